"""The CPU time our attention kernel takes to launch, measured on a machine without a GPU: tests/launch_sm90.py's
stand-in H100 driver lets Triton compile the kernel for sm_90 and take its own launch path, down to the call that
would start the kernel, which here does nothing. Side by side in one process, alternating, 1000 calls a round:

  * Triton's launch of the same kernel with every argument and constant given (the floor under any launcher);
  * flash_attention() (the output tensor, the arguments and tile worked out once for this layout): attention()'s path
    on a GPU where nothing needs gradients (sampling);
  * plan() and FlashAttention.apply(), the autograd Function around it, attention()'s path where gradients are needed
    (training), here in inference mode;
  * with --against REV, flash_attention() as it was at git revision REV.

At SD2.1's smallest shape, (2, 20, 64, 64) float16, with the tile table as it ships (so the shape's tiles are timed
once, then looked up). On a GPU, bench/attention.py measures the same beside SDPA.

    python bench/launch_cost.py [--against REV] [--rounds 30]
"""
import argparse
import importlib
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
import minicontrol.flash as flash  # noqa: E402
import minicontrol.tuning as tuning  # noqa: E402

tuning.CACHE = tempfile.mkdtemp()                # the stand-in's tile picks are kept apart from a real GPU's


def flash_attention_at(rev):
    """flash_attention() as it was at git revision rev: minicontrol/ from then, imported under another name."""
    folder = tempfile.mkdtemp()
    files = subprocess.run(["git", "-C", ROOT, "archive", rev, "minicontrol"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", folder], input=files, check=True)
    os.rename(os.path.join(folder, "minicontrol"), os.path.join(folder, "minicontrol_at_rev"))
    sys.path.insert(0, folder)
    where = "tuning" if os.path.exists(os.path.join(folder, "minicontrol_at_rev", "tuning.py")) else "attention"
    module = importlib.import_module(f"minicontrol_at_rev.{where}")
    module.CACHE = tempfile.mkdtemp()
    return module.flash_attention


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--against")
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    q, k, v = (torch.randn(2, 20, 64, 64, dtype=torch.float16) for _ in range(3))
    out = torch.empty_like(q)
    tuning.flash_attention(q, k, v)                                 # times the shape's tiles, keeps the fastest
    kargs, meta = flash.kernel_args(q, k, v, out)
    block_m, block_n, warps, stages, pad = tile = tuning.pick(q, k, v, kargs, meta)            # that tile
    d0, d1 = flash.split_width(64, pad)
    grid = (triton.cdiv(64, block_m), 40)
    calls = {"Triton's own launch, all arguments given": lambda: flash._flash_fwd[grid](
                 *kargs, **meta, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages),
             "flash_attention()": lambda: tuning.flash_attention(q, k, v),
             "plan() and FlashAttention.apply()": lambda: flash.FlashAttention.apply(q, k, v, tuning.plan(q, k, v))}
    if args.against:
        old = flash_attention_at(args.against)
        old(q, k, v)
        calls[f"flash_attention() at {args.against}"] = lambda: old(q, k, v)
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
