"""Reading files safely: a truncated or foreign file named in one line, torch's zip format memory-mapped, pickled
code refused and never run, and a training checkpoint's other objects read as inert stand-ins."""
import pickle
from pathlib import Path

import pytest
import torch

from helpers import error, same, write
from minicontrol.export import controlnet_state_dict, full_state_dict
from minicontrol.loading import load_base, load_controlnet


def test_truncated_and_foreign_files(tmp_path, tiny):
    cfg, model, net = tiny
    for suffix in (".pth", ".safetensors"):
        good = write(tmp_path / f"good{suffix}", controlnet_state_dict(net))
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        msg = error(load_controlnet, cut)
        assert cut.name in msg and "truncated" in msg
    text = tmp_path / "notes.ckpt"
    text.write_text("these are not weights")
    assert "notes.ckpt" in error(load_base, text)
    assert "no such file" in error(load_base, tmp_path / "absent.ckpt")
    (tmp_path / "hub").mkdir()
    msg = error(load_base, tmp_path / "hub")                 # a downloaded model folder given for its file
    assert "hub: a folder" in msg and ".safetensors" in msg
    write(tmp_path / "hub" / "v1-5.safetensors", full_state_dict(model))
    assert str(tmp_path / "hub" / "v1-5.safetensors") in error(load_controlnet, tmp_path / "hub")
    other = write(tmp_path / "other.pth", {"linear.weight": torch.zeros(2, 2)})
    assert "other.pth" in error(load_controlnet, other)


class Boom:
    def __reduce__(self):
        import os
        return (os.system, ("touch PWNED_MARKER",))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_zip_files_are_memory_mapped(tmp_path, tiny):
    # torch's zip format is mapped, not read whole: the weights loaded are backed by the file (mapped in this process
    # while they live; the sizes here are too small to show the memory saved, bench/load_memory.py measures it); a
    # file in torch's older format is read whole
    import gc
    cfg, model, _ = tiny
    for zip_format in (True, False):
        path = tmp_path / f"zip_{zip_format}.ckpt"
        torch.save({"state_dict": full_state_dict(model)}, path, _use_new_zipfile_serialization=zip_format)
        loaded = load_base(path, cfg)
        assert same(loaded.unet, model.unet) and (str(path) in open("/proc/self/maps").read()) == zip_format
        del loaded
        gc.collect()
        assert str(path) not in open("/proc/self/maps").read()


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"x": Boom()}}, f)
    msg = error(load_base, path)
    assert "evil.ckpt" in msg and "refused" in msg
    assert not (tmp_path / "PWNED_MARKER").exists()
    torch.save({"state_dict": {"x": Boom()}}, tmp_path / "evil2.pth")   # the zip format, same story
    assert "refused" in error(load_controlnet, tmp_path / "evil2.pth")
    assert not (tmp_path / "PWNED_MARKER").exists()


class TrainerState:                        # what a training framework pickles beside the weights
    def __init__(self):
        self.hparams = {"lr": 1e-5, "monitor": "val/loss"}


class Callback:                            # one whose unpickling runs code: it must never be imported or run
    def __init__(self):
        self.best = 0.1

    def __setstate__(self, state):
        open("PWNED_MARKER", "w").close()


def test_training_checkpoint_extras_are_read_inert_and_the_weights_load(tmp_path, monkeypatch, tiny):
    # A Lightning-style .ckpt: weights under state_dict, beside them pickled objects of other libraries (callbacks,
    # hyper-parameters, numpy scalars) that weights_only refuses. They are read as inert stand-ins: the weights load,
    # and no code of theirs runs (Callback.__setstate__ would leave a marker file).
    import numpy as np
    monkeypatch.chdir(tmp_path)
    cfg, model, _ = tiny
    for zip_format in (True, False):                                # torch's zip format and its older one
        path = tmp_path / f"trained{zip_format}.ckpt"
        extras = {"callbacks": {"checkpoint": Callback()}, "state": TrainerState(), "global_step": np.int64(1200)}
        torch.save({"state_dict": full_state_dict(model), **extras}, path, _use_new_zipfile_serialization=zip_format)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)                    # what plain weights_only says of it
        loaded = load_base(path, cfg)
        assert same(loaded.unet, model.unet) and same(loaded.vae, model.vae) and same(loaded.text, model.text)
        assert not (tmp_path / "PWNED_MARKER").exists()
    Callback().__setstate__({})                                    # what unpickling it would run: the marker works
    assert (tmp_path / "PWNED_MARKER").exists()
