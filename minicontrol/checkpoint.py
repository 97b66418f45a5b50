"""Loading and saving the official files as they are: SD base checkpoints, ControlNet 1.0 (full model), ControlNet 1.1
(`control_model.*` only) and extracted ControlNets (no prefix), in .ckpt, .pth or .safetensors; and ControlNets saved
by diffusers (a model folder, or its weights file), their keys renamed to the official ones.

Pickled files are read with `torch.load(weights_only=True)`, which refuses anything but tensors and containers,
so no code inside a file ever runs. Other objects beside the weights (a training checkpoint's callbacks and
hyper-parameters) are read as inert stand-ins; weights that would need any code to build are refused."""
import io
import json
import os
import pickle
import pickletools
import re
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import safetensors.torch
import torch
import torch.nn as nn

from .config import ModelConfig, preset
from .controlnet import ControlNet
from .ddim import schedule_buffers
from .text import TextEncoder, from_hf, to_hf
from .unet import UNet
from .vae import AutoencoderKL

UNET, CONTROL, VAE = "model.diffusion_model.", "control_model.", "first_stage_model."
TEXT_HF, TEXT_OC = "cond_stage_model.transformer.text_model.", "cond_stage_model.model."
# entries a checkpoint may carry that no module here uses: EMA copies, the DDPM schedule (recomputed in ddim.py)
# and the HF position_ids buffer (always 0..76)
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = set(schedule_buffers()) | {TEXT_HF + "embeddings.position_ids"}
CONFIG_KEY = "minicontrol_config"       # safetensors metadata written by save(); official files have none


class CheckpointError(ValueError):
    """A file that is not the checkpoint it was given as; the message names the file and what to do."""


DIFFUSERS_FILES = [f"diffusion_pytorch_model{v}{s}" for s in (".safetensors", ".bin") for v in ("", ".fp16")]


def weights_file(path) -> Path:
    """The file itself; for a diffusers model folder (config.json beside diffusion_pytorch_model.*), its weights."""
    path = Path(path)
    found = [path / name for name in DIFFUSERS_FILES if path.is_dir() and (path / name).is_file()]
    return found[0] if found else path


def check_file(path):
    """A CheckpointError unless `path` is a file or a diffusers model folder; for another folder it names a checkpoint
    file in it, if there is one."""
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


def check_out_folder(folder, flag="--out"):
    """A CheckpointError unless files can be written in `folder` (made later if absent), checked without writing."""
    path = Path(folder).absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"{flag} {folder}: {path} is a file; give a folder")
    if not os.access(path, os.W_OK):
        raise CheckpointError(f"{flag} {folder}: {path} cannot be written; give a folder you can write")


class Inert:
    """Stands for a class or function that a pickle names beyond tensors and containers: made and given its state
    without any of the original running."""
    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def refused(path, name: str) -> CheckpointError:
    return CheckpointError(f"{path}: refused: the pickle would call {name}, not only build tensors; nothing in it was "
                           "run. Use a trusted file, ideally .safetensors")


def load_pickle(path) -> tuple:
    """(torch.load(weights_only=True), []); where that refuses a global, (the same with Inert for the globals, their
    names); a CheckpointError where even that is refused (a module torch blocks, such as os).
    torch's zip format is memory-mapped: tensors are read as they are used, so what is not loaded (EMA weights, the SD
    copy in a 1.0 ControlNet file) is never read, and the weights loaded stay backed by the file until moved (so a file
    in use is replaced by writing a new one and renaming it, as save() does, never rewritten in place)."""
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), []
    except pickle.UnpicklingError:
        other = list(dict.fromkeys(n for n in pickle_imports(path) if not n.startswith(("torch.", "collections."))))
        if not other:
            raise
        try:
            with torch.serialization.safe_globals([(Inert, name) for name in other]):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap), other
        except pickle.UnpicklingError:
            raise refused(path, other[0]) from None


def read(path) -> tuple:
    """(state dict, config json or None) from a .safetensors, .ckpt or .pth file (or a diffusers model folder's weights
    file), unwrapping {"state_dict": ...}."""
    path = weights_file(path)
    check_file(path)
    meta, stand_ins = None, []
    try:
        if is_safetensors(path):
            sd, meta = safetensors.torch.load_file(str(path)), saved_config(path)
        else:
            sd, stand_ins = load_pickle(path)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt ({str(e).strip()[:100]})") from None
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or not a PyTorch/safetensors file "
                              f"({reason})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and any(isinstance(v, Inert) for v in sd.values()):
        raise refused(path, stand_ins[0])
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors; expected an SD or ControlNet checkpoint")
    return sd, meta


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
    """The module.name pairs that the pickles in a file (data.pkl of torch's zip format; else the file's pickles one
    after another, as torch's older format has them before its raw data) import, read without running them."""
    names, strings = [], []
    try:
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
    except Exception:                                # the raw tensor data after the pickles, or a damaged file
        pass
    return names


