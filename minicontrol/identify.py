"""Telling what a checkpoint is: which of the official kinds (or another kind, named and not read), SD 1.x or
2.x, and what its UNet predicts where something says so."""
import re
from pathlib import Path

from .config import ModelConfig
from .files import read, saved_config
from .model import StableDiffusion
from .names import CONTROL, UNET


def kind(sd: dict) -> str:
    """'sd' (base), 'controlnet-1.0' (full model), 'controlnet-1.1' (control_model.* only), 'controlnet' (no prefix),
    'controlnet-diffusers', 'vae' (a VAE alone), or one named in WHAT and not read (diffusers, sdxl, unknown)."""
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return "sdxl"
    has_control = any(k.startswith(CONTROL) for k in sd)
    if any(k.startswith(UNET) for k in sd):
        return "controlnet-1.0" if has_control else "sd"
    if has_control:
        return "controlnet-1.1"
    if "input_hint_block.0.weight" in sd:
        return "controlnet"
    if "controlnet_cond_embedding.conv_in.weight" in sd:
        return "sdxl" if any(k.startswith("add_embedding.") for k in sd) else "controlnet-diffusers"
    if any(k.startswith(("down_blocks.", "encoder.down_blocks.")) for k in sd):
        return "diffusers"
    return "vae" if "decoder.conv_in.weight" in sd else "unknown"


WHAT = {"sd": "a Stable Diffusion base checkpoint", "controlnet-1.0": "a ControlNet 1.0 file",
        "controlnet-1.1": "a ControlNet 1.1 file", "controlnet": "a ControlNet without the control_model. prefix",
        "controlnet-diffusers": "a ControlNet saved by diffusers",
        "diffusers": "a file from a diffusers model folder (down_blocks.* keys); of those only ControlNets are read: "
                     "use the original single-file checkpoint instead (weights/README.md lists them)",
        "sdxl": "an SDXL checkpoint (conditioner.* or add_embedding.* keys); minicontrol runs SD 1.x and 2.x",
        "vae": "a VAE on its own (encoder.* and decoder.* keys); pass it as --vae",
        "unknown": "no model.diffusion_model.* or control_model.* keys"}


def holds_controlnet(path) -> bool:
    """Whether a file is a ControlNet 1.0 full file: an SD and its ControlNet (control_model.*) in one."""
    return kind(read(path)[0]) == "controlnet-1.0"


def family(sd: dict, prefix: str = UNET) -> str:
    """'sd1' or 'sd2' from tensor shapes: SD2 has Linear proj_in and a 1024-wide text context."""
    proj = sd.get(prefix + "middle_block.1.proj_in.weight")
    return "sd2" if proj is not None and proj.dim() == 2 else "sd1"


def yaml_beside(path, key: str):
    """The value of `key:` in the official yaml kept beside a file under its name, or None: the 1.1 shuffle model's
    sets global_average_pooling: True (the one way the 1.1 yamls differ), v2-inference-v.yaml's parameterization: v."""
    yaml = Path(path).with_suffix(".yaml")
    found = yaml.is_file() and re.search(rf"^\s*{key}:\s*[\"']?([^\"'#\s]+)", yaml.read_text(errors="replace"), re.M)
    return found.group(1) if found else None


def stated_prediction(path, config: ModelConfig = None):
    """What the UNet predicts, "eps" or "v", where something says so: the config given, the one save() wrote in the
    file, or the official yaml beside it; None for an official file alone (SD 2.x has both kinds: 512 eps, 768 v)."""
    if config is not None:
        return config.parameterization
    meta = saved_config(path)
    return ModelConfig.from_json(meta).parameterization if meta else yaml_beside(path, "parameterization")


def guessed_prediction(path, model: StableDiffusion, config: ModelConfig = None):
    """A warning where load_base(path, config) took an SD 2.x file to predict noise, as nothing says; else None."""
    if not model.config.unet.use_linear_in_transformer or stated_prediction(path, config):
        return None
    return (f"{path}: an SD 2.x file does not say whether its UNet predicts noise or v; taken as predicting noise, as "
            "the 512 base models do; for the 768 v-prediction model (v2-1_768-ema-pruned) pass --config sd21-v, or "
            f"keep the official v2-inference-v.yaml beside it as {Path(path).with_suffix('.yaml').name}")
