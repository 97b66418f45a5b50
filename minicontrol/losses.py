"""The training objectives, one per stage, and the random numbers of a training step, drawn in one fixed order."""
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .ddim import T, alphas_cumprod


@dataclass
class Draws:
    """A step's random numbers, for every row of the step's whole batch."""
    drop: torch.Tensor          # (G,) bool: the prompt is replaced by "" (the paper trains 50% of them so)
    posterior: torch.Tensor     # (G, C, h, w): the VAE posterior's sample, z0 = mean + std * posterior
    t: torch.Tensor             # (G,) timesteps, uniform over 0 .. T - 1
    noise: torch.Tensor         # (G, C, h, w): eps of z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps
    latent_noise: torch.Tensor  # (G, C, h, w): noise added to the decoder stage's latents, else zeros

    def rows(self, rows: slice, device) -> "Draws":
        return Draws(*(getattr(self, f.name)[rows].to(device) for f in fields(self)))


def draw(gen: torch.Generator, rows: int, latent_shape, drop_prompt: float, latent_noise=None) -> Draws:
    """The step's numbers in the order resumed runs and every process rely on: one draw per line, never reordered.
    latent_noise (decoder stage): the std of its added noise is uniform in [0, latent_noise] per image."""
    shape = (rows, *latent_shape)
    drop = torch.rand(rows, generator=gen) < drop_prompt
    posterior = torch.randn(shape, generator=gen)
    t = torch.randint(0, T, (rows,), generator=gen)
    noise = torch.randn(shape, generator=gen)
    extra = torch.zeros(shape)
    if latent_noise is not None:
        std = torch.rand(rows, 1, 1, 1, generator=gen) * latent_noise
        extra = std * torch.randn(shape, generator=gen)
    return Draws(drop, posterior, t, noise, extra)


def latents(vae, target, posterior, moments=None):
    """z0: a sample of the VAE posterior of the target images, scaled as LDM does. moments: the cached mean and
    logvar (stacked on channels) of these images, else the encoder runs now."""
    mean, logvar = vae.moments(target) if moments is None else moments.chunk(2, dim=1)
    return (mean + torch.exp(0.5 * logvar) * posterior) * vae.config.scale_factor


def noised(model, target, prompts, d: Draws, moments=None):
    """(z_t, the prediction's target, text context): z0 noised to t, q(z_t | z0) = N(sqrt(a_t) z0, (1 - a_t) I); the
    target is eps, or v = sqrt(a_t) eps - sqrt(1 - a_t) z0 for v-models; the prompts emptied where d.drop says."""
    prompts = ["" if drop else p for p, drop in zip(prompts, d.drop.tolist())]
    with torch.no_grad():
        z0 = latents(model.vae, target, d.posterior, moments)
        context = model.text.encode(prompts)
    a = alphas_cumprod().float().to(z0.device)[d.t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * d.noise
    if model.config.parameterization == "v":
        return z_t, a.sqrt() * d.noise - (1 - a).sqrt() * z0, context
    return z_t, d.noise, context


def controlnet_loss(model, net, hint, target, prompts, d: Draws, half=None, only_mid_control=False, moments=None):
    """L = E ||eps - eps_theta(z_t, t, c_t, c_f)||^2 (arXiv:2302.05543): the locked UNet's prediction with the
    trainable copy's residuals from the control image c_f; only the ControlNet (`net`) gets gradients."""
    z_t, goal, context = noised(model, target, prompts, d, moments)
    with torch.autocast(z_t.device.type, dtype=half, enabled=half is not None):
        control = net(z_t, hint, d.t, context)
        out = model.unet(z_t, d.t, context, control, only_mid_control)
    return F.mse_loss(out.float(), goal)


def unet_loss(model, unet, target, prompts, d: Draws, half=None, moments=None):
    """LDM's objective for the base model alone: E ||eps - eps_theta(z_t, t, c_t)||^2 (arXiv:2112.10752)."""
    z_t, goal, context = noised(model, target, prompts, d, moments)
    with torch.autocast(z_t.device.type, dtype=half, enabled=half is not None):
        out = unet(z_t, d.t, context)
    return F.mse_loss(out.float(), goal)


def autoencoder_loss(vae, target, d: Draws):
    """Reconstruction through a posterior sample (plus the decoder stage's latent noise): L1 + L2, which keep flat
    colours' edges sharp, and a small KL term toward N(0, I)."""
    rec, mean, logvar = vae(target, d.posterior, d.latent_noise)
    kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
    return F.l1_loss(rec, target) + F.mse_loss(rec, target) + 1e-6 * kl
