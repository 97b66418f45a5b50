"""Detectors from the annotator library, read from random weights written under their published names, run through
sample.py with the tiny model as the official 1.1 demos run them."""
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import run_main
from minicontrol import detectors
from minicontrol.files import CheckpointError
from minicontrol.loading import load_base

pytest.importorskip("controlnet_aux")
import annotators  # noqa: E402  (needs controlnet_aux)

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
TINY = ["--base", WEIGHTS / "tiny_sd.safetensors", "--controlnet", WEIGHTS / "tiny_controlnet.safetensors"]
NETWORKS = [name for name, d in detectors.DETECTORS.items() if d.files]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return annotators.make(tmp_path_factory.mktemp("annotators"))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """An odd-sized picture with shapes in it (517 x 333, neither side a multiple of 64)."""
    yy, xx = np.mgrid[:333, :517]
    img = np.full((333, 517, 3), 200, np.uint8)
    img[(yy - 160) ** 2 + (xx - 250) ** 2 < 90 ** 2] = (30, 60, 200)
    img[40:120, 350:480] = (220, 40, 40)
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    Image.fromarray(img).save(path)
    return path


def official_size(h: int, w: int, resolution: int) -> tuple:
    """The official demos' resize_image: short side to `resolution`, each side to the nearest multiple of 64."""
    k = resolution / min(h, w)
    return int(np.round(h * k / 64.0)) * 64, int(np.round(w * k / 64.0)) * 64


