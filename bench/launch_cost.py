"""The CPU time our attention kernel takes to launch, measured on a machine without a GPU: tests/launch_sm90.py's
stand-in H100 driver lets Triton compile the kernel for sm_90 and take its own launch path, down to the call that
would start the kernel, which here does nothing. Side by side in one process, alternating, 1000 calls a round:

  * Triton's launch of the same kernel with every argument and constant given (the floor under any launcher);
  * flash_attention() (the output tensor, the arguments and tile worked out once for this layout): attention()'s path
    on a GPU where nothing needs gradients (sampling);
  * FlashAttention.apply(), the autograd Function around it, attention()'s path where gradients are needed (training),
    here in inference mode;
  * with --against REV, flash_attention() as minicontrol/attention.py was at git revision REV.

At SD2.1's smallest shape, (2, 20, 64, 64) float16, with the tile table as it ships (so the shape's tiles are timed
once, then looked up). On a GPU, bench/attention.py measures the same beside SDPA.

    python bench/launch_cost.py [--against REV] [--rounds 30]
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
import launch_sm90  # noqa: E402
import triton  # noqa: E402

launch_sm90.use_stand_in(227 * 1024)
import minicontrol.attention as attn  # noqa: E402

attn.CACHE = tempfile.mkdtemp()                  # the stand-in's tile picks are kept apart from a real GPU's


def module_at(rev):
    """minicontrol/attention.py as it was at git revision rev, imported under another name."""
    source = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:minicontrol/attention.py"], check=True,
                            capture_output=True, text=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "attention_at_rev.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("attention_at_rev", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--against")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    q, k, v = (torch.randn(2, 20, 64, 64, dtype=torch.float16) for _ in range(3))
    out = torch.empty_like(q)
    attn.flash_attention(q, k, v)                                   # times the shape's tiles, keeps the fastest
    block_m, block_n, warps, stages, pad = tile = attn.best_tiles[next(iter(attn.best_tiles))]
    kargs, meta = attn.kernel_args(q, k, v, out)
    d0, d1 = attn.split_width(64, pad)
    grid = (triton.cdiv(64, block_m), 40)
    calls = {"Triton's own launch, all arguments given": lambda: attn._flash_fwd[grid](
                 *kargs, **meta, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
             "flash_attention()": lambda: attn.flash_attention(q, k, v),
             "FlashAttention.apply()": lambda: attn.FlashAttention.apply(q, k, v)}
    if args.against:
        old = module_at(args.against)
        old.flash_attention(q, k, v)
        calls[f"flash_attention() at {args.against}"] = lambda: old.flash_attention(q, k, v)
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for name, fn in calls.items():
                start = time.perf_counter()
                for _ in range(1000):
                    fn()
                times[name].append((time.perf_counter() - start) * 1e3)        # microseconds per call
                launch_sm90.launches.clear()
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    floor = median[next(iter(calls))]
    print(f"{torch.__version__}, Triton {triton.__version__}, tile {tile}; medians of {args.rounds} rounds of 1000 "
          "calls")
    print("| call | CPU microseconds per call | vs Triton's own launch |")
    print("|---|---:|---:|")
    for name, us in median.items():
        print(f"| {name} | {us:.1f} | {us / floor:.2f}x |")


if __name__ == "__main__":
    main()
