"""Shared test helpers: tiny random models in the official layout, and their diffusers twins; checkpoint files
written and compared; a script's main or a module's command line run in the test process."""
import contextlib
import io
import runpy
import subprocess
import sys
import warnings

import pytest
import torch

from minicontrol.config import preset
from minicontrol.controlnet import clone_encoder
from minicontrol.export import full_state_dict, save
from minicontrol.files import CheckpointError
from minicontrol.model import StableDiffusion


def randomize(module, seed=0, std=0.05):
    """Random weights everywhere, the zero-initialised layers included (else a parity test would be blind)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if name.endswith("weight") and ("norm" in name or "ln_" in name or ".in_layers.0." in name
                                            or ".out_layers.0." in name or name.startswith("out.0")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))     # norm scales near 1
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return module


def tiny_models(name="tiny-sd1", seed=0):
    """(config, StableDiffusion, ControlNet) with random non-zero weights in every layer."""
    cfg = preset(name)
    torch.manual_seed(seed)
    model = StableDiffusion(cfg)
    randomize(model, seed)
    net = randomize(clone_encoder(model.unet), seed + 1)
    return cfg, model.eval(), net.eval()


def write(path, sd, wrap=False):
    if path.suffix == ".safetensors":
        save(path, sd)
    else:
        torch.save({"state_dict": sd} if wrap else sd, path)
    return path


def same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def error(fn, *args, **kw):
    with pytest.raises(CheckpointError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def ldm_original_config(cfg):
    """The yaml-shaped dict diffusers' single-file converters read, for one of our configs."""
    u, v = cfg.unet, cfg.vae
    unet_params = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                       channel_mult=list(u.channel_mult), num_res_blocks=u.num_res_blocks,
                       attention_resolutions=list(u.attention_resolutions), transformer_depth=u.transformer_depth,
                       context_dim=u.context_dim, use_linear_in_transformer=u.use_linear_in_transformer)
    if u.num_head_channels > 0:
        unet_params["num_head_channels"] = u.num_head_channels
    else:
        unet_params["num_heads"] = u.num_heads
    ddconfig = dict(ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks, z_channels=v.z_channels,
                    in_channels=v.in_channels, out_ch=v.out_ch)
    return {"model": {"params": {"unet_config": {"params": unet_params}, "scale_factor": v.scale_factor,
                                 "first_stage_config": {"params": {"ddconfig": ddconfig}}}}}


def diffusers_models(cfg, model, net):
    """diffusers' UNet2DConditionModel, ControlNetModel and AutoencoderKL filled by diffusers' own converters."""
    from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    ckpt = full_state_dict(model, net)
    original = ldm_original_config(cfg)
    unet_cfg = sfu.create_unet_diffusers_config_from_ldm(original, ckpt, image_size=64)
    unet = UNet2DConditionModel(**unet_cfg)
    unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, unet_cfg))
    keep = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "transformer_layers_per_block")
    cn_cfg = {k: unet_cfg[k] for k in keep}
    cn_cfg["conditioning_channels"] = cfg.unet.hint_channels
    controlnet = ControlNetModel(**cn_cfg)
    controlnet.load_state_dict(sfu.convert_controlnet_checkpoint(ckpt, cn_cfg))
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(original, ckpt, image_size=64)
    vae = AutoencoderKL(**vae_cfg)
    vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg))
    return unet.eval(), controlnet.eval(), vae.eval()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def run_main(main, *args):
    """A script's main(argv) in this process, for what it computes rather than its command line: the result as from
    a new interpreter (exit status and stderr; a SystemExit's message is what Python prints), without starting one."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = 1 if isinstance(e.code, str) else e.code
            err.write(f"{e.code}\n" if isinstance(e.code, str) else "")
    return subprocess.CompletedProcess(args, code, "", err.getvalue())


def run_module(module, *args):
    """`python -m module args` in this process (a new interpreter costs seconds): None when it returns, else the
    code its SystemExit carries (an error's one line); any other exception propagates."""
    argv, sys.argv = sys.argv, [module, *map(str, args)]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "'minicontrol.* found in sys.modules", RuntimeWarning)
            runpy.run_module(module, run_name="__main__")
    except SystemExit as e:
        return e.code
    finally:
        sys.argv = argv
