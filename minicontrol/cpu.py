"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, convolution weights reordered
for oneDNN once rather than at every call, and an allocator that keeps the scratch memory oneDNN takes."""
import ctypes
import functools

import torch
import torch.nn as nn


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions and
    matrix products run about twice as fast as float32; elsewhere it emulates them, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


@functools.lru_cache(maxsize=None)
def glibc():
    """The C library where it is glibc, whose allocator the functions below set; None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory():
    """Large blocks from the heap, kept there when freed (process-wide, glibc only; the entry points call it on the
    CPU). oneDNN reorders a convolution's weights into scratch memory at every call (unless packed: training, the VAE),
    which glibc would map afresh and unmap when freed: 59 MB of weights cost a 1280-channel 3x3 convolution at 8x8
    twice its time; so would the scores of attention_in_chunks."""
    if glibc():
        glibc().mallopt(-1, 1 << 30)        # M_TRIM_THRESHOLD (malloc.h): freed memory stays in the heap
        glibc().mallopt(-3, 1 << 30)        # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap


class PackedConv2d(nn.Module):
    """A Conv2d for sampling on the CPU, its weights reordered into oneDNN's blocked layout for the first input's shape
    once, not at every call (other shapes still run right). It holds the Conv2d's weight and bias under their names."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def forward(self, x):
        if not self.weight.is_mkldnn:       # the first call: packed in place of the plain weights
            packed = torch.ops.mkldnn._reorder_convolution_weight(self.weight.detach(), *self.geometry, list(x.shape))
            self.weight = nn.Parameter(packed, requires_grad=False)
            if glibc():                     # the plain weights' pages, kept by keep_freed_memory, back to the system
                glibc().malloc_trim(0)
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.geometry, "none", [], "")


def pack_convolutions(model: nn.Module):
    """Every Conv2d below the model made a PackedConv2d (bfloat16 ones where oneDNN computes in bfloat16, AVX-512 on):
    the 1280-channel 3x3 convolutions at the small latents take 0.6 of their time. The model is for sampling only from
    then on: its weights become oneDNN tensors, with no gradients and no state_dict() of the usual kind."""
    if not torch.backends.mkldnn.is_available():
        return
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.padding_mode != "zeros":
            continue
        if conv.weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedConv2d(conv))
