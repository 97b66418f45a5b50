"""A full controlled sample, 256x256, 4 DDIM steps, guidance 9, batch 1, on CPU: minicontrol's pipeline beside
diffusers' StableDiffusionControlNetPipeline on the same SD1.5-sized random weights, the same text embeddings and
initial noise, the same threads; each side in its own process. Includes the VAE decode to pixels. --bf16 1 runs our
UNet and ControlNet in bfloat16, as sample.py does on a CPU with bfloat16 instructions; diffusers keeps its default,
float32. Both sides run as their users get them: ours with sample.py's allocator setting and convolutions and linear
layers packed for oneDNN on the CPU.

    python bench/sample_pipeline.py [--size 256] [--steps 4] [--bf16 0|1] [--repeats 2|0] [--threads N]
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))


def side(args):
    from common import measure
    from unet_forward import build
    torch.set_num_threads(args.threads)
    cfg, unet, net = build(args.impl)
    if args.impl == "minicontrol":
        from minicontrol.cpu import keep_freed_memory, pack_weights
        keep_freed_memory()                                  # as sample.py on the CPU
        dtype = torch.bfloat16 if args.bf16 else torch.float32
        unet = unet.to(dtype)
        net = net.to(dtype)
        pack_weights(unet)
        pack_weights(net)
        from minicontrol.model import StableDiffusion
        from minicontrol.pipeline import Control, decode, sample
        from minicontrol.vae import AutoencoderKL
        model = StableDiffusion(cfg, device="meta")          # no weights: the text encoder is never run here
        model.unet = unet
        torch.manual_seed(2)
        model.vae = AutoencoderKL(cfg.vae).eval()
    else:
        from diffusers import AutoencoderKL as DiffusersVAE, DDIMScheduler, StableDiffusionControlNetPipeline
        from diffusers.loaders import single_file_utils as sfu
        from helpers import ldm_original_config
        from minicontrol.vae import AutoencoderKL
        torch.manual_seed(2)
        ours = AutoencoderKL(cfg.vae)
        ckpt = {"first_stage_model." + k: v for k, v in ours.state_dict().items()}
        vae_cfg = sfu.create_vae_diffusers_config_from_ldm(ldm_original_config(cfg), ckpt, image_size=args.size)
        vae = DiffusersVAE(**vae_cfg)
        vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, vae_cfg))
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionControlNetPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None, unet=unet,
                                                 controlnet=net, scheduler=sched, safety_checker=None,
                                                 feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    h = args.size // 8
    x_T = torch.randn(1, 4, h, h, generator=g)
    cond, uncond = torch.randn(1, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    hint = torch.rand(1, 3, args.size, args.size, generator=g)

    def run():
        if args.impl == "minicontrol":
            for _, z, _ in sample(model, cond, uncond, [Control(net, hint)], args.steps, 9.0, x_T=x_T,
                                  height=args.size, width=args.size):
                pass
            return decode(model, z)
        img = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, image=hint, num_inference_steps=args.steps,
                   guidance_scale=9.0, latents=x_T.clone(), height=args.size, width=args.size, output_type="np").images
        return (img * 255).round().astype("uint8")

    measure(args.impl, run, args.repeats, args.out)


def main():
    from common import compare
    compare(__file__, side, lambda a: f"SD1.5 ControlNet sample, {a.size}x{a.size}, {a.steps} DDIM steps, guidance 9, "
            f"batch 1, CPU, {a.threads} threads, torch {torch.__version__}; best of {a.repeats}",
            lambda a, o: f"largest pixel difference {(o['minicontrol'].int() - o['diffusers'].int()).abs().max()} of 255",
            size=256, steps=4, repeats=2, bf16=0)


if __name__ == "__main__":
    main()
