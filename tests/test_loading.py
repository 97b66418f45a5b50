"""The loader on the four official file kinds, made here from tiny weights, and its one-line errors."""
from dataclasses import replace

import pytest
import torch

from helpers import error, run_module, same, tiny_models, write
from minicontrol.config import preset
from minicontrol.export import controlnet_state_dict, full_state_dict, save
from minicontrol.files import read
from minicontrol.identify import guessed_prediction, kind
from minicontrol.loading import load_base, load_controlnet, load_vae
from minicontrol.names import CONTROL


FILES = {
    "sd": lambda m, n: full_state_dict(m) | {"model_ema.decay": torch.tensor(0.9999)},
    "controlnet-1.0": lambda m, n: full_state_dict(m, n),
    "controlnet-1.1": lambda m, n: controlnet_state_dict(n, "1.1"),
    "controlnet": lambda m, n: controlnet_state_dict(n, "extracted"),
}


@pytest.mark.parametrize("suffix", [".ckpt", ".pth", ".safetensors"])
@pytest.mark.parametrize("file_kind", list(FILES))
def test_round_trip(tmp_path, tiny, suffix, file_kind):
    cfg, model, net = tiny
    path = write(tmp_path / f"m{suffix}", FILES[file_kind](model, net), wrap=suffix == ".ckpt")
    sd = torch.load(path, weights_only=True) if suffix != ".safetensors" else None
    assert kind(sd.get("state_dict", sd) if sd else FILES[file_kind](model, net)) == file_kind
    if file_kind in ("sd", "controlnet-1.0"):
        loaded = load_base(path, config=cfg)
        assert same(loaded.unet, model.unet) and same(loaded.vae, model.vae) and same(loaded.text, model.text)
    if file_kind != "sd":
        assert same(load_controlnet(path, base=cfg), net)


def test_sd2_open_clip_layout_round_trips(tmp_path):
    cfg, model, net = tiny_models("tiny-sd2")
    path = save(tmp_path / "sd2.safetensors", full_state_dict(model, net), cfg) or tmp_path / "sd2.safetensors"
    loaded = load_base(path)                       # config from the file's metadata
    assert same(loaded.text, model.text) and same(loaded.unet, model.unet)
    assert same(load_controlnet(path, base=cfg), net)


def test_missing_unexpected_and_wrong_shape(tmp_path, tiny):
    cfg, model, net = tiny
    sd = controlnet_state_dict(net)
    missing = dict(sd)
    missing.pop(CONTROL + "zero_convs.2.0.weight")
    msg = error(load_controlnet, write(tmp_path / "a.pth", missing), base=cfg)
    assert "a.pth" in msg and "missing" in msg and "zero_convs.2.0.weight" in msg
    extra = dict(sd) | {CONTROL + "zero_convs.99.0.weight": torch.zeros(1)}
    msg = error(load_controlnet, write(tmp_path / "b.pth", extra), base=cfg)
    assert "b.pth" in msg and "unexpected" in msg and "zero_convs.99.0.weight" in msg
    wrong = dict(sd) | {CONTROL + "middle_block_out.0.bias": torch.zeros(7)}
    msg = error(load_controlnet, write(tmp_path / "c.pth", wrong), base=cfg)
    assert "c.pth" in msg and "shape" in msg and "middle_block_out.0.bias" in msg
    base = full_state_dict(model)
    base.pop("first_stage_model.decoder.conv_out.bias")
    msg = error(load_base, write(tmp_path / "d.ckpt", base, wrap=True), config=cfg)
    assert "d.ckpt" in msg and "VAE" in msg and "decoder.conv_out.bias" in msg


