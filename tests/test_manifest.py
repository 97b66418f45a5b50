"""Built on the meta device, the sd15 and sd21 presets give exactly the official keys and shapes."""
from pathlib import Path

import pytest
import torch

from minicontrol.config import preset
from minicontrol.controlnet import ControlNet
from minicontrol.ddim import schedule_buffers
from minicontrol.export import controlnet_state_dict
from minicontrol.model import StableDiffusion
from minicontrol.names import TEXT_HF, TEXT_OC, UNET, VAE

REF = Path(__file__).resolve().parent / "reference"     # key<TAB>shape of the official files, made from their code


def manifest(name):
    rows = (line.rstrip("\n").split("\t") for line in open(REF / f"{name}.tsv"))
    return {k: v for k, v in rows}


def shapes(sd, prefix=""):
    return {k: "x".join(map(str, v.shape)) if v.dim() else "scalar" for k, v in sd.items() if k.startswith(prefix)}


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_parts_match_manifests(family):
    cfg = preset(family)
    with torch.device("meta"):
        model, net = StableDiffusion(cfg, device="meta"), ControlNet(cfg.unet)
    full = model.official_state_dict()
    text_prefix = TEXT_HF if family == "sd15" else TEXT_OC
    assert shapes(full, UNET) == manifest(f"{family}_unet")
    assert shapes(full, VAE) == manifest(f"{family}_vae")
    assert shapes(full, text_prefix) == manifest(f"{family}_text")
    assert shapes(controlnet_state_dict(net)) == manifest(f"{family}_controlnet")
    buffers = {k: v for k, v in manifest(f"{family}_buffers").items() if not k.startswith("cond_stage_model")}
    assert shapes(schedule_buffers()) == buffers


def test_schedule_buffer_anchor_values():
    b = schedule_buffers()
    ac = b["alphas_cumprod"]
    assert b["betas"][0].item() == pytest.approx(0.00085) and b["betas"][999].item() == pytest.approx(0.012)
    assert ac[0].item() == pytest.approx(0.99915, abs=1e-6) and ac[1].item() == pytest.approx(0.998296, abs=1e-6)
    assert ac[951].item() == pytest.approx(0.0081550, rel=1e-4) and ac[999].item() == pytest.approx(0.0046601, rel=1e-4)


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_diffusers_controlnet_names_become_the_official_keys(family):
    # diffusers' own ControlNetModel at full size (its SD1.5 and SD2.1 settings, as in the diffusers-format ControlNets
    # published for each), renamed by from_diffusers: exactly the official file's keys and shapes
    from diffusers import ControlNetModel

    from minicontrol.names import CONTROL, from_diffusers
    settings = {"sd15": dict(cross_attention_dim=768, attention_head_dim=8),
                "sd21": dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)}
    with torch.device("meta"):
        theirs = ControlNetModel(**settings[family]).state_dict()
    assert shapes({CONTROL + k: v for k, v in from_diffusers(theirs).items()}) == manifest(f"{family}_controlnet")
