"""The one attention entry point used by the UNet, the ControlNet, the VAE and the text encoder."""
import math

import torch
import torch.nn.functional as F


def attention_math(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d) + mask) v, written out for readers; q: (B, H, Nq, d), k, v: (B, H, Nk, d)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])       # (B, H, Nq, Nk)
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ v                                # (B, H, Nq, d)


def attention(q, k, v, mask=None):
    """Scaled dot-product attention over (B, H, N, d) tensors; mask is additive and broadcast to (Nq, Nk).

    PyTorch's fused kernels never hold the whole (Nq, Nk) score matrix, so a 512x512 SD step stays small in memory.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
