"""What runs attention at each shape on a GPU: the fastest of our kernel's tiles and PyTorch's SDPA, measured once and
kept on disk, and a launch plan per tensor layout."""
import contextlib
import json
import os
import tempfile

import torch
import torch.nn.functional as F

from . import flash
from .flash import kernel_args, launch_config, triton

if triton is not None:
    import triton.testing

# Tiles (BLOCK_M, BLOCK_N, warps, stages, pad) per head width (tiles_at), timed on the GPU the first time a shape
# comes (pick); pad: pieces of 64 or more (split_width). BLOCK_N >= 64 faulted in 16 bits (illegal address) on an
# H200 with Triton 3.6, see BENCHMARKS.md. MINICONTROL_FLASH_TILES=tiles.json replaces the table
# ({"40": [[64, 32, 4, 3, false], ...], ...}; bench/flash_configs.py --pick writes one).
TILES = {d: [(64, 32, 4, 3, False), (128, 32, 8, 3, False), (128, 32, 4, 3, False)] for d in (40, 64, 80, 160)}
if os.environ.get("MINICONTROL_FLASH_TILES"):
    with open(os.environ["MINICONTROL_FLASH_TILES"]) as f:
        TILES = {int(d): [tuple(t) for t in tiles] for d, tiles in json.load(f).items()}
SMALLEST = (64, 32, 4, 3, False)    # fits every GPU from Ampere on: at most 80 KiB of shared memory (d = 160)
SDPA = "sdpa"                       # the candidate that stands for PyTorch's scaled_dot_product_attention
CACHE = os.environ.get("MINICONTROL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "minicontrol")
plans = {}                          # tensor layout -> SDPA, or a function launching our kernel with its arguments
picks = {}                          # what pick() measured or read from disk, by its key there


def flash_attention(q, k, v, out=None, tile=None):
    """Our kernel; q: (B, H, Nq, d), k, v: (B, H, Nk, d), any strides; into `out`, else a tensor laid out like q (the
    UNet's (B, N, H*d) view: no copy to merge the heads). tile: (BLOCK_M, BLOCK_N, warps, stages, pad) to use."""
    return plan(q, k, v, out, tile)(q, k, v, out)


def plan(q, k, v, out=None, tile=None, sdpa=False):
    """A function (q, k, v, out=None) launching our kernel with `tile`, else the fastest of our tiles here; with sdpa,
    SDPA where it was measured faster. Worked out once per layout (strides, tile, grid): later calls only launch."""
    layout = (q.shape, k.shape, q.stride(), k.stride(), v.stride(), None if out is None else out.stride(), q.dtype,
              q.device, tile, sdpa)
    if layout not in plans:
        args, meta = kernel_args(q, k, v, torch.empty_like(q) if out is None else out)
        tile = tile or pick(q, k, v, args, meta, sdpa)
        plans[layout] = SDPA if tile == SDPA else launcher(q, tile, args[4:], meta)
    return plans[layout]


def launcher(q, tile, scalars, meta):
    """A function (q, k, v, out=None) launching our kernel with this tile and kernel_args' scalar arguments."""
    grid, constants = launch_config(q, tile, meta)
    launch = flash._flash_fwd[grid]

    def run(q, k, v, out=None):
        out = torch.empty_like(q) if out is None else out
        launch(q, k, v, out, *scalars, **constants)
        return out
    return run


def pick(q, k, v, args, meta, sdpa=False):
    """The fastest of our tiles at this shape; with sdpa, that tile or SDPA, whichever is faster."""
    tile = kept(q, k, v, args, meta, tiles_at(meta["D"]))
    return kept(q, k, v, args, meta, [tile, SDPA]) if sdpa else tile


def tiles_at(d):
    """The tiles to time at head width d: its own, else those every listed width shares, else the smallest."""
    if TILES.get(d):
        return TILES[d]
    return sorted(set.intersection(*(set(tiles) for tiles in TILES.values()))) or [SMALLEST]


def kept(q, k, v, args, meta, candidates):
    """The candidate kept in CACHE/attention_tiles.json for this GPU, Triton, shape and candidates, else the fastest
    now, then kept: each sums a row's keys in its own order, so the same seed gives the same image only if the pick
    stays from run to run. The CPU interpreter takes the first candidate."""
    if flash.INTERPRET:
        return candidates[0]
    shape = q.shape[0] * q.shape[1], q.shape[2], k.shape[2], q.dtype, *meta.values()
    key = repr((torch.cuda.get_device_name(q.device), triton.__version__, shape, candidates))
    if key in picks:
        return picks[key]
    path = os.path.join(CACHE, "attention_tiles.json")
    try:
        with open(path) as f:
            on_disk = json.load(f)
    except (OSError, ValueError):
        on_disk = {}
    if key not in on_disk:
        on_disk[key] = fastest(q, k, v, args, meta, candidates)
        with contextlib.suppress(OSError):   # a cache that cannot be written: measured again next run
            os.makedirs(CACHE, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=CACHE, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(on_disk, f, indent=0)
            os.replace(tmp, path)    # written whole, then renamed: a run reading it sees the old file or the new
    picks[key] = SDPA if on_disk[key] == SDPA else tuple(on_disk[key])
    return picks[key]


def fastest(q, k, v, args, meta, candidates):
    """Times each candidate on these tensors (median of Triton's do_bench) and returns the fastest; a tile needing more
    shared memory than this GPU has is passed over, and where none fits, the smallest is taken."""
    def ms(candidate):
        if candidate == SDPA:
            return triton.testing.do_bench(lambda: F.scaled_dot_product_attention(q, k, v), return_mode="median")
        grid, constants = launch_config(q, candidate, meta)
        try:
            return triton.testing.do_bench(lambda: flash._flash_fwd[grid](*args, **constants), return_mode="median")
        except triton.runtime.errors.OutOfResources:
            return float("inf")
    times = {candidate: ms(candidate) for candidate in candidates}
    best = min(times, key=times.get)
    return best if times[best] < float("inf") else SMALLEST
