"""Reading checkpoint files safely: .ckpt, .pth and .safetensors, and diffusers' model folders, to a state dict.
Pickles are read with `torch.load(weights_only=True)`, so no code in a file runs; a training checkpoint's other
objects (callbacks, hyper-parameters) become inert stand-ins, and weights that need code to build are refused."""
import contextlib
import io
import json
import pickle
import pickletools
import zipfile
from pathlib import Path

import safetensors.torch
import torch

from .cli import UsageError

CONFIG_KEY = "minicontrol_config"       # safetensors metadata written by save(); official files have none


class CheckpointError(UsageError):
    """A file that is not the checkpoint it was given as; the message names the file and what to do."""


DIFFUSERS_FILES = [f"diffusion_pytorch_model{v}{s}" for s in (".safetensors", ".bin") for v in ("", ".fp16")]


def weights_file(path) -> Path:
    """The file itself; for a diffusers model folder (config.json beside diffusion_pytorch_model.*), its weights."""
    path = Path(path)
    return next((path / name for name in DIFFUSERS_FILES if (path / name).is_file()), path)


def check_file(path):
    """A CheckpointError unless `path` is a file or diffusers model folder; for a folder, it names a file in it."""
    path = weights_file(path)
    if (path / "model_index.json").is_file():
        raise CheckpointError(f"{path}: a diffusers pipeline folder; of diffusers' files only ControlNets are read: "
                              "give the original single-file checkpoint (weights/README.md lists them)")
    if (path / "config.json").is_file():
        raise CheckpointError(f"{path}: a diffusers model folder without its weights; put {DIFFUSERS_FILES[0]} (or "
                              f"{DIFFUSERS_FILES[2]}) in it")
    if path.is_dir():
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".pth", ".safetensors"))
        raise CheckpointError(f"{path}: a folder; give the checkpoint file itself"
                              + (f", e.g. {path / found[0]}" if found else " (.ckpt, .pth or .safetensors)"))
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")


def diffusers_config(path) -> dict:
    """The config.json of a diffusers model's folder, {} where there is none."""
    config = weights_file(path).parent / "config.json"
    try:
        return json.loads(config.read_text()) if config.is_file() else {}
    except ValueError:
        raise CheckpointError(f"{config}: not readable JSON; the folder's config.json as diffusers saved it") from None


class Inert:
    """Stands for a class or function that a pickle names beyond tensors and containers: made and given its state
    without any of the original running (object.__new__ takes the arguments too, as this __init__ does)."""
    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def refused(path, name: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused: the pickle would call {name}, not only build tensors; nothing in it was "
                           "run. Use a trusted file, ideally .safetensors")


def load_pickle(path) -> tuple:
    """(torch.load(weights_only=True), []); where that refuses a global, (the same with Inert for the globals, their
    names); a CheckpointError where even that is refused (a module torch blocks, such as os). torch's zip format is
    memory-mapped: what is not loaded (EMA weights) is never read, and the weights stay backed by the file until
    moved, so a file in use is replaced by renaming a new one over it (as save() does), never rewritten in place."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.serialization.load(path, map_location="cpu", weights_only=True, mmap=mmap), []
    except pickle.UnpicklingError:
        other = list(dict.fromkeys(n for n in pickle_imports(path) if not n.startswith(("torch.", "collections."))))
        if not other:
            raise
        try:
            with torch.serialization.safe_globals([(Inert, name) for name in other]):
                return torch.serialization.load(path, map_location="cpu", weights_only=True, mmap=mmap), other
        except pickle.UnpicklingError:
            raise refused(path, other[0]) from None


def read(path) -> tuple:
    """(state dict, config json or None) of a .safetensors, .ckpt or .pth file or diffusers folder, out of any
    {"state_dict": ...}."""
    path = weights_file(path)
    check_file(path)
    stand_ins = []
    try:
        if is_safetensors(path):
            sd = safetensors.torch.load_file(str(path))
        else:
            sd, stand_ins = load_pickle(path)
    except CheckpointError:
        raise
    except Exception as e:                           # pickle's, zipfile's, safetensors' or torch's own errors
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated, corrupt or not a "
                              f"PyTorch/safetensors file ({reason(e)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and any(isinstance(v, Inert) for v in sd.values()):
        raise refused(path, stand_ins[0])
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors; expected an SD or ControlNet checkpoint")
    return sd, saved_config(path)


def reason(e: Exception) -> str:
    """An exception's first line (at most 120 characters), or its type where it has no message."""
    return str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__


def is_safetensors(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"                # an 8-byte header length, then JSON


def saved_config(path):
    """The config JSON that save() writes in a safetensors file's header, or None (official files have none)."""
    if not is_safetensors(path):
        return None
    with safetensors.safe_open(str(path), "pt") as f:
        return (f.metadata() or {}).get(CONFIG_KEY)


def pickle_imports(path) -> list:
    """The module.name globals that a file's pickles import, read without running them: data.pkl of torch's zip
    format, else the file's pickles one after another (torch's older format puts them before its raw data)."""
    names = []
    strings = []                                     # the last strings pushed: STACK_GLOBAL's module and name
    with contextlib.suppress(Exception):     # stops at the raw tensor data after the pickles, or a damaged file
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        f = io.BytesIO(data)
        while f.tell() < len(data):
            for op, arg, _ in pickletools.genops(f):
                if op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(".".join(strings[-2:]))
                elif isinstance(arg, str):
                    strings.append(arg)
    return names

