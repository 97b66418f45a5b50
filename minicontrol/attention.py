"""The one attention entry point used by the UNet, the ControlNet and the VAE, and which kernel runs it where."""
import functools
import math
import os

import torch
import torch.nn.functional as F

from . import tuning
from .cli import UsageError
from .flash import FlashAttention, split_width, triton

# MINICONTROL_ATTENTION: auto (the default: what attention() describes), ours (our kernel wherever it runs) or sdpa
# (PyTorch's everywhere); benchmarks compare them
MODES = ("auto", "ours", "sdpa")
MODE = os.environ.get("MINICONTROL_ATTENTION") or "auto"
# Triton makes tensor-core code of the kernel's products from Ampere (sm_80) on; on older GPUs they become scalar
# multiply-adds, far slower than PyTorch's kernels, so those keep SDPA
MIN_CAPABILITY = (8, 0)


def check_mode():
    """Raises a UsageError for a MINICONTROL_ATTENTION we do not know (scripts call it before reading any weights)."""
    if MODE not in MODES:
        raise UsageError(f"MINICONTROL_ATTENTION={MODE}: give auto (the faster of ours and sdpa at each shape, the "
                         "default), ours (our kernel on CUDA) or sdpa (PyTorch's)")


def attention_math(q, k, v):
    """softmax(q k^T / sqrt(d)) v, written out for readers; q: (B, H, Nq, d), k, v: (B, H, Nk, d)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])       # (B, H, Nq, Nk)
    return scores.softmax(dim=-1) @ v                                # (B, H, Nq, d)


def attention_in_chunks(q, k, v, rows=256):
    """attention_math for `rows` queries at a time, so that (rows, Nk) scores at most are held: on a CPU in bfloat16,
    two oneDNN matrix products and a softmax are faster than SDPA's CPU kernel (BENCHMARKS.md)."""
    q = q.contiguous()                              # (B, H, N, d) whole: no copy of a chunk, of k or of v per chunk
    v = v.contiguous()
    kt = (k.contiguous() * q.shape[-1] ** -0.5).transpose(-2, -1)
    out = torch.empty_like(q)
    for i in range(0, q.shape[2], rows):
        out[:, :, i:i + rows] = (q[:, :, i:i + rows] @ kt).softmax(dim=-1) @ v
    return out


@functools.lru_cache(maxsize=None)
def has_tensor_core_code(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def attention(q, k, v):
    """Scaled dot-product attention over (B, H, N, d) tensors: on CUDA GPUs from Ampere on, our FlashAttention-2
    kernel (flash.py) or PyTorch's SDPA, whichever was measured faster at this shape (tuning.py); on a CPU in bfloat16
    with gradients off (sampling), attention_in_chunks; elsewhere, and for the VAE's 512-wide head (split_width
    refuses it), SDPA, whose CPU kernel never holds a whole (Nq, Nk) matrix."""
    check_mode()
    if MODE == "auto" and q.device.type == "cpu" and q.dtype == torch.bfloat16 and not torch.is_grad_enabled():
        return attention_in_chunks(q, k, v)
    if (MODE == "sdpa" or triton is None or not q.is_cuda or not has_tensor_core_code(q.device)
            or split_width(q.shape[-1]) is None):
        return F.scaled_dot_product_attention(q, k, v)
    run = tuning.plan(q, k, v, sdpa=MODE == "auto")       # what runs at this shape, for this layout
    if run is tuning.SDPA:
        return F.scaled_dot_product_attention(q, k, v)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return FlashAttention.apply(q, k, v, run)       # our forward, SDPA's backward
    return run(q, k, v)                                 # nothing to differentiate (sampling): launched directly