def test_diffusers_layout_files_are_named_as_such(tmp_path, tiny):
    # A diffusers model folder's UNet and VAE (written here by diffusers itself) are not read; the error says so and
    # points to the original single-file checkpoints, rather than calling them an unknown file. Its ControlNet is not a
    # base, and a diffusers pipeline folder is named as one.
    from helpers import diffusers_models
    from safetensors.torch import save_file
    unet, controlnet, vae = diffusers_models(*tiny)
    for name, module in [("unet", unet), ("vae", vae)]:
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, path)
        for load in (load_base, load_controlnet):
            msg = error(load, path)
            assert path.name in msg and "diffusers model folder" in msg and "single-file" in msg
    controlnet.save_pretrained(tmp_path / "controlnet")
    assert "ControlNet saved by diffusers; pass it as --controlnet" in error(load_base, tmp_path / "controlnet")
    (tmp_path / "model_index.json").write_text("{}")
    assert "diffusers pipeline folder" in error(load_base, tmp_path)
    assert "unknown" not in error(load_base, write(tmp_path / "x.pth", {"linear.weight": torch.zeros(2, 2)}))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_diffusers_controlnet_reads_as_the_official_file(tmp_path, name):
    # A ControlNet as diffusers saves it: diffusers' converter fills its ControlNetModel from the official file, and
    # save_pretrained writes the folder (config.json, diffusion_pytorch_model.safetensors). The folder, its weights
    # file alone, or a torch .bin / fp16 variant give back the official weights exactly (fp16: as rounded).
    from helpers import diffusers_models
    from diffusers import ControlNetModel
    cfg, model, net = tiny_models(name)
    theirs = diffusers_models(cfg, model, net)[1]
    theirs.save_pretrained(tmp_path / "plain")
    theirs.save_pretrained(tmp_path / "bin", safe_serialization=False)
    theirs.half().save_pretrained(tmp_path / "half", variant="fp16")
    theirs.float()
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["config.json",
                                                                    "diffusion_pytorch_model.fp16.safetensors"]
    for path in (tmp_path / "plain", tmp_path / "plain" / "diffusion_pytorch_model.safetensors", tmp_path / "bin"):
        assert same(load_controlnet(path, base=cfg), net)
    (tmp_path / "plain" / "diffusion_pytorch_model.bin").write_bytes(b"not read")   # safetensors first, as diffusers
    assert same(load_controlnet(tmp_path / "plain", base=cfg), net)
    half = load_controlnet(tmp_path / "half", base=cfg).state_dict()
    assert all(torch.equal(half[k], v.half().float()) for k, v in net.state_dict().items())
    # python -m minicontrol.export writes it as a 1.1 file, in the dtype it had
    assert run_module("minicontrol.export", tmp_path / "half", tmp_path / "control_half.safetensors") is None
    written = read(tmp_path / "control_half.safetensors")[0]
    assert kind(written) == "controlnet-1.1" and all(v.dtype == torch.float16 for v in written.values())
    again = load_controlnet(tmp_path / "control_half.safetensors", base=cfg).state_dict()
    assert again.keys() == half.keys() and all(torch.equal(again[k], v) for k, v in half.items())
    # the pooled residuals of the 1.1 shuffle model, as its diffusers folder's config.json says them
    assert not load_controlnet(tmp_path / "plain", base=cfg).config.global_average_pooling
    ControlNetModel.from_config(theirs.config, global_pool_conditions=True).save_pretrained(tmp_path / "shuffle")
    assert load_controlnet(tmp_path / "shuffle", base=cfg).config.global_average_pooling
    (tmp_path / "shuffle" / "config.json").write_text('{"global_pool_conditions": tru')
    assert "config.json: not readable JSON" in error(load_controlnet, tmp_path / "shuffle", base=cfg)
    (tmp_path / "shuffle" / "diffusion_pytorch_model.safetensors").unlink()          # a download cut short
    assert "folder without its weights" in error(load_controlnet, tmp_path / "shuffle", base=cfg)


@pytest.mark.slow
@torch.no_grad()
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_vae_file_on_its_own_reads_as_diffusers_reads_it(tmp_path, tiny, suffix):
    # A VAE published alone (vae-ft-mse-840000-ema-pruned and the like: the LDM VAE's keys with no prefix, with its
    # training loss's weights and EMA counters beside them) gives the same decoder as diffusers' own converter builds.
    from diffusers import AutoencoderKL as DiffusersVAE
    from diffusers.loaders import single_file_utils as sfu

    from helpers import ldm_original_config, randomize
    from minicontrol.vae import AutoencoderKL
    cfg, model, net = tiny
    own = randomize(AutoencoderKL(cfg.vae), seed=7).state_dict()
    extras = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4),
              "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(840000)}
    path = write(tmp_path / f"vae{suffix}", own | extras, wrap=True)
    vae = load_vae(path, cfg)
    vae_cfg = sfu.create_vae_diffusers_config_from_ldm(ldm_original_config(cfg), full_state_dict(model), image_size=64)
    reference = DiffusersVAE(**vae_cfg)
    reference.load_state_dict(sfu.convert_ldm_vae_checkpoint(own | extras, vae_cfg))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    expected = reference.eval().decode(z / cfg.vae.scale_factor).sample
    assert ((vae.decode(z) - expected).norm() / expected.norm()).item() <= 1e-5
    assert not torch.allclose(model.vae.decode(z), expected, atol=1e-2)      # not the base's VAE
    # an SD checkpoint's VAE is taken from it; files of other kinds, and a VAE with a stray key, are refused
    assert same(load_vae(write(tmp_path / "sd.pth", full_state_dict(model)), cfg), model.vae)
    assert "pass it as --vae" in error(load_base, path)
    assert "not a VAE" in error(load_vae, write(tmp_path / "c.pth", controlnet_state_dict(net)), cfg)
    stray = write(tmp_path / "stray.pth", own | {"decoder.extra.weight": torch.zeros(1)})
    assert "unexpected keys (first: decoder.extra.weight)" in error(load_vae, stray, cfg)


# the head of the official control_v11e_sd15_shuffle.yaml: the one line in which it differs from the other 1.1 yamls
SHUFFLE_YAML = """model:
  target: cldm.cldm.ControlLDM
  params:
    linear_start: 0.00085
    only_mid_control: False
    global_average_pooling: True

    control_stage_config:
      target: cldm.cldm.ControlNet
"""


