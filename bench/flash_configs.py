"""Try each tile configuration of our attention kernel alone, in its own process (a faulting kernel poisons its CUDA
context), at every SD head width in float16 and bfloat16; print the ones that give correct results.

    python bench/flash_configs.py          # last line: PASSING=<indices>, for MINICONTROL_FLASH_CONFIGS
"""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def check():
    import torch
    sys.path.insert(0, ROOT)
    from minicontrol.attention import attention_math, flash_attention
    for d in (40, 64, 80, 160):
        for nq, nk in ((512, 512), (1000, 77)):
            for dtype in (torch.float16, torch.bfloat16):
                q = torch.randn(2, nq, 3 * d, device="cuda").view(2, nq, 3, d).transpose(1, 2)
                k, v = (torch.randn(2, 3, nk, d, device="cuda") for _ in range(2))
                out = flash_attention(*(t.to(dtype) for t in (q, k, v)))
                ref = attention_math(q, k, v)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                if not err <= 1e-2:
                    raise SystemExit(f"d={d} {nq}x{nk} {dtype}: error {err}")


def main():
    if len(sys.argv) > 1:
        return check()
    from minicontrol.attention import TILES
    passing = []
    for i, tile in enumerate(TILES):
        env = dict(os.environ, MINICONTROL_FLASH_CONFIGS=str(i))
        res = subprocess.run([sys.executable, __file__, "check"], env=env, capture_output=True, text=True, timeout=300)
        ok = res.returncode == 0
        passing += [str(i)] * ok
        reason = "" if ok else (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        print(f"config {i} {tile}: {'ok' if ok else 'FAILED ' + reason}", flush=True)
    print("PASSING=" + ",".join(passing))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
