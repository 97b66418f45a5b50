"""The Stable Diffusion model as one object: UNet, VAE, text encoder, what it predicts (LDM arXiv:2112.10752)."""
import torch
import torch.nn as nn

from .config import ModelConfig
from .names import TEXT_HF, TEXT_OC, UNET, VAE, to_hf
from .text import TextEncoder
from .unet import UNet
from .vae import AutoencoderKL


class StableDiffusion(nn.Module):
    """The three frozen parts of an SD checkpoint: UNet, VAE and text encoder."""

    def __init__(self, config: ModelConfig, device="cpu"):
        super().__init__()
        self.parameterization = config.parameterization      # "eps" or "v": no part holds it
        with torch.device(device):
            self.unet = UNet(config.unet)
            self.vae = AutoencoderKL(config.vae)
            self.text = TextEncoder(config.text)

    @property
    def config(self) -> ModelConfig:
        """Read from the parts, so it follows them: a VAE swapped in, or a part given a new config."""
        return ModelConfig(self.unet.config, self.vae.config, self.text.config, self.parameterization)

    def official_state_dict(self) -> dict:
        sd = {UNET + k: v for k, v in self.unet.state_dict().items()}
        sd.update({VAE + k: v for k, v in self.vae.state_dict().items()})
        text = self.text.state_dict()
        if self.config.text.layout == "hf":
            sd.update({TEXT_HF + k: v for k, v in to_hf(text, self.config.text.layers).items()})
        else:
            sd.update({TEXT_OC + k: v for k, v in text.items()})
        return sd
