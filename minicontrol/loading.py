"""Building the models from the official files as they are: SD base checkpoints, ControlNet 1.0 (full model),
ControlNet 1.1 (`control_model.*` only) and extracted ControlNets (no prefix), and ControlNets saved by diffusers (a
model folder, or its weights file), their keys renamed to the official ones; each part loaded strictly."""
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig, preset
from .controlnet import ControlNet
from .ddim import schedule_buffers
from .files import CheckpointError, diffusers_config, read
from .identify import WHAT, family, kind, yaml_beside
from .model import StableDiffusion
from .names import CONTROL, TEXT_HF, TEXT_OC, UNET, VAE, from_diffusers, from_hf, to_hf
from .vae import AutoencoderKL

# entries a checkpoint may carry that no module here uses: EMA copies, the DDPM schedule (recomputed in ddim.py)
# and the HF position_ids buffer (always 0..76)
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = set(schedule_buffers()) | {TEXT_HF + "embeddings.position_ids"}
HINT = "Is it a Stable Diffusion 1.x/2.x checkpoint? For a model of another size pass its config (--config)."


def fill(path, what: str, module: nn.Module, sd: dict, hint: str) -> nn.Module:
    """Loaded strictly, in float32; keys and shapes compared first, so a mismatch is one line, not a long dump."""
    want = module.state_dict()
    stray = {"missing": sorted(set(want) - set(sd)), "unexpected": sorted(set(sd) - set(want))}
    problems = [f"{len(found)} {label} keys (first: {found[0]})" for label, found in stray.items() if found]
    wrong = [k for k in want if k in sd and tuple(want[k].shape) != tuple(sd[k].shape)]
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} wrong shapes (first: {k} is {list(sd[k].shape)}, expected {list(want[k].shape)})")
    if problems:
        raise CheckpointError(f"{path}: the {what} weights do not fit the model: {'; '.join(problems)}. {hint}")
    module.load_state_dict(sd, strict=True, assign=True)
    return module.float()


def split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def resolve_config(path, sd: dict, meta, config, prefix: str, base: ModelConfig = None) -> ModelConfig:
    """The config given, else the one save() wrote in the file, else the base's, else the preset of the weights'
    family, predicting what the official yaml beside the file says (as stated_prediction does)."""
    if config is not None:
        return config
    if meta is not None:
        return ModelConfig.from_json(meta)
    if base is not None:
        return base
    yaml = yaml_beside(path, "parameterization")
    if yaml not in (None, "eps", "v"):
        raise CheckpointError(f"{Path(path).with_suffix('.yaml')}: parameterization {yaml}: minicontrol runs "
                              "models that predict noise (eps) or v")
    config = preset("sd21" if family(sd, prefix) == "sd2" else "sd15")
    return replace(config, parameterization=yaml) if yaml else config


def load_base(path, config: ModelConfig = None) -> StableDiffusion:
    """An SD base checkpoint, or the SD part of a ControlNet 1.0 full file, loaded strictly."""
    sd, meta = read(path)
    k = kind(sd)
    if k not in ("sd", "controlnet-1.0"):
        raise CheckpointError(f"{path}: not a Stable Diffusion base checkpoint: {WHAT[k]}"
                              + ("; pass it as --controlnet and give the SD file as --base" if "control" in k else ""))
    config = resolve_config(path, sd, meta, config, UNET)
    first = sd.get(UNET + "input_blocks.0.0.weight")
    if first is not None and first.dim() == 4 and first.shape[1] == 9 and config.unet.in_channels == 4:
        raise CheckpointError(f"{path}: an inpainting base (a UNet of 9 input channels: latents, mask, masked image); "
                              "ControlNets go with the plain base of 4 (v1-5-pruned); to repaint, use it with the 1.1 "
                              "inpaint ControlNet and --mask")
    known = (UNET, VAE, TEXT_HF, TEXT_OC, CONTROL) + IGNORED_PREFIXES
    rest = sorted(k for k in sd if not k.startswith(known) and k not in IGNORED_KEYS)
    if rest:
        raise CheckpointError(f"{path}: {len(rest)} unexpected keys (first: {rest[0]}); {HINT}")
    model = StableDiffusion(config, device="meta")
    fill(path, "UNet", model.unet, split(sd, UNET), HINT)
    fill(path, "VAE", model.vae, split(sd, VAE), HINT)
    text_prefix = TEXT_HF if config.text.layout == "hf" else TEXT_OC
    text_sd = split(sd, text_prefix)
    if not text_sd:
        raise CheckpointError(f"{path}: no text encoder weights under {text_prefix}*; {HINT}")
    if config.text.layout == "hf":
        try:
            text_sd = from_hf(text_sd, config.text.layers)
        except KeyError as e:
            raise CheckpointError(f"{path}: the text encoder weights lack {text_prefix}{e.args[0]}; {HINT}") from None
        unused = set(split(sd, TEXT_HF)) - set(to_hf(text_sd, config.text.layers))
        if unused:
            raise CheckpointError(f"{path}: unexpected text key {TEXT_HF}{sorted(unused)[0]}; {HINT}")
    fill(path, "text encoder", model.text, text_sd, HINT)
    return model.eval().requires_grad_(False)


