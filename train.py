"""Train a ControlNet with the official recipe (and, for small models, the VAE, its decoder and the base model), one
CPU to many GPUs: `torchrun --nproc_per_node N train.py ...` runs DistributedDataParallel.

    python train.py --base v1-5-pruned.ckpt --data training/fill50k --out runs/fill50k          # ControlNet
    python train.py --stage vae --config tiny --data data/circles --out runs/vae                  # tiny world
    python train.py ... --resume                                                                   # after a stop
"""
import argparse
import csv
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from minicontrol.attention import check_mode
from minicontrol.checkpoint import (CheckpointError, StableDiffusion, check_out_folder, controlnet_state_dict,
                                    full_state_dict, guessed_prediction, holds_controlnet, load_base,
                                    load_controlnet, save)
from minicontrol.config import preset
from minicontrol.controlnet import clone_encoder
from minicontrol.ddim import alphas_cumprod
from minicontrol.eval import line_plot
from minicontrol.pipeline import Control, decode, sample
from minicontrol.preprocess import open_image
from minicontrol.unet import set_grad_checkpointing


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", choices=["controlnet", "base", "vae", "decoder"], default="controlnet",
      help="what trains: the ControlNet (base locked; official), the base UNet, the VAE, or the VAE's decoder alone "
           "(encoder frozen, so the latent space and every UNet trained on it stay valid)")
    a("--base", help="SD checkpoint to start from (ControlNet: built from its UNet by the official rule; a ControlNet "
                     "1.0 full file gives its own, as the official tutorial's resume_path does)")
    a("--config", help="preset for a model built from scratch (e.g. tiny) when there is no --base, or for a --base "
                       "whose prediction type its file does not tell (sd21-v: the 768 SD 2.x models predict v)")
    a("--controlnet", help="existing ControlNet (1.0 or 1.1 file, or diffusers folder) to fine-tune instead of a "
                           "fresh copy")
    a("--data", required=True, help="folder with prompt.json (fill50k layout: source, target, prompt per line)")
    a("--out", required=True, help="run folder: checkpoints, samples, loss.csv, loss.png, state.pt")
    a("--steps", type=int, default=10000, help="optimizer steps")
    a("--batch-size", type=int, default=4, help="images per step and process (official 4)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: the same training as one batch "
                                                 "that many times larger")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate (official 1e-5), torch defaults otherwise")
    a("--sd-unlocked", action="store_true", help="also train the UNet's output_blocks and out (official sd_locked=False)")
    a("--only-mid-control", action="store_true", help="train and use only the middle-block residual")
    a("--latent-noise", type=float, default=0.0, help="decoder stage: add Gaussian noise of a std drawn from [0, this] "
      "per image to the (unscaled) latents, so the decoder learns to turn imprecise latents into clean images")
    a("--drop-prompt", type=float, default=0.5, help="probability of an empty prompt (paper: 0.5)")
    a("--resolution", type=int, default=None, help="training image size: short side resized to it, the middle square "
                                                   "kept (default: the data's own short side)")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (atomic)")
    a("--sample-every", type=int, default=300, help="sample grid every N steps (official 300; 0: never)")
    a("--sample-steps", type=int, default=50, help="DDIM steps of those grids (official 50)")
    a("--seed", type=int, default=0, help="seed of new weights, the data order and the noise (default 0)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast of the UNet and ControlNet; "
      "weights and optimizer stay fp32 (default: bf16 on CUDA; fp32, the official recipe's, on the CPU); fp16, with "
      "loss scaling, is for GPUs without bf16 (before Ampere)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory")
    a("--cache-latents", action="store_true", help="encode every image once (the VAE is frozen outside its own "
      "stage; posteriors are still sampled per step); holds 8 floats per latent pixel per image in each process's RAM")
    a("--resume", action="store_true", help="continue from OUT/state.pt: weights, optimizer, step, data order, RNG")
    return p


