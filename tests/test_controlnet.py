"""Zero-convolution identity at initialisation and the official tool_add_control rule."""
import pytest
import torch

from minicontrol.config import preset
from minicontrol.controlnet import clone_encoder, guess_mode_scales
from minicontrol.unet import UNet

from helpers import randomize


def test_fresh_controlnet_leaves_unet_output_unchanged():
    cfg = preset("tiny-sd1").unet
    unet = randomize(UNet(cfg)).eval()
    net = clone_encoder(unet)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 600])
    ctx, hint = torch.randn(2, 77, cfg.context_dim), torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        residuals = net(x, hint, t, ctx)
        assert all(torch.count_nonzero(r) == 0 for r in residuals)
        assert torch.equal(unet(x, t, ctx, control=residuals), unet(x, t, ctx))


def test_clone_copies_encoder_and_shares_no_storage():
    unet = randomize(UNet(preset("tiny-sd1").unet))
    net = clone_encoder(unet)
    usd, csd = unet.state_dict(), net.state_dict()
    copied = [k for k in csd if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")]
    assert copied and all(torch.equal(csd[k], usd[k]) for k in copied)
    ptrs = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    assert not any(p.untyped_storage().data_ptr() in ptrs for p in net.parameters())
    # new parts: zero convs and middle_block_out all zero; hint block default init except its last conv
    for k, v in csd.items():
        if k.startswith(("zero_convs", "middle_block_out", "input_hint_block.14")):
            assert torch.count_nonzero(v) == 0, k
        elif k.startswith("input_hint_block") and k.endswith("weight"):
            assert torch.count_nonzero(v) > 0, k


def test_guess_mode_scales_closed_form():
    # the official gradio demos' rule, written out: [strength * (0.825 ** float(12 - i)) for i in range(13)]
    for strength in (1.0, 0.6):
        s = guess_mode_scales(strength)
        assert len(s) == 13 and s[12] == strength and abs(s[0] - strength * 0.0995) < 1e-3
        for i in range(13):
            assert abs(s[i] - strength * 0.825 ** float(12 - i)) < 1e-12, i
    # fewer residuals (the tiny models' 4): counted from the deepest, which keeps the strength
    assert [round(x, 12) for x in guess_mode_scales(0.5, 4)] == [round(0.5 * 0.825 ** k, 12) for k in (3, 2, 1, 0)]


def test_scales_and_shuffle_pooling_closed_form():
    from dataclasses import replace
    from minicontrol.controlnet import ControlNet
    cfg = preset("tiny-sd1").unet
    net = randomize(ControlNet(cfg)).eval()
    pooled = ControlNet(replace(cfg, global_average_pooling=True)).eval()
    pooled.load_state_dict(net.state_dict())
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([10])
    ctx, hint = torch.randn(1, 77, cfg.context_dim), torch.rand(1, 3, 128, 128)
    scales = guess_mode_scales(0.5, 5)
    with torch.no_grad():
        plain, scaled, avg = net(x, hint, t, ctx), net(x, hint, t, ctx, scales), pooled(x, hint, t, ctx, scales)
    for p, s, a, k in zip(plain, scaled, avg, scales):
        assert torch.allclose(s, p * k, atol=1e-6)
        assert a.shape[2:] == (1, 1) and torch.allclose(a, (p * k).mean(dim=(2, 3), keepdim=True), atol=1e-6)


@pytest.mark.slow
def test_grad_checkpointing_recomputes_each_block_and_keeps_the_gradients():
    # --grad-checkpointing: every Block's forward runs again in the backward pass (torch.utils.checkpoint), and the
    # ControlNet's gradients through the locked UNet are those of plain autograd
    from minicontrol.unet import ResBlock, set_grad_checkpointing
    cfg = preset("tiny-sd1").unet
    unet = randomize(UNet(cfg)).requires_grad_(False)
    net = randomize(clone_encoder(unet), 1)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 600])
    ctx, hint = torch.randn(2, 77, cfg.context_dim), torch.rand(2, 3, 128, 128)
    calls = []
    for m in list(unet.modules()) + list(net.modules()):
        if isinstance(m, ResBlock):                  # its first layers: a recomputation may stop once past them
            m.in_layers.register_forward_hook(lambda *_: calls.append(1))
    runs = []
    for on in (False, True):
        set_grad_checkpointing(unet, on)
        set_grad_checkpointing(net, on)
        net.zero_grad()
        unet(x, t, ctx, net(x, hint, t, ctx)).square().mean().backward()
        forward_calls = len(calls)
        runs.append((forward_calls, torch.cat([p.grad.flatten() for p in net.parameters()])))
        calls.clear()
    (plain_calls, plain), (ckpt_calls, ckpt) = runs
    # recomputed: the blocks on the gradient's path, the ControlNet's and the UNet's output blocks (the locked UNet's
    # encoder and middle get no gradient, so they are not run again)
    on_path = [m for part in (net, unet.output_blocks) for m in part.modules() if isinstance(m, ResBlock)]
    assert ckpt_calls == plain_calls + len(on_path) and len(on_path) < plain_calls
    assert torch.allclose(ckpt, plain, rtol=1e-5, atol=1e-8)
