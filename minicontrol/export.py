"""Writing checkpoints: atomic saves, the official layouts, a ControlNet moved to another base, and the command:
    python -m minicontrol.export SRC DST [--half] [--part all|sd|control] [--transfer OLD NEW]"""
import os
import tempfile
from pathlib import Path

import safetensors.torch
import torch

from .config import ModelConfig
from .controlnet import ControlNet
from .ddim import schedule_buffers
from .files import CONFIG_KEY, CheckpointError, diffusers_config, read
from .identify import WHAT, family, kind
from .model import StableDiffusion
from .names import CONTROL, UNET, VAE, from_diffusers


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
        if os.path.exists(tmp):
            os.remove(tmp)


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


def transfer(sd: dict, old: dict, new: dict) -> dict:
    """A ControlNet trained on base `old` moved to base `new`, as the official tool_transfer_control.py does: each
    weight w whose UNet counterpart (control_model.X as model.diffusion_model.X) both bases have becomes w + new - old;
    the rest (hint block, zero convolutions) stay; a 1.0 full file's VAE and text encoder become new's."""
    out = {}
    for key, w in sd.items():
        unet_key = UNET + key[len(CONTROL):] if key.startswith(CONTROL) else key
        if key.startswith((VAE, "cond_stage_model.")):
            out[key] = new[key]
        elif unet_key in old and unet_key in new:
            out[key] = (w.float() + new[unet_key].float() - old[unet_key].float()).to(w.dtype)
        else:
            out[key] = w
    return out


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="rewrite a checkpoint as .safetensors (same keys; a ControlNet saved by "
                                "diffusers in the 1.1 layout), optionally in float16; split a ControlNet 1.0 full file "
                                "into its SD and its control_model.* (1.1) parts; or move a ControlNet to another base")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as float16")
    p.add_argument("--part", choices=["all", "sd", "control"], default="all",
                   help="keep every key, the SD's alone (no control_model.*), or control_model.* alone")
    p.add_argument("--transfer", nargs=2, metavar=("OLD", "NEW"), help="src is a ControlNet (1.0 or 1.1) trained on "
                   "base OLD (v1-5-pruned.ckpt): add NEW - OLD to its weights for base NEW, as the official "
                   "tool_transfer_control.py does")
    a = p.parse_args()
    if Path(a.dst).is_dir() or Path(a.dst).suffix not in (".safetensors", ".ckpt", ".pth"):
        raise SystemExit(f"error: {a.dst}: give the new file's name, ending in .safetensors (or .ckpt or .pth)")
    try:
        check_out_folder(Path(a.dst).parent, "dst")
        sd, meta = read(a.src)
        bases = [read(f)[0] for f in a.transfer or ()]
        settings = diffusers_config(a.src) if kind(sd) == "controlnet-diffusers" else None
    except CheckpointError as e:
        raise SystemExit(f"error: {e}")
    if settings is not None:
        sd = {CONTROL + k: v for k, v in from_diffusers(sd, settings).items()}
        if settings.get("global_pool_conditions"):
            print(f"note: {a.src} pools its residuals; keep a yaml saying global_average_pooling: True beside {a.dst} "
                  "under its name, as the official shuffle model's")
    if bases:
        if kind(sd) not in ("controlnet-1.0", "controlnet-1.1") or [kind(b) for b in bases] != ["sd", "sd"]:
            raise SystemExit(f"error: --transfer moves a ControlNet 1.0 or 1.1 file ({a.src}: {WHAT[kind(sd)]}) from "
                             f"one SD base file to another ({', '.join(WHAT[kind(b)] for b in bases)})")
        if family(bases[0]) != family(bases[1]):
            raise SystemExit(f"error: --transfer {' '.join(a.transfer)}: bases of different families (SD1 and SD2)")
        sd = transfer(sd, *bases)
    if a.part != "all":
        sd = {k: v for k, v in sd.items() if k.startswith(CONTROL) == (a.part == "control")}
        if kind(sd) != ("controlnet-1.1" if a.part == "control" else "sd"):
            raise SystemExit(f"error: {a.src}: no {a.part} part; --part sd and control split a ControlNet 1.0 "
                             "full file")
    if a.half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    save(a.dst, sd, ModelConfig.from_json(meta) if meta else None)
    print(f"wrote {a.dst}: {len(sd)} tensors, {WHAT[kind(sd)]}")
