"""Writing checkpoints: atomic saves, the official layouts, and the command:
    python -m minicontrol.export SRC DST [--half] [--part all|sd|control]"""
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from .config import ModelConfig
from .controlnet import ControlNet
from .ddim import schedule_buffers
from .files import CONFIG_KEY, CheckpointError, diffusers_config, read
from .identify import WHAT, kind
from .model import StableDiffusion
from .names import CONTROL, from_diffusers


def check_out_folder(folder, flag="--out"):
    """A CheckpointError unless files can be written in `folder` (made later if absent), checked without writing."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{flag} {folder}: {path} is a file; give a folder")
    if not os.access(path, os.W_OK):
        raise CheckpointError(f"{flag} {folder}: {path} cannot be written; give a folder you can write")


def save(path, state_dict: dict, config: ModelConfig = None):
    """Write atomically (temporary file, then rename): safetensors for .safetensors, else a plain torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        if path.suffix == ".safetensors":
            safetensors.torch.save_file(tensors, tmp, metadata={CONFIG_KEY: config.to_json()} if config else None)
        else:
            torch.save(tensors, tmp)
        os.chmod(tmp, 0o644)                                 # mkstemp makes it private
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)                   # the temporary file where writing it failed


def controlnet_state_dict(net: ControlNet, layout: str = "1.1") -> dict:
    """`control_model.*` keys (1.1 layout, what the official 1.1 scripts and other tools load) or bare ("extracted")."""
    prefix = CONTROL if layout == "1.1" else ""
    return {prefix + k: v for k, v in net.state_dict().items()}


def full_state_dict(model: StableDiffusion, net: ControlNet = None) -> dict:
    """The official ControlLDM layout: SD parts, control_model.* (1.0 full file) and the 13 schedule buffers."""
    sd = model.official_state_dict()
    if net is not None:
        sd.update(controlnet_state_dict(net))
    sd.update(schedule_buffers())
    return sd


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="rewrite a checkpoint as .safetensors (same keys; a ControlNet saved by "
                                "diffusers in the 1.1 layout), optionally in float16; split a ControlNet 1.0 full file "
                                "into its SD and its control_model.* (1.1) parts")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    p.add_argument("--part", choices=["all", "sd", "control"], default="all",
                   help="keep every key, the SD's alone (no control_model.*), or control_model.* alone")
    a = p.parse_args()
    if Path(a.dst).is_dir() or Path(a.dst).suffix not in (".safetensors", ".ckpt", ".pth"):
        raise SystemExit(f"error: {a.dst}: give the new file's name, ending in .safetensors (or .ckpt or .pth)")
    try:
        check_out_folder(Path(a.dst).parent, "dst")
        sd, meta = read(a.src)
        settings = diffusers_config(a.src) if kind(sd) == "controlnet-diffusers" else None
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    if settings is not None:
        sd = {CONTROL + k: v for k, v in from_diffusers(sd, settings).items()}
        if settings.get("global_pool_conditions"):
            print(f"note: {a.src} pools its residuals; keep a yaml saying global_average_pooling: True beside {a.dst} "
                  "under its name, as the official shuffle model's")
    if a.part != "all":
        sd = {k: v for k, v in sd.items() if k.startswith(CONTROL) == (a.part == "control")}
        if kind(sd) != ("controlnet-1.1" if a.part == "control" else "sd"):
            raise SystemExit(f"error: {a.src}: no {a.part} part; --part sd and control split a ControlNet 1.0 "
                             "full file")
    if a.half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save(a.dst, sd, ModelConfig.from_json(meta) if meta else None)
    print(f"wrote {a.dst}: {len(sd)} tensors, {WHAT[kind(sd)]}")
