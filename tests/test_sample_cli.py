"""`python sample.py` as a user runs it, on tiny weights written here in the official layout."""
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_main, tiny_models
from test_loading import V_YAML
from minicontrol.export import controlnet_state_dict, full_state_dict
from minicontrol.loading import load_base
from minicontrol.config import preset
from minicontrol.preprocess import resize_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    cfg, model, net = tiny_models("tiny-sd1")
    torch.save({"state_dict": full_state_dict(model)}, d / "tiny-v1.ckpt")
    torch.save(controlnet_state_dict(net), d / "control_tiny.pth")
    _, _, net2 = tiny_models("tiny-sd2")
    torch.save(controlnet_state_dict(net2), d / "control_sd2.pth")
    yy, xx = np.mgrid[:80, :96]
    img = np.full((80, 96, 3), 240, np.uint8)
    img[(yy - 40) ** 2 + (xx - 50) ** 2 < 25 ** 2] = (200, 20, 20)
    Image.fromarray(img).save(d / "circle.png")
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    return d


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def run_here(*args):
    """sample.py's main in this process (helpers.run_main): quicker than run() where the command line is not tested."""
    import sample
    return run_main(sample.main, *args)


def base_args(d, out):
    return ["--base", d / "tiny-v1.ckpt", "--config", "tiny-sd1", "--controlnet", d / "control_tiny.pth",
            "--control-image", d / "circle.png", "--detector", "canny", "--prompt", "a red circle",
            "--steps", 3, "--num-samples", 2, "--seed", 42, "--resolution", 64, "--out", out]


@pytest.mark.slow
def test_sample_writes_pngs_with_metadata_and_is_reproducible(files, tmp_path):
    first, second, skip = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, extra in ((first, []), (second, ["--clip-skip", 1])):
        res = run(*base_args(files, out), *extra)                  # --clip-skip 1 is SD1's default: same pixels
        assert res.returncode == 0, res.stderr
    assert run_here(*base_args(files, skip), "--clip-skip", 2).returncode == 0
    grid = Image.open(first / "grid.png")
    samples = [Image.open(first / f"sample_{i}.png") for i in range(2)]
    # control_0.png is OpenCV's Canny of the resized image, and given back as the map it gives the same pixels
    import cv2
    control = np.asarray(Image.open(first / "control_0.png"))
    edges = cv2.Canny(resize_image(np.asarray(Image.open(files / "circle.png")), 64), 100, 200)
    assert control.shape == (64, 64, 3) and (control == edges[:, :, None]).all() and edges.any()
    again = [a if a != files / "circle.png" else first / "control_0.png" for a in base_args(files, tmp_path / "again")]
    assert run_here(*[a for a in again if a not in ("--detector", "canny")]).returncode == 0
    assert all(np.array_equal(np.asarray(Image.open(tmp_path / "again" / f"sample_{i}.png")), np.asarray(samples[i]))
               for i in range(2))
    assert all(s.size == (64, 64) for s in samples)                 # 80x96 -> short side 64, sides multiples of 64
    assert grid.size == (512, 512)              # control map row above two samples, 64-pixel tiles shown 4x
    params = samples[1].text["parameters"]
    for expected in ("a red circle", "Steps: 3", "CFG scale: 9.0", "Seed: 43,", "tiny-v1.ckpt", "control_tiny.pth",
                     "Detector: canny"):
        assert expected in params
    assert "Detect resolution" not in params                        # canny runs at the output size
    for i in range(2):
        assert np.array_equal(np.asarray(samples[i]), np.asarray(Image.open(second / f"sample_{i}.png")))
    assert not np.array_equal(np.asarray(samples[0]), np.asarray(samples[1]))   # two different draws
    # the penultimate layer's text (its values are checked against transformers in test_text.py) changes the images
    assert "Clip skip: 2" in Image.open(skip / "sample_0.png").text["parameters"] and "Clip skip" not in params
    assert not np.array_equal(np.asarray(samples[0]), np.asarray(Image.open(skip / "sample_0.png")))


