"""A training run's folder: state.pt, written atomically and read back so that a killed run resumes exactly, and the
loss log with its plot."""
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .cli import UsageError
from .files import reason


class RunError(UsageError):
    """A run folder that cannot be continued; the message says what to do."""


def save_state(path, run: dict, step: int):
    """state.pt: all a resumed run needs to go on exactly, written to a temporary file and renamed (a kill leaves the
    old state or the new). run: trained (a module), extra (parameters outside it), optimizer, scaler, generator."""
    state = {"trained": run["trained"].state_dict(), "extra": [p.detach() for p in run["extra"]], "step": step,
             "optimizer": run["optimizer"].state_dict(), "scaler": run["scaler"].state_dict(),
             "generator": run["generator"].get_state()}
    torch.save(state, path.with_suffix(".pt.tmp"))
    os.replace(path.with_suffix(".pt.tmp"), path)


def read_state(path) -> dict:
    """state.pt memory-mapped (read as used), so that every process checks its step before heavy work."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:                                    # a copy cut short, or not a file torch.save wrote
        raise RunError(f"{path}: cannot be read ({reason(e)}); copy it again, or give another --out")


def load_state(state: dict, path, run: dict, lr: float):
    """save_state's contents back into the run's objects; the learning rate given now wins over the saved one."""
    try:
        run["trained"].load_state_dict(state["trained"])
        for p, v in zip(run["extra"], state["extra"]):          # a count that differs fails in the optimizer
            p.data.copy_(v)
        run["optimizer"].load_state_dict(state["optimizer"])
        for kept in run["optimizer"].state.values():  # copies, not views of the file that the next save replaces
            kept.update({k: v.clone() for k, v in kept.items() if torch.is_tensor(v)})
        if state.get("scaler"):                                # a run saved in fp16 keeps its loss scale
            run["scaler"].load_state_dict(state["scaler"])
    except (RuntimeError, ValueError) as e:
        raise RunError(f"{path} is a run with other settings ({reason(e)}); resume with its --stage, --base, "
                       "--controlnet and --sd-unlocked, or give another --out")
    for group in run["optimizer"].param_groups:
        group["lr"] = lr
    run["generator"].set_state(state["generator"])


def log_loss(out: Path, step: int, loss: float):
    """A row of loss.csv (step, loss, time), the header first in a new file."""
    with open(out / "loss.csv", "a") as f:
        if f.tell() == 0:                                     # appending: at the end of the file, 0 if it is new
            f.write("step,loss,time\n")
        f.write(f"{step},{loss:.6f},{time.time():.1f}\n")


def trim_log(out: Path, step: int):
    """Drop the loss.csv rows logged after the checkpoint a run resumes from."""
    if (out / "loss.csv").exists():
        rows = (out / "loss.csv").read_text().splitlines()
        keep = [r for r in rows[1:] if int(r.split(",")[0]) <= step]
        (out / "loss.csv").write_text("\n".join(rows[:1] + keep) + "\n")


def plot_loss(csv_path, png_path):
    """loss.csv as a line (mean over 1% windows)."""
    loss = np.loadtxt(csv_path, delimiter=",", skiprows=1, usecols=1, ndmin=1)
    if len(loss) < 2:
        return
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    line_plot(np.arange(len(smooth)) + k, smooth, png_path, "loss")


def line_plot(x, y, png_path, label, width=640, height=320):
    """A line chart with PIL alone, so plots need nothing beyond the runtime dependencies."""
    lo, hi = float(np.min(y)), float(np.max(y)) + 1e-12
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    span = max(1e-12, float(x[-1] - x[0]))
    d.line([(40 + (a - x[0]) / span * (width - 50), height - 30 - (b - lo) / (hi - lo) * (height - 50))
            for a, b in zip(x, y)], fill=(30, 70, 220), width=2)
    d.text((5, 5), f"{label} {hi:.4f}", fill="black")
    d.text((5, height - 20), f"{lo:.4f}   steps {x[0]}..{x[-1]}", fill="black")
    img.save(png_path)
