"""Each tile configuration of our attention kernel at each SD head width, in its own process (a faulting kernel
poisons its CUDA context, so one fault must not hide the other widths): correctness in float16 and bfloat16, and its
time at that width's largest SD1.5 or SD2.1 512x512 self-attention shape, beside SDPA. Width 64 has no second piece
(D1 = 0) and the 1-stage tiles have no software pipelining: together they tell which part of a fault is to blame.

    python bench/flash_configs.py
"""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TILES = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 3),
         (64, 32, 4, 3), (128, 32, 4, 4), (64, 32, 2, 3), (128, 64, 4, 1), (64, 64, 4, 1)]
SHAPES = {40: (8, 4096), 64: (5, 4096), 80: (8, 1024), 160: (8, 256)}      # width: (heads, tokens)


def check(tile, d):
    import torch
    import torch.nn.functional as F
    from triton.testing import do_bench
    from minicontrol.attention import attention_math, flash_attention
    h, n = SHAPES[d]
    errs = []
    for nq, nk in ((512, 512), (1000, 77)):
        for dtype in (torch.float16, torch.bfloat16):
            q = torch.randn(2, nq, 3 * d, device="cuda").view(2, nq, 3, d).transpose(1, 2)
            k, v = (torch.randn(2, 3, nk, d, device="cuda") for _ in range(2))
            out = flash_attention(*(t.to(dtype) for t in (q, k, v)), tile=tile)
            ref = attention_math(q, k, v)
            errs.append(((out.float() - ref).norm() / ref.norm()).item())
    q, k, v = (torch.randn(2, h, n, d, device="cuda", dtype=torch.float16) for _ in range(3))
    ours = do_bench(lambda: flash_attention(q, k, v, tile=tile), warmup=10, rep=50)
    sdpa = do_bench(lambda: F.scaled_dot_product_attention(q, k, v), warmup=10, rep=50)
    ok = max(errs) <= 1e-2
    print(f"  d={d} {'ok' if ok else 'WRONG'} max err {max(errs):.1e}; (2,{h},{n},{d}) fp16 ours {ours:.3f} ms, "
          f"SDPA {sdpa:.3f} ms, speed {sdpa / ours:.2f}x", flush=True)


def main():
    if len(sys.argv) > 2:
        return check(tuple(int(x) for x in sys.argv[1].split(",")), int(sys.argv[2]))
    for tile in TILES:
        print(f"tile {tile} (BLOCK_M, BLOCK_N, warps, stages):", flush=True)
        for d in SHAPES:
            res = subprocess.run([sys.executable, __file__, ",".join(map(str, tile)), str(d)], capture_output=True,
                                 text=True, timeout=120)
            print(res.stdout.rstrip())
            if res.returncode:
                print(f"  d={d} FAILED: " + (res.stderr.strip().splitlines() or ["?"])[-1][:200], flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
