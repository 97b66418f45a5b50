"""The LDM noise schedule and the DDIM sampler (Song et al., arXiv:2010.02502) as the official ControlNet code runs it."""
import torch

T = 1000


def betas() -> torch.Tensor:
    """LDM's "linear" schedule, linear in sqrt(beta) from 0.00085 to 0.012 (diffusers: scaled_linear), float64."""
    return torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2


def alphas_cumprod() -> torch.Tensor:
    """alpha-bar_t for t = 0..999, float64."""
    return torch.cumprod(1 - betas(), dim=0)


def schedule_buffers() -> dict:
    """The 13 top-level buffers that the official checkpoints carry, in float32 as stored."""
    betas_ = betas()
    ac = alphas_cumprod()
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas_ * (1 - ac_prev) / (1 - ac)
    bufs = {"betas": betas_, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
            "log_one_minus_alphas_cumprod": (1 - ac).log(), "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(), "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
            "posterior_mean_coef1": betas_ * ac_prev.sqrt() / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * (1 - betas_).sqrt() / (1 - ac),
            "logvar": torch.zeros(T, dtype=torch.float64)}
    return {k: v.float() for k, v in bufs.items()}


def timesteps(steps: int) -> list:
    """Official "uniform" DDIM timesteps, ascending: range(0, 1000, 1000 // steps) + 1 (S=20: 1, 51, ..., 951).
    Where that would reach t = 1000 (S = 3, 9, ...: the official code fails with an index error) it stops at 999."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and {T}, got {steps}")
    return [t + 1 for t in range(0, T - 1, T // steps)]


def gaussian(x: torch.Tensor, generator=None) -> torch.Tensor:
    """N(0, 1) noise shaped as x, drawn on the generator's device (so a CPU seed gives the same numbers anywhere);
    a list of generators, one per row, draws each row from its own: a sample's noise is its seed's in any batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}: give one per sample")
        return torch.cat([gaussian(row, g) for row, g in zip(x.split(1), generator)])
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def ddim_sample(model, x, steps: int, eta: float = 0.0, parameterization: str = "eps", generator=None, keep=None,
                start: int = None):
    """Yields (i, x_prev, x0) after each step, from t = ts[-1] (or ts[start - 1]) down to ts[0] = 1; model(x, t, i)
    is the (guided) model output for all rows of x at integer timestep t and step index i.
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z   (arXiv:2010.02502, eq. 12), where
    sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev) and a_prev of the last step is alpha-bar[0].
    keep = (known latents, mask) for inpainting, as the official sampler's x0 and mask: before each step, where mask
    is 1, x is replaced by the known latents noised to t with fresh noise, q(x_t | x_0).
    start: img2img, as the official sampler's decode(x, t_start): only the steps below index start run, on an x
    that noised_to(..., start) made (so the first step takes x, noised to ts[start], as being at ts[start - 1])."""
    if not 0 <= eta <= 1:                           # above 1, 1 - a_prev - sigma^2 goes below 0 at some steps
        raise ValueError(f"eta must be from 0 to 1, got {eta}")
    ac = alphas_cumprod().float().double()          # the official buffers are float32
    ts = timesteps(steps)
    a_ts = [ac[t].item() for t in ts]
    a_prevs = [ac[0].item()] + a_ts[:-1]
    for i in reversed(range(len(ts) if start is None else start)):
        a_t, a_prev = a_ts[i], a_prevs[i]
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        if keep is not None:
            known, mask = keep
            x = mask * (a_t ** 0.5 * known + (1 - a_t) ** 0.5 * gaussian(x, generator)) + (1 - mask) * x
        out = model(x, ts[i], i)
        if parameterization == "v":
            e_t = a_t ** 0.5 * out + (1 - a_t) ** 0.5 * x
            x0 = a_t ** 0.5 * x - (1 - a_t) ** 0.5 * out
        else:
            e_t = out
            x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t ** 0.5
        x = a_prev ** 0.5 * x0 + (1 - a_prev - sigma ** 2) ** 0.5 * e_t
        if sigma > 0:
            x = x + sigma * gaussian(x, generator)
        yield i, x, x0


def img2img_start(denoise: float, steps: int) -> int:
    """The official tile demo's t_enc, min(int(denoise * steps), steps - 1): the DDIM index whose noise level img2img
    starts at; the steps below it run. At 1000 steps, where timesteps() stops at 999, the last of those: 998."""
    return min(int(denoise * steps), steps - 1, len(timesteps(steps)) - 1)


def noised_to(x0: torch.Tensor, steps: int, index: int, generator=None) -> torch.Tensor:
    """x0 at the noise level of DDIM timestep ts[index], sqrt(a) x0 + sqrt(1 - a) z: the official stochastic_encode."""
    a = alphas_cumprod().float().double()[timesteps(steps)[index]].item()
    return a ** 0.5 * x0 + (1 - a) ** 0.5 * gaussian(x0, generator)
