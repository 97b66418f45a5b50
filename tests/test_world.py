"""The tiny world: its dataset, the three-stage recipe shortened, and the shipped weights."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_module
from minicontrol.files import read
from minicontrol.identify import kind
from minicontrol.loading import load_base, load_controlnet
from minicontrol.world import COLORS, HELD_OUT_PAIRS, demo_items, draw, held_out_position, make_dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))             # the tiny world's evaluation: bench/tiny_eval.py
from tiny_eval import eval_items  # noqa: E402


def test_palette_is_large_and_well_separated():
    # at least 16 colours at least 60 apart (out of 441 across the RGB cube); brown and olive, the closest pair
    # at 49, count once
    kept = []
    for rgb in COLORS.values():
        if all(np.linalg.norm(np.subtract(rgb, k)) >= 60 for k in kept):
            kept.append(rgb)
    assert len(kept) >= 16 and len(COLORS) == 18


def test_dataset_is_deterministic_and_holds_out_pairs_and_positions(tmp_path):
    make_dataset(tmp_path / "a", 40, seed=7)
    make_dataset(tmp_path / "b", 40, seed=7)
    assert (tmp_path / "a" / "prompt.json").read_text() == (tmp_path / "b" / "prompt.json").read_text()
    for line in open(tmp_path / "a" / "prompt.json"):
        item = json.loads(line)
        words = item["prompt"].split()
        assert (words[0], words[3]) not in HELD_OUT_PAIRS and not held_out_position(*item["circle"][:2])
        target = np.asarray(Image.open(tmp_path / "a" / item["target"]))
        cx, cy, r = item["circle"]
        assert tuple(target[int(cy), int(cx)]) == COLORS[words[0]]        # the centre has the circle colour
        assert tuple(target[0, 0]) == COLORS[words[3]] or r > 40
        source = np.asarray(Image.open(tmp_path / "a" / item["source"]))
        assert source[int(cy), int(cx)].max() == 0 and source.max() == 255      # an outline, hollow inside


def test_eval_scores_against_closed_forms():
    """A drawn target scores IoU 1 and colour error 0; a circle moved by d scores the lens-area IoU of two discs of
    radius r at distance d; a wrong background colour costs half its mean distance from the named one."""
    from tiny_eval import scores
    item = ("red", "blue", 32.0, 30.0, 14.0)
    target, _ = draw(*item)
    iou, err = scores([target], [item])
    assert iou == 1.0 and err < 1e-6
    r, d = 14.0, 5.0
    lens = 2 * r * r * np.arccos(d / (2 * r)) - d / 2 * np.sqrt(4 * r * r - d * d)
    moved, _ = draw("red", "blue", 32.0 + d, 30.0, r)
    assert abs(scores([moved], [item])[0] - lens / (2 * np.pi * r * r - lens)) < 0.01
    swapped, _ = draw("blue", "red", *item[2:])
    iou, err = scores([swapped], [item])
    assert iou == 0.0 and err < 1e-6            # the right colours in the wrong places: only the IoU falls
    grey, _ = draw("red", "grey", *item[2:])    # grey is nearer blue than red, so the mask stays the disc
    iou, err = scores([grey], [item])
    assert iou == 1.0 and abs(err - np.abs(np.subtract(COLORS["grey"], COLORS["blue"])).mean() / 255 / 2) < 1e-6
    items = eval_items(5, seed=2)               # 5 of each group: new colour pairs outside the corner, then the corner
    assert all(tuple(i[:2]) in HELD_OUT_PAIRS and not held_out_position(*i[2:4]) for i in items[:5])
    assert all(held_out_position(*i[2:4]) for i in items[5:]) and len(items) == 10


def run(*args):
    res = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.slow
def test_recipe_runs_every_stage_from_scratch(tmp_path):
    data = tmp_path / "circles"
    run("-m", "minicontrol.world", "--out", data, "--n", 16)
    common = ["--data", data, "--batch-size", 4, "--steps", 2, "--save-every", 2, "--sample-every", 2,
              "--sample-steps", 2]
    run("train.py", "--stage", "vae", "--config", "tiny", "--out", tmp_path / "vae", "--lr", 5e-4, *common)
    run("train.py", "--stage", "base", "--base", tmp_path / "vae" / "step0000002.safetensors", "--out",
        tmp_path / "base", "--drop-prompt", 0.1, "--cache-latents", *common)
    run("train.py", "--stage", "controlnet", "--base", tmp_path / "base" / "step0000002.safetensors", "--out",
        tmp_path / "cn", "--cache-latents", *common)
    run("train.py", "--stage", "decoder", "--base", tmp_path / "base" / "step0000002.safetensors", "--out",
        tmp_path / "decoder", "--latent-noise", 0.3, "--lr", 1e-3, *common)
    before, after = (load_base(tmp_path / s / "step0000002.safetensors") for s in ("base", "decoder"))
    for part in ("unet", "text", "vae.encoder", "vae.quant_conv"):          # all but the decoder stay as they were
        m, n = before.get_submodule(part), after.get_submodule(part)
        assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), n.state_dict().values())), part
    assert not all(torch.equal(a, b) for a, b in zip(before.vae.decoder.parameters(), after.vae.decoder.parameters()))
    assert after.config == before.config                  # same latent space: the scale factor is kept
    net = load_controlnet(tmp_path / "cn" / "step0000002.safetensors",
                          base=load_base(tmp_path / "base" / "step0000002.safetensors").config)
    assert len(net.zero_convs) == 6                    # tiny: conv_in, 3 res blocks, 2 downsamples
    for stage in ("vae", "base", "cn", "decoder"):
        assert (tmp_path / stage / "samples" / "step0000002.png").exists() and (tmp_path / stage / "loss.png").exists()


def test_dataset_and_eval_mistakes_are_refused_in_one_line(tmp_path):
    # before any item is drawn or model read: a count of none, and outputs inside a file (the modules run here, where
    # any other exception would escape)
    (tmp_path / "x").write_text("")
    for module, args, flag in (("minicontrol.world", ["--out", tmp_path / "d", "--n", 0], "--n"),
                               ("minicontrol.world", ["--out", tmp_path / "x" / "d"], "--out"),
                               ("tiny_eval", ["--grid", tmp_path / "x" / "g.png"], "--grid")):
        code = run_module(module, *args)
        assert str(code).startswith(f"error: {flag}"), code
    assert not (tmp_path / "d").exists()


SHIPPED = [ROOT / "weights" / "tiny_sd.safetensors", ROOT / "weights" / "tiny_controlnet.safetensors"]


@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the tiny weights are not in weights/")
def test_shipped_weights_load_strictly_and_fit_the_budget():
    assert sum(p.stat().st_size for p in SHIPPED) <= 20 * 2 ** 20
    sd, meta = read(SHIPPED[0])
    assert kind(sd) == "sd" and meta is not None
    model = load_base(SHIPPED[0])
    assert kind(read(SHIPPED[1])[0]) == "controlnet-1.1"
    net = load_controlnet(SHIPPED[1], base=model.config)
    assert all(torch.isfinite(p).all() for p in list(model.parameters()) + list(net.parameters()))


@pytest.mark.slow
@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the tiny weights are not in weights/")
def test_eval_table_and_curve_run(tmp_path):
    """The table and grid on the shipped weights, and a curve over two copies of one ControlNet, which must give the
    same row twice (same weights, same seed)."""
    run("bench/tiny_eval.py", "--n", 2, "--steps", 2, "--grid", tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (4 * 64, 5 * 64)       # two of each group; five rows
    for step in (1, 2):
        (tmp_path / f"step{step:07d}.safetensors").write_bytes(SHIPPED[1].read_bytes())
    run("bench/tiny_eval.py", "--curve", tmp_path, "--n", 2, "--steps", 2)
    rows = (tmp_path / "iou.csv").read_text().splitlines()
    assert rows[0] == "step,iou,colour_error" and [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert rows[1].split(",")[1:] == rows[2].split(",")[1:] and (tmp_path / "iou.png").exists()


@pytest.mark.slow
@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the tiny weights are not in weights/")
def test_bare_sample_draws_the_circles_on_their_outlines(tmp_path):
    # what a user sees first: `python sample.py` alone, with the tiny model's settings, puts each held-out colour
    # pair's circle on its outline (IoU against the outlined disc, a closed form)
    from tiny_eval import scores
    from minicontrol.world import GUIDANCE, STRENGTH
    run("sample.py", "--num-samples", 8, "--out", tmp_path)
    images = [np.asarray(Image.open(tmp_path / f"sample_{i}.png")) for i in range(8)]
    params = Image.open(tmp_path / "sample_0.png").text["parameters"]
    assert f"CFG scale: {GUIDANCE}," in params and f"Strength: [{STRENGTH}]" in params
    from sample import parser
    seed = parser().get_default("seed")
    items = demo_items(range(seed, seed + 8))                                 # the outlines drawn
    shown = np.asarray(Image.open(tmp_path / "control_7.png"))
    assert np.array_equal(shown, draw(*items[7])[1]) and len({it[:2] for it in items}) == 8   # 8 different pairs
    assert all(it[:2] in HELD_OUT_PAIRS and not held_out_position(*it[2:4]) for it in items)
    iou, colour_error = scores(images, items)
    assert iou > 0.8 and colour_error < 0.1


@pytest.mark.slow
@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the tiny weights are not in weights/")
def test_bare_sample_takes_the_asked_count_and_rounds_the_resolution(tmp_path):
    # one sample when one is asked for (four is only the default), at 100 rounded to a multiple of 64, as for
    # control images; the same seed gives the first image of the default run (up to rounding: batch sizes differ)
    run("sample.py", "--num-samples", 1, "--resolution", 100, "--steps", 2, "--out", tmp_path / "one")
    run("sample.py", "--resolution", 100, "--steps", 2, "--out", tmp_path / "four")
    assert sorted(p.name for p in (tmp_path / "one").glob("sample_*.png")) == ["sample_0.png"]
    assert len(list((tmp_path / "four").glob("sample_*.png"))) == 4
    one, four = (np.asarray(Image.open(tmp_path / d / "sample_0.png")) for d in ("one", "four"))
    assert one.shape == (128, 128, 3) and np.abs(one.astype(int) - four).max() <= 1


@pytest.mark.skipif(not all(p.exists() for p in SHIPPED), reason="the tiny weights are not in weights/")
def test_img2img_from_a_picture_keeps_its_circle(tmp_path):
    # --denoise starts from the first control image noised part of the way (the official tile demo): at 0.05 the
    # circle stays the picture's own (IoU against its disc, a closed form); from pure noise it does not, because
    # this picture is no outline the tiny ControlNet knows.
    from tiny_eval import scores
    item = eval_items(1, seed=5)[0]
    Image.fromarray(draw(*item)[0]).save(tmp_path / "picture.png")
    common = ["sample.py", "--control-image", tmp_path / "picture.png", "--prompt", f"{item[0]} circle with "
              f"{item[1]} background", "--num-samples", 2]
    import sample                                                   # in this process: quicker than run()
    sample.main([str(a) for a in common[1:] + ["--denoise", 0.05, "--out", tmp_path / "i2i"]])
    sample.main([str(a) for a in common[1:] + ["--out", tmp_path / "t2i"]])
    got = {d: [np.asarray(Image.open(tmp_path / d / f"sample_{i}.png")) for i in range(2)] for d in ("i2i", "t2i")}
    assert scores(got["i2i"], [item] * 2)[0] > 0.9 > scores(got["t2i"], [item] * 2)[0] + 0.2
    assert "Denoise: 0.05" in Image.open(tmp_path / "i2i" / "sample_0.png").text["parameters"]
