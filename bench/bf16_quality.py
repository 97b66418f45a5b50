"""bfloat16 against float32 on the CPU, the UNet and ControlNet cast as sample.py casts them on a CPU with bfloat16
instructions (the VAE and text encoder stay float32), their convolutions and linear layers packed for oneDNN as
sample.py packs them:

  * the tiny world's evaluation (bench/tiny_eval.py's scores, the same held-out items, seeds and settings): IoU and
    colour error of the shipped ControlNet in each dtype;
  * SD1.5-sized random weights (bench/unet_forward.py's): at every step of a 20-step guided DDIM run driven by the
    float32 model, both models' outputs on the same x_t (the conditional one, and the guided one at guidance 9, which
    multiplies the conditional and unconditional outputs' difference by 9), relative L2 difference.

    python bench/bf16_quality.py [--n 128] [--size 256] [--steps 20]
"""
import argparse
import os
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def tiny_world(n, dtype):
    """{group: (IoU, colour error)} of the shipped tiny ControlNet, its UNet and ControlNet in `dtype`."""
    from tiny_eval import GROUPS, WEIGHTS, generate, scores
    from minicontrol.loading import load_base, load_controlnet
    from minicontrol.world import GUIDANCE, STRENGTH, draw
    from tiny_eval import eval_items
    from minicontrol.cpu import pack_weights
    model = load_base(WEIGHTS / "tiny_sd.safetensors")
    net = load_controlnet(WEIGHTS / "tiny_controlnet.safetensors", base=model.config).to(dtype)
    model.unet.to(dtype)
    pack_weights(net)
    pack_weights(model.unet)
    items = eval_items(n, 1)
    controls = [draw(*item)[1] for item in items]
    images = []
    for i in range(0, len(items), 16):               # eval.evaluate's batches and seeds
        images += generate(model, net, items[i:i + 16], controls[i:i + 16], 20, GUIDANCE, 1000 + i, STRENGTH)
    return {group: scores(images[k * n:(k + 1) * n], items[k * n:(k + 1) * n]) for k, group in enumerate(GROUPS)}


def guided(unet, net, x, t, context, hint, dtype, cfg=9.0):
    """(the conditional output, classifier-free guidance's) with the control in both halves, as pipeline.sample
    does."""
    xx = torch.cat([x, x]).to(dtype)
    tt = torch.full((2,), t)
    out = unet(xx, tt, context.to(dtype), net(xx, hint.to(dtype), tt, context.to(dtype))).float()
    cond, uncond = out.chunk(2)
    return cond, uncond + cfg * (cond - uncond)


def sd15_steps(size, steps):
    """The relative differences of bfloat16's conditional and guided outputs from float32's at each DDIM step."""
    from minicontrol.cpu import pack_weights
    from minicontrol.ddim import ddim_sample
    from unet_forward import build
    _, unet, net = build("minicontrol")
    half = [m for m in build("minicontrol", dtype=torch.bfloat16)[1:]]
    for m in [unet, net] + half:
        pack_weights(m)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(1, 4, size // 8, size // 8, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    hint = torch.rand(2, 3, size, size, generator=g)
    diffs = []

    def model(x, t, i):
        full = guided(unet, net, x, t, context, hint, torch.float32)
        low = guided(*half, x, t, context, hint, torch.bfloat16)
        diffs.append([((b - a).norm() / a.norm()).item() for a, b in zip(full, low)])
        return full[1]
    with torch.inference_mode():
        for _ in ddim_sample(model, x_T, steps):
            pass
    return diffs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=128)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"tiny world, {a.n} items per group, DDIM 20 steps: IoU and colour error")
    for dtype in (torch.float32, torch.bfloat16):
        for group, (iou, err) in tiny_world(a.n, dtype).items():
            print(f"  {str(dtype)[6:]:9s} {group:22s} IoU {iou:.3f}  colour error {err:.3f}")
    diffs = np.array(sd15_steps(a.size, a.steps))
    print(f"SD1.5-sized random weights, {a.size}x{a.size}: bfloat16 vs float32 model output at each DDIM step, "
          "relative L2")
    for k, name in enumerate(("conditional", "guided (9)")):
        print(f"  {name:12s} max {diffs[:, k].max():.4f} mean {diffs[:, k].mean():.4f}: "
              + " ".join(f"{d:.4f}" for d in diffs[:, k]))


if __name__ == "__main__":
    main()
