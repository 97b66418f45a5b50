"""Generate images with Stable Diffusion + ControlNet, from the official files as they are or the tiny model in weights/.

    python sample.py                                         # the tiny model shipped in weights/, no downloads
    python sample.py --base v1-5-pruned.ckpt --controlnet control_v11p_sd15_canny.pth \\
        --control-image bird.png --detector canny --prompt "a bird" --out out/
"""
import argparse
import contextlib
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from tqdm import tqdm

from minicontrol import detectors, pipeline
from minicontrol.attention import check_mode
from minicontrol.cli import UsageError, check_numbers
from minicontrol.config import PRESETS, preset
from minicontrol.cpu import keep_freed_memory, native_bf16, pack_weights
from minicontrol.ddim import img2img_start, timesteps
from minicontrol.editing import composite, image_latents, inpainting
from minicontrol.export import check_out_folder
from minicontrol.files import check_file
from minicontrol.identify import guessed_prediction, holds_controlnet, stated_prediction
from minicontrol.loading import load_base, load_controlnet, load_vae
from minicontrol.preprocess import hwc3, read_pixels, round64
from minicontrol.text import token_count
from minicontrol.world import GUIDANCE as TINY_CFG, STRENGTH as TINY_STRENGTH, demo_controls

WEIGHTS = Path(__file__).resolve().parent / "weights"
TINY_BASE = WEIGHTS / "tiny_sd.safetensors"
TINY_CONTROL = WEIGHTS / "tiny_controlnet.safetensors"
# the defaults of the flags that differ between the tiny model and the official files (the official demos')
TINY = {"cfg": TINY_CFG, "strength": TINY_STRENGTH, "num_samples": 4, "resolution": 64, "a_prompt": "",
        "negative_prompt": ""}
