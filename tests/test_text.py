"""Text encoders against transformers' CLIPTextModel; tokenizer padding against independent tokenizers."""
import json
from dataclasses import replace

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minicontrol.config import preset
from minicontrol.text import TextEncoder, from_hf, to_hf, tokenize


def hf_model(cfg, seed=0):
    hf = CLIPTextModel(CLIPTextConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                                      num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                      max_position_embeddings=cfg.context_length, hidden_act=cfg.activation))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=g) + (1 if p.dim() == 1 and p.shape[0] == cfg.width else 0))
    return hf.eval()


def hf_layout(hf):
    return {k.removeprefix("text_model."): v for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("name, layer", [("tiny-sd1", None), ("tiny-sd1", "penultimate"), ("tiny-sd2", None)])
def test_text_encoder_matches_transformers(name, layer):
    # SD1 with the penultimate layer is sample.py's --clip-skip 2: the official 1.1 demos' hidden_states[-2] then
    # final_layer_norm (cldm/hack.py)
    cfg = replace(preset(name).text, layer=layer or preset(name).text.layer)
    hf = hf_model(cfg)
    ours = TextEncoder(cfg).eval()
    sd = from_hf(hf_layout(hf), cfg.layers)
    if cfg.layout == "open_clip":
        sd["text_projection"], sd["logit_scale"] = ours.text_projection.detach(), ours.logit_scale.detach()
    ours.load_state_dict(sd, strict=True)
    tokens = tokenize(["a red circle on a blue background", ""], cfg)
    with torch.no_grad():
        got = ours(tokens)
        out = hf(tokens, output_hidden_states=True)
        # SD1: last layer then final LayerNorm; SD2: penultimate layer then final LayerNorm
        want = out.last_hidden_state if cfg.layer == "last" else hf.final_layer_norm(out.hidden_states[-2])
    assert ((got - want).norm() / want.norm()).item() <= 1e-5


def test_hf_mapping_round_trips():
    cfg = preset("tiny-sd1").text
    hf = hf_layout(hf_model(cfg))
    back = to_hf(from_hf(hf, cfg.layers), cfg.layers)
    assert set(back) == set(hf) | {"embeddings.position_ids"}
    assert all(torch.equal(back[k], hf[k]) for k in hf)
    assert torch.equal(back["embeddings.position_ids"], torch.arange(77)[None])


PROMPTS = ["a red circle, on Blue background!!", "", "word " * 100]


def test_sd1_tokens_match_hf_clip_tokenizer(tmp_path):
    # an HF CLIPTokenizer built from the BPE files: pads with <|endoftext|> (49407), as SD1's FrozenCLIPEmbedder
    bpe = open_clip.tokenizer.SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    want = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenize(PROMPTS, preset("sd15").text).tolist() == want


def test_sd2_tokens_match_open_clip_tokenize():
    assert torch.equal(tokenize(PROMPTS, preset("sd21").text), open_clip.tokenize(PROMPTS))
