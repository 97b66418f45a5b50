"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, and an allocator that keeps the
scratch memory oneDNN takes on every convolution."""
import ctypes

import torch


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions and
    matrix products run about twice as fast as float32; elsewhere it emulates them, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def keep_freed_memory():
    """Large blocks from the heap, kept there when freed (process-wide, glibc only; the entry points call it on the
    CPU). oneDNN reorders a convolution's weights into scratch memory at every call, which glibc would map afresh and
    unmap when freed: 59 MB of weights cost a 1280-channel 3x3 convolution at 8x8 twice its time."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-1, 1 << 30)               # M_TRIM_THRESHOLD (malloc.h): freed memory stays in the heap
    libc.mallopt(-3, 1 << 30)               # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
