"""How far from float64 SD's 3x3 convolutions come out on the CPU, packed as a direct convolution
(minicontrol.cpu.PackedConv2d) and as Winograd's F(2x2, 3x3) (WinogradConv2d), in float32 and in bfloat16: the
relative L2 difference, random weights (PyTorch's Conv2d initialisation) and standard normal inputs at batch 2. It is
why pack_weights gives Winograd float32 only.

    python bench/winograd_error.py [--threads N]
"""
import argparse

import torch

from minicontrol.cpu import PackedConv2d, WinogradConv2d

SHAPES = [(320, 64), (640, 32), (1280, 16), (1280, 8)]       # (channels, latent size) at each level of a 512x512 sample


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    torch.set_num_threads(p.parse_args().threads)
    torch.manual_seed(0)
    print("| conv, dtype | direct, packed | Winograd |\n|---|---:|---:|")
    for channels, size in SHAPES:
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        x = torch.randn(2, channels, size, size)
        with torch.no_grad():
            exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=1)
            for dtype in (torch.float32, torch.bfloat16):
                layer = conv.to(dtype)
                errors = [((kind(layer)(x.to(dtype)).double() - exact).norm() / exact.norm()).item()
                          for kind in (PackedConv2d, WinogradConv2d)]
                print(f"| {channels}, {size}x{size}, {str(dtype)[6:]} | {errors[0]:.2e} | {errors[1]:.2e} |")


if __name__ == "__main__":
    main()
