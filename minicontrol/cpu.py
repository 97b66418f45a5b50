"""Running the models fast on a CPU: bfloat16 where the CPU has instructions for it, weights reordered for oneDNN once
rather than at every call, Winograd's 3x3 convolutions, and an allocator that keeps oneDNN's scratch memory."""
import ctypes
import platform

import torch
import torch.nn as nn
import torch.nn.functional as F

GLIBC = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None    # its allocator is set below


def native_bf16() -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX512-BF16 or AMX), where oneDNN's bfloat16 convolutions and
    matrix products run about twice as fast as float32; elsewhere it emulates them, slower than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def keep_freed_memory():
    """Large blocks from the heap, kept there when freed (process-wide, glibc only; sample.py and train.py call it).
    oneDNN reorders unpacked weights (training, the VAE) into scratch memory at every call, which glibc would map
    afresh each time: a 1280-channel 3x3 convolution at 8x8 took twice its time; so would the attention chunks."""
    if GLIBC:
        GLIBC.mallopt(-1, 1 << 30)          # M_TRIM_THRESHOLD (malloc.h): freed memory stays in the heap
        GLIBC.mallopt(-3, 1 << 30)          # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap


class Packed(nn.Module):
    """A Conv2d or Linear for sampling on the CPU, its weights reordered into oneDNN's blocked layout for the first
    input's shape once, not at every call (other shapes still run right). It holds the layer's weight and bias under
    their names; subclasses say how to reorder and how to run."""
    unreturned = 0                          # bytes of plain weights dropped since the heap was last trimmed

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None):
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, x):
        if not self.weight.is_mkldnn:       # the first call: packed in place of the plain weights
            Packed.unreturned += self.weight.nbytes
            self.weight = nn.Parameter(self.reorder(self.weight.detach(), x), requires_grad=False)
            if GLIBC and Packed.unreturned >= 1 << 28:     # the plain weights' pages freed, 256 MiB at a time
                GLIBC.malloc_trim(0)
                Packed.unreturned = 0
        return self.run(x)


class PackedConv2d(Packed):
    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight, conv.bias)
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


def input_tiles(d: list, out: torch.Tensor) -> torch.Tensor:
    """Winograd's F(2, 3) input transform B^T d along one axis: the 4 rows d of every tile into out's 4 rows."""
    torch.sub(d[0], d[2], out=out[0])
    torch.add(d[1], d[2], out=out[1])
    torch.sub(d[2], d[1], out=out[2])
    torch.sub(d[1], d[3], out=out[3])
    return out


def output_tiles(m: list, out: torch.Tensor):
    """Winograd's F(2, 3) output transform A^T m along one axis: every tile's 4 rows m of products into out's 2."""
    torch.add(m[0], m[1], out=out[0]).add_(m[2])
    torch.sub(m[1], m[2], out=out[1]).sub_(m[3])


class WinogradConv2d(nn.Module):
    """A 3x3 convolution (stride 1, padding 1) for sampling on the CPU as Winograd's F(2x2, 3x3) (arXiv:1509.09308):
    each 2x2 output tile is A^T [(G g G^T) * (B^T d B)] A of its 4x4 input tile d, summed over input channels: 16
    packed products of (tiles, C_in) by (C_in, C_out), 4 multiplications an output instead of 9, for the transforms'
    time and 16/9 the weights' memory. Float32 only: bfloat16's roundings would more than double the error."""

    @staticmethod
    def fits(conv: nn.Conv2d) -> bool:
        """Whether this takes a convolution: 3x3, stride 1, float32, 256 input channels or more (BENCHMARKS.md)."""
        geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        wide = conv.in_channels >= 256 and conv.weight.dtype == torch.float32
        return geometry == ((3, 3), (1, 1), (1, 1), (1, 1), 1) and wide

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        g = torch.tensor([[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]], dtype=conv.weight.dtype)
        u = g @ conv.weight.detach() @ g.T                     # (C_out, C_in, 4 tile rows, 4 tile columns)
        u = u.permute(3, 2, 0, 1).flatten(0, 1)                 # 16 (C_out, C_in): k at column k // 4, row k % 4
        biases = [conv.bias if k == 5 else None for k in range(16)]     # at row 1, column 1 it reaches all 4 outputs
        weights = [nn.Parameter(w, requires_grad=False) for w in u]
        self.products = nn.ModuleList(PackedLinear(w, b) for w, b in zip(weights, biases))

    def forward(self, x):
        n, c, h, w = x.shape
        th, tw = (h + 1) // 2, (w + 1) // 2                     # 2x2 output tiles down and across
        padded = F.pad(x, (1, 1 + w % 2, 1, 1 + h % 2)).permute(0, 2, 3, 1)    # (N, 2 th + 2, 2 tw + 2, C_in)
        down = input_tiles(padded.unfold(1, 4, 2).unbind(-1), x.new_empty(4, n, th, 2 * tw + 2, c))
        tiles = input_tiles(down.unfold(3, 4, 2).unbind(-1), x.new_empty(4, 4, n, th, tw, c))     # and across
        products = [product(t) for product, t in zip(self.products, tiles.flatten(0, 1))]     # 16 (N, th, tw, C_out)
        up = x.new_empty(2, 4, *products[0].shape)
        for j in range(4):                                      # back up, column by column
            output_tiles(products[4 * j:4 * j + 4], up[:, j])
        y = x.new_empty(n, th, 2, tw, 2, up.shape[-1])          # and across, into each tile's 2x2 outputs
        output_tiles(up.unbind(1), y.permute(4, 2, 0, 1, 3, 5))
        return y.view(n, 2 * th, 2 * tw, -1)[:, :h, :w].permute(0, 3, 1, 2)     # channels last


def pack_weights(model: nn.Module):
    """Every Conv2d and Linear below the model packed (bfloat16 ones where oneDNN computes in bfloat16, AVX-512 on),
    the wide 3x3 ones as WinogradConv2d: SD's float32 3x3 convolutions take 0.5 to 0.75 of their plain time, its
    linear layers 0.7 to 0.9 (BENCHMARKS.md). For sampling only from then on: oneDNN weights have no gradients."""
    if not torch.backends.mkldnn.is_available():
        return
    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for name, layer in list(model.named_modules()):
        conv = isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros"
        if not (conv or isinstance(layer, nn.Linear)) or (layer.weight.dtype == torch.bfloat16 and not bf16):
            continue
        if conv and WinogradConv2d.fits(layer):
            packed = WinogradConv2d(layer)
        elif conv:
            packed = PackedConv2d(layer)
        else:
            packed = PackedLinear(layer.weight, layer.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
