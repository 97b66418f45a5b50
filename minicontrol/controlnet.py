"""ControlNet (Zhang & Agrawala, arXiv:2302.05543): a trainable copy of the UNet's encoder half, fed the control
image through a small conv stack, joined back to the locked UNet by zero-initialised 1x1 convolutions."""
import torch.nn as nn

from .config import UNetConfig
from .unet import UNet, build_encoder, timestep_embedding, zero_module


def zero_conv(channels: int) -> nn.Sequential:
    # a Sequential only so the key reads zero_convs.{i}.0.weight, as in the released files
    return nn.Sequential(zero_module(nn.Conv2d(channels, channels, 1)))


def hint_block(hint_channels: int, model_channels: int) -> nn.Sequential:
    """Control image at pixel resolution (B, 3, 8h, 8w) in [0, 1] -> (B, model_channels, h, w); last conv zeroed."""
    widths, strides = (hint_channels, 16, 16, 32, 32, 96, 96, 256), (1, 1, 2, 1, 2, 1, 2)
    layers = []
    for c_in, c_out, stride in zip(widths, widths[1:], strides):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU()]
    return nn.Sequential(*layers, zero_module(nn.Conv2d(256, model_channels, 3, padding=1)))


class ControlNet(nn.Module):
    """y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)   (arXiv:2302.05543, eq. 2)

    Returns one residual per UNet input block plus one for the middle block, each multiplied by its control scale
    (and, for the 1.1 shuffle model, pooled to 1x1): exactly what `UNet.forward(control=...)` adds."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.time_embed, self.input_blocks, self.middle_block, chans = build_encoder(cfg)
        self.input_hint_block = hint_block(cfg.hint_channels, cfg.model_channels)
        self.zero_convs = nn.ModuleList(zero_conv(c) for c in chans)
        self.middle_block_out = zero_conv(chans[-1])

    def forward(self, x, hint, timesteps, context, scales=1.0):
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(x.dtype))
        h, outs = x, []                                           # x: (B, 4, h, w) noisy latent
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + self.input_hint_block(hint)               # (B, 3, 8h, 8w) -> (B, C, h, w)
            outs.append(zero(h))
        outs.append(self.middle_block_out(self.middle_block(h, emb, context)))
        if not isinstance(scales, (list, tuple)):
            scales = [scales] * len(outs)
        outs = [o * s for o, s in zip(outs, scales)]
        if self.config.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
        return outs


def clone_encoder(unet: UNet) -> ControlNet:
    """The trainable copy: `control_model.X <- model.diffusion_model.X` for the encoder half, as the official
    tool_add_control does; the hint block keeps its default init (last conv zero) and every zero conv is zero."""
    net = ControlNet(unet.config).to(next(unet.parameters()).device)
    for name in ("time_embed", "input_blocks", "middle_block"):
        getattr(net, name).load_state_dict(getattr(unet, name).state_dict())     # copies; shares no storage
    return net


def guess_mode_scales(strength: float, n: int = 13):
    """Official guess mode: the deepest residual keeps `strength`, each shallower one is 0.825 times the next."""
    return [strength * 0.825 ** (n - 1 - i) for i in range(n)]
