"""train.py: the official recipe on a tiny model, resume after SIGKILL, and torchrun with two CPU processes."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from minicontrol.config import preset
from minicontrol.controlnet import clone_encoder
from minicontrol.data import DataError, collate, load_item, read_index
from minicontrol.export import full_state_dict
from minicontrol.files import read
from minicontrol.identify import kind
from minicontrol.loading import load_base, load_controlnet
from minicontrol.losses import draw
from minicontrol.model import StableDiffusion
from minicontrol.names import CONTROL, UNET
from minicontrol.world import make_dataset

from helpers import run_main
from test_manifest import manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    make_dataset(d / "data", 16, seed=3)
    torch.manual_seed(0)
    model = StableDiffusion(preset("tiny"))
    with torch.no_grad():               # an SD whose UNet output is not zero, as a trained one
        for p in model.unet.out.parameters():
            p.normal_(std=0.1)
    path = d / "base.safetensors"
    from minicontrol.export import save
    save(path, full_state_dict(model), model.config)
    return d, path


def train(*args, env=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def train_here(*args):
    """train.py's main in this process (helpers.run_main), for refusals that come before any training."""
    import train as script
    return run_main(script.main, *args)


def common(setup, out, steps=6, batch=4, extra=()):
    d, base = setup
    return ["--base", base, "--data", d / "data", "--out", out, "--steps", steps, "--batch-size", batch,
            "--lr", 1e-3, "--sample-every", 0, "--seed", 5, *extra]


