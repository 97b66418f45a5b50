"""Measure the tiny world's models on held-out colour pairs and circle positions:

* control fidelity: IoU between the generated circle (pixels nearer the named circle colour than the background's)
  and the outlined disc;
* prompt fidelity: mean absolute RGB error (in [0, 1]) of the circle and of the background against the named colours;
* the VAE: the same IoU and colour error on reconstructions, and their mean absolute pixel error.

    python -m minicontrol.eval [--base weights/tiny_sd.safetensors] [--controlnet weights/tiny_controlnet.safetensors]
"""
import argparse
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_base, load_controlnet
from .pipeline import Control, decode, sample
from .world import COLORS, SIZE, draw, prompt, random_item

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def scores(images, items):
    """(IoU, colour error) averaged over images, each item (circle, background, cx, cy, r)."""
    ious, errs = [], []
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    for img, (c, b, cx, cy, r) in zip(images, items):
        x = img.astype(np.float32) / 255.0
        fg, bg = np.array(COLORS[c]) / 255.0, np.array(COLORS[b]) / 255.0
        mask = ((x - fg) ** 2).sum(-1) < ((x - bg) ** 2).sum(-1)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= r ** 2
        ious.append((mask & disc).sum() / max(1, (mask | disc).sum()))
        circle_err = np.abs(x[mask] - fg).mean() if mask.any() else 1.0
        back_err = np.abs(x[~mask] - bg).mean() if (~mask).any() else 1.0
        errs.append((circle_err + back_err) / 2)
    return float(np.mean(ious)), float(np.mean(errs))


def evaluate(base, controlnet, n=64, seed=1, steps=20, cfg=9.0, batch=16):
    model = load_base(base)
    net = load_controlnet(controlnet, base=model.config)
    rng = np.random.default_rng(seed)
    items = [random_item(rng, "eval") for _ in range(n)]
    targets, controls = zip(*[draw(c, b, cx, cy, r) for c, b, cx, cy, r in items])
    results, grids = {}, {}
    for name, use in (("base", False), ("controlnet", True)):
        images = []
        for i in range(0, n, batch):
            chunk = items[i:i + batch]
            hint = torch.from_numpy(np.stack(controls[i:i + batch])).permute(0, 3, 1, 2).float() / 255.0
            g = torch.Generator().manual_seed(seed * 1000 + i)
            for _, z, _ in sample(model, [prompt(c, b) for c, b, *_ in chunk], [""] * len(chunk),
                                  [Control(net, hint)] if use else [], steps, cfg, height=SIZE, width=SIZE, generator=g):
                pass
            images += list(decode(model, z))
        results[name] = scores(images, items)
        grids[name] = images
    with torch.no_grad():
        x = torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = decode(model, model.vae.encode(x, sample=False))
    results["vae"] = scores(rec, items) + (float(np.abs(rec.astype(np.float32) - np.stack(targets)).mean() / 255),)
    grids["vae"], grids["control"], grids["target"] = list(rec), list(controls), list(targets)
    return results, grids


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(WEIGHTS / "tiny_sd.safetensors"))
    p.add_argument("--controlnet", default=str(WEIGHTS / "tiny_controlnet.safetensors"))
    p.add_argument("--n", type=int, default=64, help="held-out prompts and outlines")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=9.0)
    p.add_argument("--grid", help="write a PNG: outline, target, base alone, with ControlNet, VAE reconstruction")
    a = p.parse_args()
    torch.set_grad_enabled(False)
    res, grids = evaluate(a.base, a.controlnet, a.n, a.seed, a.steps, a.cfg)
    print(f"held-out: {a.n} prompts and outlines, DDIM {a.steps} steps, guidance {a.cfg}, seed {a.seed}")
    print("| model | IoU with the outlined disc | colour error (RGB in [0, 1]) |")
    print("|---|---:|---:|")
    print(f"| base model alone | {res['base'][0]:.3f} | {res['base'][1]:.3f} |")
    print(f"| with the ControlNet | {res['controlnet'][0]:.3f} | {res['controlnet'][1]:.3f} |")
    print(f"| VAE reconstruction | {res['vae'][0]:.3f} | {res['vae'][1]:.3f} (pixel error {res['vae'][2]:.3f}) |")
    if a.grid:
        from PIL import Image
        rows = [np.concatenate(grids[k][:8], axis=1) for k in ("control", "target", "base", "controlnet", "vae")]
        Image.fromarray(np.concatenate(rows, axis=0)).save(a.grid)


if __name__ == "__main__":
    main()
