"""Numerical parity with diffusers, filled by diffusers' own converters for original LDM checkpoints."""
import pytest
import torch
import torch.nn.functional as F

from helpers import diffusers_models, rel_err, tiny_models


@pytest.fixture(scope="module", params=["tiny-sd1", "tiny-sd2"])
def pair(request):
    cfg, model, net = tiny_models(request.param)
    return cfg, model, net, diffusers_models(cfg, model, net)


def inputs(cfg, b=2, h=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, 4, h, h, generator=g)
    t = torch.tensor([13, 781])[:b]
    ctx = torch.randn(b, 77, cfg.unet.context_dim, generator=g)
    hint = torch.rand(b, 3, 8 * h, 8 * h, generator=g)
    return x, t, ctx, hint


@torch.no_grad()
def test_controlnet_and_unet_match_diffusers(pair):
    cfg, model, net, (d_unet, d_net, _) = pair
    x, t, ctx, hint = inputs(cfg)
    ours = net(x, hint, t, ctx)
    down, mid = d_net(x, t, ctx, hint, return_dict=False)
    assert len(ours) == len(down) + 1
    for a, b in zip(ours, list(down) + [mid]):
        assert rel_err(a, b) <= 1e-4
    plain, controlled = model.unet(x, t, ctx), model.unet(x, t, ctx, control=ours)
    assert rel_err(plain, d_unet(x, t, ctx).sample) <= 1e-4
    ref = d_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert rel_err(controlled, ref) <= 1e-4
    assert rel_err(controlled, plain) > 1e-2            # the residuals really changed the output
    # only_mid_control (the official ControlledUnetModel's flag): the middle residual alone is added
    zeros = [torch.zeros_like(d) for d in down]
    ref = d_unet(x, t, ctx, down_block_additional_residuals=zeros, mid_block_additional_residual=mid).sample
    mid_only = model.unet(x, t, ctx, control=ours, only_mid_control=True)
    assert rel_err(mid_only, ref) <= 1e-4 and rel_err(mid_only, controlled) > 1e-2 and rel_err(mid_only, plain) > 1e-3


@torch.no_grad()
def test_vae_matches_diffusers(pair):
    cfg, model, _, (_, _, d_vae) = pair
    img = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = model.vae.moments(img)
    dist = d_vae.encode(img).latent_dist
    assert rel_err(mean, dist.mean) <= 1e-4 and rel_err(logvar, dist.logvar) <= 1e-4
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    assert rel_err(model.vae.decode(z), d_vae.decode(z / cfg.vae.scale_factor).sample) <= 1e-4


@torch.no_grad()
@pytest.mark.parametrize("settings", [{"global_pool_conditions": True},
                                      {"controlnet_conditioning_channel_order": "bgr"}])
@pytest.mark.slow
def test_diffusers_controlnet_folder_settings_act_as_in_diffusers(pair, tmp_path, settings):
    # a diffusers ControlNet whose config.json pools its residuals (the 1.1 shuffle model) or takes the image's
    # channels in BGR order, loaded here from the folder, gives the residuals diffusers' own forward gives
    from diffusers import ControlNetModel

    from minicontrol.loading import load_controlnet
    cfg, model, net, (_, d_net, _) = pair
    theirs = ControlNetModel.from_config(d_net.config, **settings)
    theirs.load_state_dict(d_net.state_dict())
    theirs.save_pretrained(tmp_path)
    x, t, ctx, hint = inputs(cfg)
    ours = load_controlnet(tmp_path, base=cfg)(x, hint, t, ctx)
    down, mid = theirs.eval()(x, t, ctx, hint, return_dict=False)
    plain = net(x, hint, t, ctx)
    for a, b, c in zip(ours, list(down) + [mid], plain):
        assert rel_err(a, b) <= 1e-5 and rel_err(a, c) > 1e-3      # the setting changed every residual


def test_group_norm_sums_16_bit_inputs_in_float32():
    # as the official GroupNorm32 (x.float(), then back): against float64 on the same bfloat16 values, only the
    # final rounding to bfloat16 may differ; inputs far from zero, where sums kept in bfloat16 lose the variance
    from minicontrol.unet import GroupNorm32
    torch.manual_seed(0)
    x = (torch.randn(2, 64, 16, 16) + 40).bfloat16()
    norm = GroupNorm32(64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    norm = norm.bfloat16()
    expected = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), 1e-5)
    got = norm(x)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - expected).abs() <= expected.abs() * 2 ** -7 + 2 ** -9).all()
