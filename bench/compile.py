"""Whether torch.compile pays off for a 20-step sample on the CPU: SD1.5-sized UNet + ControlNet (random weights,
bench/unet_forward.py's) in sample.py's CPU dtype, one guided DDIM step (batch 2) eager beside compiled
(torch.compile, inductor), each in its own process: the compiled side's first step (compiling included), then the
steps after it. A 20-step sample costs 20 eager steps, or the first compiled step and 19 more.

    python bench/compile.py [--size 512] [--steps 3] [--bf16 1] [--threads N]
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def side(args):
    from minicontrol.cpu import keep_freed_memory
    from unet_forward import build
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    _, unet, net = build("minicontrol", dtype=dtype)
    if args.impl == "compiled":
        unet = torch.compile(unet)
        net = torch.compile(net)
    g = torch.Generator().manual_seed(0)
    h = args.size // 8
    x = torch.randn(2, 4, h, h, generator=g).to(dtype)
    t = torch.full((2,), 500)
    ctx = torch.randn(2, 77, 768, generator=g).to(dtype)
    hint = torch.rand(2, 3, args.size, args.size, generator=g).to(dtype)
    times = []
    with torch.inference_mode():
        for _ in range(args.steps + 1):
            start = time.perf_counter()
            unet(x, t, ctx, control=net(x, hint, t, ctx))
            times.append(time.perf_counter() - start)
    print(json.dumps({"impl": args.impl, "first": times[0], "step": min(times[1:])}))


def main():
    from common import parse_args, side_row
    args, keys = parse_args(size=512, steps=3, bf16=1)
    if args.impl:
        return side(args)
    rows = {}
    for impl in ("eager", "compiled"):
        rows[impl] = side_row([__file__, "--impl", impl] + [f"--{k}={getattr(args, k)}" for k in keys])
    e, c = rows["eager"], rows["compiled"]
    print(f"SD1.5 UNet + ControlNet, {args.size}x{args.size}, batch 2, {'bfloat16' if args.bf16 else 'float32'}, CPU, "
          f"{args.threads} threads, torch {torch.__version__}")
    print("| impl | first step (s) | later steps (s) | 20-step sample (s) |")
    print("|---|---:|---:|---:|")
    for impl, r in rows.items():
        print(f"| {impl} | {r['first']:.1f} | {r['step']:.2f} | {r['first'] + 19 * r['step']:.1f} |")
    print(f"ratio compiled/eager, 20 steps with compiling: {(c['first'] + 19 * c['step']) / (e['first'] + 19 * e['step']):.3f}")


if __name__ == "__main__":
    main()