@pytest.mark.slow
def test_flags_reach_the_sampler_as_given(files, tmp_path, monkeypatch):
    # every sampling flag arrives in pipeline.sample (whose guidance, guess mode, start/end and middle-only control
    # are checked against diffusers in test_parity.py and test_sampling.py) with the value given
    import cv2
    import minicontrol.pipeline
    seen, real = {}, minicontrol.pipeline.sample
    monkeypatch.setattr(minicontrol.pipeline, "sample", lambda *a, **k: seen.update(a=a) or real(*a, **k))
    yy, xx = np.mgrid[:64, :64]
    image = np.full((64, 64, 3), 200, np.uint8)                       # a faint circle and a clear one
    image[(yy - 32) ** 2 + (xx - 20) ** 2 < 12 ** 2], image[(yy - 32) ** 2 + (xx - 46) ** 2 < 12 ** 2] = 180, 120
    Image.fromarray(image).save(tmp_path / "circles.png")
    args = [a if a != files / "circle.png" else tmp_path / "circles.png" for a in base_args(files, tmp_path / "o")]
    assert run_here(*args, "--a-prompt", "sharp", "--negative-prompt", "blurry", "--guess-mode", "--start", 0.25,
                    "--end", 0.75, "--only-mid-control", "--strength", 0.6, "--low-threshold", 40,
                    "--high-threshold", 90, "--cfg", 4.5, "--eta", 0.3).returncode == 0
    _, prompts, negative, (control,), steps, cfg, eta, guess_mode, only_mid = seen["a"][:9]
    assert prompts == ["a red circle, sharp"] * 2 and negative == "blurry"       # one negative prompt for every prompt
    assert (steps, cfg, eta, guess_mode, only_mid) == (3, 4.5, 0.3, True, True)
    assert (control.strength, control.start, control.end) == (0.6, 0.25, 0.75)
    edges = torch.tensor(cv2.Canny(image, 40, 90) / 255.0, dtype=torch.float32)
    assert torch.equal(control.image, edges.expand(1, 3, -1, -1))
    assert (cv2.Canny(image, 40, 90) > cv2.Canny(image, 100, 200)).any()          # the faint circle's edges
    # with no such flags, the official demos' (gradio_canny2image.py) added and negative prompts, guidance 9, eta 0
    assert run_here(*args).returncode == 0
    _, prompts, negative, (control,), _, cfg, eta, guess_mode, only_mid = seen["a"][:9]
    assert prompts[0] == "a red circle, best quality, extremely detailed" and (cfg, eta) == (9.0, 0.0)
    assert negative == ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                        "cropped, worst quality, low quality")
    assert (control.strength, control.start, control.end, guess_mode, only_mid) == (1.0, 0.0, 1.0, False, False)


@pytest.mark.slow
def test_controlnet_1_0_file_alone_is_base_and_controlnet(files, tmp_path):
    # the official 1.0 demos load one file, an SD and its ControlNet: as --base with no --controlnet it is both
    _, model, net = tiny_models("tiny-sd1")
    torch.save(full_state_dict(model, net), tmp_path / "control_sd15_tiny.pth")
    args = base_args(files, None)[:-1]
    args[1], args[5] = tmp_path / "control_sd15_tiny.pth", tmp_path / "control_sd15_tiny.pth"
    twice, once, apart = tmp_path / "twice", tmp_path / "once", tmp_path / "apart"
    assert run_here(*args, twice).returncode == 0
    assert run_here(*(args[:4] + args[6:]), once).returncode == 0
    assert run_here(*base_args(files, apart)).returncode == 0          # the same weights as an SD file and a 1.1 file
    pixels = [np.asarray(Image.open(out / "sample_1.png")) for out in (twice, once, apart)]
    assert np.array_equal(pixels[0], pixels[1]) and np.array_equal(pixels[0], pixels[2])
    assert "ControlNet: control_sd15_tiny.pth" in Image.open(once / "sample_0.png").text["parameters"]
    plain = base_args(files, tmp_path / "o")                          # an SD file alone has no ControlNet to use
    one_line_error(run_here(*(plain[:4] + plain[6:])), "tiny-v1.ckpt holds no ControlNet")