OFFICIAL = {"cfg": 9.0, "strength": 1.0, "num_samples": 1, "resolution": 512,
            "a_prompt": "best quality, extremely detailed",
            "negative_prompt": "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, "
                               "cropped, worst quality, low quality"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--base", help="SD 1.x/2.x base checkpoint (.ckpt/.safetensors) or a ControlNet 1.0 full .pth, which is also "
      f"the ControlNet when none is given (default: {TINY_BASE.relative_to(WEIGHTS.parent)})")
    a("--controlnet", action="append", default=[], help="ControlNet file: 1.0 full, 1.1 control-only, or the folder "
      "of one saved by diffusers; repeat for several, each paired with the --control-image at its position")
    a("--vae", help="a VAE file to use instead of the base's, e.g. vae-ft-mse-840000-ema-pruned.safetensors (or an "
      "SD checkpoint, whose VAE is taken)")
    a("--control-image", action="append", default=[], help="control image for the ControlNet at the same position")
    detectors.add_flags(p)
    a("--prompt", default=None, help="what to draw")
    a("--a-prompt", default=None, help="added to the prompt after a comma (official default "
                                       "'best quality, extremely detailed'; empty for the tiny model)")
    a("--negative-prompt", default=None, help="the unconditional prompt of classifier-free guidance")
    a("--steps", type=int, default=20, help="DDIM steps; 1000 // steps sets the spacing (default 20)")
    a("--cfg", type=float, default=None, help="classifier-free guidance scale; 1 turns guidance off (default 9.0, "
                                                f"the official demos'; {TINY_CFG} for the tiny model)")
    a("--eta", type=float, default=0.0, help="DDIM eta, 0 to 1: 0 is deterministic, 1 is DDPM-like (default 0.0)")
    a("--strength", type=float, action="append", default=[], help="control strength, one for all ControlNets or "
      f"one per ControlNet (default 1.0; {TINY_STRENGTH} for the tiny model)")
    a("--guess-mode", action="store_true", help="no control in the unconditional pass, residual scales "
                                                "strength * 0.825 ** (12 - i): the ControlNet guesses the content")
    a("--start", type=float, action="append", default=[], help="fraction of the steps at which control starts "
                                                                "(default 0.0); one for all or one per ControlNet")
    a("--end", type=float, action="append", default=[], help="fraction of the steps at which control ends "
                                                              "(default 1.0); one for all or one per ControlNet")
    a("--only-mid-control", action="store_true", help="add only the middle-block residual")
    a("--mask", default=None, help="inpaint: white where the first --control-image is to be repainted (with the "
                                    "ControlNet 1.1 inpaint model); the rest of the image is kept")
    a("--mask-blur", type=float, default=5.0, help="Gaussian blur (sigma, pixels) of the --mask edge (default 5.0)")
    a("--denoise", type=float, default=None,
      help="img2img: start from the first --control-image (as given, before any detector) noised this far, 0 to 1 "
           "(1: nearly all noise), as the official tile demo does; default: text to image from pure noise")
    a("--prompt-chunks", type=int, default=1,
      help="prompts in this many pieces of 75 tokens, each encoded alone and then joined (default 1: CLIP's 77 "
           "tokens; the official ControlNet 1.1 lineart_anime demo uses 3, for prompts of up to 225 tokens)")
    a("--clip-skip", type=int, choices=[1, 2], default=None,
      help="text from CLIP's last layer (1, SD1's default) or the one before it (2, SD2's default; the official "
           "ControlNet 1.1 lineart_anime demo uses 2 with its SD1 base), LayerNorm applied after either")
    a("--seed", type=int, default=12345, help="random seed of the first sample, seed + i of sample i (each image its "
      "own seed's, whatever the batch), written in its PNG; -1 draws one, as the official demos do")
    a("--num-samples", type=int, default=None, help="images to generate (default 1; 4 for the tiny model)")
    a("--batch-size", type=int, default=None, help="images drawn at once (default: all of them); any batch size "
                                                   "gives the same images, as each draws from its own seed")
    a("--resolution", type=int, default=None, help="short side of the output, rounded to a multiple of 64 (default "
      "512; 768 for v-prediction models, which were trained at 768; 64 for the tiny model)")
    a("--out", default="out", help="output folder: grid.png, sample_N.png and control_N.png (default out/)")
    a("--device", default=None, help="cpu or cuda (default: cuda when available)")
    a("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
      help="UNet and ControlNet precision; the VAE and text encoder stay float32 (default: float16 on CUDA; on the "
           "CPU bfloat16 with AVX512-BF16 or AMX, else float32; float32 for the tiny model)")
    a("--config", choices=PRESETS, default=None, help="model preset for files whose size or prediction type "
                                                      "cannot be read from their tensors")
    return p


def fail(msg: str):
    raise SystemExit(f"error: {msg}")               # stderr, exit status 1


def per_control(values: list, n: int) -> list:
    """A flag given once stands for every ControlNet."""
    return values * n if len(values) == 1 else values


def choose_files(args) -> bool:
    """The model files: as given, or the tiny model's in weights/ when there is no --base; a ControlNet 1.0 file
    given as --base with control images and no --controlnet is its own ControlNet, as in the 1.0 demos. True for the
    tiny model."""
    tiny = args.base is None
    if tiny and args.controlnet:
        fail("--controlnet needs --base: the SD 1.x/2.x checkpoint the ControlNet was trained for")
    if tiny:
        missing = [str(p) for p in (TINY_BASE, TINY_CONTROL) if not p.is_file()]
        if missing:
            fail(f"{', '.join(missing)} not found: the tiny model's weights. Retrain them (weights/README.md), or pass "
                 "--base and --controlnet with official files (weights/README.md says where to get them)")
        args.base = str(TINY_BASE)
        args.controlnet = [str(TINY_CONTROL)]
    for f in [args.base] + args.controlnet + ([args.vae] if args.vae else []):
        check_file(f)
    if args.control_image and not args.controlnet and holds_controlnet(args.base):
        args.controlnet = [args.base]
    return tiny


