"""Training data read with and without the read-ahead thread (minicontrol.data.prefetched), in one process: fill50k-like
data (512x512 PNG control and target per item), batches of 4 read as train.py reads them, beside a training step
modelled as a wait that leaves the CPU free, as a CUDA step does while the CPU waits for the GPU.

    python bench/data_loading.py [--steps 40] [--step-ms 0,100,200] [--batch 4]
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def make_data(folder: Path, n: int):
    """n items of smooth colour fields with noise (photograph-like: PNG compresses them as it does photos)."""
    rng = np.random.default_rng(0)
    with open(folder / "prompt.json", "w") as f:
        for i in range(n):
            for name in ("source", "target"):
                small = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
                big = np.asarray(small.resize((512, 512), Image.BICUBIC)).astype(np.int16)
                big = np.clip(big + rng.integers(-8, 9, big.shape), 0, 255).astype(np.uint8)
                Image.fromarray(big).save(folder / f"{name}_{i}.png")
            f.write(json.dumps({"source": f"source_{i}.png", "target": f"target_{i}.png", "prompt": "x"}) + "\n")


def run(items, steps, batch, step_s, ahead):
    """Seconds per step: read the step's batch (from the read-ahead thread when ahead), then the modelled step."""
    from minicontrol.data import batch_indices, load_item, prefetched

    def read(n):
        return [load_item(items[i], 512, i + 1) for i in batch_indices(len(items), batch, n, 0)]
    batches = prefetched(read, range(steps)) if ahead else map(read, range(steps))
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
        time.sleep(step_s)
    return (time.perf_counter() - start) / steps


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--step-ms", default="0,100,200")
    args = p.parse_args()
    from minicontrol.data import read_index
    with tempfile.TemporaryDirectory() as d:
        make_data(Path(d), 64)
        items = read_index(Path(d))
        run(items, 2, args.batch, 0.0, False)                                   # warm the page cache
        print(f"reading batches of {args.batch} items (two 512x512 PNGs each), {args.steps} steps, "
              f"{os.cpu_count()} cores; ms per step")
        print("| modelled step (ms) | read, then step | read ahead | ratio |")
        print("|---:|---:|---:|---:|")
        for ms in map(float, args.step_ms.split(",")):
            plain = run(items, args.steps, args.batch, ms / 1000, False)
            ahead = run(items, args.steps, args.batch, ms / 1000, True)
            print(f"| {ms:.0f} | {plain * 1000:.1f} | {ahead * 1000:.1f} | {ahead / plain:.3f} |")


if __name__ == "__main__":
    main()
