"""The one attention entry point used by the UNet, the ControlNet and the VAE, and our fused Triton kernel for CUDA."""
import functools
import json
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                     # CPU-only installs: PyTorch's kernels do everything
    triton = None


def attention_math(q, k, v):
    """softmax(q k^T / sqrt(d)) v, written out for readers; q: (B, H, Nq, d), k, v: (B, H, Nk, d)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])       # (B, H, Nq, Nk)
    return scores.softmax(dim=-1) @ v                                # (B, H, Nq, d)


def split_width(d: int, pad: bool = False):
    """Head width as two power-of-two pieces (D0, D1), D1 padded to at least 16 for tl.dot: 40 -> 32 + 16 (8 used),
    64 -> 64 + 0, 80 -> 64 + 16, 160 -> 128 + 32. None when the pieces would waste too much or not fit (VAE: 512).
    pad: one piece, the next power of two up to 128 (40 -> 64 + 0), for the autotuner to weigh against the split."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    d1 = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    if d0 < 16 or d0 > 128 or d1 > d0 or (d0 + d1) > 1.25 * d:
        return None
    return (2 * d0, 0) if pad and rest and d0 < 128 else (d0, d1)


use_kernel = True      # set False to send CUDA tensors to PyTorch's SDPA too (benchmarks compare the two)
# Triton makes tensor-core code of the kernel's products from Ampere (sm_80) on; on older GPUs they become scalar
# multiply-adds, far slower than PyTorch's kernels, so those keep SDPA
MIN_CAPABILITY = (8, 0)