def check_args(args, tiny: bool):
    """The flags as given, each mistake in one line, before any weights are read."""
    n = len(args.controlnet)
    ranges = [("--steps", 1, 1000), ("--prompt-chunks", 1, 8), ("--resolution", 64, 4096),
              ("--num-samples", 1, None), ("--batch-size", 1, None), ("--cfg", 0, None), ("--eta", 0, 1),
              ("--mask-blur", 0, None), ("--detect-resolution", 64, 4096)]
    check_numbers(args, ranges)
    check_mode()                                     # MINICONTROL_ATTENTION
    check_out_folder(args.out)
    detectors.check(args.detector, args.annotators)
    if args.prompt is None and not (tiny and not args.control_image):     # the tiny model's outlines come with theirs
        fail("--prompt is required with your own control images or model files; the tiny model knows prompts like "
             "\"red circle with blue background\"")
    if len(args.control_image) != n and not (tiny and not args.control_image):
        held = "" if n else f" ({args.base} holds no ControlNet: it is not a 1.0 file)"
        fail(f"{n} --controlnet but {len(args.control_image)} --control-image; give one control image per "
             f"ControlNet, in the same order{held}")
    images = [("--control-image", f) for f in args.control_image] + ([("--mask", args.mask)] if args.mask else [])
    for flag, f in images:
        if not Path(f).is_file():
            fail(f"{flag} {f}: no such file")
    if args.mask and (not args.control_image or (args.detector or "none") != "none"):
        fail("--mask goes with the image to repaint as the first --control-image, used as it is (no --detector)")
    if args.denoise is not None and not (0 < args.denoise <= 1 and args.control_image):
        fail(f"--denoise {args.denoise}: give a value in (0, 1], and the first --control-image to start from")
    for flag, values in (("--strength", args.strength), ("--start", args.start), ("--end", args.end)):
        if len(values) not in (0, 1, n):
            fail(f"{flag} was given {len(values)} times for {n} ControlNets; give it once or once per ControlNet")
    for s, e in zip(per_control(args.start or [0.0], n), per_control(args.end or [1.0], n)):
        if not 0 <= s < e <= 1:
            fail(f"--start {s} and --end {e} must satisfy 0 <= start < end <= 1")
    if args.denoise and img2img_start(args.denoise, args.steps) < 1:
        fail(f"--denoise {args.denoise} of --steps {args.steps} runs no step (the official rule runs "
             "min(int(denoise * steps), steps - 1)); give a larger --denoise or more --steps")
    if not -1 <= args.seed < 2 ** 32:
        fail(f"--seed must be from 0 to 2**32 - 1, or -1 to draw one; got {args.seed}")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        fail(f"--device {args.device}: give cpu, cuda or cuda:N")
    count = torch.cuda.device_count()
    if args.device not in (None, "cpu") and int(args.device[5:] or 0) >= count:
        gpus = f" or cuda:0 to cuda:{count - 1}" if count else ""
        fail(f"--device {args.device}: this machine has {count} CUDA device(s); use --device cpu{gpus}")
    on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    if on_cpu and args.dtype == "float16":
        fail("--dtype float16 is for CUDA; on the CPU use bfloat16 or float32")


