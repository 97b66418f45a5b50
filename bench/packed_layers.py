"""SD1.5's convolutions and linear layers on the CPU, plain (PyTorch's Conv2d and Linear, oneDNN reordering the
weights at every call) beside packed for oneDNN once (minicontrol.cpu.pack_weights, as sample.py samples: the 3x3
convolutions in float32 as Winograd's F(2x2, 3x3)), each side in its own process with sample.py's allocator setting:
per layer at batch 2, float32 and bfloat16, the best time of 5 calls after a warm-up, and the ratio packed / plain.
Each side's convolutions get the input they get in the model: the plain ones NCHW, the packed ones channels-last (what
the packed convolution before them returns).

    python bench/packed_layers.py [--threads N] [--rounds 1]
"""
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# (name, layer, input shape): the 3x3 convolutions at each level of a 256x256 and a 512x512 sample, and the linear
# layers of the transformer blocks at the first and last level of a 512x512 one (tokens x width)
LAYERS = [
    ("conv 320, 64x64", lambda: torch.nn.Conv2d(320, 320, 3, padding=1), (2, 320, 64, 64)),
    ("conv 320, 32x32", lambda: torch.nn.Conv2d(320, 320, 3, padding=1), (2, 320, 32, 32)),
    ("conv 640, 32x32", lambda: torch.nn.Conv2d(640, 640, 3, padding=1), (2, 640, 32, 32)),
    ("conv 1280, 16x16", lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 16, 16)),
    ("conv 1280, 8x8", lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 8, 8)),
    ("conv 1280, 4x4", lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (2, 1280, 4, 4)),
    ("linear 320 -> 2560, 4096 tokens", lambda: torch.nn.Linear(320, 2560), (2, 4096, 320)),
    ("linear 1280 -> 320, 4096 tokens", lambda: torch.nn.Linear(1280, 320), (2, 4096, 1280)),
    ("linear 320 -> 320, 4096 tokens", lambda: torch.nn.Linear(320, 320, bias=False), (2, 4096, 320)),
    ("linear 1280 -> 10240, 256 tokens", lambda: torch.nn.Linear(1280, 10240), (2, 256, 1280)),
    ("linear 5120 -> 1280, 256 tokens", lambda: torch.nn.Linear(5120, 1280), (2, 256, 5120)),
    ("linear 768 -> 1280, 77 tokens", lambda: torch.nn.Linear(768, 1280, bias=False), (2, 77, 768)),
]


def side(args):
    from minicontrol.cpu import keep_freed_memory, pack_weights
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, make, shape in LAYERS:
            torch.manual_seed(0)
            model = torch.nn.Sequential(make()).to(dtype)
            if args.impl == "packed":
                pack_weights(model)
            x = torch.randn(shape).to(dtype)
            if args.impl == "packed" and x.dim() == 4:      # in the model a packed convolution's input is the
                x = x.to(memory_format=torch.channels_last)  # channels-last output of the one before it
            best = float("inf")
            with torch.inference_mode():
                model(x)
                for _ in range(5):
                    start = time.perf_counter()
                    model(x)
                    best = min(best, time.perf_counter() - start)
            times[f"{name}, {str(dtype)[6:]}"] = best
    print(json.dumps(times))


def main(args, keys):
    from common import side_row
    best = {}
    for _ in range(args.rounds):
        for impl in ("plain", "packed"):
            row = side_row([__file__, "--impl", impl] + [f"--{k}={getattr(args, k)}" for k in keys])
            best[impl] = {k: min(v, best.get(impl, row)[k]) for k, v in row.items()}
    print(f"SD1.5 layers, batch 2, CPU, {args.threads} threads, torch {torch.__version__}; best of 5 calls, "
          f"{args.rounds} round(s)")
    print("| layer, dtype | plain (ms) | packed (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for name, plain in best["plain"].items():
        packed = best["packed"][name]
        print(f"| {name} | {plain * 1e3:.2f} | {packed * 1e3:.2f} | {packed / plain:.3f} |")


if __name__ == "__main__":
    from common import parse_args
    options, names = parse_args()
    if options.impl:
        side(options)
    else:
        main(options, names)
