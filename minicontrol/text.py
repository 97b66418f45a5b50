"""CLIP text encoders on open-clip-torch: SD1's OpenAI ViT-L/14 tower (last layer) and SD2's OpenCLIP ViT-H/14
tower (penultimate layer), both followed by ln_final, plus the bundled BPE tokenizer (works offline)."""
import functools

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

from .config import TextConfig

SOT, EOT = 49406, 49407


@functools.lru_cache(maxsize=1)
def bpe() -> SimpleTokenizer:
    return SimpleTokenizer()


def token_count(prompt: str) -> int:
    """BPE tokens of a prompt, not counting the start and end tokens."""
    return len(bpe().encode(prompt))


def tokenize(prompts, cfg: TextConfig) -> torch.Tensor:
    """(B * cfg.chunks, context_length) ids: each prompt's BPE tokens in cfg.chunks pieces of context_length - 2 (the
    rest cut), each piece as SOT, its tokens, EOT, then cfg.pad_id up to the length."""
    n = cfg.context_length - 2
    rows = []
    for prompt in prompts:
        tokens = bpe().encode(prompt)
        for k in range(cfg.chunks):
            ids = [SOT] + tokens[k * n:(k + 1) * n] + [EOT]
            rows.append(ids + [cfg.pad_id] * (cfg.context_length - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class TextEncoder(nn.Module):
    """Tokens (B, 77) -> context (B, 77, width). Module names are open_clip's, i.e. SD2's keys after
    `cond_stage_model.model.`; SD1's HF-layout keys go through names.py's `from_hf` / `to_hf`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        act = QuickGELU if cfg.activation == "quick_gelu" else nn.GELU
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, cfg.width) * 0.01)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(cfg.width, cfg.heads, act_layer=act) for _ in range(cfg.layers))
        self.ln_final = LayerNorm(cfg.width)
        if cfg.layout == "open_clip":   # kept only so SD2 files load strictly; the conditioning never uses them
            self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.width).normal_(std=cfg.width ** -0.5))
            self.logit_scale = nn.Parameter(torch.tensor(4.6052))

    def forward(self, tokens):
        x = self.token_embedding(tokens) + self.positional_embedding
        n = tokens.shape[1]
        causal = torch.full((n, n), float("-inf"), device=x.device).triu(1)   # token i sees tokens 0..i
        depth = self.config.layers - (1 if self.config.layer == "penultimate" else 0)
        for block in self.transformer.resblocks[:depth]:
            x = block(x, attn_mask=causal)
        return self.ln_final(x)

    def encode(self, prompts):
        """Prompts -> (B, chunks * 77, width): the chunks of a prompt, each encoded alone, one after another."""
        x = self(tokenize(prompts, self.config).to(self.positional_embedding.device))
        return x.reshape(len(prompts), -1, x.shape[-1])
