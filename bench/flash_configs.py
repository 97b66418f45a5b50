"""Which tile configurations of our attention kernel run correctly on this GPU, and how fast, at each SD head width.

Each (tile, width) runs in its own process, since a faulting kernel poisons its CUDA context: first all of them check
correctness side by side (float16 and bfloat16, self- and cross-attention, NaN-poisoned outputs), then, one at a time,
the ones that passed are timed at that width's largest SD 512x512 self-attention shape beside SDPA, with q, k, v laid
out as the UNet passes them. Where a tile faults, it is checked once more with Triton's Hopper tensor-core path turned
off (DISABLE_MMA_V3=1), which tells whether the fault lies in that path. The last column weighs padding SD1.5's
40-wide heads to one 64-wide piece against our split into 32 + 16. --pick FILE writes the tiles to autotune over at each
width (the fastest that ran correctly there) as MINICONTROL_FLASH_TILES reads them.

    python bench/flash_configs.py [--pick FILE]
"""
import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TILES = [(64, 32, 4, 3), (128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3),
         (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3)]
SHAPES = {40: (8, 4096), 64: (5, 4096), 80: (8, 1024), 160: (8, 256)}      # width: (heads, tokens)


def unet_layout(b, n, h, d, dtype):
    """(B, H, N, d) views of a (B, N, H*d) projection, as the UNet passes them."""
    import torch
    return torch.randn(b, n, h * d, device="cuda").view(b, n, h, d).transpose(1, 2).to(dtype)


def child(tile, d, mode):
    import torch
    import torch.nn.functional as F
    from minicontrol.attention import attention_math, flash_attention
    h, n = SHAPES[d]
    if mode == "check":
        worst = 0.0
        for nq, nk in ((512, 512), (1000, 77), (n, n)):
            for dtype in (torch.float16, torch.bfloat16):
                q = unet_layout(2, nq, 3, d, torch.float32)
                k, v = (unet_layout(2, nk, 3, d, torch.float32) for _ in range(2))
                out = torch.full((2, 3, nq, d), float("nan"), device="cuda", dtype=dtype)
                flash_attention(*(t.to(dtype) for t in (q, k, v)), out=out, tile=tile)
                ref = attention_math(q, k, v)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                worst = max(worst, err if err == err else float("inf"))                  # NaN: an unwritten element
        torch.cuda.synchronize()
        print(json.dumps({"ok": worst <= 1e-2, "err": worst}))
    else:                  # "time", or "pad": ours at width 64 against SDPA at SD1.5's (2, 8, 4096, 40)
        from triton.testing import do_bench
        if mode == "pad":
            h, n, d = 8, 4096, 40
        q, k, v = (unet_layout(2, n, h, d, torch.float16) for _ in range(3))
        qo, ko, vo = (unet_layout(2, n, h, 64, torch.float16) for _ in range(3)) if mode == "pad" else (q, k, v)
        ours = do_bench(lambda: flash_attention(qo, ko, vo, tile=tile), warmup=25, rep=100)
        sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=25, rep=100)
        print(json.dumps({"ours": ours, "sdpa": sdpa}))


def spawn(tile, d, mode, env=None):
    cmd = [sys.executable, __file__, "--child", ",".join(map(str, tile)), str(d), mode]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        return {"fail": "timed out"}
    if res.returncode:
        last = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"fail": "illegal address" if "illegal memory access" in last else last[:160]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pick", help="write the tiles to autotune over to this file")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(tuple(int(x) for x in args.child[0].split(",")), int(args.child[1]), args.child[2])
    import torch
    import triton
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}", flush=True)
    jobs = [(tile, d) for tile in TILES for d in SHAPES]
    with ThreadPoolExecutor(8) as pool:
        checks = dict(zip(jobs, pool.map(lambda job: spawn(*job, "check"), jobs)))
    speed, pad = {}, {}
    for job in jobs:
        if checks[job].get("ok"):
            t = spawn(*job, "time")
            speed[job] = t["sdpa"] / t["ours"] if "ours" in t else None
            checks[job]["time"] = t
    for tile in TILES:                 # would 40-wide heads padded to 64 (one piece, no narrow ones) be faster?
        if speed.get((tile, 64)):
            t = spawn(tile, 64, "pad")
            pad[tile] = f"{t['sdpa'] / t['ours']:.2f}x" if "ours" in t else t.get("fail", "?")

    print("\n| tile (BLOCK_M, BLOCK_N, warps, stages) | " + " | ".join(
        f"d={d} (2,{h},{n},{d})" for d, (h, n) in SHAPES.items()) + " | d=40 padded to 64 |")
    print("|---|" + "---:|" * (len(SHAPES) + 1))
    for tile in TILES:
        cells = []
        for d in SHAPES:
            c = checks[(tile, d)]
            cells.append(f"{speed[(tile, d)]:.2f}x" if speed.get((tile, d)) else
                         "wrong ({:.0e})".format(c["err"]) if "err" in c and not c["ok"] else
                         c.get("fail") or c.get("time", {}).get("fail", "?"))
        print(f"| {tile} | " + " | ".join(cells) + f" | {pad.get(tile, '')} |")
    print("\n(speed: SDPA time / our time, float16; higher is better; the last column times our kernel on 64-wide "
          "heads against SDPA on the real 40-wide ones)")

    faulted = [job for job in jobs if "fail" in checks[job]]
    if faulted:
        tile, d = faulted[0]
        res = spawn(tile, d, "check", env=dict(os.environ, DISABLE_MMA_V3="1"))
        print(f"first fault {tile} d={d} again with DISABLE_MMA_V3=1: {res}")
    for job in jobs:
        print("raw", job, json.dumps(checks[job]))

    # per width, the three fastest tiles that ran there, plus the fastest that ran at every width (which the
    # autotuner offers at widths not measured here)
    everywhere = [t for t in TILES if all(speed.get((t, d)) for d in SHAPES)]
    best_everywhere = max(everywhere, key=lambda t: min(speed[(t, d)] for d in SHAPES), default=None)
    pick = {}
    for d in SHAPES:
        ran = sorted((t for t in TILES if speed.get((t, d))), key=lambda t: -speed[(t, d)])[:3]
        pick[d] = ran + [best_everywhere] if best_everywhere and best_everywhere not in ran else ran
    print("autotune over:", json.dumps(pick))
    if args.pick and best_everywhere:
        with open(args.pick, "w") as f:
            json.dump(pick, f)

if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