@pytest.mark.slow
def test_diffusers_controlnet_folder_samples_as_the_official_file(files, tmp_path):
    # the same ControlNet saved by diffusers (its converter, then save_pretrained) gives the same pixels as the 1.1 file
    from helpers import diffusers_models
    cfg, model, net = tiny_models("tiny-sd1")
    folder = tmp_path / "control_tiny_diffusers"
    diffusers_models(cfg, model, net)[1].save_pretrained(folder)
    args = [a if a != files / "control_tiny.pth" else folder for a in base_args(files, None)]
    assert run_here(*args[:-1], tmp_path / "a").returncode == 0
    assert run_here(*base_args(files, tmp_path / "b")).returncode == 0
    a, b = (Image.open(tmp_path / out / "sample_1.png") for out in "ab")
    assert np.array_equal(np.asarray(a), np.asarray(b)) and "ControlNet: control_tiny_diffusers" in a.text["parameters"]


@pytest.mark.slow
def test_base_alone_samples_text_to_image(files, tmp_path):
    res = run("--base", files / "tiny-v1.ckpt", "--config", "tiny-sd1", "--prompt", "a red circle", "--steps", 3,
              "--num-samples", 2, "--resolution", 100, "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    assert Image.open(tmp_path / "grid.png").size == (512, 256)     # one row: the two samples shown 2x, no maps
    sample = Image.open(tmp_path / "sample_0.png")
    assert sample.size == (128, 128)                                # 100 rounded to the nearest multiple of 64
    assert "ControlNet: ," in sample.text["parameters"]


def one_line_error(res, *words):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(w in line for w in words), res.stderr


@pytest.mark.slow
def test_user_mistakes_get_clear_errors(files, tmp_path):
    # the first from the command line itself, the rest through main in this process (an exception would escape)
    args = base_args(files, tmp_path / "o")
    one_line_error(run(*[a if a != files / "circle.png" else files / "missing.png" for a in args]), "missing.png")
    one_line_error(run_here(*[a if a != files / "circle.png" else files / "broken.png" for a in args]), "broken.png")
    sd2 = [a if a != files / "control_tiny.pth" else files / "control_sd2.pth" for a in args]
    one_line_error(run_here(*sd2), "control_sd2.pth", "base")
    one_line_error(run_here(*args[:-4], "--resolution", 8, "--out", tmp_path / "o"), "--resolution")
    one_line_error(run_here(*args, "--strength", 1, "--strength", 2), "--strength")
    one_line_error(run_here(*args[:-2], "--out", files / "circle.png"), "--out", "circle.png")   # before any sampling
    one_line_error(run_here(*args, "--denoise", 0.01), "--denoise", "runs no step")
    one_line_error(run_here("--base", files / "tiny-v1.ckpt", "--prompt", "x", "--denoise", 0.5), "--denoise", "first")
    # each before any weights are read: a folder inside a file, an unknown device, seeds numpy cannot take, and a
    # resolution of 0 (once taken as "the default")
    one_line_error(run_here(*args[:-2], "--out", files / "circle.png" / "sub"), "--out", "circle.png is a file")
    one_line_error(run_here(*args, "--device", "tpu"), "--device tpu")
    one_line_error(run_here(*args, "--seed", -5), "--seed")
    one_line_error(run_here(*args, "--seed", 2 ** 32), "--seed")
    one_line_error(run_here(*args, "--cfg", -1), "--cfg")
    one_line_error(run_here(*args, "--eta", 1.5), "--eta")
    one_line_error(run_here(*args[:-4], "--resolution", 0, "--out", tmp_path / "o"), "--resolution 0")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value", [("--cfg", "nan"), ("--cfg", "inf"), ("--eta", "nan"), ("--strength", "nan"),
                                         ("--start", "nan"), ("--end", "inf"), ("--denoise", "nan"),
                                         ("--low-threshold", "nan"), ("--high-threshold", "inf"),
                                         ("--mask-blur", "nan")])
