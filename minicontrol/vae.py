"""The KL autoencoder of latent diffusion (LDM arXiv:2112.10752), named as the official `first_stage_model.*` keys."""
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import attention
from .config import VAEConfig
from .ddim import gaussian
from .unet import upsample


def norm(channels: int) -> nn.GroupNorm:
    # every VAE norm: 32 groups, eps 1e-6 (the UNet's ResBlocks use 1e-5)
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv(swish(norm(conv(swish(norm(x)))))): the UNet's ResBlock without the time step; a 1x1 shortcut where
    the width changes."""
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)    # Identity: no weights

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """One head over all H*W positions; q, k, v and proj_out are 1x1 convs in the released files."""
    def __init__(self, c: int):
        super().__init__()
        self.norm = norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        out = rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=x.shape[2]).contiguous()
        return x + self.proj_out(out)


def downsample(c: int) -> nn.Sequential:
    # an asymmetric zero pad, then an unpadded stride-2 conv under its released name (down.{i}.downsample.conv)
    return nn.Sequential(OrderedDict(pad=nn.ZeroPad2d((0, 1, 0, 1)), conv=nn.Conv2d(c, c, 3, stride=2)))


def mid_block(c: int) -> nn.Sequential:
    # Sequentials of named layers: they run in order, under the released files' names (mid.block_1, up.0.upsample)
    return nn.Sequential(OrderedDict(block_1=ResnetBlock(c, c), attn_1=AttnBlock(c), block_2=ResnetBlock(c, c)))


def level(blocks, name: str, resample: nn.Module) -> nn.Sequential:
    # the resampling is named downsample or upsample; the last level's is an Identity
    return nn.Sequential(OrderedDict([("block", nn.Sequential(*blocks)), (name, resample)]))


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, 2 * z_channels, H/f, W/f): posterior mean and log-variance; f = 2 ** (levels - 1)."""
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down, c = nn.Sequential(), cfg.ch          # the levels in the order they run, down.0 first
        for i, w in enumerate(widths):
            blocks = [ResnetBlock(c if j == 0 else w, w) for j in range(cfg.num_res_blocks)]
            down = downsample(w) if i != len(widths) - 1 else nn.Identity()
            self.down.append(level(blocks, "downsample", down))
            c = w
        self.mid = mid_block(c)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)   # mean and log-variance

    def forward(self, x):
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, H/f, W/f) latent -> (B, 3, H, W) image in about [-1, 1]; the encoder's mirror with one block more
    per level."""
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        c = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = mid_block(c)
        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):            # built deepest first, stored shallowest first (up.0 ...)
            blocks = [ResnetBlock(c if j == 0 else widths[i], widths[i]) for j in range(cfg.num_res_blocks + 1)]
            c = widths[i]
            self.up.insert(0, level(blocks, "upsample", upsample(c) if i != 0 else nn.Identity()))
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for lvl in reversed(self.up):
            h = lvl(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """Images in [-1, 1], (B, 3, H, W) <-> latents (B, 4, H/8, W/8) times scale_factor: SD's 0.18215 brings the
    latents diffusion works on (LDM arXiv:2112.10752) to about the unit variance the noise schedule assumes."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def moments(self, x):
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)          # as the official posterior, so exp(logvar) stays finite

    def forward(self, x, noise, extra=0.0):
        """Reconstruction through a posterior sample (noise ~ N(0, I) of the latent's shape) plus `extra` (added
        latent noise, for training the decoder alone), with the moments."""
        mean, logvar = self.moments(x)
        return self.decoder(self.post_quant_conv(mean + torch.exp(0.5 * logvar) * noise + extra)), mean, logvar

    def encode(self, x, generator=None, sample=True, n=1):
        """Scaled latent: a sample of the posterior (n of each image, one after another: the encoder runs once), as
        LDM training uses, or its mean with sample=False."""
        mean, logvar = self.moments(x)
        if sample:
            mean, logvar = mean.repeat_interleave(n, dim=0), logvar.repeat_interleave(n, dim=0)
            mean = mean + torch.exp(0.5 * logvar) * gaussian(mean, generator)
        return mean * self.config.scale_factor

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z / self.config.scale_factor))