def sample(folder, photo, out, *extra):
    import sample as script
    return run_main(script.main, *TINY, "--control-image", photo, "--prompt", "red circle", "--annotators", folder,
                    "--resolution", 64, "--steps", 1, "--num-samples", 1, "--out", out, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("name", NETWORKS)
def test_each_detector_makes_a_map_at_the_output_size_the_same_each_run(folder, photo, tmp_path, name):
    # at a small detect resolution, to keep the test quick; the arithmetic of the default is tested below
    maps = []
    for run in range(2):
        res = sample(folder, photo, tmp_path / str(run), "--detector", name, "--detect-resolution", 128)
        assert res.returncode == 0, res.stderr[-2000:]
        maps.append(np.asarray(Image.open(tmp_path / str(run) / "control_0.png")))
        params = Image.open(tmp_path / str(run) / "sample_0.png").text["parameters"]
        assert f"Detector: {name}, Detect resolution: 128" in params
    assert maps[0].dtype == np.uint8 and maps[0].shape == (*official_size(333, 517, 64), 3)
    assert np.array_equal(maps[0], maps[1])


@pytest.mark.parametrize("size,detect,out", [((333, 517), 512, 512), ((517, 333), 300, 768), ((401, 700), 512, 64),
                                             ((333, 517), 352, 512)])
def test_the_network_sees_the_image_at_the_detect_resolution_and_the_map_comes_at_the_output_size(
        folder, size, detect, out, monkeypatch):
    # the official 1.1 demos: detect on resize_image(image, detect), then one linear resize of the map to the output
    # size; every resize on the way (the library's and ours) must go to one of those two sizes
    import cv2
    net = detectors.load("hed", folder)
    seen = []
    first_conv = next(m for m in net.netNetwork.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_pre_hook(lambda module, inputs: seen.append(tuple(inputs[0].shape[2:])))
    resized = []
    resize = cv2.resize

    def recorded(src, dsize, *args, **kwargs):
        resized.append(tuple(dsize)[::-1])
        return resize(src, dsize, *args, **kwargs)
    monkeypatch.setattr(cv2, "resize", recorded)
    image = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    control, img = detectors.detect(image, out, "hed", net, detect_resolution=detect)
    assert seen == [official_size(*size, detect)]
    assert set(resized) == {official_size(*size, detect), official_size(*size, out)} and resized[-1] == img.shape[:2]
    assert control.shape == img.shape == (*official_size(*size, out), 3) and control.dtype == np.uint8


def test_detector_settings_are_parameters_of_the_library_detectors():
    # controlnet-aux's detectors take **kwargs and ignore a name they do not know: each keyword passed must be one of
    # theirs by name
    import argparse
    import inspect
    import controlnet_aux
    p = argparse.ArgumentParser()
    detectors.add_flags(p)
    for name, d in detectors.DETECTORS.items():
        if d.files and name != "seg":
            args = p.parse_args(["--detector", name])
            args.seed = 0
            keys = set(d.fixed) | set(detectors.settings(args)) - {"detect_resolution", "seed", "low", "high"}
            accepted = inspect.signature(getattr(controlnet_aux, d.aux).__call__).parameters
            assert keys <= set(accepted), (name, keys - set(accepted))


def test_normal_midas_gives_the_channels_as_the_1_0_demo(folder):
    # a depth that rises to the right: the official annotator makes (x, y, z) = (sobel dx, 0, 2 pi), normalised, as
    # (n * 127.5 + 127.5) in uint8, and the 1.0 demo hands the model its channels reversed: (z, y, x)
    net = detectors.load("normal_midas", folder)

    class Ramp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.arange(x.shape[3], dtype=torch.float32).expand(x.shape[0], x.shape[2], x.shape[3])
    net.model = Ramp()
    control, _ = detectors.detect(np.zeros((64, 64, 3), np.uint8), 64, "normal_midas", net, detect_resolution=64)
    n = np.sqrt(8.0 ** 2 + (2 * np.pi) ** 2)                          # a 3x3 Sobel of slope 1 is 8
    expected = (np.array([2 * np.pi, 0, 8.0]) / n * 127.5 + 127.5).astype(np.uint8)
    assert np.abs(control[32, 40:56].astype(int) - expected).max() <= 1


def test_missing_extra_file_and_malicious_file_each_stop_before_the_base_is_read(folder, photo, tmp_path,
                                                                                  monkeypatch):
    import sample as script
    monkeypatch.setattr(script, "load_base", lambda *a, **k: pytest.fail("the base was read"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "controlnet_aux" else real_find_spec(name, *a))
    res = sample(folder, photo, tmp_path / "a", "--detector", "hed")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "controlnet_aux" in res.stderr and 'pip install -e ".[detectors]"' in res.stderr
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)

    res = sample(tmp_path, photo, tmp_path / "b", "--detector", "openpose")          # an empty annotators folder
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "body_pose_model.pth" in res.stderr and "huggingface.co/lllyasviel/Annotators" in res.stderr
    res = sample(tmp_path, photo, tmp_path / "b", "--detector", "seg")
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "upernet-convnext-small" in res.stderr and "huggingface.co/openmmlab" in res.stderr
    with pytest.raises(detectors.DetectorError, match="needs its weights: --annotators DIR .*huggingface.co/openmmlab"):
        detectors.check("seg", None)                                              # no folder given at all

    class Boom:
        def __reduce__(self):
            import os
            return (os.system, ("touch PWNED_MARKER",))
    evil = tmp_path / "evil"
    evil.mkdir()
    monkeypatch.chdir(tmp_path)
    with open(evil / "ControlNetHED.pth", "wb") as f:
        pickle.dump({"x": Boom()}, f)
    # torch 2.6 and later refuse it by default too; the message, the same as for a base, tells our reader ran
    res = sample(evil, photo, tmp_path / "c", "--detector", "hed")
    with pytest.raises(CheckpointError) as as_base:
        load_base(evil / "ControlNetHED.pth")
    assert res.returncode == 1 and res.stderr == f"error: {as_base.value}\n" and "refused" in res.stderr
    assert not (tmp_path / "PWNED_MARKER").exists()
    (evil / "ControlNetHED.pth").write_bytes(b"<html>a page saved in place of the file</html>")
    res = sample(evil, photo, tmp_path / "c", "--detector", "hed")
    assert res.returncode == 1 and res.stderr.count("\n") == 1 and "ControlNetHED.pth" in res.stderr
    assert torch.load is not None and torch.load.__module__ == "torch.serialization"    # put back as it was
