"""Our fused attention kernel for CUDA GPUs: FlashAttention-2's forward (arXiv:2307.08691, Algorithm 1) in Triton."""
import math
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:                     # CPU-only installs: PyTorch's kernels do everything
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (the tests); Triton reads it once too
LOG2E = 1.4426950408889634


def split_width(d: int, pad: bool = False):
    """Head width as two power-of-two pieces (D0, D1), D1 padded to at least 16 for tl.dot: 40 -> 32 + 16 (8 used),
    64 -> 64 + 0, 80 -> 64 + 16, 160 -> 128 + 32. None when the pieces would waste too much or not fit (VAE: 512).
    pad: no piece under 64 wide (40 -> 64, 80 -> 128, 160 -> 128 + 64), for the tile timing to weigh against the split
    (Triton 3.6 and 3.7 have faulted on Hopper with 32-wide operands: triton-lang/triton#10573, #11366)."""
    d0 = 1 << (d.bit_length() - 1)
    rest = d - d0
    d1 = 0 if rest == 0 else max(16, 1 << (rest - 1).bit_length())
    if d0 < 16 or d0 > 128 or d1 > d0 or (d0 + d1) > 1.25 * d:
        return None
    if pad and rest:
        return (2 * d0, 0) if d0 < 128 else (d0, max(64, d1))
    return d0, d1


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

    @triton.jit
    def _piece(base, rows, rows_ok, row_stride, col_stride, START: tl.constexpr, WIDTH: tl.constexpr,
               D: tl.constexpr):
        """Addresses and mask of a piece of the head width: columns START to START + WIDTH of these rows."""
        cols = START + tl.arange(0, WIDTH)
        return base + rows[:, None] * row_stride + cols[None, :] * col_stride, rows_ok[:, None] & (cols[None, :] < D)

    @triton.jit
    def _add_product(acc, scale, a, base, rows, rows_ok, row_stride, col_stride, START: tl.constexpr,
                     WIDTH: tl.constexpr, D: tl.constexpr, TRANS: tl.constexpr, IEEE: tl.constexpr,
                     UPCAST: tl.constexpr):
        """acc * scale + a @ B, B a piece of these rows (transposed with TRANS), as a GEMM's beta and C. A piece that
        starts past D is empty (64 = 64 + none): acc comes back as it was, and the compiler drops the whole piece."""
        if START >= D:
            return acc
        ptrs, mask = _piece(base, rows, rows_ok, row_stride, col_stride, START, WIDTH, D)
        b = tl.load(ptrs, mask=mask, other=0.0)
        if TRANS:
            b = tl.trans(b)
        return acc * scale + _dot(a, b, IEEE, UPCAST)

    @triton.jit
    def _flash_fwd(Q, K, V, O, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                   H, NQ, NK, qk_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head) against all keys, FlashAttention-2 (arXiv:2307.08691,
        Algorithm 1): running row max m_i, running sum l_i, unnormalised output acc, rescaled as new keys arrive.
        The head width D runs as two power-of-two pieces, D0 then D1 wide (the last one's tail masked; D1 = 0: an
        empty piece past D, which _add_product skips). Strides arrive divided by VEC, a power of two dividing them
        all: multiplied back here, they show the compiler that rows start on VEC-element boundaries, so it moves whole
        16-byte vectors and prefetches the next tiles (a plain stride of 40 would load one element at a time)."""
        sqb, sqh, sqn, skb, skh, skn = sqb * VEC, sqh * VEC, sqn * VEC, skb * VEC, skh * VEC, skn * VEC
        svb, svh, svn, sob, soh, son = svb * VEC, svh * VEC, svn * VEC, sob * VEC, soh * VEC, son * VEC
        start_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        Q, K, V, O = Q + b * sqb + h * sqh, K + b * skb + h * skh, V + b * svb + h * svh, O + b * sob + h * soh
        W1: tl.constexpr = D1 if D1 > 0 else 16                              # an empty piece: tl.dot's least width
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)                     # this program's queries, Q_i
        rows_ok = rows < NQ
        ptrs, mask = _piece(Q, rows, rows_ok, sqn, sqd, 0, D0, D)
        q0 = tl.load(ptrs, mask=mask, other=0.0)
        ptrs, mask = _piece(Q, rows, rows_ok, sqn, sqd, D0, W1, D)
        q1 = tl.load(ptrs, mask=mask, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, W1], dtype=tl.float32)
        for start_n in range(0, NK, BLOCK_N):                                # K_j, V_j: BLOCK_N keys at a time
            keys = start_n + tl.arange(0, BLOCK_N)
            keys_ok = keys < NK
            s = _add_product(0.0, 1.0, q0, K, keys, keys_ok, skn, skd, 0, D0, D, True, IEEE, UPCAST)   # S = Q_i K_j^T
            s = _add_product(s, 1.0, q1, K, keys, keys_ok, skn, skd, D0, W1, D, True, IEEE, UPCAST)
            if start_n + BLOCK_N > NK:                                       # the last, partial block (77 tokens)
                s = tl.where(keys[None, :] < NK, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)                 # qk_scale holds log2(e): exp2 below
            p = tl.math.exp2(s * qk_scale - m_new[:, None])                  # one fused multiply-add per score
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(V.dtype.element_ty)
            # acc = diag(alpha) acc + P V_j, piece by piece
            acc0 = _add_product(acc0, alpha[:, None], p, V, keys, keys_ok, svn, svd, 0, D0, D, False, IEEE, UPCAST)
            acc1 = _add_product(acc1, alpha[:, None], p, V, keys, keys_ok, svn, svd, D0, W1, D, False, IEEE, UPCAST)
            m_i = m_new
        ptrs, mask = _piece(O, rows, rows_ok, son, sod, 0, D0, D)
        tl.store(ptrs, (acc0 / l_i[:, None]).to(O.dtype.element_ty), mask=mask)
        ptrs, mask = _piece(O, rows, rows_ok, son, sod, D0, W1, D)
        tl.store(ptrs, (acc1 / l_i[:, None]).to(O.dtype.element_ty), mask=mask)


def kernel_args(q, k, v, out):
    """The kernel's arguments and compile-time constants for these tensors (tests also compile them for a GPU)."""
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())           # (batch, head, token, width) each
    vec = math.gcd(16 // q.element_size(), *strides[0:3], *strides[4:7], *strides[8:11], *strides[12:15])
    args = (q, k, v, out, *(s if i % 4 == 3 else s // vec for i, s in enumerate(strides)),
            q.shape[1], q.shape[2], k.shape[2], q.shape[3] ** -0.5 * LOG2E)
    return args, dict(D=q.shape[3], VEC=vec, IEEE=q.dtype == torch.float32, UPCAST=INTERPRET)


def launch_config(q, tile, meta):
    """The grid (a program per BLOCK_M queries of each (batch, head)) and compile-time constants of a tile."""
    block_m, block_n, warps, stages, pad = tile
    d0, d1 = split_width(meta["D"], pad)
    return ((triton.cdiv(q.shape[2], block_m), q.shape[0] * q.shape[1]),
            dict(meta, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages))


class FlashAttention(torch.autograd.Function):
    """Our kernel forward, launched by `run` (a layout's launch plan); the backward recomputes attention with
    PyTorch's SDPA and differentiates that (memory efficient, exact up to rounding), so training on CUDA works."""

    @staticmethod
    def forward(ctx, q, k, v, run):
        ctx.save_for_backward(q, k, v)
        return run(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v)
        return *torch.autograd.grad(out, (q, k, v), grad_out), None
