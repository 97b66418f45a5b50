"""ControlNet training steps on CPU: minicontrol's UNet + ControlNet beside diffusers' UNet2DConditionModel +
ControlNetModel on the same weights (converted by diffusers' own converters), the step train.py takes: the locked
UNet, noisy latents at random t, MSE on eps, backward through the ControlNet only, AdamW. Each side in its own process.

    python bench/train_step.py [--steps 5] [--batch 4] [--latent 32] [--bf16 0|1] [--threads N]

--bf16 1: both sides under torch.autocast("cpu", bfloat16), as train.py --precision bf16 (and diffusers' training
scripts with --mixed_precision bf16) run them. minicontrol with train.py's allocator setting on the CPU.
"""
import json
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def config():
    from minicontrol.config import preset
    cfg = preset("tiny-sd1")     # tiny but not trivial: 3 levels, 2 res blocks, attention at two of them
    unet = replace(cfg.unet, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                   num_heads=4, context_dim=128)
    return replace(cfg, unet=unet)


def side(args):
    from common import PeakRSS
    from helpers import diffusers_models, randomize
    from minicontrol.controlnet import clone_encoder
    from minicontrol.ddim import alphas_cumprod
    from minicontrol.model import StableDiffusion
    torch.set_num_threads(args.threads)
    if args.impl == "minicontrol":
        from minicontrol.cpu import keep_freed_memory
        keep_freed_memory()                          # as train.py on the CPU
    cfg = config()
    torch.manual_seed(0)
    model = StableDiffusion(cfg)
    randomize(model.unet, seed=0, std=0.02)
    net = clone_encoder(model.unet)
    unet = model.unet
    if args.impl == "diffusers":
        unet, net, _ = diffusers_models(cfg, model, net)
    unet.requires_grad_(False)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    ac = alphas_cumprod().float()
    b, h = args.batch, args.latent

    def step():
        x0, noise = torch.randn(b, 4, h, h, generator=g), torch.randn(b, 4, h, h, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        ctx, hint = torch.randn(b, 77, cfg.unet.context_dim, generator=g), torch.rand(b, 3, 8 * h, 8 * h, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast("cpu", torch.bfloat16, enabled=bool(args.bf16)):      # train.py --precision bf16
            if args.impl == "minicontrol":
                out = unet(x_t, t, ctx, control=net(x_t, hint, t, ctx))
            else:
                down, mid = net(x_t, t, ctx, hint, return_dict=False)
                out = unet(x_t, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    with PeakRSS() as mem:
        step()
        step()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    seconds = (time.perf_counter() - start) / args.steps
    torch.save(torch.tensor(losses), args.out)
    print(json.dumps({"impl": args.impl, "seconds": seconds, "peak_extra_mb": mem.extra / 2 ** 20}))


def main():
    from common import compare
    compare(__file__, side, lambda a: f"ControlNet training step (model_channels 64, 3 levels, latents {a.latent}x"
            f"{a.latent}, batch {a.batch}), {'bf16 autocast' if a.bf16 else 'fp32'}, CPU, {a.threads} threads, torch {torch.__version__}; mean of {a.steps} steps "
            "after 2 warm-up steps; time is seconds per step",
            lambda a, o: f"largest loss difference {(o['minicontrol'] - o['diffusers']).abs().max().item():.1e}",
            steps=5, batch=4, latent=32, bf16=0)


if __name__ == "__main__":
    main()
