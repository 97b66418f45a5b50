"""The Stable Diffusion UNet (LDM arXiv:2112.10752), with parameter names equal to the official
`model.diffusion_model.*` keys, so a checkpoint loads with a plain strict `load_state_dict`."""
import math
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from .attention import attention
from .config import UNetConfig


def timestep_embedding(t, dim: int, max_period: int = 10000):
    """Sinusoidal embedding of integer timesteps, [cos, sin] order as in the official code; t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, eps 1e-5) with float32 statistics whatever the input dtype, as the official ResBlocks compute it
    (x.float(), then back): PyTorch's kernels already sum 16-bit inputs in float32, so no float32 copy is made."""
    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class ResBlock(nn.Module):
    """skip(x) + out_layers(in_layers(x) + emb_layers(emb)), each layer stack GroupNorm, SiLU, conv: the time step
    enters as a per-channel shift. skip is a 1x1 conv where the width changes; the last conv starts at zero."""
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # index 2 is the official (inactive) Dropout, kept so the last conv is out_layers.3
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Identity(),
                                        zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1)))
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb).type(x.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens to themselves (attn1, context None) or to the text tokens (attn2)."""
    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # official: Linear then Dropout, hence to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context          # x: (B, h*w, C) image tokens; context: (B, 77, C_text)
        q, k, v = (rearrange(f(a), "b n (h d) -> b h n d", h=self.heads)
                   for f, a in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        return self.to_out(rearrange(attention(q, k, v), "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer layer: self-attention, cross-attention to the text, GEGLU feed-forward."""
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # 1: Dropout slot
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


class SpatialTransformer(nn.Module):
    """The feature map as h*w tokens through transformer layers, added back to it: where the prompt enters the UNet.
    proj_out starts at zero, so a fresh block passes x through unchanged."""
    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, linear: bool):
        super().__init__()
        inner = heads * dim_head
        self.linear = linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = zero_module(nn.Linear(inner, channels) if linear else nn.Conv2d(inner, channels, 1))

    def forward(self, x, context):
        h, w = x.shape[2:]
        y = self.norm(x)
        if self.linear:                                           # SD2: Linear after the flatten
            y = self.proj_in(rearrange(y, "b c h w -> b (h w) c"))
        else:                                                     # SD1: 1x1 conv before it
            y = rearrange(self.proj_in(y), "b c h w -> b (h w) c")
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear:                                          # contiguous: channels-last strides slow CPU convs
            return x + rearrange(self.proj_out(y), "b (h w) c -> b c h w", h=h, w=w).contiguous()
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w).contiguous())


def downsample(channels: int) -> nn.Sequential:
    # a Sequential of one named layer only so the key reads input_blocks.{i}.0.op, as in the released files
    return nn.Sequential(OrderedDict(op=nn.Conv2d(channels, channels, 3, stride=2, padding=1)))


def upsample(channels: int) -> nn.Sequential:
    # nearest-neighbour doubling, then the conv under its released name: output_blocks.{i}.{j}.conv, upsample.conv
    return nn.Sequential(OrderedDict(nearest=nn.Upsample(scale_factor=2, mode="nearest"),
                                     conv=nn.Conv2d(channels, channels, 3, padding=1)))


class Block(nn.Sequential):
    """A row of layers, each fed what it needs: ResBlocks the time embedding, transformers the text context."""
    grad_checkpoint = False

    def forward(self, x, emb, context):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self.run, x, emb, context, use_reentrant=False)
        return self.run(x, emb, context)

    def run(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def set_grad_checkpointing(model: nn.Module, on: bool = True):
    for m in model.modules():
        if isinstance(m, Block):
            m.grad_checkpoint = on


def transformer(cfg: UNetConfig, channels: int) -> SpatialTransformer:
    heads = cfg.heads(channels)
    return SpatialTransformer(channels, heads, channels // heads, cfg.transformer_depth, cfg.context_dim,
                              cfg.use_linear_in_transformer)


def build_encoder(cfg: UNetConfig):
    """time_embed, input_blocks and middle_block: the half that ControlNet copies. Also returns each input
    block's output channels (the skip widths)."""
    mc, emb_ch = cfg.model_channels, cfg.model_channels * 4
    time_embed = nn.Sequential(nn.Linear(mc, emb_ch), nn.SiLU(), nn.Linear(emb_ch, emb_ch))
    # ds: how many times the latent has been halved so far; attention runs where ds is in attention_resolutions
    blocks, chans, ch, ds = [Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))], [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb_ch, mult * mc)]
            ch = mult * mc
            if ds in cfg.attention_resolutions:
                layers.append(transformer(cfg, ch))
            blocks.append(Block(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(Block(downsample(ch)))
            chans.append(ch)
            ds *= 2
    middle = Block(ResBlock(ch, emb_ch, ch), transformer(cfg, ch), ResBlock(ch, emb_ch, ch))
    return time_embed, nn.ModuleList(blocks), middle, chans


class UNet(nn.Module):
    """eps (or v) = UNet(x_t, t, text context), optionally joined by ControlNet residuals (arXiv:2302.05543)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.time_embed, self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        mc, emb_ch = cfg.model_channels, cfg.model_channels * 4
        ch, ds, blocks = chans[-1], 2 ** (len(cfg.channel_mult) - 1), []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):     # the decoder mirrors the encoder
            for i in range(cfg.num_res_blocks + 1):       # one block more per level: each takes one encoder skip
                layers = [ResBlock(ch + chans.pop(), emb_ch, mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(cfg, ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(upsample(ch))
                    ds //= 2
                blocks.append(Block(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(mc, cfg.out_channels, 3, padding=1)))

    def forward(self, x, timesteps, context, control=None, only_mid_control=False):
        """x: (B, 4, h, w) latent; timesteps: (B,); context: (B, 77, context_dim); control: None or one residual
        per input block plus one for the middle (13 for SD), already scaled, as ControlNet returns them."""
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        h, skips = x, []                    # SD: (B, 320, h, w) after the first block, (B, 1280, h/8, w/8) last
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1]                         # the middle residual is added even with only_mid_control
            if not only_mid_control:
                skips = [skip + residual for skip, residual in zip(skips, control)]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)    # channels: h's, then the skip's
        return self.out(h)
