"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, convolution and linear weights
reordered for oneDNN once rather than at every call, and an allocator that keeps the scratch memory oneDNN takes."""
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


class Packed(nn.Module):
    """A Conv2d or Linear for sampling on the CPU, its weights reordered into oneDNN's blocked layout for the first
    input's shape once, not at every call (other shapes still run right). It holds the layer's weight and bias under
    their names; subclasses say how to reorder and how to run."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.weight = layer.weight
        self.bias = layer.bias

    def forward(self, x):
        if not self.weight.is_mkldnn:       # the first call: packed in place of the plain weights
            self.weight = nn.Parameter(self.reorder(self.weight.detach(), x), requires_grad=False)
            if glibc():                     # the plain weights' pages, kept by keep_freed_memory, back to the system
                glibc().malloc_trim(0)
        return self.run(x)


class PackedConv2d(Packed):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        self.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)

    def reorder(self, weight, x):
        return torch.ops.mkldnn._reorder_convolution_weight(weight, *self.geometry, list(x.shape))

    def run(self, x):
        return torch.ops.mkldnn._convolution_pointwise(x, self.weight, self.bias, *self.geometry, "none", [], "")


class PackedLinear(Packed):
    def reorder(self, weight, x):
        return torch.ops.mkldnn._reorder_linear_weight(weight, x.numel() // x.shape[-1])     # for this many rows

    def run(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_weights(model: nn.Module):
    """Every Conv2d and Linear below the model made a Packed one (bfloat16 ones where oneDNN computes in bfloat16,
    AVX-512 on): the 1280-channel 3x3 convolutions at the small latents take 0.5 to 0.7 of their time, the linear
    layers 0.75 to 0.95 (BENCHMARKS.md). The model is for sampling only from then on: its weights become oneDNN
    tensors, with no gradients."""
    if not torch.backends.mkldnn.is_available():
        return
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
            kind = PackedConv2d
        elif isinstance(layer, nn.Linear):
            kind = PackedLinear
        else:
            continue
        if layer.weight.dtype == torch.bfloat16 and not bf16:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, kind(layer))