def test_float_flags_refuse_nan_and_inf(files, tmp_path, flag, value):
    # nan guidance (or strength, eta...) would sample and write images of nothing
    one_line_error(run_here(*base_args(files, tmp_path / "o"), flag, value), flag, value)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_attention_is_chosen_in_the_environment(files, tmp_path):
    # MINICONTROL_ATTENTION: auto (the faster of ours and SDPA at each shape on CUDA, the default), ours (our kernel on
    # CUDA) or sdpa (PyTorch's on CUDA too); anything else stops sample.py in one line before any weights are read
    probe = [sys.executable, "-c", "import minicontrol.attention as a; print(a.MODE)"]
    for value, mode in (("", "auto"), ("ours", "ours"), ("sdpa", "sdpa")):
        env = dict(os.environ, MINICONTROL_ATTENTION=value)
        assert subprocess.run(probe, env=env, cwd=ROOT, capture_output=True, text=True).stdout.strip() == mode
    env["MINICONTROL_ATTENTION"] = "flash"
    res = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, base_args(files, tmp_path / "o"))],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    one_line_error(res, "MINICONTROL_ATTENTION=flash", "ours", "sdpa")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_vae_flag_samples_as_a_base_carrying_that_vae(files, tmp_path):
    # --vae FILE (a VAE published alone, no key prefix) gives the pixels of a base file whose first_stage_model.* is
    # that VAE, written here by hand; and it is named in the PNGs
    from helpers import randomize
    from minicontrol.config import preset
    from minicontrol.vae import AutoencoderKL
    vae = randomize(AutoencoderKL(preset("tiny-sd1").vae), seed=7).state_dict()
    torch.save(vae, files / "vae-tiny.pth")
    base = torch.load(files / "tiny-v1.ckpt", weights_only=True)["state_dict"]
    torch.save(base | {"first_stage_model." + k: v for k, v in vae.items()}, tmp_path / "spliced.ckpt")
    args = base_args(files, tmp_path / "a")
    assert run_here(*args, "--vae", files / "vae-tiny.pth").returncode == 0
    args[1], args[-1] = tmp_path / "spliced.ckpt", tmp_path / "b"
    assert run_here(*args).returncode == 0
    assert run_here(*base_args(files, tmp_path / "c")).returncode == 0
    read = lambda out: np.asarray(Image.open(out / "sample_0.png"))
    assert np.array_equal(read(tmp_path / "a"), read(tmp_path / "b"))
    assert not np.array_equal(read(tmp_path / "a"), read(tmp_path / "c"))          # the base's own VAE differs
    assert "VAE: vae-tiny.pth" in Image.open(tmp_path / "a" / "sample_0.png").text["parameters"]
    one_line_error(run_here(*base_args(files, tmp_path / "o"), "--vae", files / "control_tiny.pth"), "not a VAE")


@pytest.mark.slow
def test_sd2_file_without_its_prediction_type_is_warned_of(files, tmp_path, monkeypatch):
    # SD 2.x files do not record eps or v; an official one (no --config, no config of ours in it) gets a warning. The
    # tiny SD2 stands in for the full-size one here: the preset guessed for an SD2 file is made the tiny one.
    from minicontrol import config
    from minicontrol.export import save
    cfg, model, _ = tiny_models("tiny-sd2")
    monkeypatch.setitem(config.PRESETS, "sd21", cfg)
    torch.save({"state_dict": full_state_dict(model)}, tmp_path / "sd2.ckpt")
    save(tmp_path / "sd2.safetensors", full_state_dict(model), cfg)
    common = ["--prompt", "x", "--steps", 1, "--resolution", 64, "--out", tmp_path / "o"]
    res = run_here("--base", tmp_path / "sd2.ckpt", *common[:-1], tmp_path / "eps")
    assert res.returncode == 0 and "warning: " in res.stderr and "--config sd21-v" in res.stderr
    for given in (["--base", tmp_path / "sd2.ckpt", "--config", "sd21"], ["--base", tmp_path / "sd2.safetensors"],
                  ["--base", files / "tiny-v1.ckpt", "--config", "tiny-sd1"]):
        res = run_here(*given, *common)
        assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    # the official v2-inference-v.yaml beside it says v: sampled as --config sd21-v samples it, without a warning
    monkeypatch.setitem(config.PRESETS, "sd21-v", replace(cfg, parameterization="v"))
    (tmp_path / "sd2.yaml").write_text(V_YAML)
    for out, extra in (("yaml", []), ("v", ["--config", "sd21-v"])):
        res = run_here("--base", tmp_path / "sd2.ckpt", *common[:-1], tmp_path / out, *extra)
        assert res.returncode == 0 and "warning" not in res.stderr, res.stderr
    pixels = [np.asarray(Image.open(tmp_path / out / "sample_0.png")) for out in ("yaml", "v", "eps")]
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])