@torch.no_grad()
def test_official_yaml_beside_a_controlnet_turns_on_pooling(tmp_path, tiny):
    # the 1.1 shuffle model's residuals are averaged over space (cldm.py: mean over dims 2, 3, kept as 1x1)
    cfg, _, net = tiny
    path = write(tmp_path / "control_v11e_sd15_shuffle.pth", controlnet_state_dict(net))
    plain = load_controlnet(path, base=cfg)
    yaml = tmp_path / "control_v11e_sd15_shuffle.yaml"
    for text in (SHUFFLE_YAML.replace("True", "False"), SHUFFLE_YAML.replace("    global_average_pooling: True\n", "")):
        yaml.write_text(text)
        assert not load_controlnet(path, base=cfg).config.global_average_pooling
    yaml.write_text(SHUFFLE_YAML)
    pooled = load_controlnet(path, base=cfg)
    assert pooled.config.global_average_pooling and not plain.config.global_average_pooling
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([13, 781]), torch.randn(2, 77, 64, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    for a, b in zip(plain(x, hint, t, ctx, 0.7), pooled(x, hint, t, ctx, 0.7)):
        assert b.shape == (*a.shape[:2], 1, 1) and torch.allclose(b, a.mean(dim=(2, 3), keepdim=True), atol=1e-6)


# the head of the official SD 2.x v2-inference-v.yaml, for the 768 models (v2-inference.yaml, for the 512 ones, has no
# parameterization line: LDM's default, eps)
V_YAML = """model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
"""


def test_official_yaml_beside_an_sd2_file_says_it_predicts_v(tmp_path, tiny, monkeypatch):
    # an SD 2.x file does not record eps or v: alone it is taken as eps with a warning; the official yaml kept beside it
    # under its name says which; a config given wins; a yaml of a kind not sampled here (x0) is refused by name
    from minicontrol import config
    cfg, model, _ = tiny_models("tiny-sd2")
    monkeypatch.setitem(config.PRESETS, "sd21", cfg)                    # the preset taken for an SD2 file, made tiny
    path = write(tmp_path / "v2-1_768-ema-pruned.ckpt", full_state_dict(model), wrap=True)
    alone = load_base(path)
    assert alone.config.parameterization == "eps" and "--config sd21-v" in guessed_prediction(path, alone)
    yaml = path.with_suffix(".yaml")
    yaml.write_text(V_YAML)
    loaded = load_base(path)
    assert loaded.config == replace(cfg, parameterization="v") and guessed_prediction(path, loaded) is None
    assert same(loaded.unet, model.unet)
    assert load_base(path, cfg).config.parameterization == "eps"
    yaml.write_text(V_YAML.replace('"v"', '"eps"'))
    assert load_base(path).config.parameterization == "eps" and guessed_prediction(path, alone) is None
    yaml.write_text(V_YAML.replace('"v"', '"x0"'))
    assert f"{yaml}: parameterization x0" in error(load_base, path)
    sd1 = write(tmp_path / "v1-5-pruned.ckpt", full_state_dict(tiny[1]), wrap=True)
    assert guessed_prediction(sd1, load_base(sd1, tiny[0])) is None                  # SD1 is eps alone: no guess


def test_inpainting_and_sdxl_bases_are_named(tmp_path, tiny):
    # sd-v1-5-inpainting's UNet takes 9 channels (latents, mask, masked-image latents): named, not a shape dump
    cfg, model, _ = tiny
    sd = full_state_dict(model)
    w = sd["model.diffusion_model.input_blocks.0.0.weight"]
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([w, w, w[:, :1]], dim=1)      # (C, 9, 3, 3)
    msg = error(load_base, write(tmp_path / "sd-v1-5-inpainting.ckpt", sd, wrap=True), cfg)
    assert "inpainting base" in msg and "--mask" in msg
    # and an SDXL file (its text encoders under conditioner.embedders.*) is named, not counted as unexpected keys
    sdxl = {"model.diffusion_model.input_blocks.0.0.weight": w, "conditioner.embedders.0.transformer.x": w[:1].clone()}
    assert "an SDXL checkpoint" in error(load_base, write(tmp_path / "sd_xl_base_1.0.safetensors", sdxl))


def test_sd2_controlnet_refused_with_sd1_base(tmp_path):
    sd2_cfg, _, sd2_net = tiny_models("tiny-sd2")
    path = write(tmp_path / "control_sd21.pth", controlnet_state_dict(sd2_net))
    msg = error(load_controlnet, path, base=preset("tiny-sd1"))
    assert "control_sd21.pth" in msg and "base" in msg
    assert msg.index("SD2.x") < msg.index("SD1.x")         # the ControlNet's family, then the base's (same width here)


def test_controlnet_for_another_unet_width_refused(tmp_path):
    cfg, _, net = tiny_models("tiny-sd1")
    path = tmp_path / "control_tiny.safetensors"
    save(path, controlnet_state_dict(net), cfg)
    wider = replace(cfg, unet=replace(cfg.unet, model_channels=2 * cfg.unet.model_channels))
    msg = error(load_controlnet, path, base=wider)
    assert "control_tiny.safetensors" in msg and "model_channels" in msg
    assert load_controlnet(path, base=cfg).zero_convs[0][0].weight.shape[0] == cfg.unet.model_channels
