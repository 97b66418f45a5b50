"""Compile our attention kernel for an H100 (sm_90) with Triton's own compiler, on a machine without a GPU, and report
what the code does: shared memory per program, 2-byte global loads (a row read one element at a time), asynchronous
copies (key/value tiles prefetched into shared memory, 4 to 16 bytes each) and tensor-core instructions (Hopper's
wgmma, Ampere's mma.sync). A case may name another compute capability as a fifth item (75 for Turing, 80 for Ampere).

The arguments are specialised the way Triton's launcher specialises them (an int equal to 1 becomes a constant, ints
and pointers divisible by 16 are marked so), from real tensors passed through the same kernel_args() the launcher
uses. Must run outside Triton's interpreter, so the tests start it as its own process:

    python tests/compile_sm90.py '[[40, "float16", "unet", [64, 32, 4, 3, false]], ...]'     # prints a JSON list
"""
import json
import os
import re
import sys

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minicontrol.flash import _flash_fwd, kernel_args, split_width  # noqa: E402

HEADS = {40: 8, 64: 5, 80: 8, 160: 8}          # SD1.5 and SD2.1 heads at each width


def example(d, dtype, layout, n=1024):
    """q, k, v at one SD width: "unet" is a (B, N, H*d) projection viewed as (B, H, N, d), "contiguous" is (B, H, N, d),
    "odd" has rows of d + 1 elements starting one element in."""
    h = HEADS[d]
    if layout == "unet":
        make = lambda: torch.zeros(2, n, h * d, dtype=dtype).view(2, n, h, d).transpose(1, 2)
    elif layout == "contiguous":
        make = lambda: torch.zeros(2, h, n, d, dtype=dtype)
    else:
        make = lambda: torch.zeros(2, h, n, d + 1, dtype=dtype)[..., 1:]
    return make(), make(), make()


def compile_case(d, dtype, layout, tile, capability=90):
    q, k, v = example(d, getattr(torch, dtype), layout)
    args, meta = kernel_args(q, k, v, torch.empty_like(q))
    block_m, block_n, warps, stages, pad = tile
    d0, d1 = split_width(d, pad)
    values = dict(zip(_flash_fwd.arg_names, args), **dict(meta, UPCAST=False), BLOCK_M=block_m, BLOCK_N=block_n,
                  D0=d0, D1=d1)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(_flash_fwd.params):
        value = values[param.name]
        kind, key = ("constexpr", value) if param.is_constexpr else native_specialize_impl(
            CUDABackend, value, False, True, True)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = key
        elif key:
            attrs[(i,)] = CUDABackend.parse_attr(key)
    kernel = triton.compile(ASTSource(_flash_fwd, signature, constexprs, attrs),
                            target=GPUTarget("cuda", capability, 32), options=dict(num_warps=warps, num_stages=stages))
    ptx = kernel.asm["ptx"]
    return dict(shared=kernel.metadata.shared,
                b16_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.b16\b", ptx)),
                async_copies=len(re.findall(r"cp\.async\.\w+\.shared\.global", ptx)),
                wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                mma=len(re.findall(r"\bmma\.sync", ptx)))


if __name__ == "__main__":
    print(json.dumps([compile_case(*case) for case in json.loads(sys.argv[1])]))