@pytest.mark.slow
def test_shuffle_model_without_its_yaml_is_warned_of(files, tmp_path):
    # the official 1.1 shuffle model pools its residuals by its yaml, published beside the .pth; without it, a warning
    import shutil
    from test_loading import SHUFFLE_YAML
    shuffle = tmp_path / "control_v11e_sd15_shuffle.pth"
    shutil.copy(files / "control_tiny.pth", shuffle)
    args = [a if a != files / "control_tiny.pth" else shuffle for a in base_args(files, tmp_path / "o")]
    res = run_here(*args)
    assert res.returncode == 0 and "warning: " in res.stderr and "control_v11e_sd15_shuffle.yaml" in res.stderr
    shuffle.with_suffix(".yaml").write_text(SHUFFLE_YAML)
    res = run_here(*args)
    assert res.returncode == 0 and "warning" not in res.stderr


@pytest.mark.slow
def test_long_prompt_says_it_is_truncated(files, tmp_path):
    args = base_args(files, tmp_path / "o")
    args[args.index("--prompt") + 1] = "circle " * 90
    res = run(*args)
    assert res.returncode == 0 and "truncated" in res.stderr
    res = run_here(*args, "--prompt-chunks", 2)                     # 90 tokens fit in two pieces of 75
    assert res.returncode == 0 and "truncated" not in res.stderr
    assert "Prompt chunks: 2" in Image.open(args[-1] / "sample_0.png").text["parameters"]


@pytest.mark.slow
def test_control_image_as_the_map_runs_without_warnings(files, tmp_path):
    args = base_args(files, tmp_path / "o")
    args[args.index("--detector") + 1] = "none"
    res = run(*args)
    assert res.returncode == 0 and "Warning" not in res.stderr, res.stderr


def settled(*argv):
    """sample.py's flags as its main takes them: files chosen, checked, defaults filled."""
    import sample
    args = sample.parser().parse_args([str(a) for a in argv])
    tiny = sample.choose_files(args)
    sample.check_args(args, tiny)
    sample.fill_defaults(args, tiny)
    return args


@pytest.mark.parametrize("native", [True, False])
def test_cpu_samples_in_bfloat16_where_the_cpu_has_it(files, monkeypatch, native):
    # bfloat16 where the CPU computes in it natively (about twice float32's speed there), float32 elsewhere and for
    # the tiny model (README's grid); --dtype wins; float16 is for CUDA
    import sample
    monkeypatch.setattr(sample, "native_bf16", lambda: native)
    base = ["--base", files / "tiny-v1.ckpt", "--prompt", "x", "--device", "cpu"]
    assert settled(*base).dtype == ("bfloat16" if native else "float32")
    assert settled(*base, "--dtype", "float32").dtype == "float32"
    assert settled(*base, "--dtype", "bfloat16").dtype == "bfloat16"
    assert settled("--device", "cpu").dtype == "float32"
    one_line_error(run_here(*base, "--dtype", "float16"), "--dtype float16", "CUDA")