def kind(sd: dict) -> str:
    """'sd' (base), 'controlnet-1.0' (full model), 'controlnet-1.1' (control_model.* only), 'controlnet' (no prefix),
    'controlnet-diffusers', 'diffusers' (another diffusers model's file, which is not read), 'vae' (a VAE alone),
    'sdxl' or 'unknown'."""
    has_unet, has_control = any(k.startswith(UNET) for k in sd), any(k.startswith(CONTROL) for k in sd)
    if any(k.startswith("conditioner.embedders.") for k in sd):
        return "sdxl"
    if has_unet:
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
        "sdxl": "an SDXL checkpoint (conditioner.* or add_embedding.* keys); minicontrol runs Stable Diffusion 1.x "
                "and 2.x",
        "vae": "a VAE on its own (encoder.* and decoder.* keys); pass it as --vae",
        "unknown": "no model.diffusion_model.* or control_model.* keys"}


def holds_controlnet(path) -> bool:
    """Whether a file is a ControlNet 1.0 full file: an SD and its ControlNet (control_model.*) in one."""
    return kind(read(path)[0]) == "controlnet-1.0"


def family(sd: dict, prefix: str = UNET) -> str:
    """'sd1' or 'sd2' from tensor shapes: SD2 has Linear proj_in and a 1024-wide text context."""
    proj = sd.get(prefix + "middle_block.1.proj_in.weight")
    return "sd2" if proj is not None and proj.dim() == 2 else "sd1"


def context_dim(sd: dict, prefix: str) -> int:
    return sd[prefix + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]


