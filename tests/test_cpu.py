"""The CPU's bfloat16 instructions as the kernel reports them, the allocator setting that keeps freed scratch memory,
counted in page faults by the kernel, and convolutions (Winograd's among them) and linear layers packed for oneDNN
against float64."""
import copy
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minicontrol.cpu import Packed, PackedConv2d, PackedLinear, WinogradConv2d, native_bf16, pack_weights

ROOT = Path(__file__).resolve().parents[1]
x86_linux = pytest.mark.skipif(platform.system() != "Linux" or platform.machine() != "x86_64",
                               reason="reads Linux's /proc/cpuinfo flags and glibc's allocator")


@x86_linux
def test_native_bf16_follows_the_cpu_flags():
    flags = set()
    for line in open("/proc/cpuinfo"):
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)


FAULTS = """
import resource, sys, torch
from minicontrol.cpu import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
torch.set_num_threads(2)
conv = torch.nn.Conv2d(1280, 1280, 3, padding=1)    # SD's deepest convolutions: 59 MB of weights
x = torch.randn(2, 1280, 8, 8)                       # a 256x256 sample at batch 2
faults = []
with torch.no_grad():
    for _ in range(6):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        conv(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[3:]))       # once the heap has grown to hold it (two calls); on a busy machine one call may fault
"""


@x86_linux
def test_convolution_scratch_memory_is_kept_and_not_faulted_in_again():
    # oneDNN reorders the weights into fresh scratch memory at every call: without the setting glibc maps it anew each
    # time and the kernel faults in every 4 KiB page (59 MB: about 14,400); with it the heap's pages are reused
    counts = {}
    for mode in ("plain", "keep"):
        res = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        counts[mode] = int(res.stdout.split()[-1])
    assert counts["plain"] > 10000 and counts["keep"] < 1000, counts


BF16 = pytest.param(torch.bfloat16, 2e-2, marks=pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN computes bfloat16 only from AVX-512 on"))


def sd_layers(g):
    """(layers, inputs, packed class): SD's kinds of convolution (3x3, 3x3 with stride 2 for downsampling, 1x1 for
    skips and zero convolutions, grouped) and of linear layer (with a bias: feed-forward, time embedding; without:
    q, k, v), each with two inputs of different shapes (tokens as (B, N, C), time embeddings as (B, C))."""
    convs = [torch.nn.Conv2d(64, 96, 3, padding=1), torch.nn.Conv2d(64, 64, 3, stride=2, padding=1),
             torch.nn.Conv2d(64, 32, 1), torch.nn.Conv2d(64, 64, 3, padding=1, groups=4)]
    conv_inputs = [torch.randn(2, 64, 9, 9, generator=g), torch.randn(1, 64, 12, 7, generator=g)]
    linears = [torch.nn.Linear(64, 96), torch.nn.Linear(64, 48, bias=False)]
    linear_inputs = [torch.randn(2, 50, 64, generator=g), torch.randn(3, 64, generator=g)]
    return [(convs, conv_inputs, PackedConv2d), (linears, linear_inputs, PackedLinear)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), BF16])
@pytest.mark.parametrize("kind", [0, 1], ids=["convolutions", "linears"])
def test_packed_layers_match_the_plain_ones(kind, dtype, tol):
    # float64 for the reference; the second input, of another shape, runs on the weights packed for the first
    layers, inputs, packed_class = sd_layers(torch.Generator().manual_seed(0))[kind]
    for layer in layers:
        exact = [layer.double()(x.double()) for x in inputs]
        model = torch.nn.Sequential(layer.to(dtype))
        pack_weights(model)
        with torch.no_grad():
            outs = [model(x.to(dtype)) for x in inputs]
        assert isinstance(model[0], packed_class) and model[0].weight.is_mkldnn
        for out, ref in zip(outs, exact):
            assert out.shape == ref.shape
            assert ((out.double() - ref).norm() / ref.norm()).item() < tol


def test_wide_3x3_float32_convolutions_run_as_winograd_and_match_float64():
    g = torch.Generator().manual_seed(0)
    wide = torch.nn.Conv2d(256, 96, 3, padding=1)
    exact = copy.deepcopy(wide).double()
    model = torch.nn.ModuleDict({"wide": wide, "narrow": torch.nn.Conv2d(128, 96, 3, padding=1),
                                 "strided": torch.nn.Conv2d(256, 96, 3, stride=2, padding=1),
                                 "in_bfloat16": torch.nn.Conv2d(256, 96, 3, padding=1).to(torch.bfloat16)})
    pack_weights(model)
    assert isinstance(model["wide"], WinogradConv2d)
    assert not any(isinstance(model[name], WinogradConv2d) for name in ("narrow", "strided", "in_bfloat16"))
    # even and odd sizes (the odd ones padded to whole 2x2 output tiles and cropped), one pixel, another batch
    for shape in [(2, 256, 8, 10), (1, 256, 9, 7), (1, 256, 1, 1), (3, 256, 6, 6)]:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            out = model["wide"](x)
            ref = exact(x.double())
        assert out.shape == ref.shape
        assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_a_packed_unet_and_controlnet_give_the_float64_output():
    from helpers import randomize
    from minicontrol.config import preset
    from minicontrol.controlnet import clone_encoder
    from minicontrol.model import StableDiffusion
    torch.manual_seed(0)
    unet = randomize(StableDiffusion(preset("tiny")).unet, seed=1, std=0.05).eval()
    net = randomize(clone_encoder(unet), seed=2, std=0.05).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet.config.context_dim, generator=g)
    hint = torch.rand(2, 3, 64, 64, generator=g)
    t = torch.tensor([10, 900])
    keys = list(unet.state_dict()) + list(net.state_dict())
    unet64 = copy.deepcopy(unet).double()
    net64 = copy.deepcopy(net).double()
    with torch.no_grad():
        exact = unet64(x.double(), t, context.double(), control=net64(x.double(), hint.double(), t, context.double()))
    pack_weights(unet)
    pack_weights(net)
    with torch.no_grad():
        packed = unet(x, t, context, control=net(x, hint, t, context))
    modules = list(unet.modules()) + list(net.modules())
    layers = [m for m in modules if isinstance(m, Packed)]
    assert layers and all(m.weight.is_mkldnn for m in layers)
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in modules)
    packed_keys = list(unet.state_dict()) + list(net.state_dict())
    assert any(".products.15." in key for key in packed_keys)                  # a WinogradConv2d among them
    assert {re.sub(r"\.products\.\d+", "", key) for key in packed_keys} == set(keys)    # else the official names
    assert ((packed.double() - exact).norm() / exact.norm()).item() < 1e-5