def micro_batch_loss(args, model, net, batch, gen):
    """train.py's loss of its stage on loaded items, the step's random numbers drawn from gen (the batch is one
    part: the whole step)."""
    from train import stage_loss
    latent = (model.vae.config.embed_dim, 64 // model.config.vae_down, 64 // model.config.vae_down)
    d = draw(gen, len(batch), latent, args.drop_prompt)
    return stage_loss(args, model, net, collate(batch), d.rows(slice(None), torch.device("cpu")))


def held_out_loss(args, model, net, items):
    """Loss on 8 fixed items with fixed t, noise and prompt dropout: comparable before and after training."""
    with torch.no_grad():
        batch = [load_item(items[i], 64, i + 1) for i in range(8)]
        return micro_batch_loss(args, model, net, batch, torch.Generator().manual_seed(123)).item()


@pytest.mark.slow
def test_training_lowers_loss_and_touches_only_the_controlnet(setup, tmp_path):
    from train import build, parser
    d, base = setup
    out = tmp_path / "run"
    train(*common(setup, out, steps=40, extra=["--save-every", 40]))
    ckpt = out / "step0000040.safetensors"
    sd, _ = read(ckpt)
    assert kind(sd) == "controlnet-1.1" and all(k.startswith(CONTROL) for k in sd)
    args = parser().parse_args(list(map(str, common(setup, tmp_path / "x"))))
    model, net, params = build(args, torch.device("cpu"))
    items = read_index(d / "data")
    before = held_out_loss(args, model, net.eval(), items)
    trained = load_controlnet(ckpt, base=model.config)                  # the loader takes it as a 1.1 file
    assert held_out_loss(args, model, trained, items) < 0.9 * before
    # one step in memory: only the ControlNet gets gradients; the UNet, VAE and text stay bitwise the same
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    net.train().requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    batch = [load_item(items[i], 64, i + 1) for i in range(4)]
    micro_batch_loss(args, model, net, batch, torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())


def test_unlocked_trains_output_blocks_and_out_only(setup, tmp_path):
    from train import build, parser
    d, _ = setup
    args = parser().parse_args(list(map(str, common(setup, tmp_path / "x", extra=["--sd-unlocked"]))))
    model, net, params = build(args, torch.device("cpu"))
    net.requires_grad_(True)
    for p in params:
        p.requires_grad_(True)
    items = read_index(d / "data")
    loss = micro_batch_loss(args, model, net, [load_item(items[i], 64, i + 1) for i in range(2)],
                            torch.Generator().manual_seed(0))
    loss.backward()
    got = {n.split(".")[1] for n, p in model.named_parameters() if p.grad is not None}
    assert got == {"output_blocks", "out"}


@pytest.mark.slow
def test_unlocked_run_exports_a_full_file_with_its_trained_decoder(setup, tmp_path):
    # the trained output_blocks/out must reach the exported file: a ControlNet 1.0 full file (SD + control_model.*)
    _, base = setup
    out = tmp_path / "run"
    train(*common(setup, out, steps=3, extra=["--sd-unlocked", "--save-every", 3]))
    ckpt = out / "step0000003.safetensors"
    sd, before = read(ckpt)[0], read(base)[0]
    assert kind(sd) == "controlnet-1.0"
    changed = {k.split(".")[2] for k in before if not torch.equal(sd[k], before[k])}
    assert changed == {"output_blocks", "out"}
    model = load_base(ckpt)                                            # usable as --base and as --controlnet
    load_controlnet(ckpt, base=model.config)
    assert torch.equal(model.unet.out[2].weight, sd[UNET + "out.2.weight"].float())


def test_start_from_sd_follows_tool_add_control_rule():
    # names: control_model.X is copied from model.diffusion_model.X whenever that key exists in the UNet manifest
    for family in ("sd15", "sd21"):
        unet_keys = {k[len(UNET):] for k in manifest(f"{family}_unet")}
        control = {k[len(CONTROL):]: v for k, v in manifest(f"{family}_controlnet").items()}
        copied = {k for k in control if k in unet_keys}
        assert len(copied) == 298 and len(control) - len(copied) == 42
        assert all(k.split(".")[0] in ("time_embed", "input_blocks", "middle_block") for k in copied)
        assert all(k.split(".")[0] in ("input_hint_block", "zero_convs", "middle_block_out")
                   for k in set(control) - copied)
    # values: on a tiny model, every copied key equals its UNet twin and every new key is the fresh init
    from helpers import randomize
    from minicontrol.unet import UNet
    unet = randomize(UNet(preset("tiny").unet))
    net, usd = clone_encoder(unet), unet.state_dict()
    for k, v in net.state_dict().items():
        if k in usd:
            assert torch.equal(v, usd[k]), k
        else:
            assert k.split(".")[0] in ("input_hint_block", "zero_convs", "middle_block_out"), k


def weights(path):
    sd, _ = read(path)
    return sd


# python -c KILLED_AFTER_LOGGING STEP train.py ARGS: train.py, SIGKILLed right after it logs the loss of STEP
KILLED_AFTER_LOGGING = """
import os, runpy, signal, sys
import minicontrol.runs as runs
step_to_kill = int(sys.argv[1])
sys.argv = sys.argv[2:]
log_loss = runs.log_loss
def log_then_die(out, step, loss):
    log_loss(out, step, loss)
    if step == step_to_kill:
        os.kill(os.getpid(), signal.SIGKILL)
runs.log_loss = log_then_die                     # train.py takes its log_loss from minicontrol.runs on import
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_and_resume_equals_uninterrupted(setup, tmp_path):
    full = tmp_path / "full"
    train(*common(setup, full, steps=8, extra=["--save-every", 2]))
    # train.py in a process that SIGKILLs itself as soon as step 5's loss is logged: after the checkpoint of step 4,
    # before that of step 6, at the same point on every run
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_LOGGING, "5", str(ROOT / "train.py"),
                             *map(str, common(setup, cut, steps=8, extra=["--save-every", 2]))],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert torch.load(cut / "state.pt", weights_only=True)["step"] == 4
    assert not (cut / "step0000006.safetensors").exists() and not (cut / "step0000008.safetensors").exists()
    assert [row.split(",")[0] for row in (cut / "loss.csv").read_text().splitlines()[1:]] == list("12345")
    train(*common(setup, cut, steps=8, extra=["--save-every", 2, "--resume"]))
    a, b = weights(full / "step0000008.safetensors"), weights(cut / "step0000008.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [int(row.split(",")[0]) for row in (cut / "loss.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, 9))                      # steps after the last checkpoint logged once, not twice
    # the same command without --resume must not start over on top of the finished run
    state = (full / "state.pt").read_bytes()
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, common(setup, full, steps=8))],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--resume" in res.stderr.strip().splitlines()[-1] and (full / "state.pt").read_bytes() == state
    # nor resume it as another stage
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, common(setup, full, steps=9)), "--stage",
                          "base", "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--stage" in res.stderr.strip().splitlines()[-1] and (full / "state.pt").read_bytes() == state


@pytest.mark.slow
def test_torchrun_two_processes_and_gradient_accumulation_match_one(setup, tmp_path):
    """A step's batch of 4 as one process, as two processes of 2 (torchrun), and as two micro-batches of 2
    (--grad-accum 2): the same items, random numbers and loss, so the same training."""
    one, two, accum = tmp_path / "one", tmp_path / "two", tmp_path / "accum"
    train(*common(setup, one, steps=3, batch=4, extra=["--save-every", 3]))
    train(*common(setup, accum, steps=3, batch=2, extra=["--save-every", 3, "--grad-accum", 2]))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(ROOT / "train.py"), *map(str, common(setup, two, steps=3, batch=2, extra=["--save-every", 3]))]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    la = [float(line.split(",")[1]) for line in open(one / "loss.csv").read().splitlines()[1:]]
    a = weights(one / "step0000003.safetensors")
    for other in (two, accum):
        lb = [float(line.split(",")[1]) for line in open(other / "loss.csv").read().splitlines()[1:]]
        assert len(la) == len(lb) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb)), (other, la, lb)
        b = weights(other / "step0000003.safetensors")
        assert a.keys() == b.keys()
        diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
        # gradients agree to float rounding, but Adam's update lr * m / (sqrt(v) + eps) turns rounding noise on
        # near-zero gradients into steps of up to lr: so nearly all weights agree to 1e-5, none by more than lr * steps
        assert (diff <= 1e-5).float().mean() >= 0.999 and diff.max() <= 1e-3 * 3


@pytest.mark.slow
def test_torchrun_only_mid_control_with_accumulation_syncs_once_a_step(setup, tmp_path):
    """--only-mid-control under torchrun: the skips' zero convs get no gradient, which DDP refuses unless they do not
    require one. --grad-accum 2: DDP all-reduces the gradients once a step (at the last micro-batch), counted by a
    communication hook, not once per micro-batch. The training equals one process taking the whole batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    extra = ["--save-every", 3, "--only-mid-control"]
    train(*common(setup, one, steps=3, batch=4, extra=extra))
    env = dict(os.environ, OMP_NUM_THREADS="1", DDP_PROBE_OUT=str(tmp_path / "syncs"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537",
           str(ROOT / "tests" / "ddp_probe.py"), str(ROOT / "train.py"),
           *map(str, common(setup, two, steps=3, batch=1, extra=[*extra, "--grad-accum", 2]))]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [(tmp_path / f"syncs.{rank}").read_text() for rank in (0, 1)] == ["3", "3"]     # 3 steps, 3 all-reduces
    a, b = weights(one / "step0000003.safetensors"), weights(two / "step0000003.safetensors")
    assert all(not v.any() for k, v in b.items() if ".zero_convs." in k)
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert (diff <= 1e-5).float().mean() >= 0.999 and diff.max() <= 1e-3 * 3          # as in the test above


@pytest.mark.slow
def test_nodes_resuming_from_different_steps_are_refused(setup, tmp_path):
    """Two torchrun nodes whose --out are not one shared disk: the first holds the run's state.pt (rank 0 wrote it),
    the second none. Both stop with the reason before training, rather than train from different steps and hang."""
    first, second = tmp_path / "first", tmp_path / "second"
    train(*common(setup, first, steps=2, batch=2, extra=["--save-every", 2]))
    state = (first / "state.pt").read_bytes()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", "29541",
                               str(ROOT / "train.py"), *map(str, common(setup, out, steps=4, batch=1)), "--resume"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
             for rank, out in enumerate((first, second))]
    try:
        results = [node.communicate(timeout=300) + (node.returncode,) for node in nodes]
    finally:                                        # nodes that hang are stopped with their workers
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
    for stdout, stderr, code in results:
        assert code != 0 and "resume at steps 0 to 2" in stderr, stderr[-2000:]
        assert "must be on a disk every node reads" in stderr
    assert (first / "state.pt").read_bytes() == state and not (second / "state.pt").exists()
    assert not (first / "step0000004.safetensors").exists()
    second.mkdir()
    (second / "state.pt").write_bytes(state[:len(state) // 2])          # a copy to the other node, cut short
    res = train_here(*common(setup, second, steps=4, batch=1), "--resume")
    assert res.returncode != 0 and "state.pt: cannot be read" in res.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_half_precision_trains_as_fp32_does(setup, tmp_path):
    """--precision bf16 / fp16 (with loss scaling) autocast the UNet and ControlNet: the loss is fp32's to half
    precision's rounding, the second step moves the weights the way fp32's does (but not bitwise so), and an fp16
    run resumed from its state (loss scale included) ends as the uninterrupted one."""
    runs = {}
    for precision in ("fp32", "bf16", "fp16"):
        out = tmp_path / precision
        res = train_here(*common(setup, out, steps=2, extra=["--save-every", 1, "--precision", precision]))
        assert res.returncode == 0, res.stderr
        loss = float(open(out / "loss.csv").read().splitlines()[1].split(",")[1])
        w1, w2 = weights(out / "step0000001.safetensors"), weights(out / "step0000002.safetensors")
        runs[precision] = loss, torch.cat([(w2[k] - w1[k]).flatten() for k in sorted(w1)])
    loss, update = runs["fp32"]
    for precision in ("bf16", "fp16"):
        half_loss, half_update = runs[precision]
        assert abs(half_loss - loss) <= 2e-2 * loss and not torch.equal(half_update, update)   # really half
        assert F.cosine_similarity(half_update, update, dim=0) >= 0.9
    cut = tmp_path / "cut"
    fp16 = ["--save-every", 1, "--precision", "fp16"]
    assert train_here(*common(setup, cut, steps=1, extra=fp16)).returncode == 0
    assert train_here(*common(setup, cut, steps=2, extra=[*fp16, "--resume"])).returncode == 0
    a, b = weights(tmp_path / "fp16" / "step0000002.safetensors"), weights(cut / "step0000002.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_only_mid_control_and_grad_checkpointing_flags(setup, tmp_path, monkeypatch):
    """--only-mid-control: the UNet takes the middle residual alone, so the input blocks' zero convs get no gradient
    and stay zero while middle_block_out learns. --grad-checkpointing: blocks are recomputed, and the training is the
    same as without it."""
    import minicontrol.unet
    runs, calls, real = {}, [], minicontrol.unet.checkpoint
    monkeypatch.setattr(minicontrol.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    for name, extra in (("plain", []), ("mid", ["--only-mid-control"]), ("recompute", ["--grad-checkpointing"])):
        assert train_here(*common(setup, tmp_path / name, steps=3, extra=["--save-every", 3, *extra])).returncode == 0
        runs[name] = weights(tmp_path / name / "step0000003.safetensors")
        assert bool(calls) == (name == "recompute")
    zero = lambda sd: {k for k in sd if ".zero_convs." in k and not sd[k].any()}
    every = {k for k in runs["mid"] if ".zero_convs." in k}                       # weights and biases
    assert every and zero(runs["mid"]) == every and not zero(runs["plain"])
    assert runs["mid"][CONTROL + "middle_block_out.0.weight"].any()
    assert all(torch.allclose(runs["recompute"][k], runs["plain"][k], rtol=1e-5, atol=1e-7) for k in runs["plain"])


@pytest.mark.slow
def test_cached_latents_give_the_same_loss(setup, tmp_path):
    """--cache-latents encodes the data once: the first step's loss equals the one from encoding at the step."""
    losses = []
    for name, extra in (("fresh", []), ("cached", ["--cache-latents"])):
        train(*common(setup, tmp_path / name, steps=1, batch=8, extra=["--save-every", 1, *extra]))
        losses.append(float(open(tmp_path / name / "loss.csv").read().splitlines()[1].split(",")[1]))
    assert abs(losses[0] - losses[1]) <= 1e-6 * max(1.0, abs(losses[0]))


@pytest.mark.slow
def test_checkpoint_runs_in_sample_py(setup, tmp_path):
    d, base = setup
    out = tmp_path / "run"
    train(*common(setup, out, steps=2, extra=["--save-every", 2]))
    args = ["--base", base, "--controlnet", out / "step0000002.safetensors", "--control-image",
            d / "data" / "source" / "0.png", "--prompt", "red circle with blue background", "--steps", 2,
            "--resolution", 64, "--out", tmp_path / "samples"]
    res = subprocess.run([sys.executable, str(ROOT / "sample.py"), *map(str, args)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "samples" / "grid.png").exists()


def test_prompt_that_is_not_text_is_named_before_training(setup, tmp_path):
    # a number or null as the prompt would reach the tokenizer mid-training; it is refused with the line's number
    import shutil
    d, _ = setup
    data = tmp_path / "data"
    shutil.copytree(d / "data", data)
    lines = (data / "prompt.json").read_text().splitlines()
    for bad in (5, None):
        item = json.loads(lines[2])
        item["prompt"] = bad
        (data / "prompt.json").write_text("\n".join(lines[:2] + [json.dumps(item)] + lines[3:]))
        with pytest.raises(DataError, match="line 3.*prompt is"):
            read_index(data)


@pytest.mark.slow
def test_bad_data_line_is_named(setup, tmp_path):
    d, base = setup
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompt.json").write_text('{"source": "source/0.png", "target": "target/0.png", "prompt": "x"}\n')
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "--base", base, "--data", data, "--out",
                          tmp_path / "o"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode != 0 and "line 1" in res.stderr and "source/0.png" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_unreadable_image_met_while_training_is_named(setup, tmp_path):
    # images are read a step ahead on another thread: one that cannot be decoded still stops the run, with one line
    # that names it
    import shutil
    d, base = setup
    data = tmp_path / "data"
    shutil.copytree(d / "data", data)
    line = 6                                         # not the first: that one is read before training starts
    item = json.loads((data / "prompt.json").read_text().splitlines()[line - 1])
    (data / item["target"]).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    args = common(setup, tmp_path / "o", steps=4, batch=4)          # 4 steps of 4: every one of the 16 items
    args[args.index("--data") + 1] = data
    res = train_here(*args)
    error = res.stderr.splitlines()[-1]             # a line of its own, after the progress bar's
    assert res.returncode != 0 and error.startswith("error: prompt.json") and f"line {line}" in error
    assert item["target"] in error and "Traceback" not in res.stderr


@pytest.mark.parametrize("flag, value", [("--latent-noise", "0.3"), ("--batch-size", "0"), ("--resolution", "0"),
                                         ("--lr", "0"), ("--drop-prompt", "1.5"), ("--out", "x/o"),
                                         ("--precision", "fp16"), ("--lr", "nan"), ("--drop-prompt", "nan"),
                                         ("--latent-noise", "inf"), ("--sample-steps", "1001"), ("--seed", "-1"),
                                         ("--seed", str(2 ** 32))])
def test_flag_mistakes_are_refused_in_one_line(setup, tmp_path, flag, value):
    # --latent-noise outside the decoder stage; counts below 1 (a division by zero; 0 taken as "the data's size"); an
    # --out inside a file (x); --precision for the VAE stages, which train in fp32 (the flag was passed over); nan or inf
    d, base = setup
    (tmp_path / "x").write_text("")
    args = ["--stage", "vae", "--config", "tiny"] if flag == "--precision" else ["--base", base]
    res = train_here(*args, "--data", d / "data", "--out", tmp_path / "o", flag, str(tmp_path / value)
                     if flag == "--out" else value)
    assert res.returncode != 0 and flag in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr and not (tmp_path / "o").exists()


def test_data_smaller_than_one_batch_is_refused(setup, tmp_path):
    # 16 items, a batch of 17: every step would be short of its batch (and each process's share uneven)
    res = train_here(*common(setup, tmp_path / "o", steps=1, batch=17))
    assert res.returncode != 0 and "fewer than one batch of 17" in res.stderr.strip().splitlines()[-1]


def test_image_size_the_model_cannot_take_is_refused(setup, tmp_path):
    # the tiny model halves 3 times in the VAE and twice in the UNet: sides must be multiples of 2 ** 5 = 32
    d, _ = setup
    res = train_here("--stage", "vae", "--config", "tiny", "--data", d / "data", "--out", tmp_path / "o",
                     "--resolution", "100")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "--resolution 96" in res.stderr.strip().splitlines()[-1]


def test_controlnet_for_another_base_is_refused_in_one_line(setup, tmp_path):
    from helpers import tiny_models
    from minicontrol.export import controlnet_state_dict
    d, base = setup
    torch.save(controlnet_state_dict(tiny_models("tiny-sd2")[2]), tmp_path / "control_sd2.pth")
    res = train_here(*common(setup, tmp_path / "o"), "--controlnet", tmp_path / "control_sd2.pth")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "control_sd2.pth" in line and "base" in line


@pytest.mark.parametrize("w, h, res", [(96, 64, 64), (50, 75, 32), (64, 64, 48), (33, 71, 40)])
def test_images_are_resized_and_centre_cropped_as_torchvision_does(tmp_path, w, h, res):
    # The oracle: diffusers' train_controlnet.py transform, Resize(resolution) then CenterCrop(resolution), here with
    # bicubic resampling; the short side is resized and the middle square kept, never squashed.
    from torchvision import transforms
    rng = np.random.default_rng(w * h)
    paths = [tmp_path / "hint.png", tmp_path / "target.png"]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
    ref = transforms.Compose([transforms.Resize(res, transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(res)])
    hint, target, _ = load_item((*paths, "p"), res, 1)
    for ours, p in [(hint * 255, paths[0]), ((target + 1) * 127.5, paths[1])]:
        expect = torch.from_numpy(np.asarray(ref(Image.open(p).convert("RGB"))).copy()).permute(2, 0, 1).float()
        assert ours.shape == (3, res, res) and (ours.round() - expect).abs().max() == 0
    Image.fromarray(np.zeros((h + 1, w, 3), np.uint8)).save(paths[1])
    with pytest.raises(DataError, match="same size"):
        load_item((*paths, "p"), res, 1)


def test_v_model_learns_v_as_diffusers_defines_it(tmp_path, monkeypatch):
    """An SD 2.x file alone does not say eps or v: trained on eps, with a warning. With the official
    v2-inference-v.yaml beside it under its name, the target is v = sqrt(a) eps - sqrt(1 - a) z0 on x_t, diffusers'
    DDPMScheduler.get_velocity on its add_noise, without a warning."""
    from diffusers import DDPMScheduler
    from minicontrol import config
    from test_loading import V_YAML
    from train import build, parser
    from helpers import randomize, tiny_models
    cfg, model, _ = tiny_models("tiny-sd2")
    monkeypatch.setitem(config.PRESETS, "sd21", cfg)                    # the preset taken for an SD2 file, made tiny
    base = tmp_path / "v2-1_768-ema-pruned.ckpt"
    torch.save({"state_dict": full_state_dict(model)}, base)
    make_dataset(tmp_path / "data", 4, seed=3)
    items = read_index(tmp_path / "data")
    batch = [load_item(items[i], 64, i + 1) for i in range(4)]
    argv = ["--base", base, "--data", tmp_path / "data", "--batch-size", 4, "--sample-every", 0, "--drop-prompt", 1]
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    for yaml, want in ((None, "eps"), (V_YAML, "v")):
        if yaml:
            base.with_suffix(".yaml").write_text(yaml)
        res = train_here(*argv, "--out", tmp_path / want, "--steps", 1)
        assert res.returncode == 0 and ("warning: " in res.stderr) == (want == "eps"), res.stderr
        args = parser().parse_args([str(a) for a in argv + ["--out", tmp_path / "x"]])
        model, net, _ = build(args, torch.device("cpu"))
        assert model.config.parameterization == want
        randomize(net, 1)                                               # residuals that are not zero
        with torch.no_grad():
            loss = micro_batch_loss(args, model, net, batch, torch.Generator().manual_seed(7))
            g = torch.Generator().manual_seed(7)                        # its draws: dropout, posterior, t, noise
            torch.rand(4, generator=g)
            posterior = torch.randn(4, 4, 8, 8, generator=g)
            t, noise = torch.randint(0, 1000, (4,), generator=g), torch.randn(4, 4, 8, 8, generator=g)
            hint, target = (torch.stack([item[i] for item in batch]) for i in (0, 1))
            mean, logvar = model.vae.moments(target)
            z0 = (mean + (0.5 * logvar).exp() * posterior) * cfg.vae.scale_factor
            x_t, context = sched.add_noise(z0, noise, t), model.text.encode([""] * 4)
            out = model.unet(x_t, t, context, net(x_t, hint, t, context))
        expected = F.mse_loss(out, sched.get_velocity(z0, noise, t) if want == "v" else noise)
        assert abs(loss.item() - expected.item()) <= 1e-4 * expected.item()


def test_controlnet_flag_fine_tunes_the_given_file(setup, tmp_path):
    """--controlnet FILE trains that ControlNet (a 1.1 file, a 1.0 full file's control_model.*, or a diffusers
    folder), not a fresh copy of the base's encoder: its weights, every one of them trained. A 1.0 file given as --base
    alone gives its own, as the official tutorial_train.py's resume_path (a whole ControlLDM file) does."""
    from train import build, parser
    from helpers import diffusers_models, randomize
    _, base = setup
    model = load_base(base)
    net = randomize(clone_encoder(model.unet), 3)
    start = net.state_dict()
    torch.save({CONTROL + k: v for k, v in start.items()}, tmp_path / "control_1.1.pth")
    torch.save(full_state_dict(model) | {CONTROL + k: v for k, v in start.items()}, tmp_path / "control_1.0.pth")
    diffusers_models(model.config, model, net)[1].save_pretrained(tmp_path / "control_diffusers")
    one_file = common(setup, tmp_path / "x", extra=["--config", "tiny"])     # a 1.0 file as --base alone
    one_file[1] = tmp_path / "control_1.0.pth"
    for argv in [common(setup, tmp_path / "x", extra=["--controlnet", tmp_path / name])
                 for name in ("control_1.1.pth", "control_1.0.pth", "control_diffusers")] + [one_file]:
        _, net, params = build(parser().parse_args([str(a) for a in argv]), torch.device("cpu"))
        trained = net.state_dict()
        assert trained.keys() == start.keys() and all(torch.equal(trained[k], v) for k, v in start.items())
        assert [id(p) for p in params] == [id(p) for p in net.parameters()]         # all of it trains


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_resumed_state_keeps_no_view_of_the_replaced_file(tmp_path):
    """state.pt is read memory-mapped; what load_state puts in the run (weights, optimizer moments) are copies, so the
    file, replaced at the next save, is not held open (a deleted state.pt would keep its disk space until the end)."""
    import gc
    from minicontrol.runs import load_state, save_state
    path = tmp_path / "state.pt"

    def new_run():
        net = torch.nn.Linear(16, 16)
        return {"trained": net, "extra": [], "optimizer": torch.optim.AdamW(net.parameters()),
                "scaler": torch.amp.GradScaler("cpu", enabled=False), "generator": torch.Generator().manual_seed(1)}
    run = new_run()
    run["trained"](torch.randn(4, 16)).square().sum().backward()
    run["optimizer"].step()
    save_state(path, run, 1)
    resumed = new_run()
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    load_state(state, path, resumed, 1e-3)
    del state
    gc.collect()
    assert str(path) not in open("/proc/self/maps").read()
    a, b = run["optimizer"].state_dict()["state"], resumed["optimizer"].state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
