"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, convolution weights reordered
for oneDNN once rather than at every call, and an allocator that keeps the scratch memory oneDNN takes."""
import ctypes
import functools
import types

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
    CPU). oneDNN reorders a convolution's weights into scratch memory at every call, which glibc would map afresh and
    unmap when freed: 59 MB of weights cost a 1280-channel 3x3 convolution at 8x8 twice its time."""
    libc = glibc()
    if libc is None:
        return
    libc.mallopt(-1, 1 << 30)               # M_TRIM_THRESHOLD (malloc.h): freed memory stays in the heap
    libc.mallopt(-3, 1 << 30)               # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap


def packed_forward(conv: nn.Conv2d, x):
    """conv(x) by oneDNN, the weights reordered into its blocked layout for x's shape at the first call and kept so in
    place of the plain ones, rather than reordered at every call (an input of another shape is still right)."""
    if not conv.weight.is_mkldnn:
        layout = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
        packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), *layout)
        conv.weight = nn.Parameter(packed, requires_grad=False)
        if glibc():                         # the plain weights' pages, kept by keep_freed_memory, back to the system
            glibc().malloc_trim(0)
    return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, conv.padding, conv.stride,
                                                   conv.dilation, conv.groups, "none", [], "")


def pack_convolutions(model: nn.Module):
    """Every Conv2d in the model run by packed_forward, for sampling on the CPU: the 1280-channel 3x3 convolutions at
    the small latents take about 0.6 of their time. The model is for sampling only from then on: its weights become
    oneDNN tensors, which have no gradients and no state_dict() of the usual kind."""
    if not torch.backends.mkldnn.is_available():
        return
    for conv in model.modules():
        if isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros":
            conv.forward = types.MethodType(packed_forward, conv)
