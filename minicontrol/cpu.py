"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, and an allocator that keeps the
scratch memory oneDNN takes on every convolution."""
import ctypes

import torch

M_TRIM_THRESHOLD = -1                   # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions and
    matrix products run about twice as fast as float32; elsewhere it emulates them, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def keep_freed_memory():
    """oneDNN reorders a convolution's weights into scratch memory at every call. glibc serves blocks that large by
    mapping fresh pages and gives them back when freed, so each call faults in every page again: 59 MB of weights
    cost a 1280-channel 3x3 convolution at 8x8 twice its time. Large blocks come from the heap and stay there instead.
    Process-wide, and nothing outside glibc; the entry points call it on the CPU."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
