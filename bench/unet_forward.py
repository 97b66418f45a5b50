"""One SD1.5 UNet + ControlNet forward at batch 2 on CPU, minicontrol beside diffusers, each side in its own process
and built as its own users build it: random weights from each library's own constructors (diffusers'
UNet2DConditionModel for SD1.5 and ControlNetModel.from_unet), cast to the dtype; minicontrol with the allocator
setting and the convolutions and linear layers packed for oneDNN as sample.py makes them on the CPU
(minicontrol.cpu; --packed 0 leaves them plain). --native 0 instead gives diffusers the same weights as ours through
its own single-file converters (outputs then compared). The printed table gives time, the memory added by the forward,
and the ratio; --rounds N runs both sides N times in turn and keeps each side's best.

    python bench/unet_forward.py [--size 512] [--batch 2] [--repeats 2] [--bf16 0|1] [--native 1|0] [--packed 1|0]
        [--threads N] [--rounds 1]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def build(impl, native=False, dtype=torch.float32):
    """(config, UNet, ControlNet) of SD1.5's size with random weights."""
    from helpers import diffusers_models, randomize
    from minicontrol.config import preset
    from minicontrol.controlnet import clone_encoder
    from minicontrol.model import StableDiffusion
    cfg = preset("sd15")
    torch.manual_seed(0)
    if native and impl == "diffusers":
        from diffusers import ControlNetModel, UNet2DConditionModel
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        return cfg, unet.to(dtype).eval(), ControlNetModel.from_unet(unet).to(dtype).eval()
    model = StableDiffusion(cfg)
    with torch.no_grad():    # the zero-initialised convs get weights too, so both outputs are non-trivial
        for name, p in model.unet.named_parameters():
            if name.startswith("out.2") or ".out_layers.3." in name or ".proj_out." in name:
                p.normal_(std=0.01)
    net = randomize(clone_encoder(model.unet), seed=1, std=0.01)
    if impl == "minicontrol":
        return cfg, model.unet.to(dtype).eval(), net.to(dtype).eval()
    unet, controlnet, _ = diffusers_models(cfg, model, net)
    return cfg, unet.to(dtype), controlnet.to(dtype)


def side(args):
    from common import measure
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    if args.impl == "minicontrol":
        from minicontrol.cpu import keep_freed_memory
        keep_freed_memory()
    cfg, unet, net = build(args.impl, args.native, dtype)
    if args.impl == "minicontrol" and args.packed:
        from minicontrol.cpu import pack_weights
        pack_weights(unet)
        pack_weights(net)
    g = torch.Generator().manual_seed(0)
    h = args.size // 8
    x = torch.randn(args.batch, 4, h, h, generator=g).to(dtype)
    t = torch.full((args.batch,), 500)
    ctx = torch.randn(args.batch, 77, 768, generator=g).to(dtype)
    hint = torch.rand(args.batch, 3, args.size, args.size, generator=g).to(dtype)

    def forward():
        if args.impl == "minicontrol":
            return unet(x, t, ctx, control=net(x, hint, t, ctx))
        down, mid = net(x, t, ctx, hint, return_dict=False)
        return unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    measure(args.impl, forward, args.repeats, args.out)


def main():
    from common import compare
    def note(a, o):
        if a.native:
            return "each side's own random weights"
        diff = (o["minicontrol"].float() - o["diffusers"].float()).norm() / o["diffusers"].float().norm()
        return f"the same weights; output relative difference {diff.item():.2e}"
    compare(__file__, side, lambda a: f"SD1.5 UNet + ControlNet forward, {a.size}x{a.size}, batch {a.batch}, "
            f"{'bfloat16' if a.bf16 else 'float32'}, CPU, {a.threads} threads, torch {torch.__version__}; best of "
            f"{a.repeats}", note, size=512, batch=2, repeats=2, bf16=0, native=1, packed=1)


if __name__ == "__main__":
    main()