# ---------------------------------------------------------------------------------------------------------- data
def read_index(folder: Path):
    """The prompt.json lines, every file checked up front so a bad line fails before any training."""
    index = folder / "prompt.json"
    if not index.is_file():
        raise SystemExit(f"error: {index}: no such file; --data must be a folder with prompt.json (fill50k layout)")
    items = []
    for n, line in enumerate(index.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            paths = [folder / item["source"], folder / item["target"]]
            prompt = item["prompt"]
        except (ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"error: {index} line {n}: expected JSON with source, target and prompt ({e})")
        for path in paths:
            if not path.is_file():
                raise SystemExit(f"error: {index} line {n}: {path} does not exist")
        items.append((*paths, prompt))
    if not items:
        raise SystemExit(f"error: {index} lists no images")
    return items


def load_item(item, resolution, line):
    """hint (3, R, R) in [0, 1], target (3, R, R) in [-1, 1], prompt. Both images' short side is resized to R and
    the middle R x R kept, as diffusers' training script does; resolution None keeps the images as they are."""
    imgs = []
    for path in item[:2]:
        try:
            imgs.append(open_image(path).convert("RGB"))
        except Exception as e:
            raise SystemExit(f"error: prompt.json line {line}: cannot read {path} ({type(e).__name__}: {str(e)[:80]})")
    if imgs[0].size != imgs[1].size:
        raise SystemExit(f"error: prompt.json line {line}: {item[0]} is {imgs[0].size[0]}x{imgs[0].size[1]} but "
                         f"{item[1]} is {imgs[1].size[0]}x{imgs[1].size[1]}; a control image and its target must "
                         "be the same size")
    w, h = imgs[0].size
    if resolution and (w, h) != (resolution, resolution):
        size = (resolution, int(resolution * h / w)) if w < h else (int(resolution * w / h), resolution)
        left, top = round((size[0] - resolution) / 2), round((size[1] - resolution) / 2)
        imgs = [im.resize(size, Image.BICUBIC).crop((left, top, left + resolution, top + resolution)) for im in imgs]
    hint, target = (torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() for im in imgs)
    return hint / 255.0, target / 127.5 - 1.0, item[2]


def batch_indices(n_items, global_batch, step, seed):
    """Items of global step `step`: epochs are seeded permutations, so data order is a function of the step alone."""
    per_epoch = max(1, n_items // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * global_batch:(pos + 1) * global_batch].tolist()


def prefetched(load, keys, ahead=2):
    """load(key) for each key in order, each started `ahead` keys early on a second thread: reading and decoding the
    next batch's images overlaps this step (on a GPU, the CPU mostly waits for the step)."""
    keys = iter(keys)
    with ThreadPoolExecutor(1) as pool:
        queue = deque(pool.submit(load, key) for key in islice(keys, ahead))
        while queue:
            result = queue.popleft().result()
            queue.extend(pool.submit(load, key) for key in islice(keys, 1))
            yield result


# --------------------------------------------------------------------------------------------------------- model
def build(args, device):
    """(model, trainable module, parameters to optimise)."""
    try:
        config = preset(args.config) if args.config else None
        model = load_base(args.base, config) if args.base else None
        if model and args.stage == "controlnet" and not args.controlnet and holds_controlnet(args.base):
            args.controlnet = args.base              # its ControlNet too, as the official tutorial's resume_path does
        net = load_controlnet(args.controlnet, base=model.config) if args.controlnet and model else None
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    if model is None:
        if not args.config or args.stage in ("controlnet", "decoder"):
            raise SystemExit("error: give --base (an SD checkpoint), or --config to build a new model for --stage vae/base")
        torch.manual_seed(args.seed)
        model = StableDiffusion(config)
    model = model.to(device).requires_grad_(False).eval()
    if args.stage == "vae":
        return model, model.vae, list(model.vae.parameters())
    if args.stage == "decoder":
        return model, model.vae, list(model.vae.post_quant_conv.parameters()) + list(model.vae.decoder.parameters())
    if args.stage == "base":
        return model, model.unet, list(model.unet.parameters())
    torch.manual_seed(args.seed)
    net = net.to(device) if net is not None else clone_encoder(model.unet)
    params = list(net.parameters())
    if args.sd_unlocked:
        params += list(model.unet.output_blocks.parameters()) + list(model.unet.out.parameters())
    return model, net, params


def export(args, model, net, path):
    """What users load: a ControlNet 1.1 file (control_model.*); with --sd-unlocked a ControlNet 1.0 full file (SD
    with its trained decoder, and control_model.*); for the other stages a whole SD file."""
    if args.stage == "controlnet" and args.sd_unlocked:
        save(path, full_state_dict(model, net), model.config)
    elif args.stage == "controlnet":
        save(path, controlnet_state_dict(net), model.config)
    else:
        save(path, full_state_dict(model), model.config)


# ------------------------------------------------------------------------------------------------------ training
def micro_batch_loss(args, model, trained, items, part, parts, gen, cached=None):
    """Loss of part `part` of a step's batch, split in `parts` equal parts (processes x micro-batches). Every part
    draws the random numbers of the whole batch from the same generator state and keeps its own rows, so N processes
    or N micro-batches compute what one process would with the whole batch. `cached`: these rows' VAE moments from
    encode_all, else the VAE encodes the targets now."""
    g = len(items) * parts
    hint, target, prompts = (torch.stack(x) if i < 2 else list(x) for i, x in enumerate(zip(*items)))
    down = model.config.vae_down
    zshape = (g, model.vae.config.embed_dim, target.shape[2] // down, target.shape[3] // down)
    drop, posterior = torch.rand(g, generator=gen) < args.drop_prompt, torch.randn(zshape, generator=gen)
    t, noise = torch.randint(0, 1000, (g,), generator=gen), torch.randn(zshape, generator=gen)
    rows = slice(part * len(items), (part + 1) * len(items))
    device = next(model.parameters()).device
    hint, target, posterior, t, noise = (x[rows] if x.shape[0] == g else x for x in (hint, target, posterior, t, noise))
    hint, target, posterior, t, noise = (x.to(device) for x in (hint, target, posterior, t, noise))
    if args.stage in ("vae", "decoder"):
        extra = 0.0
        if args.stage == "decoder":                  # extra latent noise, std uniform in [0, --latent-noise]
            extra = torch.rand(g, 1, 1, 1, generator=gen) * args.latent_noise * torch.randn(zshape, generator=gen)
            extra = extra[rows].to(device)
        rec, mean, logvar = trained(target, posterior, extra)
        kl = 0.5 * (mean ** 2 + logvar.exp() - 1 - logvar).mean()
        return F.l1_loss(rec, target) + F.mse_loss(rec, target) + 1e-6 * kl   # L1 keeps flat-colour edges sharp
    prompts = ["" if d else p for p, d in zip(prompts, drop[rows].tolist())]   # empty-prompt dropout
    with torch.no_grad():
        mean, logvar = model.vae.moments(target) if cached is None else cached.to(device).chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * posterior) * model.vae.config.scale_factor
        context = model.text.encode(prompts)
    a = alphas_cumprod().float().to(device)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents + (1 - a).sqrt() * noise                   # q(x_t | x_0)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    with torch.autocast(x_t.device.type, dtype=half, enabled=half is not None):
        if args.stage == "controlnet":
            out = model.unet(x_t, t, context, trained(x_t, hint, t, context), args.only_mid_control)
        else:
            out = trained(x_t, t, context)
    target = a.sqrt() * noise - (1 - a).sqrt() * latents if model.config.parameterization == "v" else noise
    return F.mse_loss(out.float(), target)


def encode_all(model, items, resolution, batch=64):
    """The VAE's moments (mean and logvar, stacked on channels) of every training image, kept on the CPU."""
    device, out = next(model.parameters()).device, []

    def read(i):                                     # the targets of items i .. i + batch - 1
        return torch.stack([load_item(items[j], resolution, j + 1)[1] for j in range(i, min(i + batch, len(items)))])
    with torch.no_grad():
        for x in prefetched(read, range(0, len(items), batch)):             # the next images read while these encode
            out.append(torch.cat(model.vae.moments(x.to(device)), dim=1).cpu())
    return torch.cat(out)


def vae_scale_factor(model, items, resolution):
    """LDM's scale_factor: 1 / std of the latents (the posterior means), over up to 256 training images."""
    mean, _ = encode_all(model, items[:256], resolution).chunk(2, dim=1)
    return 1.0 / mean.std().item()


def sample_grid(args, model, net, items, path):
    """Rows of control, target and sample (DDIM, guidance 9, control kept in the unconditional pass)."""
    hint, target, prompts = zip(*[load_item(it, args.resolution, n) for n, it in enumerate(items[:4], 1)])
    hint, target = torch.stack(hint), torch.stack(target)
    device = next(model.parameters()).device
    model.eval()
    if args.stage in ("vae", "decoder"):
        with torch.no_grad():
            out = decode(model, model.vae.encode(target.to(device), sample=False))
    else:
        controls = [Control(net, hint)] if args.stage == "controlnet" else []
        steps = sample(model, prompts, [""] * len(prompts), controls, args.sample_steps, 9.0, 0.0,
                       only_mid_control=args.only_mid_control, height=hint.shape[2], width=hint.shape[3],
                       generator=torch.Generator().manual_seed(0))
        for _, z, _ in steps:
            pass
        out = decode(model, z)
    tiles = lambda x: np.concatenate(list(x), axis=1)
    rows = [tiles((hint.permute(0, 2, 3, 1) * 255).byte().numpy()),
            tiles(((target.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte().numpy()), tiles(out)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def plot_loss(csv_path, png_path):
    """loss.csv as a line (mean over 1% windows)."""
    rows = list(csv.DictReader(Path(csv_path).read_text().splitlines()))
    if len(rows) < 2:
        return
    loss = np.array([float(r["loss"]) for r in rows])
    k = max(1, len(loss) // 100)
    smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
    line_plot(np.arange(len(smooth)) + k, smooth, png_path, "loss")


def save_state(path, run: dict, extra: list, step: int):
    """state.pt: what a resumed run needs to go on exactly as this one would (weights, optimizer, loss scale, the data
    order's and the noise's generator, the step), written to a temporary file and renamed: a kill leaves the old
    state or the new one."""
    torch.save({"trained": run["trained"].state_dict(), "extra": [p.detach() for p in extra], "step": step,
                "optimizer": run["optimizer"].state_dict(), "scaler": run["scaler"].state_dict(),
                "generator": run["generator"].get_state()}, path.with_suffix(".pt.tmp"))
    os.replace(path.with_suffix(".pt.tmp"), path)


def load_state(state: dict, path, run: dict, extra: list, lr: float):
    """save_state's contents back into the run's objects; --lr given now wins over the saved one."""
    try:
        run["trained"].load_state_dict(state["trained"])
        for p, v in zip(extra, state["extra"]):                # a count that differs fails in the optimizer
            p.data.copy_(v)
        run["optimizer"].load_state_dict(state["optimizer"])
        for kept in run["optimizer"].state.values():  # copies, not views of the file that the next save replaces
            kept.update({k: v.clone() for k, v in kept.items() if torch.is_tensor(v)})
        if state.get("scaler"):                                # a run saved in fp16 keeps its loss scale
            run["scaler"].load_state_dict(state["scaler"])
    except (RuntimeError, ValueError) as e:
        why = str(e).strip().splitlines()[0][:120]
        raise SystemExit(f"error: {path} is a run with other settings ({why}); resume with its --stage, --base, "
                         "--controlnet and --sd-unlocked, or give another --out")
    for group in run["optimizer"].param_groups:
        group["lr"] = lr
    run["generator"].set_state(state["generator"])


def check_args(args):
    """Flag mistakes, each one line, before any data or weights are read."""
    counts = {"--steps": args.steps, "--batch-size": args.batch_size, "--grad-accum": args.grad_accum,
              "--save-every": args.save_every, "--sample-steps": args.sample_steps}
    if args.resolution is not None:
        counts["--resolution"] = args.resolution
    for flag, n in counts.items():
        if n < 1:
            raise SystemExit(f"error: {flag} must be at least 1, got {n}")
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    if not 0 <= args.drop_prompt <= 1:
        raise SystemExit(f"error: --drop-prompt is a probability, from 0 to 1; got {args.drop_prompt}")
    for flag, x in (("--sample-every", args.sample_every), ("--latent-noise", args.latent_noise)):
        if x < 0:
            raise SystemExit(f"error: {flag} must not be negative, got {x}")
    if args.latent_noise and args.stage != "decoder":
        raise SystemExit("error: --latent-noise is for --stage decoder; leave it out for the other stages")
    if args.controlnet and args.stage != "controlnet":
        raise SystemExit(f"error: --controlnet is for --stage controlnet; --stage {args.stage} does not use it")
    if args.precision not in (None, "fp32") and args.stage in ("vae", "decoder"):
        raise SystemExit(f"error: --precision {args.precision} is for the UNet stages (controlnet, base); the VAE "
                         "stages train in fp32: leave it out")
    try:
        check_mode()                       # MINICONTROL_ATTENTION
        check_out_folder(args.out)
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")


def main(argv=None):
    args = parser().parse_args(argv)
    check_args(args)
    out = Path(args.out)
    state_path = out / "state.pt"
    if state_path.is_file() and not args.resume:
        raise SystemExit(f"error: {state_path} exists: --out holds a run already; pass --resume to continue it, or "
                         "give another --out")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)                # else every process's NCCL context also lands on GPU 0
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    # the run to continue, memory-mapped (read as used), so that every process checks its step before heavy work
    resume = args.resume and state_path.is_file()
    try:
        state = torch.load(state_path, map_location="cpu", mmap=True, weights_only=True) if resume else None
    except Exception as e:                                    # a copy cut short, or not a file torch.save wrote
        raise SystemExit(f"error: {state_path}: cannot be read ({str(e).strip().splitlines()[0][:100]}); copy it "
                         "again, or give another --out")
    step = state["step"] if resume else 0
    if world > 1:                                    # rank 0 alone writes state.pt: every node must read that one
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
        if steps[0] != -steps[1]:
            raise SystemExit(f"error: the processes resume at steps {-steps[1].item()} to {steps[0].item()} (this "
                             f"one: {step}): {state_path} must be on a disk every node reads; copy it to the others")
    items = read_index(Path(args.data))
    step_batch = args.batch_size * world * args.grad_accum
    if len(items) < step_batch:
        raise SystemExit(f"error: {Path(args.data) / 'prompt.json'} lists {len(items)} items, fewer than one batch of "
                         f"{step_batch} (--batch-size {args.batch_size} x {world} processes x --grad-accum "
                         f"{args.grad_accum}); give a smaller --batch-size or --grad-accum, or more data")
    args.resolution = args.resolution or min(load_item(items[0], None, 1)[1].shape[-2:])
    model, trained, params = build(args, device)
    given = preset(args.config) if args.config else None
    warning = args.base and args.stage in ("controlnet", "base") and guessed_prediction(args.base, model, given)
    if rank == 0 and warning:
        print(f"warning: {warning}", file=sys.stderr)
    need = model.config.size_multiple
    if args.resolution % need:
        fit = max(need, args.resolution // need * need)
        raise SystemExit(f"error: training images of {args.resolution} pixels (--resolution, else the data's own "
                         f"size): this model needs a multiple of {need}; pass --resolution {fit}, for example")
    trained.train()
    for p in params:                                 # the decoder stage leaves the encoder frozen
        p.requires_grad_(True)
    extra = [p for p in params if not any(p is q for q in trained.parameters())]   # unlocked output_blocks/out
    if args.grad_checkpointing:
        set_grad_checkpointing(model.unet)
        set_grad_checkpointing(trained)
    ddp = torch.nn.parallel.DistributedDataParallel(trained) if world > 1 else trained
    cache = args.cache_latents and args.stage in ("base", "controlnet")      # the other stages run the encoder
    moments = encode_all(model, items, args.resolution) if cache else None
    opt = torch.optim.AdamW(params, lr=args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")   # fp16 gradients would underflow
    gen = torch.Generator().manual_seed(args.seed)
    run = {"trained": trained, "optimizer": opt, "scaler": scaler, "generator": gen}    # all that state.pt holds
    if resume:
        load_state(state, state_path, run, extra, args.lr)
        del state
    if rank == 0:
        print(f"resumed {state_path} at step {step}" if step else f"starting a new run in {out}")
        if (out / "loss.csv").exists():                      # drop rows logged after the last checkpoint
            rows = (out / "loss.csv").read_text().splitlines()
            keep = [r for r in rows[1:] if int(r.split(",")[0]) <= step]
            (out / "loss.csv").write_text("\n".join(rows[:1] + keep) + "\n")
        (out / "samples").mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    parts = world * args.grad_accum                  # a step's batch: micro-batch m of process r is part m * world + r

    def own_items(n):                                # micro-batch n (of step n // grad_accum): this process's part
        step, micro = divmod(n, args.grad_accum)
        first = (micro * world + rank) * args.batch_size
        idx = batch_indices(len(items), step_batch, step, args.seed)[first:first + args.batch_size]
        return idx, [load_item(items[i], args.resolution, i + 1) for i in idx]
    batches = prefetched(own_items, range(step * args.grad_accum, args.steps * args.grad_accum))
    # the bar is closed on an error too, so that the error's line starts a line of its own
    with tqdm(total=args.steps, initial=step, disable=rank != 0, desc=args.stage, unit="step") as bar:
        while step < args.steps:
            opt.zero_grad(set_to_none=True)
            total, start = 0.0, gen.get_state()
            for micro in range(args.grad_accum):
                own, batch = next(batches)
                cached = moments[own] if moments is not None else None
                gen.set_state(start)                 # each micro-batch draws the step's numbers and keeps its rows
                loss = micro_batch_loss(args, model, ddp, batch, micro * world + rank, parts, gen, cached)
                loss = loss / args.grad_accum
                last = micro == args.grad_accum - 1
                if world > 1 and not last:
                    with ddp.no_sync():
                        scaler.scale(loss).backward()
                else:
                    scaler.scale(loss).backward()
                total += loss.item()
            if world > 1:
                for p in extra:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                t = torch.tensor([total], device=device)
                dist.all_reduce(t)
                total = t.item() / world
            scaler.step(opt)                             # opt.step(), unless fp16 gradients overflowed
            scaler.update()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if rank != 0:
                continue
            new = not (out / "loss.csv").exists()
            with open(out / "loss.csv", "a") as f:
                f.write(("step,loss,time\n" if new else "") + f"{step},{total:.6f},{time.time():.1f}\n")
            if step % args.save_every == 0 or step == args.steps:
                if args.stage == "vae":
                    s = vae_scale_factor(model, items, args.resolution)
                    model.config = replace(model.config, vae=replace(model.config.vae, scale_factor=s))
                    model.vae.config = model.config.vae
                export(args, model, trained, out / f"step{step:07d}.safetensors")
                save_state(state_path, run, extra, step)
                plot_loss(out / "loss.csv", out / "loss.png")
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                sample_grid(args, model, trained, items, out / "samples" / f"step{step:07d}.png")
                trained.train()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
