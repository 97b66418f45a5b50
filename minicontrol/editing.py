"""Sampling from a given image rather than from noise alone: img2img, as the official 1.1 tile demo does, and
inpainting, as the official 1.1 inpaint demo does (gradio_tile.py, gradio_inpaint.py)."""
from dataclasses import dataclass

import numpy as np
import torch

from .preprocess import gaussian_blur


def image_latents(model, image: np.ndarray, generators) -> torch.Tensor:
    """(len(generators), C, h, w): the (H, W, 3) uint8 image encoded as those demos do, from pixels / 127 - 1 (sic),
    to one sample of the VAE's posterior per generator (one per sample of the batch)."""
    x = torch.tensor(image / 127.0 - 1.0, dtype=torch.float32).permute(2, 0, 1)[None]
    with torch.no_grad():
        return model.vae.encode(x.to(next(model.vae.parameters()).device), generators, n=len(generators))


@dataclass
class Inpainting:
    """The inpaint demo's inputs, from an (H, W, 3) uint8 image and an (H, W) uint8 mask (white: repaint)."""
    soft: np.ndarray            # (H, W) in [0, 1]: the mask blurred, with which the output keeps the image's pixels
    kept: torch.Tensor          # (1, 1, H / 8, W / 8): 1 where the latents are the image's (1 - the soft mask's mean)
    control: np.ndarray         # (H, W, 3): the image in [0, 1], -1 where the soft mask is over one half


def inpainting(image: np.ndarray, mask: np.ndarray, blur: float = 5.0, down: int = 8) -> Inpainting:
    """The mask blurred (sigma `blur`), its mean over down x down blocks for the latents, and the control image."""
    soft = mask.astype(np.float32) / 255.0
    if blur > 0:
        soft = gaussian_blur(soft, blur)
    h, w = soft.shape
    latent = soft.reshape(h // down, down, w // down, down).mean(axis=(1, 3))
    control = np.where(soft[:, :, None] > 0.5, -1.0, image / 255.0).astype(np.float32)
    return Inpainting(soft, torch.tensor(1.0 - latent)[None, None], control)


def composite(images: np.ndarray, image: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) samples, with the given image's pixels where the soft mask is 0 and a blend along its edge."""
    alpha = soft[..., None]
    return (images * alpha + image * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
