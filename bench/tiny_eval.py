"""Measure the tiny world's models on its two held-out groups, n items each (eval_items): the IoU of the
generated circle with the outlined disc, and the colour error of circle and background, for the base alone, with the
ControlNet, and the VAE's reconstructions (README: The tiny world).

    python bench/tiny_eval.py [--base weights/tiny_sd.safetensors] [--controlnet weights/tiny_controlnet.safetensors]
"""
import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minicontrol.export import check_out_folder
from minicontrol.files import CheckpointError
from minicontrol.loading import load_base, load_controlnet
from minicontrol.pipeline import Control, decode, sample
from minicontrol.runs import line_plot
from minicontrol.world import COLORS, GUIDANCE, SIZE, STRENGTH, draw, held_out_position, prompt, random_item

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
GROUPS = ("held-out colour pairs", "held-out corner")


def eval_items(n: int, seed: int = 1):
    """n held-out items of each group, in this order: new colour pairs (circles outside the corner), then circles
    centred in the held-out corner (colour pairs seen in training)."""
    rng = np.random.default_rng(seed)
    groups = ([], [])
    while min(map(len, groups)) < n:
        item = random_item(rng, "eval")
        group = groups[held_out_position(*item[2:4])]
        if len(group) < n:
            group.append(item)
    return groups[0] + groups[1]


def scores(images, items):
    """(IoU, colour error) averaged over images, each item (circle, background, cx, cy, r). The circle is the pixels
    nearer the named circle colour than the background's; the colour error is the mean absolute RGB error in [0, 1]."""
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


def generate(model, net, items, controls, steps, cfg, seed, strength):
    """Images (uint8 HxWx3) for the items' prompts, with the ControlNet on their outlines unless net is None."""
    hint = torch.from_numpy(np.stack(controls)).permute(0, 3, 1, 2).float() / 255.0
    prompts = [prompt(c, b) for c, b, *_ in items]
    control = [Control(net, hint, strength)] if net is not None else []
    for _, z, _ in sample(model, prompts, [""] * len(items), control, steps, cfg, height=SIZE, width=SIZE,
                          generator=torch.Generator().manual_seed(seed)):
        pass
    return list(decode(model, z))


def evaluate(base, controlnet, n=128, seed=1, steps=20, cfg=GUIDANCE, strength=STRENGTH, batch=16):
    """{model: {group: (IoU, colour error)}} for the base alone, with the ControlNet and the VAE, and image grids."""
    model = load_base(base)
    net = load_controlnet(controlnet, base=model.config)
    items = eval_items(n, seed)
    targets, controls = zip(*[draw(c, b, cx, cy, r) for c, b, cx, cy, r in items])
    grids = {"control": list(controls), "target": list(targets), "base": [], "controlnet": []}
    for i in range(0, len(items), batch):                   # each batch's noise from its own seed
        for name, use in (("base", None), ("controlnet", net)):
            grids[name] += generate(model, use, items[i:i + batch], controls[i:i + batch], steps, cfg,
                                    seed * 1000 + i, strength)
    x = torch.from_numpy(np.stack(targets)).permute(0, 3, 1, 2).float() / 127.5 - 1
    grids["vae"] = list(decode(model, model.vae.encode(x, sample=False)))        # a frozen VAE: no graph is kept
    results = {name: {group: scores(grids[name][k * n:(k + 1) * n], items[k * n:(k + 1) * n])
                      for k, group in enumerate(GROUPS)} for name in ("base", "controlnet", "vae")}
    return results, grids


def curve(run, base, n=16, seed=1, steps=20, cfg=GUIDANCE, strength=STRENGTH):
    """IoU and colour error with the ControlNet on held-out colour pairs at every checkpoint (stepN.safetensors) of
    a ControlNet training run on `base`: [(step, IoU, colour error)]."""
    model = load_base(base)
    items = eval_items(n, seed)[:n]
    controls = [draw(*item)[1] for item in items]
    rows = []
    for path in sorted(Path(run).glob("step*.safetensors")):
        images = generate(model, load_controlnet(path, base=model.config), items, controls, steps, cfg, seed * 1000,
                          strength)
        rows.append((int(path.stem[4:]), *scores(images, items)))
        print(*rows[-1], sep="\t", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=str(WEIGHTS / "tiny_sd.safetensors"))
    p.add_argument("--controlnet", default=str(WEIGHTS / "tiny_controlnet.safetensors"))
    p.add_argument("--n", type=int, default=128, help="held-out prompts and outlines per group")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=GUIDANCE, help=f"guidance scale (default {GUIDANCE}, as sample.py "
                   "uses for the tiny model)")
    p.add_argument("--strength", type=float, default=STRENGTH, help=f"control strength (default {STRENGTH}, as "
                   "sample.py uses for the tiny model)")
    p.add_argument("--grid", help="write a PNG: outline, target, base alone, with ControlNet, VAE reconstruction")
    p.add_argument("--curve", metavar="RUN", help="instead: IoU at every checkpoint of a ControlNet run folder, "
                   "written to RUN/iou.csv and RUN/iou.png (n held-out colour pairs)")
    a = p.parse_args()
    if a.n < 1 or not 1 <= a.steps <= 1000 or a.cfg < 0:
        raise SystemExit(f"error: --n must be at least 1, --steps 1 to 1000 and --cfg not negative; got --n {a.n}, "
                         f"--steps {a.steps}, --cfg {a.cfg}")
    if a.grid:
        check_out_folder(Path(a.grid).parent, "--grid")
    if a.curve:
        rows = curve(a.curve, a.base, a.n, a.seed, a.steps, a.cfg, a.strength)
        if not rows:
            raise SystemExit(f"error: {a.curve}: no step*.safetensors checkpoints; give a ControlNet run folder")
        with open(Path(a.curve) / "iou.csv", "w") as f:
            f.write("step,iou,colour_error\n" + "".join(f"{s},{i:.4f},{e:.4f}\n" for s, i, e in rows))
        line_plot(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]), Path(a.curve) / "iou.png", "IoU")
        return
    res, grids = evaluate(a.base, a.controlnet, a.n, a.seed, a.steps, a.cfg, a.strength)
    print(f"{a.n} items per group, DDIM {a.steps} steps, guidance {a.cfg}, strength {a.strength}, seed {a.seed}; "
          "IoU with the outlined disc and colour error (RGB in [0, 1])")
    print("| model | " + " | ".join(f"{g}: IoU | colour error" for g in GROUPS) + " |")
    print("|---" * (1 + 2 * len(GROUPS)) + "|")
    labels = {"base": "base model alone", "controlnet": "with the ControlNet", "vae": "VAE reconstruction"}
    for name, label in labels.items():
        print(f"| {label} | " + " | ".join(f"{iou:.3f} | {err:.3f}" for iou, err in res[name].values()) + " |")
    if a.grid:
        cols = [*range(min(4, a.n)), *range(a.n, a.n + min(4, a.n))]      # up to four of each group
        kinds = ("control", "target", "base", "controlnet", "vae")
        rows = [np.concatenate([grids[k][i] for i in cols], axis=1) for k in kinds]
        Image.fromarray(np.concatenate(rows, axis=0)).save(a.grid)


if __name__ == "__main__":
    try:
        main()
    except CheckpointError as e:              # a file or folder that will not do: one line, no traceback
        raise SystemExit(f"error: {e}")
