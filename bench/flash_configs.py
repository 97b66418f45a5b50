"""Which tile configurations of our attention kernel run correctly on this GPU, and how fast, at each SD head width.

A faulting kernel poisons its CUDA context, so the work runs in child processes: first every (tile, width) checks
correctness in its own process, side by side (float16 and bfloat16, self- and cross-attention, NaN-poisoned outputs),
then one process per width times the tiles that passed there at that width's largest SD 512x512 self-attention shape
beside SDPA, with q, k, v laid out as the UNet passes them (should one fault, the rest are timed in a fresh process).
Each block shape runs with the head width split into power-of-two pieces and, where that differs, padded to pieces of 64
or more (40 -> 64, 80 -> 128, 160 -> 128 + 64). Where a tile faults, it is checked once more with Triton's Hopper
tensor-core path turned off (DISABLE_MMA_V3=1), which tells whether the fault lies in that path, and under
compute-sanitizer where the machine has it (which access faults). --pick FILE writes the tiles to autotune over at each
width (the fastest that ran correctly there) as MINICONTROL_FLASH_TILES reads them, before those two checks.
--budget SECONDS: work not started by then is left out and the table printed with what was measured.

    python bench/flash_configs.py [--pick FILE] [--budget SECONDS]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
# the last two are BLOCK_N = 64 tiles without software pipelining (one stage: no asynchronous copies ahead of the
# loop), which tells whether the BLOCK_N >= 64 faults lie in the pipelined copies (BENCHMARKS.md)
BLOCKS = [(64, 32, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
          (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 1), (128, 64, 8, 1)]
TILES = [(*block, pad) for pad in (False, True) for block in BLOCKS]
SHAPES = {40: (8, 4096), 64: (5, 4096), 80: (8, 1024), 160: (8, 256)}      # width: (heads, tokens)
DEADLINE = float("inf")                                                       # --budget sets it
LATE = "not run (out of time)"


def unet_layout(b, n, h, d, dtype):
    """(B, H, N, d) views of a (B, N, H*d) projection, as the UNet passes them."""
    import torch
    return torch.randn(b, n, h * d, device="cuda").view(b, n, h, d).transpose(1, 2).to(dtype)


def check(tile, d):
    import torch
    from minicontrol.attention import attention_math
    from minicontrol.tuning import flash_attention
    worst = 0.0
    for nq, nk in ((512, 512), (1000, 77), (SHAPES[d][1],) * 2):
        for dtype in (torch.float16, torch.bfloat16):
            q = unet_layout(2, nq, 3, d, torch.float32)
            k, v = (unet_layout(2, nk, 3, d, torch.float32) for _ in range(2))
            out = torch.full((2, 3, nq, d), float("nan"), device="cuda", dtype=dtype)
            flash_attention(*(t.to(dtype) for t in (q, k, v)), out=out, tile=tile)
            ref = attention_math(q, k, v)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            worst = max(worst, err if err == err else float("inf"))                      # NaN: an unwritten element
    torch.cuda.synchronize()
    print(json.dumps({"ok": worst <= 1e-2, "err": worst}))


def time_tiles(tiles, d):
    """One line per tile: our time and SDPA's at width d's shape."""
    import torch.nn.functional as F
    from triton.testing import do_bench
    import torch
    from minicontrol.tuning import flash_attention
    h, n = SHAPES[d]
    q, k, v = (unet_layout(2, n, h, d, torch.float16) for _ in range(3))
    sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=100)
    for tile in tiles:
        ours = do_bench(lambda: flash_attention(q, k, v, tile=tile), warmup=25, rep=100)
        print(json.dumps({"tile": tile, "ours": ours, "sdpa": sdpa}), flush=True)


def spawn(args, env=None):
    """Run this file as a child; its stdout lines as JSON, and the reason if it failed."""
    left = DEADLINE - time.time()
    if left < 5:
        return [], LATE
    try:
        res = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], capture_output=True, text=True,
                             timeout=min(240, left), env=env)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")], "timed out"
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode == 0:
        return lines, None
    last = (res.stderr.strip().splitlines() or ["?"])[-1]
    return lines, "illegal address" if "illegal memory access" in last else last[:160]


def timings(tiles, d):
    """SDPA time / our time for each tile; where a child faults, that tile gets the reason and the rest a new child."""
    result, todo = {}, list(tiles)
    while todo:
        lines, fail = spawn(["time", todo, d])
        for line in lines:
            result[tuple(line["tile"])] = line["sdpa"] / line["ours"]
        todo = [t for t in todo if t not in result]
        if fail and todo:
            result[todo.pop(0)] = fail
    return result


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pick", help="write the tiles to autotune over at each width to this JSON file")
    p.add_argument("--budget", type=float, help="seconds for the whole run; what would start later is left out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        mode, tiles, *rest = json.loads(args.child)
        return check(tuple(tiles), *rest) if mode == "check" else time_tiles([tuple(t) for t in tiles], *rest)
    global DEADLINE
    DEADLINE = time.time() + (args.budget or float("inf"))
    import torch
    import triton
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}", flush=True)
    from minicontrol.flash import split_width
    # a padded tile only where padding changes the pieces (40 -> 64, 80 -> 128, 160 -> 128 + 64)
    jobs = [(tile, d) for tile in TILES for d in SHAPES if not tile[-1] or split_width(d, True) != split_width(d)]
    with ThreadPoolExecutor(8) as pool:
        checked = dict(zip(jobs, pool.map(lambda job: spawn(["check", *job]), jobs)))
    cells, speed = {}, {}
    for job, (lines, fail) in checked.items():
        cells[job] = fail or ("wrong ({:.0e})".format(lines[-1]["err"]) if not lines[-1]["ok"] else None)
    for d in SHAPES:
        for tile, res in timings([t for t in TILES if cells.get((t, d), "") is None], d).items():
            if isinstance(res, float):
                speed[(tile, d)] = res
            cells[(tile, d)] = f"{res:.2f}x" if isinstance(res, float) else res

    print("\n| BLOCK_M, BLOCK_N, warps, stages | pieces | " + " | ".join(
        f"d={d} (2,{h},{n},{d})" for d, (h, n) in SHAPES.items()) + " |")
    print("|---|---|" + "---:|" * len(SHAPES))
    for tile in TILES:
        print(f"| {', '.join(map(str, tile[:4]))} | {'padded' if tile[-1] else 'split'} | " +
              " | ".join(cells.get((tile, d), "") for d in SHAPES) + " |")
    print("\n(speed: SDPA time / our time, float16; higher is better. split: 40 = 32 + 16, 80 = 64 + 16, "
          "160 = 128 + 32; padded: 40 -> 64, 80 -> 128, 160 -> 128 + 64)")

    # per width, the three fastest tiles that ran there, plus the fastest that ran at every width (which the
    # autotuner offers at widths not measured here)
    everywhere = [t for t in TILES if not t[-1] and all((t, d) in speed for d in SHAPES)]
    best_everywhere = max(everywhere, key=lambda t: min(speed[(t, d)] for d in SHAPES), default=None)
    pick = {}
    for d in SHAPES:
        ran = sorted((t for t in TILES if (t, d) in speed), key=lambda t: -speed[(t, d)])[:3]
        pick[d] = ran + [best_everywhere] if best_everywhere and best_everywhere not in ran else ran
    print("autotune over:", json.dumps(pick))
    if args.pick and all(pick.values()):                   # a tile for every width
        with open(args.pick, "w") as f:
            json.dump(pick, f)

    faulted = [job for job in jobs if checked[job][1] == "illegal address"]
    if faulted:                                            # after the pick: what is left of the budget, if any
        tile, d = faulted[0]
        lines, fail = spawn(["check", tile, d], env=dict(os.environ, DISABLE_MMA_V3="1"))
        print(f"first fault, {tile} at d={d}, checked again with DISABLE_MMA_V3=1:", fail or lines[-1], flush=True)
        print(f"first fault, {tile} at d={d}, under compute-sanitizer:", sanitized(tile, d))


def sanitized(tile, d):
    """compute-sanitizer's first reports of a faulting check: an invalid __shared__ access lies in the code the compiler
    made, an invalid __global__ one in the addresses the kernel computes."""
    left = DEADLINE - time.time()
    if not shutil.which("compute-sanitizer") or left < 20:
        return "not run (no compute-sanitizer)" if left >= 20 else LATE
    cmd = ["compute-sanitizer", "--tool", "memcheck", "--print-limit", "2", sys.executable, __file__, "--child",
           json.dumps(["check", tile, d])]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=min(120, left))
    except subprocess.TimeoutExpired:
        return "timed out"
    found = [line.strip("= ").strip() for line in res.stdout.splitlines()
             if line.startswith("=========") and any(w in line for w in ("Invalid", " at ", "Address", "ERROR"))]
    return " / ".join(found[:8]) or (res.stdout + res.stderr).strip()[-300:]


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
