"""Train a ControlNet with the official recipe (and, for small models, the VAE, its decoder and the base model), one
CPU to many GPUs: `torchrun --nproc_per_node N train.py ...` runs DistributedDataParallel.

    python train.py --base v1-5-pruned.ckpt --data training/fill50k --out runs/fill50k          # ControlNet
    python train.py --stage vae --config tiny --data data/circles --out runs/vae                  # tiny world
    python train.py ... --resume                                                                   # after a stop
"""
import argparse
import os
import sys
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from minicontrol.attention import check_mode
from minicontrol.cli import UsageError, check_numbers
from minicontrol.config import PRESETS, preset
from minicontrol.controlnet import clone_encoder
from minicontrol.cpu import keep_freed_memory
from minicontrol.data import batch_indices, collate, encode_all, load_item, prefetched, read_index, vae_scale_factor
from minicontrol.export import check_out_folder, controlnet_state_dict, full_state_dict, save
from minicontrol.identify import guessed_prediction, holds_controlnet
from minicontrol.loading import load_base, load_controlnet
from minicontrol.losses import autoencoder_loss, controlnet_loss, draw, unet_loss
from minicontrol.model import StableDiffusion
from minicontrol.pipeline import Control, decode, sample
from minicontrol.runs import load_state, log_loss, plot_loss, read_state, save_state, trim_log
from minicontrol.unet import set_grad_checkpointing

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}      # --precision: autocast dtypes (fp32: none)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--stage", choices=["controlnet", "base", "vae", "decoder"], default="controlnet",
      help="what trains: the ControlNet (base locked; official), the base UNet, the VAE, or the VAE's decoder alone "
           "(encoder frozen, so the latent space and every UNet trained on it stay valid)")
    a("--base", help="SD checkpoint to start from (ControlNet: built from its UNet by the official rule; a ControlNet "
                     "1.0 full file gives its own, as the official tutorial's resume_path does)")
    a("--config", choices=PRESETS, help="preset for a model built from scratch (e.g. tiny) when there is no --base, "
      "or for a --base whose prediction type its file does not tell (sd21-v: the 768 SD 2.x models predict v)")
    a("--controlnet", help="a ControlNet (1.0 or 1.1 file, or diffusers folder) to fine-tune instead of a fresh copy")
    a("--data", required=True, help="folder with prompt.json (fill50k layout: source, target, prompt per line)")
    a("--out", required=True, help="run folder: checkpoints, samples, loss.csv, loss.png, state.pt")
    a("--steps", type=int, default=10000, help="optimizer steps")
    a("--batch-size", type=int, default=4, help="images per step and process (official 4)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step: the same training as one batch "
                                                 "that many times larger")
    a("--lr", type=float, default=1e-5, help="AdamW learning rate (official 1e-5), torch defaults otherwise")
    a("--sd-unlocked", action="store_true", help="also train the UNet's output_blocks and out (official sd_locked=False)")
    a("--only-mid-control", action="store_true", help="train and use only the middle-block residual")
    a("--latent-noise", type=float, default=0.0, help="decoder stage: add Gaussian noise of a std drawn from [0, "
      "this] per image to the (unscaled) latents, so the decoder learns to turn imprecise latents into clean images")
    a("--drop-prompt", type=float, default=0.5, help="chance of an empty prompt (the paper's 0.5; released code: 0)")
    a("--resolution", type=int, default=None, help="training image size: short side resized to it, the middle square "
                                                   "kept (default: the data's own short side)")
    a("--save-every", type=int, default=500, help="checkpoint every N steps (atomic)")
    a("--sample-every", type=int, default=300, help="sample grid every N steps (official 300; 0: never)")
    a("--sample-steps", type=int, default=50, help="DDIM steps of those grids (official 50)")
    a("--seed", type=int, default=0, help="seed of new weights, the data order and the noise (default 0)")
    a("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="autocast of the UNet and ControlNet; "
      "weights and optimizer stay fp32 (default: bf16 on CUDA; fp32, the official recipe's, on the CPU, where bf16 is "
      "faster only with AVX512-BF16 or AMX); fp16, with loss scaling, is for GPUs without bf16 (before Ampere)")
    a("--grad-checkpointing", action="store_true", help="trade compute for memory")
    a("--cache-latents", action="store_true", help="encode every image once (the VAE is frozen outside its own "
      "stage; posteriors are still sampled per step); holds 8 floats per latent pixel per image in each process's RAM")
    a("--resume", action="store_true", help="continue from OUT/state.pt: weights, optimizer, step, data order, RNG")
    return p


