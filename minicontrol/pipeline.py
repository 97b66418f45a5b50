"""Text + control image -> image: classifier-free guidance around the DDIM loop, with one or more ControlNets joined
to the locked UNet as the official gradio demos do (gradio_canny2image.py and the 1.1 scripts)."""
from dataclasses import dataclass

import numpy as np
import torch

from .controlnet import ControlNet, guess_mode_scales
from .ddim import ddim_sample, gaussian, img2img_start, noised_to, timesteps
from .model import StableDiffusion


@dataclass
class Control:
    net: ControlNet
    image: torch.Tensor         # (1 or B, 3, H, W) in [0, 1] at pixel resolution (-1: pixels to inpaint)
    strength: float = 1.0
    start: float = 0.0          # fraction of the steps before which this control is off
    end: float = 1.0            # fraction of the steps after which it is off


def residuals(controls, x, t, context, n_cond, guess_mode, step, total):
    """Sum of every active ControlNet's scaled residuals, or None. Rows [:n_cond] are the conditional pass; in guess
    mode (and always for the 1.1 shuffle model) the unconditional rows get no control, i.e. zero residuals."""
    total_res = None
    for c in controls:
        if step / total < c.start or (step + 1) / total > c.end:       # diffusers' control_guidance_start/end rule
            continue
        cond_only = guess_mode or c.net.config.global_average_pooling
        rows = n_cond if cond_only else x.shape[0]
        scales = guess_mode_scales(c.strength, len(c.net.zero_convs) + 1) if guess_mode else c.strength
        hint = c.image.to(x.device, x.dtype).repeat(rows // c.image.shape[0], 1, 1, 1)
        res = c.net(x[:rows], hint, t[:rows], context[:rows], scales)
        if rows < x.shape[0]:
            res = [torch.cat([r, torch.zeros_like(r).expand(x.shape[0] - rows, -1, -1, -1)]) for r in res]
        total_res = res if total_res is None else [a + b for a, b in zip(total_res, res)]
    return total_res


@torch.no_grad()
def sample(model: StableDiffusion, prompts, negative, controls=(), steps=20, cfg_scale=9.0, eta=0.0,
           guess_mode=False, only_mid_control=False, height=None, width=None, generator=None, x_T=None, keep=None,
           init=None, denoise=1.0):
    """Yields (i, x, x0) at every DDIM step, i counting down to 0; the last x is the final latent. prompts and negative:
    strings (one negative string for all), or (B, 77, C) text embeddings. The size is the control images', else
    512x512. keep = (latents, mask) inpaints: latents (1 or B, C, h, w) kept where mask (1 or B, 1, h, w) is 1. init
    (1 or B, C, h, w): img2img from these latents noised `denoise` of the way (ddim.img2img_start, the tile demo's).
    All noise comes from `generator` (one, or one per prompt; see ddim.gaussian), so a seed gives the same image on
    any device."""
    if isinstance(prompts, str):                             # one prompt, or a negative prompt for every prompt
        prompts = [prompts]
    if isinstance(negative, str):
        negative = [negative] * len(prompts)
    if len(negative) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts and {len(negative)} negative prompts: give one negative prompt (a "
                         "string) or one per prompt")
    if height is None or width is None:
        height, width = controls[0].image.shape[-2:] if controls else (512, 512)
    for c in controls:
        if tuple(c.image.shape[-2:]) != (height, width) or c.image.shape[0] not in (1, len(prompts)):
            raise ValueError(f"a control image batch is {tuple(c.image.shape)} (B, 3, H, W) for {len(prompts)} "
                             f"prompts at {(height, width)} pixels: give one image or one per prompt, at that size")
    unet = model.unet
    down = model.config.size_multiple
    if height % down or width % down:
        raise ValueError(f"an image of {height}x{width} pixels: this model needs sides that are multiples of {down}")
    device, dtype = next(unet.parameters()).device, next(unet.parameters()).dtype

    def encode(texts):                                       # strings, or (B, 77, C) text embeddings
        return (texts if torch.is_tensor(texts) else model.text.encode(list(texts))).to(device, dtype)
    b = len(prompts)
    guided = cfg_scale != 1.0
    context = torch.cat([encode(prompts), encode(negative)]) if guided else encode(prompts)
    total = len(timesteps(steps))
    start = None
    if init is not None:
        start = img2img_start(denoise, steps)
        if start < 1:
            raise ValueError(f"denoise {denoise} of {steps} steps runs no step: give a larger denoise or more steps")
        x_T = noised_to(init.to(device, torch.float32).expand(b, -1, -1, -1), steps, start, generator)
    if x_T is None:
        f = model.config.vae_down                          # image pixels per latent pixel (LDM's f)
        x_T = gaussian(torch.empty(b, unet.config.in_channels, height // f, width // f), generator)
    x_T = x_T.to(device, torch.float32)

    def model_fn(x, t, i):
        xx = (torch.cat([x, x]) if guided else x).to(dtype)
        tt = torch.full((xx.shape[0],), t, device=device, dtype=torch.long)
        control = residuals(controls, xx, tt, context, b, guess_mode, total - 1 - i, total)
        out = unet(xx, tt, context, control, only_mid_control).float()
        if not guided:
            return out
        out_cond, out_uncond = out.chunk(2)
        return out_uncond + cfg_scale * (out_cond - out_uncond)

    if keep is not None:
        keep = tuple(k.to(device, torch.float32) for k in keep)
    yield from ddim_sample(model_fn, x_T, steps, eta, model.config.parameterization, generator, keep, start)


@torch.no_grad()
def decode(model: StableDiffusion, z: torch.Tensor) -> np.ndarray:
    """Latents -> (B, H, W, 3) uint8. The VAE stays in float32, so fp16 overflow can never give NaN or black images."""
    img = model.vae.decode(z.to(next(model.vae.parameters()).device, torch.float32))
    return (img * 127.5 + 127.5).clamp(0, 255).permute(0, 2, 3, 1).to(torch.uint8).cpu().numpy()
