"""The checks that need a CUDA GPU, in one run: our kernel against float32 math on the GPU at SD's widths and lengths
(forward into poisoned outputs, gradients through attention()), then an SD1.5 UNet + ControlNet forward at 512x512,
batch 2, float16, with our kernel and with SDPA, and a bf16 training step through the kernel.

    python bench/gpu_check.py
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minicontrol.attention as attn  # noqa: E402
from minicontrol.tuning import flash_attention  # noqa: E402
from minicontrol.config import preset  # noqa: E402
from minicontrol.controlnet import clone_encoder  # noqa: E402
from minicontrol.unet import UNet  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def kernel_checks():
    bad = 0
    for d in (40, 64, 80, 160):
        for nq, nk in ((4096, 4096), (1024, 1024), (256, 256), (64, 64), (4096, 77), (64, 77), (1000, 77)):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                g = torch.Generator(device="cuda").manual_seed(d + nq)
                q = torch.randn(2, nq, 3 * d, device="cuda", generator=g).view(2, nq, 3, d).transpose(1, 2)
                k, v = (torch.randn(2, 3, nk, d, device="cuda", generator=g) for _ in range(2))
                ref = attn.attention_math(q, k, v)
                out = torch.full((2, 3, nq, d), float("nan"), device="cuda", dtype=dtype)
                flash_attention(*(t.to(dtype) for t in (q, k, v)), out=out)
                e = rel(out, ref)
                ok = not out.isnan().any().item() and e <= TOL[dtype]
                qs, ks, vs = (t.to(dtype).detach().requires_grad_() for t in (q, k, v))
                gout = torch.randn_like(out)
                grads = torch.autograd.grad(attn.attention(qs, ks, vs), (qs, ks, vs), gout)
                qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
                refg = torch.autograd.grad(attn.attention_math(qf, kf, vf), (qf, kf, vf), gout.float())
                ge = max(rel(a, b) for a, b in zip(grads, refg))
                ok = ok and ge <= TOL[dtype]
                bad += not ok
                print(f"{'PASS' if ok else 'FAIL'} d={d} Nq={nq} Nk={nk} {str(dtype)[6:]}: fwd {e:.1e} grad {ge:.1e}")
    return bad


def timed(fn, n=5):
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def sd15_models():
    """SD1.5-sized UNet and ControlNet with every zero-initialised layer given weights, so outputs and gradients
    are not trivially zero."""
    torch.manual_seed(0)
    unet = UNet(preset("sd15").unet)
    for name, p in unet.named_parameters():
        if name.startswith("out.2") or ".out_layers.3." in name or ".proj_out." in name:
            p.data.normal_(std=0.01)
    net = clone_encoder(unet)
    for p in list(net.zero_convs.parameters()) + list(net.middle_block_out.parameters()) + \
            list(net.input_hint_block[-1].parameters()):
        p.data.normal_(std=0.01)
    return unet, net


@torch.no_grad()
def unet_step():
    unet, net = sd15_models()
    unet, net = unet.cuda().half().eval(), net.cuda().half().eval()
    x = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.half)
    t, ctx = torch.full((2,), 500, device="cuda"), torch.randn(2, 77, 768, device="cuda", dtype=torch.half)
    hint = torch.rand(2, 3, 512, 512, device="cuda", dtype=torch.half)
    step = lambda: unet(x, t, ctx, control=net(x, hint, t, ctx))
    res = {}
    for use in (True, False):
        attn.MODE = "ours" if use else "sdpa"
        res[use] = (timed(step), step().float())
    attn.MODE = "ours"
    print(f"SD1.5 UNet+ControlNet 512x512 batch 2 fp16 forward: ours {res[True][0] * 1e3:.1f} ms, SDPA "
          f"{res[False][0] * 1e3:.1f} ms, ratio {res[False][0] / res[True][0]:.3f}x, output rel diff "
          f"{rel(res[True][1], res[False][1]):.1e}, finite {bool(res[True][1].isfinite().all())}")


def train_step():
    unet, net = sd15_models()
    unet, net = unet.cuda().requires_grad_(False), net.cuda().train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    x, t = torch.randn(2, 4, 32, 32, device="cuda"), torch.randint(0, 1000, (2,), device="cuda")
    ctx, hint = torch.randn(2, 77, 768, device="cuda"), torch.rand(2, 3, 256, 256, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = (unet(x, t, ctx, control=net(x, hint, t, ctx)).float() - torch.randn_like(x)).pow(2).mean()
    loss.backward()
    finite = all(p.grad is None or p.grad.isfinite().all() for p in net.parameters())
    nonzero = sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in net.parameters())
    opt.step()
    print(f"bf16 autocast training step through the kernel: loss {loss.item():.4f}, grads finite {finite}, "
          f"{nonzero} ControlNet tensors with non-zero gradient")


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    attn.MODE = "ours"                      # our kernel everywhere it runs, SDPA only where compared with it
    bad = kernel_checks()
    print(f"kernel checks: {bad} failed")
    unet_step()
    train_step()