@pytest.mark.parametrize("config, size", [("sd15", 512), ("sd21", 512), ("sd21-v", 768), (None, 512)])
def test_default_size_is_the_models_training_size(files, config, size, tmp_path):
    # SD 2.1-v (v2-1_768-ema-pruned) was trained at 768x768 and SD 1.5 / 2.1-base at 512 (diffusers' default height
    # for each is unet.sample_size * 8: 96 * 8 and 64 * 8); an explicit --resolution wins.
    argv = ["--base", str(files / "tiny-v1.ckpt"), "--prompt", "x"] + (["--config", config] if config else [])
    assert settled(*argv).resolution == size
    assert settled(*argv, "--resolution", "640").resolution == 640
    if config == "sd21-v":                           # the official v2-inference-v.yaml beside the file says v too
        (tmp_path / "v2.yaml").write_text(V_YAML)
        (tmp_path / "v2.ckpt").write_bytes((files / "tiny-v1.ckpt").read_bytes())
        args = settled("--base", str(tmp_path / "v2.ckpt"), "--prompt", "x")
        assert args.resolution == 768


@pytest.mark.slow
def test_img2img_and_inpainting_encode_the_image_as_the_official_demos(files, tmp_path, monkeypatch):
    # gradio_tile.py and gradio_inpaint.py: x0 = image / 127.0 - 1 (not 127.5), one copy per sample, each encoded to a
    # posterior sample (mean + std * N(0, 1)) * scale_factor, the noise here each sample's seed's first draws
    import minicontrol.pipeline
    seen, real = {}, minicontrol.pipeline.sample
    monkeypatch.setattr(minicontrol.pipeline, "sample", lambda *a, **k: seen.update(k) or real(*a, **k))
    vae = load_base(files / "tiny-v1.ckpt", config=preset("tiny-sd1")).vae
    image = resize_image(np.asarray(Image.open(files / "circle.png")), 64)
    mean, logvar = vae.moments(torch.tensor(image / 127.0 - 1.0, dtype=torch.float32).permute(2, 0, 1)[None])
    noise = torch.cat([torch.randn(mean.shape, generator=torch.Generator().manual_seed(s)) for s in (42, 43)])
    want = (mean + (0.5 * logvar).exp() * noise) * vae.config.scale_factor
    args = [a for a in base_args(files, tmp_path / "o") if a not in ("--detector", "canny")]     # the image as is
    for extra, key in ((["--denoise", 0.5], "init"), (["--mask", files / "circle.png"], "keep")):
        assert run_here(*args, *extra).returncode == 0
        got = seen[key] if key == "init" else seen[key][0]
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), key


@pytest.mark.slow
def test_inpainting_keeps_the_image_outside_the_blurred_mask(files, tmp_path):
    # The official inpaint demo's last step: output = sample * soft + image * (1 - soft), soft the mask blurred by
    # OpenCV's GaussianBlur; pixels the blur does not reach are the input image exactly.
    import cv2
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:40, 20:44] = 255
    Image.fromarray(image).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    args = [a for a in base_args(files, tmp_path / "o") if a != "canny"]
    args[args.index("--detector"):args.index("--detector") + 1] = []
    args[args.index("--control-image") + 1] = tmp_path / "photo.png"
    res = run_here(*args, "--mask", tmp_path / "mask.png", "--mask-blur", 2)
    assert res.returncode == 0, res.stderr
    soft = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), 2.0)
    for i in range(2):
        out = np.asarray(Image.open(tmp_path / "o" / f"sample_{i}.png")).astype(int)
        assert (soft == 0).mean() > 0.5 and (out[soft == 0] == image[soft == 0]).all()
        assert np.abs(out - image)[soft > 0.99].mean() > 10                 # the masked part is drawn anew
    assert "Mask: mask.png, Mask blur: 2.0" in Image.open(tmp_path / "o" / "sample_0.png").text["parameters"]
    one_line_error(run_here(*args, "--mask", tmp_path / "mask.png", "--detector", "canny"), "--mask", "--detector")
    one_line_error(run_here(*args, "--mask", tmp_path / "absent.png"), "--mask", "absent.png")


@pytest.mark.slow
def test_shuffle_detector_shuffles_the_whole_image_with_the_seed(files, tmp_path):
    # The official shuffle demo shuffles the image as given (not the resized one) into the output size, drawing
    # from the seed; the map shown above the samples is that shuffle.
    from minicontrol.preprocess import shuffle
    args = base_args(files, tmp_path / "o")
    args[args.index("--detector") + 1] = "shuffle"
    assert run_here(*args).returncode == 0
    shown = np.asarray(Image.open(tmp_path / "o" / "grid.png"))[:256:4, :256:4]         # tiles are shown 4x
    image = np.asarray(Image.open(files / "circle.png"))
    assert np.array_equal(shown, shuffle(image, 64, 64, 42)) and not np.array_equal(shown, shuffle(image, 64, 64, 1))