def check_fits(path, what: str, module: nn.Module, sd: dict, hint: str):
    """Compare keys and shapes first, so a mismatch is one clear line rather than a long load_state_dict dump."""
    want = module.state_dict()
    missing, unexpected = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    wrong = [k for k in want if k in sd and tuple(want[k].shape) != tuple(sd[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (first: {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} wrong shapes (first: {k} is {list(sd[k].shape)}, expected {list(want[k].shape)})")
    if problems:
        raise CheckpointError(f"{path}: the {what} weights do not fit the model: {'; '.join(problems)}. {hint}")


def fill(path, what, module, sd, hint):
    check_fits(path, what, module, sd, hint)
    module.load_state_dict(sd, strict=True, assign=True)
    return module.float()


def split(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def resolve_config(sd: dict, meta, config, prefix: str) -> ModelConfig:
    if config is not None:
        return config
    if meta is not None:
        return ModelConfig.from_json(meta)
    return preset("sd21" if family(sd, prefix) == "sd2" else "sd15")


class StableDiffusion(nn.Module):
    """The three frozen parts of an SD checkpoint: UNet, VAE and text encoder."""

    def __init__(self, config: ModelConfig, device="cpu"):
        super().__init__()
        self.config = config
        with torch.device(device):
            self.unet, self.vae, self.text = UNet(config.unet), AutoencoderKL(config.vae), TextEncoder(config.text)

    def official_state_dict(self) -> dict:
        sd = {UNET + k: v for k, v in self.unet.state_dict().items()}
        sd.update({VAE + k: v for k, v in self.vae.state_dict().items()})
        text = self.text.state_dict()
        if self.config.text.layout == "hf":
            sd.update({TEXT_HF + k: v for k, v in to_hf(text, self.config.text.layers).items()})
        else:
            sd.update({TEXT_OC + k: v for k, v in text.items()})
        return sd


HINT = "Is it a Stable Diffusion 1.x/2.x checkpoint? For a model of another size pass its config (--config)."


def load_base(path, config: ModelConfig = None) -> StableDiffusion:
    """An SD base checkpoint, or the SD part of a ControlNet 1.0 full file, loaded strictly."""
    sd, meta = read(path)
    k = kind(sd)
    if k not in ("sd", "controlnet-1.0"):
        raise CheckpointError(f"{path}: not a Stable Diffusion base checkpoint: {WHAT[k]}"
                              + ("; pass it as --controlnet and give the SD file as --base" if "control" in k else ""))
    # as stated_prediction, without reading the file again: a config given, then the file's own, then the yaml beside it
    yaml = yaml_beside(path, "parameterization") if config is None and meta is None else None
    if yaml not in (None, "eps", "v"):
        raise CheckpointError(f"{Path(path).with_suffix('.yaml')}: parameterization {yaml}: minicontrol runs "
                              "models that predict noise (eps) or v")
    config = resolve_config(sd, meta, config, UNET)
    config = replace(config, parameterization=yaml) if yaml else config
    first = sd.get(UNET + "input_blocks.0.0.weight")
    if first is not None and first.dim() == 4 and first.shape[1] == 9 and config.unet.in_channels == 4:
        raise CheckpointError(f"{path}: an inpainting base (a UNet of 9 input channels: latents, mask, masked image); "
                              "ControlNets go with the plain base of 4 (v1-5-pruned); to repaint, use it with the 1.1 "
                              "inpaint ControlNet and --mask")
    ignored = [k for k in sd if k.startswith(IGNORED_PREFIXES + (CONTROL,)) or k in IGNORED_KEYS]
    parts = {p: split(sd, p) for p in (UNET, VAE, TEXT_HF, TEXT_OC)}
    rest = set(sd) - set(ignored) - {p + k for p, d in parts.items() for k in d}
    if rest:
        raise CheckpointError(f"{path}: {len(rest)} unexpected keys (first: {sorted(rest)[0]}); {HINT}")
    model = StableDiffusion(config, device="meta")
    fill(path, "UNet", model.unet, parts[UNET], HINT)
    fill(path, "VAE", model.vae, parts[VAE], HINT)
    text_sd, text_prefix = (parts[TEXT_HF], TEXT_HF) if config.text.layout == "hf" else (parts[TEXT_OC], TEXT_OC)
    if not text_sd:
        raise CheckpointError(f"{path}: no text encoder weights under {text_prefix}*; {HINT}")
    if config.text.layout == "hf":
        text_sd.pop("embeddings.position_ids", None)
        try:
            text_sd = from_hf(text_sd, config.text.layers)
        except KeyError as e:
            raise CheckpointError(f"{path}: the text encoder weights lack {text_prefix}{e.args[0]}; {HINT}") from None
        unused = set(parts[TEXT_HF]) - {"embeddings.position_ids"} - set(to_hf(text_sd, config.text.layers))
        if unused:
            raise CheckpointError(f"{path}: unexpected text key {TEXT_HF}{sorted(unused)[0]}; {HINT}")
    fill(path, "text encoder", model.text, text_sd, HINT)
    return model.eval().requires_grad_(False)


def yaml_beside(path, key: str):
    """The value of `key:` in the official yaml kept beside a file under its name (read as text), or None: the 1.1
    shuffle model's control_v11e_sd15_shuffle.yaml sets global_average_pooling: True, the one setting in which the 1.1
    yamls differ; SD 2.x's v2-inference-v.yaml (kept as v2-1_768-ema-pruned.yaml) sets parameterization: "v"."""
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
    """A warning where load_base(path, config) took an SD 2.x file as predicting noise for want of anything that says
    so; else None."""
    if not model.config.unet.use_linear_in_transformer or stated_prediction(path, config):
        return None
    return (f"{path}: an SD 2.x file does not say whether its UNet predicts noise or v; taken as predicting noise, as "
            "the 512 base models do; for the 768 v-prediction model (v2-1_768-ema-pruned) pass --config sd21-v, or "
            f"keep the official v2-inference-v.yaml beside it as {Path(path).with_suffix('.yaml').name}")


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def from_diffusers(sd: dict, settings: dict = None) -> dict:
    """A diffusers ControlNetModel's weights under the official names. diffusers names the encoder's blocks by level
    (down_blocks.L.resnets.J, .attentions.J, .downsamplers.0) where the official code numbers them in order
    (input_blocks.I), and the ResBlocks' layers by role where the official code numbers them; attention layers have
    the same names in both. Keys that fit no block are kept as they are, for check_fits to name. settings: its
    config.json, whose BGR channel order (diffusers flips the image) becomes the first convolution's weights flipped."""
    levels = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("down_blocks.")), default=-1)
    per_level = 1 + max((int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets.")), default=-1)
    names = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2", "mid_block.resnets.0": "middle_block.0",
             "mid_block.attentions.0": "middle_block.1", "mid_block.resnets.1": "middle_block.2",
             "controlnet_mid_block": "middle_block_out.0", "controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": "input_hint_block.14"}
    names |= {f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * j + 2}" for j in range(6)}
    i = 1                                            # input_blocks.0 is conv_in
    for level in range(levels):
        for j in range(per_level):
            names |= {f"down_blocks.{level}.resnets.{j}": f"input_blocks.{i}.0",
                      f"down_blocks.{level}.attentions.{j}": f"input_blocks.{i}.1"}
            i += 1
        if level < levels - 1:
            names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{i}.0.op"
            i += 1
    names |= {f"controlnet_down_blocks.{j}": f"zero_convs.{j}.0" for j in range(i)}

    def rename(key):
        block = next((b for b in names if key.startswith(b + ".")), None)
        if block is None:
            return key
        layer, dot, rest = key[len(block) + 1:].partition(".")
        return f"{names[block]}.{RESNET.get(layer, layer)}{dot}{rest}"       # RESNET's names are in ResBlocks alone
    out = {rename(key): w for key, w in sd.items()}
    if (settings or {}).get("controlnet_conditioning_channel_order") == "bgr" and "input_hint_block.0.weight" in out:
        out["input_hint_block.0.weight"] = out["input_hint_block.0.weight"].flip(1)
    return out


def diffusers_config(path) -> dict:
    """The config.json of a diffusers model's folder, {} where there is none."""
    config = weights_file(path).parent / "config.json"
    try:
        return json.loads(config.read_text()) if config.is_file() else {}
    except ValueError:
        raise CheckpointError(f"{config}: not readable JSON; the folder's config.json as diffusers saved it") from None


def load_controlnet(path, base: ModelConfig = None, config: ModelConfig = None) -> ControlNet:
    """Any of the three official ControlNet layouts, or diffusers'. With `base`, a ControlNet made for another family
    is refused. The residuals are pooled (the 1.1 shuffle model) where the config says so, or the official yaml beside
    the file does, or a diffusers folder's config.json (global_pool_conditions)."""
    sd, meta = read(path)
    k, settings = kind(sd), {}
    if k == "controlnet-diffusers":
        settings = diffusers_config(path)
        sd, k = from_diffusers(sd, settings), "controlnet"
    prefix = {"controlnet-1.0": CONTROL, "controlnet-1.1": CONTROL, "controlnet": ""}.get(k)
    if prefix is None:
        raise CheckpointError(f"{path}: no ControlNet weights in it (control_model.* keys): {WHAT[k]}")
    if k == "controlnet-1.1":
        other = [key for key in sd if not key.startswith(CONTROL)]
        if other:
            raise CheckpointError(f"{path}: unexpected key {other[0]} beside the control_model.* keys")
    net_sd = split(sd, prefix) if prefix else sd
    if "middle_block.1.transformer_blocks.0.attn2.to_k.weight" not in net_sd:
        raise CheckpointError(f"{path}: the ControlNet weights lack middle_block.1 (attention); "
                              "is this a ControlNet for Stable Diffusion 1.x/2.x?")
    if base is not None:
        net_kind = family(net_sd, ""), context_dim(net_sd, "")
        base_kind = "sd2" if base.unet.use_linear_in_transformer else "sd1", base.unet.context_dim
        describe = lambda fam, width: (f"{'SD2.x' if fam == 'sd2' else 'SD1.x'} (text context width {width}, "
                                       f"{'linear' if fam == 'sd2' else 'convolution'} proj_in)")
        if net_kind != base_kind:
            raise CheckpointError(f"{path}: this ControlNet is for {describe(*net_kind)} but the base model is "
                                  f"{describe(*base_kind)}; use a ControlNet made for this base")
    config = config or (base if base is not None and meta is None else resolve_config(net_sd, meta, None, ""))
    if base is not None:
        own = dict(vars(config.unet), hint_channels=0, global_average_pooling=False)
        other = dict(vars(base.unet), hint_channels=0, global_average_pooling=False)
        diff = next((k for k in own if own[k] != other[k]), None)
        if diff:
            raise CheckpointError(f"{path}: this ControlNet was trained on another UNet ({diff} {own[diff]}, the base "
                                  f"model has {other[diff]}); use a ControlNet made for this base")
    if (yaml_beside(path, "global_average_pooling") or "").lower() == "true" or settings.get("global_pool_conditions"):
        config = replace(config, unet=replace(config.unet, global_average_pooling=True))
    with torch.device("meta"):
        net = ControlNet(config.unet)
    return fill(path, "ControlNet", net, net_sd, HINT).eval()


def load_vae(path, config: ModelConfig) -> AutoencoderKL:
    """A VAE file to use instead of the base's (such as vae-ft-mse-840000-ema-pruned: the LDM VAE's keys with no
    prefix, perhaps beside its training loss's LPIPS and discriminator, loss.*, and EMA counters), or the VAE of an
    SD checkpoint (first_stage_model.*)."""
    sd, _ = read(path)
    k = kind(sd)
    if k not in ("vae", "sd", "controlnet-1.0"):
        raise CheckpointError(f"{path}: not a VAE: {WHAT[k]}")
    unused = lambda key: key.startswith("loss.") or key in ("model_ema.decay", "model_ema.num_updates")
    vae_sd = split(sd, VAE) if k != "vae" else {key: v for key, v in sd.items() if not unused(key)}
    with torch.device("meta"):
        vae = AutoencoderKL(config.vae)
    return fill(path, "VAE", vae, vae_sd, "Is it a VAE for Stable Diffusion 1.x/2.x?").eval().requires_grad_(False)


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
    """A ControlNet trained on base `old` moved to base `new` of the same family, as the official
    tool_transfer_control.py does: each weight w whose UNet counterpart (control_model.X counting as
    model.diffusion_model.X) both bases have becomes w + new - old; the rest (hint block, zero convolutions) stay; a
    1.0 full file's VAE and text encoder become new's."""
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
