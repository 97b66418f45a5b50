"""Loading the official SD1.5 + ControlNet files, then one UNet + ControlNet forward (which touches every weight that
was loaded), on CPU: minicontrol's loader, which memory-maps torch's zip files, beside the same loader reading every
file whole, as the official code's cldm/model.py does (torch.load to the CPU, no mmap). Each side in its own process;
time from the first read to the forward's end, and peak resident memory.

The files are SD1.5-sized random weights in the official layouts, written once to --files (about 15 GB):
v1-5-pruned.ckpt (SD and the UNet's EMA copy, float32, as the released file), control_v11p_sd15_canny.pth (1.1,
control_model.* only) and control_sd15_canny.pth (1.0: a whole SD and its ControlNet, used as both --base and
--controlnet, as the 1.0 demos do).

    python bench/load_memory.py [--files /tmp/minicontrol_load_bench] [--threads N]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
PAIRS = {"1.1": ("v1-5-pruned.ckpt", "control_v11p_sd15_canny.pth"),
         "1.0": ("control_sd15_canny.pth", "control_sd15_canny.pth")}


def write_files(folder):
    from minicontrol.config import preset
    from minicontrol.controlnet import clone_encoder
    from minicontrol.export import controlnet_state_dict, full_state_dict
    from minicontrol.model import StableDiffusion
    from minicontrol.names import CONTROL, UNET
    os.makedirs(folder, exist_ok=True)
    if all(os.path.exists(os.path.join(folder, f)) for pair in PAIRS.values() for f in pair):
        return
    torch.manual_seed(0)
    model = StableDiffusion(preset("sd15"))
    with torch.no_grad():
        for p in model.unet.out.parameters():           # an output that is not zero, as a trained model's
            p.normal_(std=0.01)
    net = clone_encoder(model.unet)
    sd = full_state_dict(model)
    ema = {"model_ema." + k[len(UNET):].replace(".", ""): v.clone() for k, v in sd.items() if k.startswith(UNET)}
    torch.save({"state_dict": sd | ema}, os.path.join(folder, PAIRS["1.1"][0]))
    del ema
    torch.save(controlnet_state_dict(net), os.path.join(folder, PAIRS["1.1"][1]))
    torch.save(sd | {CONTROL + k: v for k, v in net.state_dict().items()}, os.path.join(folder, PAIRS["1.0"][0]))


def side(args):
    """One load and forward in this process; prints its JSON row."""
    from common import PeakRSS
    torch.set_num_threads(args.threads)
    if args.impl == "whole":                             # every file read whole, as torch.load does without mmap
        load = torch.load
        torch.load = lambda *a, **k: load(*a, **{**k, "mmap": False})
    from minicontrol.loading import load_base, load_controlnet
    base, control = (os.path.join(args.files, f) for f in PAIRS[args.pair])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500])
    ctx, hint = torch.randn(1, 77, 768, generator=g), torch.rand(1, 3, 256, 256, generator=g)
    with torch.inference_mode(), PeakRSS() as mem:
        start = time.perf_counter()
        model = load_base(base)
        net = load_controlnet(control, base=model.config)
        out = model.unet(x, t, ctx, net(x, hint, t, ctx))
        seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": mem.peak / 2 ** 20, "checksum": out.double().sum().item()}))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--files", default="/tmp/minicontrol_load_bench")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--impl")
    p.add_argument("--pair")
    args = p.parse_args()
    if args.impl:
        return side(args)
    from common import side_row
    write_files(args.files)
    print("| files | read whole: s | memory-mapped: s | time ratio | read whole: peak MiB | memory-mapped: peak MiB "
          "| memory ratio | same output |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for pair in PAIRS:
        rows = {}
        for impl in ("whole", "mmap", "whole", "mmap"):      # twice each, alternating: the second of each counts,
            rows[impl] = side_row([__file__, "--impl", impl, "--pair", pair, "--files", args.files,   # page cache
                                   "--threads", str(args.threads)])                                   # warm for both
        w, m = rows["whole"], rows["mmap"]
        print(f"| {' + '.join(dict.fromkeys(PAIRS[pair]))} | {w['seconds']:.1f} | {m['seconds']:.1f} | "
              f"{m['seconds'] / w['seconds']:.2f} | {w['peak_mb']:.0f} | {m['peak_mb']:.0f} | "
              f"{m['peak_mb'] / w['peak_mb']:.2f} | {w['checksum'] == m['checksum']} |")


if __name__ == "__main__":
    main()