@pytest.mark.slow
def test_each_sample_is_its_own_seeds_in_any_batch_and_batch_size(files, tmp_path):
    # sample i of --seed s is the image of --seed s + i alone, with every random draw (initial noise, DDIM noise at
    # eta > 0, the posterior sample of img2img and inpainting, the inpainting's re-noised known latents)
    args = [a for a in base_args(files, None)[:-1] if a not in ("--detector", "canny")]
    n = args.index("--num-samples") + 1
    for extra in (["--eta", 1.0, "--denoise", 0.7], ["--eta", 0.5, "--mask", files / "circle.png"]):
        args[n] = 3
        assert run_here(*args, tmp_path / "batch", *extra).returncode == 0
        args[n], args[args.index("--seed") + 1] = 1, 44
        assert run_here(*args, tmp_path / "alone", *extra).returncode == 0
        args[args.index("--seed") + 1] = 42
        batch, alone = (Image.open(tmp_path / d / f"sample_{i}.png") for d, i in (("batch", 2), ("alone", 0)))
        assert "Seed: 44," in batch.text["parameters"] and "Seed: 44," in alone.text["parameters"]
        diff = np.abs(np.asarray(batch).astype(int) - np.asarray(alone))
        assert diff.max() <= 1, (extra, diff.max())                  # float sums of another batch size, at most
        others = [np.asarray(Image.open(tmp_path / "batch" / f"sample_{i}.png")).astype(int) for i in (0, 1)]
        assert all(np.abs(o - np.asarray(alone)).mean() > 5 for o in others)
        args[n] = 3                                                   # batches of 2 and 1 give the same 3 images
        assert run_here(*args, tmp_path / "parts", *extra, "--batch-size", 2).returncode == 0
        for i in range(3):
            parts, batch = (np.asarray(Image.open(tmp_path / d / f"sample_{i}.png")) for d in ("parts", "batch"))
            assert np.abs(parts.astype(int) - batch).max() <= 1
    # the tiny model's own prompts and outlines, one from each sample's seed, go with their samples
    for out, extra in (("whole", []), ("split", ["--batch-size", 2]), ("one", ["--num-samples", 1, "--seed", 9])):
        assert run_here("--num-samples", 3, "--steps", 2, "--seed", 7, "--out", tmp_path / out, *extra).returncode == 0
    for name in ("grid.png", "sample_2.png"):
        whole, split = (np.asarray(Image.open(tmp_path / d / name)).astype(int) for d in ("whole", "split"))
        assert np.abs(whole - split).max() <= 1, name
    third, one = Image.open(tmp_path / "whole" / "sample_2.png"), Image.open(tmp_path / "one" / "sample_0.png")
    assert third.text["parameters"].split("\n")[0] == one.text["parameters"].split("\n")[0]      # the prompt
    assert np.abs(np.asarray(third).astype(int) - np.asarray(one)).max() <= 1
    one_line_error(run_here(*args, tmp_path / "o", "--batch-size", 0), "--batch-size")


@pytest.mark.slow
def test_seed_minus_one_draws_a_seed_that_reproduces_the_images(files, tmp_path):
    args = base_args(files, tmp_path / "a")
    args[args.index("--seed") + 1] = -1
    assert run_here(*args).returncode == 0
    params = Image.open(tmp_path / "a" / "sample_0.png").text["parameters"]
    seed = int(params.split("Seed: ")[1].split(",")[0])
    assert 0 <= seed <= 65535                                     # the official demos' random.randint(0, 65535)
    args[args.index("--seed") + 1], args[-1] = seed, tmp_path / "b"
    assert run_here(*args).returncode == 0
    for i in range(2):
        assert np.array_equal(*(np.asarray(Image.open(tmp_path / d / f"sample_{i}.png")) for d in "ab"))
