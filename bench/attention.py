"""Attention at Stable Diffusion's shapes (batch 2, 512x512 and 768x768): our Triton kernel, PyTorch's SDPA (whatever
backend it picks) and plain math, in ms and useful TFLOP/s (4 * B * H * Nq * Nk * d), with each one's relative error
against a float32 reference, our tile, and which of the two attention() picked there (kept on disk, as when sampling);
then the CPU time one call of each takes to launch (an SD1.5 UNet + ControlNet step makes 46 calls, many of them a few
microseconds of GPU work). Needs a CUDA GPU.

    python bench/attention.py [--dtype float16|bfloat16]
"""
import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import minicontrol.attention as attn  # noqa: E402
import minicontrol.tuning as tuning  # noqa: E402
from minicontrol.attention import attention_math  # noqa: E402
from minicontrol.flash import kernel_args  # noqa: E402
from minicontrol.tuning import flash_attention  # noqa: E402


def sd_shapes(model, size):
    """(heads, Nq, Nk, d) of every attention layer kind in one UNet at this image size."""
    tokens = [(size // 8 // 2 ** i) ** 2 for i in range(4)]          # levels 0..2 and the middle block
    if model == "SD1.5":
        heads_width = [(8, 40), (8, 80), (8, 160), (8, 160)]
    else:                                                             # SD2.1: 64-wide heads
        heads_width = [(5, 64), (10, 64), (20, 64), (20, 64)]
    rows = []
    for n, (h, d) in zip(tokens, heads_width):
        rows += [(h, n, n, d), (h, n, 77, d)]
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    p.add_argument("--batch", type=int, default=2)
    args = p.parse_args()
    dtype, b = getattr(torch, args.dtype), args.batch
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}, batch {b}")
    print("| model | size | H | Nq | Nk | d | ours ms | SDPA ms | math ms | ours TFLOP/s | SDPA TFLOP/s | ours/SDPA speed "
          "| err ours | err SDPA | err math | config | picked |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for model in ("SD1.5", "SD2.1"):
        for size in (512, 768):
            for h, nq, nk, d in sd_shapes(model, size):
                g = torch.Generator(device="cuda").manual_seed(0)
                # q as the UNet passes it: a (B, N, H*d) projection viewed as (B, H, N, d)
                q = torch.randn(b, nq, h * d, device="cuda", generator=g).view(b, nq, h, d).transpose(1, 2)
                k, v = (torch.randn(b, nk, h * d, device="cuda", generator=g).view(b, nk, h, d).transpose(1, 2)
                        for _ in range(2))
                ref = attention_math(q, k, v)                                          # float32
                q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
                fns = {"ours": lambda: flash_attention(q16, k16, v16),
                       "sdpa": lambda: F.scaled_dot_product_attention(q16, k16, v16),
                       "math": lambda: attention_math(q16, k16, v16)}
                ms = {name: do_bench(fn, warmup=25, rep=100) for name, fn in fns.items()}
                err = {name: ((fn().float() - ref).norm() / ref.norm()).item() for name, fn in fns.items()}
                flops = 4 * b * h * nq * nk * d
                tf = {name: flops / (t * 1e-3) / 1e12 for name, t in ms.items()}
                args16, meta = kernel_args(q16, k16, v16, torch.empty_like(q16))     # as flash_attention makes them
                m, n, w, st, pad = tuning.pick(q16, k16, v16, args16, meta)          # our tile for this shape
                cfg = f"{m}x{n} w{w} s{st}" + (" padded" if pad else "")
                picked = "SDPA" if tuning.pick(q16, k16, v16, args16, meta, sdpa=True) == tuning.SDPA else "ours"
                print(f"| {model} | {size} | {h} | {nq} | {nk} | {d} | {ms['ours']:.3f} | {ms['sdpa']:.3f} | "
                      f"{ms['math']:.3f} | {tf['ours']:.0f} | {tf['sdpa']:.0f} | {ms['sdpa'] / ms['ours']:.2f}x | "
                      f"{err['ours']:.1e} | {err['sdpa']:.1e} | {err['math']:.1e} | {cfg} | {picked} |", flush=True)
                del q, k, v, ref, q16, k16, v16
    launch_cost(b, dtype)


def launch_cost(b, dtype, calls=2000):
    """CPU microseconds per call at SD2.1's smallest shape, calls queued without waiting: GPU work of a few
    microseconds each, so the loop runs at the speed of the Python and C++ that launch it."""
    q, k, v = (torch.randn(b, 20, 64, 64, device="cuda", dtype=dtype) for _ in range(3))
    fns = {f"attention() (MINICONTROL_ATTENTION={attn.MODE})": lambda: attn.attention(q, k, v),
           "ours, flash_attention()": lambda: flash_attention(q, k, v),
           "SDPA": lambda: F.scaled_dot_product_attention(q, k, v)}
    print(f"\nlaunch cost at ({b}, 20, 64, 64), {dtype}, inference mode: CPU microseconds per call, best of 5 runs "
          f"of {calls}")
    with torch.inference_mode():
        for name, fn in fns.items():
            best = float("inf")
            for _ in range(5):
                fn()
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                best = min(best, (time.perf_counter() - start) / calls * 1e6)
                torch.cuda.synchronize()
            print(f"{name}: {best:.1f}")


if __name__ == "__main__":
    main()
