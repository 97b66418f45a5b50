"""Writing: `python -m minicontrol.export` splits a ControlNet 1.0 full file in two, and writes float16 files."""
import torch
from safetensors.torch import load_file

from helpers import run_module, same, tiny_models
from minicontrol.export import full_state_dict, save
from minicontrol.files import read
from minicontrol.identify import kind
from minicontrol.loading import load_base, load_controlnet


def test_split_a_full_file_into_sd_and_control_files(tmp_path):
    # python -m minicontrol.export --part: the two halves of a 1.0 full file load as a base and a 1.1 ControlNet
    cfg, model, net = tiny_models("tiny-sd2")
    full = save(tmp_path / "full.pth", full_state_dict(model, net)) or tmp_path / "full.pth"
    cli = lambda *args: run_module("minicontrol.export", *args)
    for part in ("sd", "control"):
        assert cli(full, tmp_path / f"{part}.safetensors", "--part", part) is None
    sd_part, control_part = read(tmp_path / "sd.safetensors")[0], read(tmp_path / "control.safetensors")[0]
    assert kind(sd_part) == "sd" and kind(control_part) == "controlnet-1.1"
    assert same(load_base(tmp_path / "sd.safetensors", config=cfg).unet, model.unet)
    assert same(load_controlnet(tmp_path / "control.safetensors", base=cfg), net)
    assert cli(tmp_path / "control.safetensors", tmp_path / "x.safetensors", "--part", "sd") == (
        f"error: {tmp_path / 'control.safetensors'}: no sd part; --part sd and control split a ControlNet 1.0 full file")
    inside_a_file = tmp_path / "full.pth" / "x.safetensors"        # refused before the source is read
    for dst, error in ((tmp_path, "give the new file's name"), (tmp_path / "notes.txt", "ending in .safetensors"),
                       (inside_a_file, f"{tmp_path / 'full.pth'} is a file")):
        code = cli(full, dst, "--half")
        assert str(code).startswith("error: ") and error in code


def test_half_writes_every_float_tensor_as_float16(tmp_path):
    # --half: each floating-point tensor is the source's .half(); the integer position_ids (SD1) kept as they are
    cfg, model, net = tiny_models("tiny-sd1")
    source = full_state_dict(model, net)
    full = save(tmp_path / "full.safetensors", source) or tmp_path / "full.safetensors"
    assert run_module("minicontrol.export", full, tmp_path / "half.safetensors", "--half") is None
    written = load_file(tmp_path / "half.safetensors")          # safetensors' own reader
    assert written.keys() == source.keys()
    integer = [k for k, v in source.items() if not v.is_floating_point()]
    assert integer == ["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    for k, v in source.items():
        expected = v.half() if v.is_floating_point() else v
        assert written[k].dtype == expected.dtype and torch.equal(written[k], expected), k