def fill_defaults(args, tiny: bool):
    """Every flag left out gets its default: the tiny model's or the official demos' (TINY, OFFICIAL)."""
    defaults = TINY if tiny else OFFICIAL
    if args.resolution is None and not tiny:
        with contextlib.suppress(Exception):         # a file that cannot be read: load_base names the problem
            if stated_prediction(args.base, preset(args.config) if args.config else None) == "v":
                args.resolution = 768                # v-models were trained at 768
    for name in ("cfg", "num_samples", "a_prompt", "negative_prompt", "resolution"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    n = len(args.controlnet)
    args.strength = per_control(args.strength or [defaults["strength"]], n)
    args.start = per_control(args.start or [0.0], n)
    args.end = per_control(args.end or [1.0], n)
    if args.seed == -1:                              # as the official demos draw one
        args.seed = random.randint(0, 65535)
    args.batch_size = args.batch_size or args.num_samples
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None and args.device.startswith("cuda"):
        args.dtype = "float16"
    if args.dtype is None:                           # the tiny model's grid in README is float32's
        args.dtype = "bfloat16" if native_bf16() and not tiny else "float32"


def read_image(path, flag="--control-image") -> np.ndarray:
    try:
        return read_pixels(path)
    except Exception as e:
        fail(f"{flag} {path}: cannot read it as an image ({type(e).__name__}: {str(e)[:80]})")


def as_hint(image: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) map in [0, 255] -> (B, 3, H, W) in [0, 1]."""
    x = torch.tensor(image).float() / 255.0
    return x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)


def control_maps(args, tiny):
    """(maps to show, one hint tensor per ControlNet, the first control image at the output size or None). The tiny
    model's default draws its own outlines, one per sample."""
    if tiny and not args.control_image:
        prompts, maps = demo_controls(seeds(args), round64(args.resolution))
        args.prompt = args.prompt or prompts
        return maps, [as_hint(np.stack(maps))], None
    if not args.control_image:                       # --base alone: text to image
        return [], [], None
    net = detectors.load(args.detector, args.annotators, args.device)
    found = [detectors.detect(read_image(f), args.resolution, args.detector, net, **detectors.settings(args))
             for f in args.control_image]
    source = found[0][1]                             # the first image at the output size: img2img's, inpainting's
    size = found[0][0].shape[1::-1]                  # every map at the first one's (W, H)
    maps = [np.asarray(Image.fromarray(m).resize(size, Image.BILINEAR)) for m, _ in found]
    return maps, [as_hint(m) for m in maps], source


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        generate(args)
    except UsageError as e:                          # a flag, file or detector of the user's, named in one line
        fail(str(e))


def generate(args):
    tiny = choose_files(args)
    check_args(args, tiny)
    fill_defaults(args, tiny)
    maps, hints, source = control_maps(args, tiny)
    if args.mask:                                    # the official inpaint demo's control: -1 where to repaint
        mask = hwc3(read_image(args.mask, "--mask"))[:, :, 0]
        mask = np.asarray(Image.fromarray(mask).resize(source.shape[1::-1], Image.BILINEAR))
        inpaint = inpainting(source, mask, args.mask_blur)
        maps[0] = (inpaint.control.clip(0, 1) * 255).astype(np.uint8)
        hints[0] = torch.tensor(inpaint.control[None]).permute(0, 3, 1, 2)
    prompts = args.prompt if isinstance(args.prompt, list) else [args.prompt] * args.num_samples
    if args.a_prompt:
        prompts = [p + ", " + args.a_prompt for p in prompts]
    for text, flag in ((prompts[0], "--prompt + --a-prompt"), (args.negative_prompt, "--negative-prompt")):
        if token_count(text) > 75 * args.prompt_chunks:
            print(f"warning: {flag} is {token_count(text)} tokens; it is truncated to the first "
                  f"{75 * args.prompt_chunks} ({args.prompt_chunks} x CLIP's 77 with start and end tokens; "
                  "--prompt-chunks gives more)", file=sys.stderr)
    config = preset(args.config) if args.config else None
    model = load_base(args.base, config)
    nets = [load_controlnet(f, base=model.config) for f in args.controlnet]
    if args.vae:
        model.vae = load_vae(args.vae, model.config)
    for f, net in zip(args.controlnet, nets):
        if "shuffle" in Path(f).name.lower() and not net.config.global_average_pooling:
            print(f"warning: {f}: named as the 1.1 shuffle model, whose residuals are pooled, but no yaml beside it "
                  f"({Path(f).with_suffix('.yaml').name}, published with it) or --config sd15-shuffle says so; "
                  "using it unpooled", file=sys.stderr)
    warning = guessed_prediction(args.base, model, config)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    text = replace(model.config.text, chunks=args.prompt_chunks)
    if args.clip_skip:
        text = replace(text, layer="last" if args.clip_skip == 1 else "penultimate")
    model.text.config = text                         # model.config follows
    if args.device == "cpu":
        keep_freed_memory()
    for part in [model.unet] + nets:                 # cast while moved, tensor by tensor: no float32 copy on the GPU
        part.to(args.device, getattr(torch, args.dtype))
        if args.device == "cpu":
            pack_weights(part)
    model.to(args.device)
    h, w = maps[0].shape[:2] if maps else (round64(args.resolution),) * 2
    controls = [pipeline.Control(*c) for c in zip(nets, hints, args.strength, args.start, args.end)]
    images = []
    batches = -(-len(prompts) // args.batch_size)
    total = img2img_start(args.denoise, args.steps) if args.denoise else len(timesteps(args.steps))
    for lo in range(0, len(prompts), args.batch_size):
        part = slice(lo, lo + args.batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds(args)[part]]
        known = image_latents(model, source, generators) if args.mask or args.denoise else None
        keep = (known, inpaint.kept) if args.mask else None
        init = known if args.denoise else None
        # a control image per sample (the tiny model's own outlines) is taken for this batch's samples
        batch = [replace(c, image=c.image[part]) if c.image.shape[0] > 1 else c for c in controls]
        steps = pipeline.sample(model, prompts[part], args.negative_prompt, batch, args.steps, args.cfg, args.eta,
                                args.guess_mode, args.only_mid_control, h, w, generators, keep=keep, init=init,
                                denoise=args.denoise or 1.0)
        desc = f"DDIM {lo // args.batch_size + 1}/{batches}" if batches > 1 else "DDIM"
        for _, z, _ in tqdm(steps, total=total, desc=desc, unit="step"):
            pass
        images.append(pipeline.decode(model, z))
    images = np.concatenate(images)
    if args.mask:                                    # and the pixels outside the soft mask are the input's
        images = composite(images, source, inpaint.soft)
    write_outputs(args, prompts, maps, images)


def seeds(args) -> list:
    """Sample i's seed: --seed + i (wrapping at 2**32), so an image is made again alone with its own seed."""
    return [(args.seed + i) % 2 ** 32 for i in range(args.num_samples)]


def parameters(args, prompt: str, seed: int, image: np.ndarray) -> str:
    """One sample's settings, as the PNG text chunk `parameters` that image tools read."""
    settings = {"Steps": args.steps, "CFG scale": args.cfg, "Eta": args.eta, "Seed": seed,
                "Size": f"{image.shape[1]}x{image.shape[0]}", "Model": Path(args.base).name,
                "VAE": Path(args.vae or "").name, "ControlNet": ", ".join(Path(c).name for c in args.controlnet),
                "Strength": args.strength, "Guess mode": args.guess_mode, "Start": args.start, "End": args.end,
                "Dtype": args.dtype, "Clip skip": args.clip_skip, "Prompt chunks": args.prompt_chunks,
                "Mask": Path(args.mask or "").name, "Mask blur": args.mask_blur, "Denoise": args.denoise,
                "Detector": args.detector, "Detect resolution": args.detect_resolution}
    # these are written only when the flag is used (the detect resolution: where a network detects)
    used = {"VAE": args.vae, "Clip skip": args.clip_skip, "Prompt chunks": args.prompt_chunks > 1, "Mask": args.mask,
            "Mask blur": args.mask, "Denoise": args.denoise, "Detector": args.detector,
            "Detect resolution": detectors.DETECTORS[args.detector or "none"].files}
    listed = ", ".join(f"{name}: {value}" for name, value in settings.items() if used.get(name, True))
    return f"{prompt}\nNegative prompt: {args.negative_prompt}\n{listed}"


def write_outputs(args, prompts, maps, images):
    """sample_N.png with the settings in a PNG text chunk named `parameters`; control_N.png: each control map as the
    ControlNet saw it (reusable with --detector none); grid.png: control maps (if any) above samples."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters(args, prompts[i], seeds(args)[i], img))
        Image.fromarray(img).save(out / f"sample_{i}.png", pnginfo=info)
    for j, m in enumerate(maps):
        Image.fromarray(m).save(out / f"control_{j}.png")
    n = max(len(maps), len(images))
    blank = np.zeros_like(images[0])
    rows = [np.concatenate(list(tiles) + [blank] * (n - len(tiles)), axis=1) for tiles in (maps, images) if len(tiles)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    zoom = max(1, 256 // images.shape[1])                 # tiny-model tiles are shown at least 256 pixels wide
    grid.resize((grid.width * zoom, grid.height * zoom), Image.NEAREST).save(out / "grid.png")
    print(f"wrote {out / 'grid.png'} and {len(images)} sample(s) in {out}/")


if __name__ == "__main__":
    main()