def check_args(args):
    """Flag mistakes, each one line, before any data or weights are read."""
    ranges = [("--steps", 1, None), ("--batch-size", 1, None), ("--grad-accum", 1, None), ("--save-every", 1, None),
              ("--sample-steps", 1, 1000), ("--resolution", 1, None), ("--seed", 0, 2 ** 32 - 1),
              ("--sample-every", 0, None), ("--latent-noise", 0, None), ("--drop-prompt", 0, 1)]   # a probability
    check_numbers(args, ranges)
    check_mode()                                     # MINICONTROL_ATTENTION
    check_out_folder(args.out)
    if args.lr <= 0:
        raise SystemExit(f"error: --lr must be positive, got {args.lr}")
    if args.latent_noise and args.stage != "decoder":
        raise SystemExit("error: --latent-noise is for --stage decoder; leave it out for the other stages")
    if args.controlnet and args.stage != "controlnet":
        raise SystemExit(f"error: --controlnet is for --stage controlnet; --stage {args.stage} does not use it")
    if args.precision not in (None, "fp32") and args.stage in ("vae", "decoder"):
        raise SystemExit(f"error: --precision {args.precision} is for the UNet stages (controlnet, base); the VAE "
                         "stages train in fp32: leave it out")


# --------------------------------------------------------------------------------------------------------- model
def build(args, device):
    """(model, trainable module, parameters to optimise)."""
    config = preset(args.config) if args.config else None
    if args.base and args.stage == "controlnet" and not args.controlnet and holds_controlnet(args.base):
        args.controlnet = args.base                  # its ControlNet too, as the official tutorial's resume_path does
    if args.base:
        model = load_base(args.base, config)
    elif args.config and args.stage in ("vae", "base"):
        torch.manual_seed(args.seed)
        model = StableDiffusion(config)
    else:
        raise SystemExit("error: give --base (an SD checkpoint), or --config to build a new model for --stage vae/base")
    model = model.to(device).requires_grad_(False).eval()
    if args.stage == "vae":
        return model, model.vae, list(model.vae.parameters())
    if args.stage == "decoder":                      # the encoder stays frozen
        return model, model.vae, list(model.vae.post_quant_conv.parameters()) + list(model.vae.decoder.parameters())
    if args.stage == "base":
        return model, model.unet, list(model.unet.parameters())
    torch.manual_seed(args.seed)
    net = load_controlnet(args.controlnet, base=model.config) if args.controlnet else clone_encoder(model.unet)
    net = net.to(device)
    params = list(net.parameters())
    if args.only_mid_control:                        # the skips' zero convs get no gradient, so they do not train
        params = [p for name, p in net.named_parameters() if not name.startswith("zero_convs.")]
    if args.sd_unlocked:
        params += list(model.unet.output_blocks.parameters()) + list(model.unet.out.parameters())
    return model, net, params


def export(args, model, net, path):
    """What users load: a ControlNet 1.1 file (control_model.*); with --sd-unlocked a ControlNet 1.0 full file (SD
    with its trained decoder, and control_model.*); for the other stages a whole SD file."""
    if args.stage == "controlnet" and not args.sd_unlocked:
        save(path, controlnet_state_dict(net), model.config)
    else:
        save(path, full_state_dict(model, net if args.stage == "controlnet" else None), model.config)


# ------------------------------------------------------------------------------------------------------ training
def stage_loss(args, model, trained, batch, d, moments=None):
    """The loss of this stage on a part of a step's batch, with that part's random numbers `d`."""
    hint, target, prompts = batch
    device = next(model.parameters()).device
    hint = hint.to(device)
    target = target.to(device)
    moments = None if moments is None else moments.to(device)
    half = HALF.get(args.precision)
    if args.stage in ("vae", "decoder"):
        return autoencoder_loss(trained, target, d)
    if args.stage == "base":
        return unet_loss(model, trained, target, prompts, d, half, moments)
    return controlnet_loss(model, trained, hint, target, prompts, d, half, args.only_mid_control, moments)


def step_parts(args, items, world, rank, first_step):
    """This process's parts of every step's batch from `first_step` on, read ahead: (rows, item indices, items).
    Micro-batch m of process r is part m * world + r of the step's batch, rows cut batch_size at a time; the step's
    items and random numbers are drawn whole and cut alike, so any world and grad_accum train as one whole batch."""
    def load(key):
        step, part = key
        rows = slice(part * args.batch_size, (part + 1) * args.batch_size)
        own = batch_indices(len(items), args.batch_size * world * args.grad_accum, step, args.seed)[rows]
        return rows, own, [load_item(items[i], args.resolution, i + 1) for i in own]
    keys = ((s, m * world + rank) for s in range(first_step, args.steps) for m in range(args.grad_accum))
    return prefetched(load, keys)