def load_controlnet(path, base: ModelConfig = None, config: ModelConfig = None) -> ControlNet:
    """Any of the three official ControlNet layouts, or diffusers'. With `base`, a ControlNet made for another UNet
    is refused. The residuals are pooled (the 1.1 shuffle model) where the config says so, or the official yaml beside
    the file does, or a diffusers folder's config.json (global_pool_conditions)."""
    sd, meta = read(path)
    settings = {}
    if kind(sd) == "controlnet-diffusers":
        settings = diffusers_config(path)
        sd = from_diffusers(sd, settings)                  # now a ControlNet without prefix
    k = kind(sd)
    if k not in ("controlnet-1.0", "controlnet-1.1", "controlnet"):
        raise CheckpointError(f"{path}: no ControlNet weights in it (control_model.* keys): {WHAT[k]}")
    if k == "controlnet-1.0":
        net_sd = split(sd, CONTROL)                        # beside it, the SD it was trained on
    else:                                                  # a key that is not the ControlNet's is named by fill
        net_sd = {key.removeprefix(CONTROL): v for key, v in sd.items()}
    attn2 = net_sd.get("middle_block.1.transformer_blocks.0.attn2.to_k.weight")      # (inner, text context width)
    if attn2 is None:
        raise CheckpointError(f"{path}: the ControlNet weights lack middle_block.1 (attention); "
                              "is this a ControlNet for Stable Diffusion 1.x/2.x?")
    config = resolve_config(path, net_sd, meta, config, "", base)
    if base is not None:
        # its UNet (the config's, with the family and text width its weights show) against the base's, hint aside
        own = dict(vars(config.unet), hint_channels=0, global_average_pooling=False, context_dim=attn2.shape[1],
                   use_linear_in_transformer=family(net_sd, "") == "sd2")
        other = dict(vars(base.unet), hint_channels=0, global_average_pooling=False)
        diff = next((name for name in own if own[name] != other[name]), None)
        if diff:
            versions = ["SD2.x" if unet["use_linear_in_transformer"] else "SD1.x" for unet in (own, other)]
            raise CheckpointError(f"{path}: this ControlNet was made for another UNet ({versions[0]}, {diff} "
                                  f"{own[diff]}) than the base model's ({versions[1]}, {diff} {other[diff]}); "
                                  "use a ControlNet made for this base")
    if str(yaml_beside(path, "global_average_pooling")).lower() == "true" or settings.get("global_pool_conditions"):
        config = replace(config, unet=replace(config.unet, global_average_pooling=True))
    with torch.device("meta"):
        net = ControlNet(config.unet)
    return fill(path, "ControlNet", net, net_sd, HINT).eval()


def load_vae(path, config: ModelConfig) -> AutoencoderKL:
    """A VAE file to use instead of the base's (as vae-ft-mse-840000-ema-pruned: the LDM VAE's keys, no prefix,
    maybe beside its training loss's LPIPS and discriminator, loss.*, and EMA entries), or an SD file's VAE."""
    sd, _ = read(path)
    k = kind(sd)
    if k not in ("vae", "sd", "controlnet-1.0"):
        raise CheckpointError(f"{path}: not a VAE: {WHAT[k]}")
    if k == "vae":
        vae_sd = {key: v for key, v in sd.items() if not key.startswith(("loss.", *IGNORED_PREFIXES))}
    else:
        vae_sd = split(sd, VAE)
    with torch.device("meta"):
        vae = AutoencoderKL(config.vae)
    return fill(path, "VAE", vae, vae_sd, "Is it a VAE for Stable Diffusion 1.x/2.x?").eval().requires_grad_(False)