@functools.lru_cache(maxsize=None)
def has_tensor_core_code(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def attention(q, k, v):
    """Scaled dot-product attention over (B, H, N, d) tensors.

    On CUDA GPUs from Ampere on, with Triton, our FlashAttention-2 kernel below; elsewhere PyTorch's
    scaled_dot_product_attention, whose CPU kernel is blocked too, so a 512x512 SD step never holds a whole (Nq, Nk)
    score matrix. The VAE's single 512-wide head goes to PyTorch's kernel (split_width refuses it)."""
    if (use_kernel and triton is not None and q.is_cuda and has_tensor_core_code(q.device)
            and split_width(q.shape[-1]) is not None):
        return FlashAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


if triton is not None:
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        # fp32 inputs use full-precision products (not TF32). UPCAST: Triton's CPU interpreter misreads bf16/fp16
        # operands of tl.dot, so there they are widened first; products of 16-bit floats are exact in fp32 anyway.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    # Tiles (BLOCK_M, BLOCK_N, warps, stages, pad) per head width, tried once per shape on the GPU; a width not listed
    # gets the tiles that every listed width has, the CPU interpreter the first tile. pad: the head width as one padded
    # piece (split_width). BLOCK_N >= 64 faulted in 16 bits (illegal address) on an H200 with Triton 3.6, see
    # BENCHMARKS.md. MINICONTROL_FLASH_TILES=tiles.json replaces the table ({"40": [[64, 32, 4, 3, false], ...], ...};
    # bench/flash_configs.py --pick writes one).
    TILES = {d: [(64, 32, 4, 3, False), (128, 32, 8, 3, False), (128, 32, 4, 3, False)] for d in (40, 64, 80, 160)}
    if os.environ.get("MINICONTROL_FLASH_TILES"):
        with open(os.environ["MINICONTROL_FLASH_TILES"]) as f:
            TILES = {int(d): [tuple(t) for t in tiles] for d, tiles in json.load(f).items()}
    CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "PAD": pad}, num_warps=w, num_stages=st)
               for m, n, w, st, pad in sorted({t for tiles in TILES.values() for t in tiles})]

    def tile_of(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.kwargs["PAD"]

    def tiles_for(configs, named_args, D, **kwargs):
        """The autotuner's candidates at head width D."""
        keep = TILES.get(D, set.intersection(*(set(tiles) for tiles in TILES.values())))
        return [c for c in configs if tile_of(c) in keep]

    @triton.autotune(configs=CONFIGS[:1] if os.environ.get("TRITON_INTERPRET") == "1" else CONFIGS,
                     key=["NQ", "NK", "D", "IEEE", "VEC"], prune_configs_by={"early_config_prune": tiles_for})
    @triton.heuristics({"D0": lambda args: split_width(args["D"], args["PAD"])[0],
                        "D1": lambda args: split_width(args["D"], args["PAD"])[1]})
    @triton.jit
    def _flash_fwd(Q, K, V, O, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                   H, NQ, NK, qk_scale, D: tl.constexpr, PAD: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head) against all keys, FlashAttention-2 (arXiv:2307.08691,
        Algorithm 1): running row max m_i, running sum l_i, unnormalised output acc, rescaled as new keys arrive.
        The head width D is computed as two pieces D0 + D1 so no lane does padding work beyond the last piece (or, with
        PAD, as one piece D0 > D, its tail masked).
        Batch, head and token strides arrive divided by VEC, a power of two that divides them all: multiplied back here,
        they show the compiler that every row starts on a VEC-element boundary, so it moves whole 16-byte vectors and
        can prefetch the next key and value tiles while this one is computed (a 40-wide row is 80 bytes, and a plain
        stride of 40 would leave it loading one element at a time)."""
        sqb, sqh, sqn, skb, skh, skn = sqb * VEC, sqh * VEC, sqn * VEC, skb * VEC, skh * VEC, skn * VEC
        svb, svh, svn, sob, soh, son = svb * VEC, svh * VEC, svn * VEC, sob * VEC, soh * VEC, son * VEC
        start_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d0 = tl.arange(0, D0)
        q_base, k_base, v_base = Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh
        row_ok = offs_m[:, None] < NQ
        col0_ok = offs_d0[None, :] < D
        q0 = tl.load(q_base + offs_m[:, None] * sqn + offs_d0[None, :] * sqd, mask=row_ok & col0_ok, other=0.0)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        if D1 > 0:
            offs_d1 = D0 + tl.arange(0, D1)
            col_ok = offs_d1[None, :] < D
            q1 = tl.load(q_base + offs_m[:, None] * sqn + offs_d1[None, :] * sqd, mask=row_ok & col_ok, other=0.0)
            acc1 = tl.zeros([BLOCK_M, D1], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, NK, BLOCK_N):
            cols = start_n + offs_n
            key_ok = cols[:, None] < NK
            k0 = tl.load(k_base + cols[:, None] * skn + offs_d0[None, :] * skd, mask=key_ok & col0_ok, other=0.0)
            s = _dot(q0, tl.trans(k0), IEEE, UPCAST)                                         # (BLOCK_M, BLOCK_N)
            if D1 > 0:
                k1 = tl.load(k_base + cols[:, None] * skn + offs_d1[None, :] * skd, mask=key_ok & col_ok, other=0.0)
                s += _dot(q1, tl.trans(k1), IEEE, UPCAST)
            if start_n + BLOCK_N > NK:                                       # the last, partial block (77 tokens)
                s = tl.where(cols[None, :] < NK, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                 # qk_scale holds log2(e): exp2 below
            p = tl.math.exp2(s * qk_scale - m_new[:, None])                  # one fused multiply-add per score
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(V.dtype.element_ty)
            v0 = tl.load(v_base + cols[:, None] * svn + offs_d0[None, :] * svd, mask=key_ok & col0_ok, other=0.0)
            acc0 = acc0 * alpha[:, None] + _dot(p, v0, IEEE, UPCAST)
            if D1 > 0:
                v1 = tl.load(v_base + cols[:, None] * svn + offs_d1[None, :] * svd, mask=key_ok & col_ok, other=0.0)
                acc1 = acc1 * alpha[:, None] + _dot(p, v1, IEEE, UPCAST)
            m_i = m_new
        o_base = O + b * sob + h * soh + offs_m[:, None] * son
        tl.store(o_base + offs_d0[None, :] * sod, (acc0 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok & col0_ok)
        if D1 > 0:
            tl.store(o_base + offs_d1[None, :] * sod, (acc1 / l_i[:, None]).to(O.dtype.element_ty), mask=row_ok & col_ok)


def kernel_args(q, k, v, out):
    """The kernel's arguments and compile-time constants for these tensors (tests also compile them for a GPU)."""
    D = q.shape[-1]
    vec = math.gcd(16 // q.element_size(), *(s for t in (q, k, v, out) for s in t.stride()[:3]))
    strides = [s // vec if i < 3 else s for t in (q, k, v, out) for i, s in enumerate(t.stride())]
    args = (q, k, v, out, *strides, q.shape[1], q.shape[2], k.shape[2], D ** -0.5 * 1.4426950408889634)
    return args, dict(D=D, VEC=vec, IEEE=q.dtype == torch.float32,
                      UPCAST=os.environ.get("TRITON_INTERPRET") == "1")


def flash_attention(q, k, v, out=None, tile=None):
    """Launch the forward kernel; q: (B, H, Nq, d), k, v: (B, H, Nk, d), any strides; writes into `out` if given, else
    into a tensor laid out like q (the UNet's (B, N, H*d) view, so merging the heads back needs no copy).
    tile=(BLOCK_M, BLOCK_N, warps, stages, pad) skips the autotuner (benchmarks compare tiles with it)."""
    out = torch.empty_like(q) if out is None else out
    grid = lambda meta: (triton.cdiv(q.shape[2], meta["BLOCK_M"]), q.shape[0] * q.shape[1])
    args, meta = kernel_args(q, k, v, out)
    if tile is None:
        _flash_fwd[grid](*args, **meta)
    else:
        m, n, w, st, pad = tile
        _flash_fwd.fn[grid(dict(BLOCK_M=m))](*args, **meta, BLOCK_M=m, BLOCK_N=n, PAD=pad, num_warps=w, num_stages=st)
    return out


class FlashAttention(torch.autograd.Function):
    """Our kernel forward. The backward recomputes attention with PyTorch's SDPA and differentiates that (memory
    efficient, exact up to rounding), so training on CUDA works with our forward."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return flash_attention(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(out, (q, k, v), grad_out)
