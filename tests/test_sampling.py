"""DDIM against diffusers' DDIMScheduler set up the official way, and whole controlled samples against diffusers'
StableDiffusionControlNetPipeline on the same converted weights and initial noise."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

from helpers import diffusers_models, tiny_models
from minicontrol.controlnet import ControlNet
from minicontrol.ddim import ddim_sample, timesteps
from minicontrol.pipeline import Control, decode, sample


def official_ddim(prediction_type="epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                         prediction_type=prediction_type)


def test_timesteps_closed_form():
    assert timesteps(20) == list(range(1, 1000, 50)) and timesteps(20)[-1] == 951
    assert timesteps(50)[:2] == [1, 21] and timesteps(50)[-1] == 981
    assert len(timesteps(30)) == 31 and timesteps(30)[-1] == 991      # 1000 // 30 = 33: one step more than asked
    assert len(timesteps(7)) == 8


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_timesteps_match_diffusers(steps):
    s = official_ddim()
    s.set_timesteps(steps)
    assert s.timesteps.tolist() == list(reversed(timesteps(steps)))


def fake_model(x, t, i=None):
    return 0.3 * x + torch.sin(torch.tensor(t / 100.0)) * torch.linspace(-1, 1, x.numel()).reshape(x.shape)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("param", ["eps", "v"])
def test_every_step_matches_diffusers(eta, param):
    steps = 10
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = [x for _, x, _ in ddim_sample(fake_model, x0, steps, eta, param, torch.Generator().manual_seed(5))]
    sched = official_ddim("v_prediction" if param == "v" else "epsilon")
    sched.set_timesteps(steps)
    g, x = torch.Generator().manual_seed(5), x0
    for k, t in enumerate(sched.timesteps):
        x = sched.step(fake_model(x, int(t)), t, x, eta=eta, generator=g).prev_sample
        assert torch.allclose(ours[k], x, rtol=1e-5, atol=1e-5), (k, (ours[k] - x).abs().max())


class OfficialGuessControlNet(ControlNetModel):
    """diffusers' ControlNetModel with the official guess-mode scales strength * 0.825 ** (12 - i) instead of its
    own logspace(-1, 0); the pipeline around it still drops control from the unconditional pass, as officially."""

    def forward(self, *args, conditioning_scale=1.0, guess_mode=False, return_dict=True, **kw):
        down, mid = super().forward(*args, conditioning_scale=1.0, guess_mode=False, return_dict=False, **kw)
        # the gradio demos' control_scales = [strength * (0.825 ** float(12 - i)) for i in range(13)], written
        # out for n residuals (13 there): the deepest keeps the strength, each shallower one 0.825 of the next
        n = len(down) + 1
        scales = [conditioning_scale * 0.825 ** float(n - 1 - i) for i in range(n)]
        if not guess_mode:
            scales = [conditioning_scale] * n
        return [d * s for d, s in zip(down, scales)], mid * scales[len(down)]


def run_pair(name, guess_mode=False, strength=1.0, eta=0.0, steps=4, wrap=False, pooled=False,
             prompts=("a red circle", "a blue square"), negative=("", "blurry")):
    """Our sample and diffusers' pipeline's on the same weights, noise and text embeddings (prompts and negative
    prompts given to ours as they are, as lists or strings; to diffusers as embeddings of one per sample). pooled:
    the ControlNet pools its residuals (the 1.1 shuffle model's global_average_pooling, diffusers'
    global_pool_conditions)."""
    cfg, model, net = tiny_models(name)
    d_unet, d_net, d_vae = diffusers_models(cfg, model, net)
    if pooled:
        shuffle = ControlNet(replace(cfg.unet, global_average_pooling=True))
        shuffle.load_state_dict(net.state_dict())
        net = shuffle.eval()
        d_shuffle = ControlNetModel(**{**d_net.config, "global_pool_conditions": True})
        d_shuffle.load_state_dict(d_net.state_dict())
        d_net = d_shuffle.eval()
    if wrap:
        wrapped = OfficialGuessControlNet(**d_net.config)
        wrapped.load_state_dict(d_net.state_dict())
        d_net = wrapped.eval()
    pipe = StableDiffusionControlNetPipeline(vae=d_vae, text_encoder=None, tokenizer=None, unet=d_unet,
                                             controlnet=d_net, scheduler=official_ddim(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    h = w = 64
    listed = [prompts] if isinstance(prompts, str) else list(prompts)
    negatives = [negative] * len(listed) if isinstance(negative, str) else list(negative)
    x_T = torch.randn(2, 4, h // 8, w // 8, generator=g)[:len(listed)]
    hint = torch.rand(1, 3, h, w, generator=g)
    ours = [x for _, x, _ in sample(model, prompts, negative, [Control(net, hint, strength)], steps=steps, cfg_scale=9.0,
                                   eta=eta, guess_mode=guess_mode, height=h, width=w, x_T=x_T,
                                   generator=torch.Generator().manual_seed(7))][-1]
    with torch.no_grad():
        ref = pipe(prompt_embeds=model.text.encode(listed), negative_prompt_embeds=model.text.encode(negatives),
                   image=hint.expand(len(listed), -1, -1, -1), num_inference_steps=steps, guidance_scale=9.0, eta=eta,
                   latents=x_T.clone(), output_type="latent", height=h, width=w, guess_mode=guess_mode,
                   controlnet_conditioning_scale=strength, generator=torch.Generator().manual_seed(7)).images
    return ours, ref


@pytest.mark.parametrize("name", ["tiny-sd1", "tiny-sd2"])
def test_controlled_sample_matches_diffusers_pipeline(name):
    ours, ref = run_pair(name, strength=0.8, eta=1.0)
    assert (ours - ref).abs().max().item() <= 1e-4


def test_prompts_as_strings_as_diffusers_takes_them():
    # one prompt as a string, and one negative prompt for every prompt (diffusers' prompt / negative_prompt)
    for prompts, negative in (("a red circle", "blurry"), (["a red circle", "a blue square"], "blurry")):
        ours, ref = run_pair("tiny-sd1", prompts=prompts, negative=negative)
        assert ours.shape[0] == len(ref) and (ours - ref).abs().max().item() <= 1e-4
    _, model, _ = tiny_models("tiny-sd1")
    with pytest.raises(ValueError, match="2 prompts and 3 negative prompts"):
        next(sample(model, ["a", "b"], ["x", "y", "z"], steps=2, height=64, width=64))


def test_guess_mode_follows_official_rule():
    # the official rule (no control in the unconditional pass, scales strength * 0.825 ** (12 - i)) equals diffusers'
    # pipeline once its ControlNet applies those scales; diffusers' own guess mode (logspace scales) does not
    ours, official = run_pair("tiny-sd1", guess_mode=True, wrap=True)
    assert (ours - official).abs().max().item() <= 1e-4
    _, native = run_pair("tiny-sd1", guess_mode=True)
    assert (ours - native).abs().max().item() > 1e-3


def test_shuffle_model_controls_only_the_conditional_pass_as_diffusers():
    # a ControlNet that pools its residuals (1.1 shuffle) always runs as in guess mode: diffusers' pipeline turns
    # on guess_mode for global_pool_conditions, so the unconditional pass gets no control; the scales stay plain
    ours, ref = run_pair("tiny-sd1", pooled=True, strength=0.8)
    assert (ours - ref).abs().max().item() <= 1e-4
    plain, _ = run_pair("tiny-sd1", strength=0.8)
    assert (ours - plain).abs().max().item() > 1e-3        # the pooled residuals are not the plain ones


def test_timesteps_never_reach_1000():
    # 1000 // 3 = 333: the official range(0, 1000, 333) + 1 would end at t = 1000, past the schedule
    assert timesteps(3) == [1, 334, 667] and max(timesteps(9)) < 1000 and timesteps(1000) == list(range(1, 1000))


def test_two_controlnets_with_strengths_and_ranges_match_diffusers():
    # residuals of several ControlNets are summed, each with its own image, strength and start/end fraction
    cfg, model, net_a = tiny_models("tiny-sd1")
    _, _, net_b = tiny_models("tiny-sd1", seed=5)
    d_unet, d_a, d_vae = diffusers_models(cfg, model, net_a)
    _, d_b, _ = diffusers_models(cfg, model, net_b)
    pipe = StableDiffusionControlNetPipeline(vae=d_vae, text_encoder=None, tokenizer=None, unet=d_unet,
                                             controlnet=[d_a, d_b], scheduler=official_ddim(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    hints = [torch.rand(1, 3, 64, 64, generator=g) for _ in range(2)]
    strengths, starts, ends = [0.7, 1.3], [0.0, 0.25], [0.75, 1.0]
    controls = [Control(n, h, s, a, b) for n, h, s, a, b in zip((net_a, net_b), hints, strengths, starts, ends)]
    prompts, negative = ["a red circle"], ["blurry"]
    ours = [x for _, x, _ in sample(model, prompts, negative, controls, steps=4, cfg_scale=7.5, x_T=x_T)][-1]
    with torch.no_grad():
        ref = pipe(prompt_embeds=model.text.encode(prompts), negative_prompt_embeds=model.text.encode(negative),
                   image=hints, num_inference_steps=4, guidance_scale=7.5, latents=x_T.clone(), output_type="latent",
                   height=64, width=64, controlnet_conditioning_scale=strengths, control_guidance_start=starts,
                   control_guidance_end=ends).images
    assert (ours - ref).abs().max().item() <= 1e-4
    only_a = [x for _, x, _ in sample(model, prompts, negative, controls[:1], steps=4, cfg_scale=7.5, height=64,
                                     width=64, x_T=x_T)][-1]
    assert (ours - only_a).abs().max().item() > 1e-3          # the second ControlNet really contributes
    # without height and width, the size is the control images' (as in diffusers); images of another size are named
    last = lambda **size: [x for _, x, _ in sample(model, prompts, negative, controls, steps=2,
                                                  generator=torch.Generator().manual_seed(1), **size)][-1]
    assert torch.equal(last(), last(height=64, width=64))
    with pytest.raises(ValueError, match=r"\(1, 3, 64, 64\) .* at \(128, 128\) pixels"):
        next(sample(model, prompts, negative, controls, steps=4, height=128, width=128))
    with pytest.raises(ValueError, match=r"\(3, 3, 64, 64\) .* for 1 prompts"):
        next(sample(model, prompts, negative, [Control(net_a, hints[0].expand(3, -1, -1, -1))], steps=4))
    # sides the UNet cannot halve down to its deepest level (here 8 * 2 ** 1 = 16) are named, not a deep size mismatch
    with pytest.raises(ValueError, match=r"72x64 pixels: .* multiples of 16"):
        next(sample(model, prompts, negative, [], steps=4, height=72, width=64))


def test_inpainting_steps_keep_the_known_latents_noised_to_t():
    # With eps = 0 every latent element follows its own path. Where the mask is 0 the run is exactly the unmasked one;
    # where it is 1 the model sees q(x_t | known) = sqrt(a_t) known + sqrt(1 - a_t) z, z ~ N(0, 1) fresh at every step.
    from minicontrol.ddim import alphas_cumprod
    seen = []
    zero_eps = lambda x, t, i: (seen.append((t, x.clone())), torch.zeros_like(x))[1]
    x_T = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    known = torch.randn(x_T.shape, generator=torch.Generator().manual_seed(1)) * 2 + 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., :16] = 1
    plain = [x for _, x, _ in ddim_sample(zero_eps, x_T, 10)]
    seen.clear()
    kept = [x for _, x, _ in ddim_sample(zero_eps, x_T, 10, generator=torch.Generator().manual_seed(2),
                                         keep=(known, mask))]
    assert all(torch.equal(a[..., 16:], b[..., 16:]) for a, b in zip(plain, kept))
    ac = alphas_cumprod().float().double()
    zs = [((x - ac[t].sqrt() * known) / (1 - ac[t]).sqrt())[..., :16].double() for t, x in seen]
    for z in zs:
        assert abs(z.mean().item()) < 0.06 and abs(z.std().item() - 1) < 0.05
    for a, b in zip(zs, zs[1:]):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.08


@pytest.mark.parametrize("steps, denoise, t_enc", [(10, 0.5, 5), (10, 1.0, 9), (30, 1.0, 29), (20, 0.33, 6)])
def test_img2img_follows_the_official_tile_demo(steps, denoise, t_enc):
    # gradio_tile.py: t_enc = min(int(denoise * steps), steps - 1); z_enc = stochastic_encode(z, t_enc), i.e.
    # sqrt(a) z + sqrt(1 - a) n at DDIM timestep ts[t_enc]; decode(z_enc, t_enc) runs ts[t_enc - 1], ..., ts[0].
    from minicontrol.ddim import alphas_cumprod
    _, model, net = tiny_models("tiny-sd1")
    calls, forward = [], model.unet.forward
    model.unet.forward = lambda x, t, *a: (calls.append((t[0].item(), x[:1].clone())), forward(x, t, *a))[1]
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    list(sample(model, ["a"], [""], [Control(net, torch.rand(1, 3, 64, 64))], steps, 7.5,
                generator=torch.Generator().manual_seed(3), init=init, denoise=denoise))
    ts = timesteps(steps)
    assert [t for t, _ in calls] == ts[:t_enc][::-1]
    a = alphas_cumprod().float().double()[ts[t_enc]].item()
    n = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))      # the seed's first draw
    assert torch.allclose(calls[0][1], a ** 0.5 * init + (1 - a) ** 0.5 * n, atol=1e-6)


@pytest.mark.parametrize("steps, t_enc", [(600, 599), (999, 998), (1000, 998)])
def test_img2img_at_full_denoise_stays_within_the_timesteps(steps, t_enc):
    # 1000 // steps == 1: the official range(0, 1000, 1) + 1 reaches t = 1000, one past alphas_cumprod; timesteps()
    # stops at 999 (999 of them), where the official t_enc = min(int(1.0 * 1000), 1000 - 1) would index past them
    from minicontrol.ddim import img2img_start, noised_to
    start = img2img_start(1.0, steps)
    assert len(timesteps(steps)) == 999 and start == t_enc
    assert torch.isfinite(noised_to(torch.zeros(1, 4, 2, 2), steps, start)).all()


@pytest.mark.parametrize("eta", [-0.1, 1.02, 3.0])
def test_eta_outside_0_to_1_is_refused(eta):
    # above 1, sigma^2 exceeds 1 - a_prev at some steps: the square root of a negative number (complex latents)
    with pytest.raises(ValueError, match="eta"):
        next(ddim_sample(fake_model, torch.zeros(1, 4, 2, 2), 20, eta))


def test_decode_to_pixels_follows_the_official_demos():
    # gradio_canny2image.py: (einops.rearrange(x, 'b c h w -> b h w c') * 127.5 + 127.5).cpu().numpy()
    # .clip(0, 255).astype(np.uint8), i.e. out-of-range values clipped and the rest truncated, not rounded
    _, model, _ = tiny_models("tiny-sd1")
    model.vae.decode = lambda z: z                     # the VAE's output is the tensor given here
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g) * 0.8
    x[0, :, 0, :] = torch.tensor([-1.6, -1.0, -1.003, 1.0, 1.4])            # clipped at both ends
    lifted_by_rounding = torch.tensor([0.6, 10.6, 127.7, 200.5, 254.65])
    x[1, :, 1, :] = (lifted_by_rounding - 127.5) / 127.5
    official = (np.transpose(x.numpy(), (0, 2, 3, 1)) * 127.5 + 127.5).clip(0, 255).astype(np.uint8)
    ours = decode(model, x)
    assert ours.dtype == np.uint8 and ours.shape == (2, 4, 5, 3)
    assert np.array_equal(ours, official)
    assert (official == 0).any() and (official == 255).any()
    assert official[1, 1, :, 0].tolist() == [0, 10, 127, 200, 254]     # truncated, where rounding gives 1, 11, ...