def train_step(args, model, ddp, run, parts, moments, world):
    """One optimizer step. Its random numbers are drawn once for the step's whole batch, and each micro-batch takes
    its part's rows of them; DDP all-reduces the gradients once, in the last micro-batch's backward."""
    opt, scaler = run["optimizer"], run["scaler"]
    device = next(model.parameters()).device
    latent_shape = (model.vae.config.embed_dim, args.resolution // model.config.vae_down,
                    args.resolution // model.config.vae_down)
    latent_noise = args.latent_noise if args.stage == "decoder" else None
    d = draw(run["generator"], args.batch_size * world * args.grad_accum, latent_shape, args.drop_prompt, latent_noise)
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for micro in range(args.grad_accum):
        rows, own, items = next(parts)
        sync = micro == args.grad_accum - 1 or world == 1           # the last micro-batch all-reduces
        # DDP decides whether to all-reduce when the forward runs, so no_sync must hold the forward too
        with nullcontext() if sync else ddp.no_sync():
            own_moments = moments[own] if moments is not None else None
            loss = stage_loss(args, model, ddp, collate(items), d.rows(rows, device), own_moments) / args.grad_accum
            scaler.scale(loss).backward()
        total += loss.item()
    if world > 1:
        for p in run["extra"]:                       # the unlocked UNet decoder, outside DDP
            dist.all_reduce(p.grad)
            p.grad /= world
        t = torch.tensor([total], device=device)
        dist.all_reduce(t)
        total = t.item() / world
    scaler.step(opt)                                 # opt.step(), unless fp16 gradients overflowed
    scaler.update()
    return total


# ------------------------------------------------------------------------------------------------------- outputs
def sample_grid(args, model, net, items, path):
    """Rows of control, target and sample (DDIM, guidance 9, control kept in the unconditional pass)."""
    hint, target, prompts = collate([load_item(it, args.resolution, n) for n, it in enumerate(items[:4], 1)])
    model.eval()
    if args.stage in ("vae", "decoder"):
        with torch.no_grad():
            out = decode(model, model.vae.encode(target.to(next(model.parameters()).device), sample=False))
    else:
        controls = [Control(net, hint)] if args.stage == "controlnet" else []
        steps = sample(model, prompts, "", controls, args.sample_steps, 9.0, 0.0,
                       only_mid_control=args.only_mid_control, height=hint.shape[2], width=hint.shape[3],
                       generator=torch.Generator().manual_seed(0))
        for _, z, _ in steps:
            pass
        out = decode(model, z)
    hint = (hint.permute(0, 2, 3, 1) * 255).byte().numpy()
    target = ((target.permute(0, 2, 3, 1) + 1) * 127.5).clamp(0, 255).byte().numpy()
    rows = [np.concatenate(list(x), axis=1) for x in (hint, target, out)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parser().parse_args(argv)
    try:
        check_args(args)
        train(args)
    except UsageError as e:              # a flag, file, run or data of the user's, named in one line
        raise SystemExit(f"error: {e}")


def train(args):
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
    else:
        keep_freed_memory()
    state = read_state(state_path) if args.resume and state_path.is_file() else None
    step = state["step"] if state else 0
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        # rank 0 alone writes state.pt: every node must resume from that one file, so at the same step
        steps = torch.tensor([step, -step], device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)                 # the latest step and minus the earliest
        if steps[0] != -steps[1]:
            raise SystemExit(f"error: the processes resume at steps {-steps[1].item()} to {steps[0].item()} (this "
                             f"one: {step}): {state_path} must be on a disk every node reads; copy it to the others")
    items = read_index(args.data)
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
    trained.train().requires_grad_(False)
    for p in params:                                 # DDP expects a gradient for every parameter that requires one
        p.requires_grad_(True)
    if args.grad_checkpointing:
        set_grad_checkpointing(model.unet)
        set_grad_checkpointing(trained)
    ddp = torch.nn.parallel.DistributedDataParallel(trained) if world > 1 else trained
    cache = args.cache_latents and args.stage in ("base", "controlnet")      # the other stages run the encoder
    moments = encode_all(model.vae, items, args.resolution) if cache else None
    run = {"trained": trained,                       # all that state.pt holds
           "extra": [p for p in params if not any(p is q for q in trained.parameters())],   # unlocked UNet parts
           "optimizer": torch.optim.AdamW(params, lr=args.lr),
           "scaler": torch.amp.GradScaler(device.type, enabled=args.precision == "fp16"),   # fp16 would underflow
           "generator": torch.Generator().manual_seed(args.seed)}
    if state:
        load_state(state, state_path, run, args.lr)
        del state
    if rank == 0:
        print(f"resumed {state_path} at step {step}" if step else f"starting a new run in {out}")
        trim_log(out, step)
        (out / "samples").mkdir(parents=True, exist_ok=True)
    from tqdm import tqdm
    parts = step_parts(args, items, world, rank, step)
    # the bar is closed on an error too, so that the error's line starts a line of its own
    with tqdm(total=args.steps, initial=step, disable=rank != 0, desc=args.stage, unit="step") as bar:
        while step < args.steps:
            loss = train_step(args, model, ddp, run, parts, moments, world)
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if rank != 0:
                continue
            log_loss(out, step, loss)
            if step % args.save_every == 0 or step == args.steps:
                if args.stage == "vae":
                    s = vae_scale_factor(model.vae, items, args.resolution)
                    model.vae.config = replace(model.vae.config, scale_factor=s)      # model.config follows
                export(args, model, trained, out / f"step{step:07d}.safetensors")
                save_state(state_path, run, step)
                plot_loss(out / "loss.csv", out / "loss.png")
            if args.sample_every and (step % args.sample_every == 0 or step == args.steps):
                sample_grid(args, model, trained, items, out / "samples" / f"step{step:07d}.png")
                trained.train()
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
