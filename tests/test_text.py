"""Text encoders against transformers' CLIPTextModel; tokenizer padding against independent tokenizers."""
import json
from dataclasses import replace

import open_clip
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from minicontrol.config import preset
from minicontrol.names import from_hf, to_hf
from minicontrol.text import TextEncoder, tokenize


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


def hf_tokenizer(folder):
    """An HF CLIPTokenizer built from the BPE files: pads with <|endoftext|> (49407), as SD1's FrozenCLIPEmbedder."""
    bpe = open_clip.tokenizer.SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = vocab.pop("<start_of_text>"), vocab.pop("<end_of_text>")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def test_sd1_tokens_match_hf_clip_tokenizer(tmp_path):
    tok = hf_tokenizer(tmp_path)
    want = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    assert tokenize(PROMPTS, preset("sd15").text).tolist() == want


def test_sd2_tokens_match_open_clip_tokenize():
    assert torch.equal(tokenize(PROMPTS, preset("sd21").text), open_clip.tokenize(PROMPTS))


def test_three_chunks_and_clip_skip_2_match_the_lineart_anime_demo(tmp_path):
    # cldm/hack.py, which the official 1.1 lineart_anime demo runs: the untruncated tokens in three pieces of 75, each
    # as BOS + piece + EOS padded to 77, encoded alone (hidden_states[-2], then final_layer_norm), joined to 231
    tok = hf_tokenizer(tmp_path)
    cfg = replace(preset("tiny-sd1").text, layer="penultimate", chunks=3)
    hf = hf_model(cfg)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(from_hf(hf_layout(hf), cfg.layers))
    prompts = ["a red circle", "word " * 160, "", "sky " * 250]                # the last one is cut at 225
    rows = []
    for ids in tok(prompts, truncation=False, add_special_tokens=False)["input_ids"]:
        for piece in (ids[0:75], ids[75:150], ids[150:225]):
            row = [tok.bos_token_id] + piece + [tok.eos_token_id]
            rows.append(row + [tok.pad_token_id] * (77 - len(row)))
    with torch.no_grad():
        want = hf.final_layer_norm(hf(torch.tensor(rows), output_hidden_states=True).hidden_states[-2])
        got = ours.encode(prompts)
    assert got.shape == (4, 231, cfg.width)
    assert ((got - want.reshape(4, 231, -1)).norm() / want.norm()).item() <= 1e-5


# open_clip's releases on PyPI, read: up to 2.24.0 ResidualAttentionBlock runs nn.MultiheadAttention sequence first,
# (N, B, C); 2.25.0 and 2.26.0 were never published; 2.26.1 is the first whose blocks take batch_first=True (its
# PR #906). TextEncoder gives them (B, N, C), so setup.cfg's floor keeps the older ones out.
FIRST_BATCH_FIRST = "2.26.1"


def test_open_clip_floor_is_the_first_batch_first_release():
    import re
    from pathlib import Path
    setup = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert re.search(r"^\s*open-clip-torch>=(\S+)$", setup, re.M).group(1) == FIRST_BATCH_FIRST


def test_a_batch_of_prompts_encodes_as_each_prompt_alone():
    # what the installed open_clip's blocks give this encoder's (B, N, C) tokens: each prompt attends to itself
    # alone, as in transformers' CLIPTextModel
    from open_clip.transformer import ResidualAttentionBlock
    assert ResidualAttentionBlock(8, 2).attn.batch_first
    cfg = preset("tiny-sd1").text
    hf = hf_model(cfg)
    ours = TextEncoder(cfg).eval()
    ours.load_state_dict(from_hf(hf_layout(hf), cfg.layers))
    prompts = ["a red circle", "a blue square on a green background", ""]
    with torch.no_grad():
        together = ours.encode(prompts)
        alone = torch.cat([ours.encode([p]) for p in prompts])
        want = hf(tokenize(prompts, cfg)).last_hidden_state
    assert ((alone - want).norm() / want.norm()).item() <= 1e-5
    assert ((together - alone).norm() / alone.norm()).item() <= 1e-6
