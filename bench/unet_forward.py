"""One SD1.5 512x512 UNet + ControlNet forward at batch 2 on CPU, minicontrol beside diffusers on the same random
weights (converted by diffusers' own single-file converters). Each side runs in its own process so that peak
memory is its own; the printed table gives time and the memory added by the forward, and the ratio.

    python bench/unet_forward.py [--size 512] [--batch 2] [--repeats 2] [--threads N]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def build(impl):
    from helpers import diffusers_models, randomize
    from minicontrol.config import preset
    from minicontrol.controlnet import clone_encoder
    from minicontrol.model import StableDiffusion
    cfg = preset("sd15")
    torch.manual_seed(0)
    model = StableDiffusion(cfg)
    with torch.no_grad():    # the zero-initialised convs get weights too, so both outputs are non-trivial
        for name, p in model.unet.named_parameters():
            if name.startswith("out.2") or ".out_layers.3." in name or ".proj_out." in name:
                p.normal_(std=0.01)
    net = randomize(clone_encoder(model.unet), seed=1, std=0.01)
    if impl == "minicontrol":
        return cfg, model.unet.eval(), net.eval()
    unet, controlnet, _ = diffusers_models(cfg, model, net)
    return cfg, unet, controlnet


def side(args):
    from common import measure
    torch.set_num_threads(args.threads)
    cfg, unet, net = build(args.impl)
    g = torch.Generator().manual_seed(0)
    h = args.size // 8
    x = torch.randn(args.batch, 4, h, h, generator=g)
    t = torch.full((args.batch,), 500)
    ctx = torch.randn(args.batch, 77, 768, generator=g)
    hint = torch.rand(args.batch, 3, args.size, args.size, generator=g)

    def forward():
        if args.impl == "minicontrol":
            return unet(x, t, ctx, control=net(x, hint, t, ctx))
        down, mid = net(x, t, ctx, hint, return_dict=False)
        return unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    measure(args.impl, forward, args.repeats, args.out)


def main():
    from common import compare
    compare(__file__, side, lambda a: f"SD1.5 UNet + ControlNet forward, {a.size}x{a.size}, batch {a.batch}, CPU, "
            f"{a.threads} threads, torch {torch.__version__}; best of {a.repeats}",
            lambda a, o: "output relative difference "
            f"{((o['minicontrol'] - o['diffusers']).norm() / o['diffusers'].norm()).item():.2e}",
            size=512, batch=2, repeats=2)


if __name__ == "__main__":
    main()
