"""The one attention entry point used by the UNet, the ControlNet and the VAE, and our fused Triton kernel for CUDA."""
import functools
import json
import math
import os
import tempfile

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    import triton.testing
except ImportError:                     # CPU-only installs: PyTorch's kernels do everything
    triton = None


def attention_math(q, k, v):
    """softmax(q k^T / sqrt(d)) v, written out for readers; q: (B, H, Nq, d), k, v: (B, H, Nk, d)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])       # (B, H, Nq, Nk)
    return scores.softmax(dim=-1) @ v                                # (B, H, Nq, d)


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


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"   # Triton's CPU interpreter (the tests); Triton reads it once too
LOG2E = 1.4426950408889634
ATTENTION = os.environ.get("MINICONTROL_ATTENTION") or "ours"
if ATTENTION not in ("ours", "sdpa"):
    raise SystemExit(f"error: MINICONTROL_ATTENTION={ATTENTION}: give ours (our kernel on CUDA) or sdpa (PyTorch's)")
use_kernel = ATTENTION == "ours"    # False sends CUDA tensors to PyTorch's SDPA too (benchmarks compare the two)
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
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return FlashAttention.apply(q, k, v)
        return flash_attention(q, k, v)              # nothing to differentiate (sampling): launched directly
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

    # Tiles (BLOCK_M, BLOCK_N, warps, stages, pad) per head width; flash_attention times a width's tiles on the GPU the
    # first time it meets a shape and keeps the fastest (kept_tile). A width not listed gets the tiles that every listed
    # width has, the CPU interpreter the first tile. pad: pieces of 64 or more (split_width). BLOCK_N >= 64 faulted in
    # 16 bits (illegal address) on an H200 with Triton 3.6, see BENCHMARKS.md. MINICONTROL_FLASH_TILES=tiles.json
    # replaces the table ({"40": [[64, 32, 4, 3, false], ...], ...}; bench/flash_configs.py --pick writes one).
    TILES = {d: [(64, 32, 4, 3, False), (128, 32, 8, 3, False), (128, 32, 4, 3, False)] for d in (40, 64, 80, 160)}
    if os.environ.get("MINICONTROL_FLASH_TILES"):
        with open(os.environ["MINICONTROL_FLASH_TILES"]) as f:
            TILES = {int(d): [tuple(t) for t in tiles] for d, tiles in json.load(f).items()}

    @triton.jit
    def _flash_fwd(Q, K, V, O, sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
                   H, NQ, NK, qk_scale, D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                   VEC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                   UPCAST: tl.constexpr):
        """One program: BLOCK_M queries of one (batch, head) against all keys, FlashAttention-2 (arXiv:2307.08691,
        Algorithm 1): running row max m_i, running sum l_i, unnormalised output acc, rescaled as new keys arrive.
        The head width D is computed as two pieces D0 + D1 so no lane does padding work beyond the last piece (padded,
        D0 + D1 > D: the last piece's tail is masked).
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
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())           # (batch, head, token, width) each
    vec = math.gcd(16 // q.element_size(), *strides[0:3], *strides[4:7], *strides[8:11], *strides[12:15])
    args = (q, k, v, out, *(s if i % 4 == 3 else s // vec for i, s in enumerate(strides)),
            q.shape[1], q.shape[2], k.shape[2], q.shape[3] ** -0.5 * LOG2E)
    return args, dict(D=q.shape[3], VEC=vec, IEEE=q.dtype == torch.float32, UPCAST=INTERPRET)


def flash_attention(q, k, v, out=None, tile=None):
    """Launch the forward kernel; q: (B, H, Nq, d), k, v: (B, H, Nk, d), any strides; writes into `out` if given, else
    into a tensor laid out like q (the UNet's (B, N, H*d) view, so merging the heads back needs no copy).
    tile=(BLOCK_M, BLOCK_N, warps, stages, pad) instead of the fastest one measured (benchmarks compare tiles)."""
    out = torch.empty_like(q) if out is None else out
    layout = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), out.stride(), q.dtype, q.device, tile)
    if layout not in plans:                          # worked out once per layout; later calls only launch
        args, meta = kernel_args(q, k, v, out)
        if tile is None:
            shape = shape_key(q, k, meta)
            tile = best_tiles.get(shape) or best_tiles.setdefault(shape, kept_tile(q, args, meta, shape))
        plans[layout] = args[4:], *launch_config(q, tile, meta)
    scalars, grid, constants = plans[layout]
    _flash_fwd[grid](q, k, v, out, *scalars, **constants)
    return out


plans = {}                          # tensor layout -> the kernel's scalar arguments, grid and constants
best_tiles = {}                     # shape_key -> the tile measured fastest there
SMALLEST = (64, 32, 4, 3, False)    # fits every GPU from Ampere on: at most 80 KiB of shared memory (d = 160)
CACHE = os.environ.get("MINICONTROL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicontrol")


def shape_key(q, k, meta):
    """What the fastest tile depends on: (B * H, Nq, Nk, dtype, kernel constants)."""
    return q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.dtype, *meta.values()


def tiles_at(d):
    """The tiles to time at head width d: its own, else those every listed width shares, else the smallest."""
    shared = sorted(set.intersection(*(set(tiles) for tiles in TILES.values())))
    return TILES.get(d) or shared or [SMALLEST]


def kept_tile(q, args, meta, shape):
    """The tile kept in CACHE/attention_tiles.json for this GPU, Triton, shape and tile list, else the fastest measured
    now, then kept there. Tiles add up a row's keys in different orders, so picks that followed each run's timing noise
    would change the images a little from run to run; kept, the same seed gives the same image. The CPU interpreter
    takes the first tile."""
    tiles = tiles_at(meta["D"])
    if INTERPRET:
        return tiles[0]
    path = os.path.join(CACHE, "attention_tiles.json")
    key = repr((torch.cuda.get_device_name(q.device), triton.__version__, shape, tiles))
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        kept = {}
    if key not in kept:
        kept[key] = fastest_tile(q, tiles, args, meta)
        try:                             # written whole, then renamed: a run reading it sees the old file or the new
            os.makedirs(CACHE, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(kept, f, indent=0)
            os.replace(tmp, path)
        except OSError:                  # a cache that cannot be written: measured again next run
            pass
    return tuple(kept[key])


def fastest_tile(q, tiles, args, meta):
    """Times each tile on these tensors (median of Triton's do_bench) and returns the fastest; a tile needing more
    shared memory than this GPU has is passed over, and where none fits, the smallest is taken."""
    def ms(tile):
        grid, constants = launch_config(q, tile, meta)
        try:
            return triton.testing.do_bench(lambda: _flash_fwd[grid](*args, **constants), return_mode="median")
        except triton.runtime.errors.OutOfResources:
            return float("inf")
    times = {tile: ms(tile) for tile in tiles}
    best = min(times, key=times.get)
    return best if times[best] < float("inf") else SMALLEST


def launch_config(q, tile, meta):
    """The grid (a program per BLOCK_M queries of each (batch, head)) and compile-time constants of a tile."""
    block_m, block_n, warps, stages, pad = tile
    d0, d1 = split_width(meta["D"], pad)
    return ((triton.cdiv(q.shape[2], block_m), q.shape[0] * q.shape[1]),
            dict(meta, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages))


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
