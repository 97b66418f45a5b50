"""Writing: `python -m minicontrol.export` splits a ControlNet 1.0 full file in two and moves a ControlNet to
another base, as the official tool_transfer_control.py does."""
import pytest
import torch

from helpers import run_module, same, tiny_models, write
from minicontrol.export import controlnet_state_dict, full_state_dict, save
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


@pytest.mark.slow
def test_transfer_moves_a_controlnet_to_another_base(tmp_path):
    # The official tool_transfer_control rule on a fresh trainable copy (clone_encoder, the official add-control rule)
    # of base A: moved to base B, it is the fresh copy of B, its hint block and zero convolutions kept; in a 1.0 full
    # file the SD becomes B (VAE and text encoder B's own)
    from helpers import randomize
    from minicontrol.controlnet import clone_encoder
    cfg, a, _ = tiny_models("tiny-sd1", seed=0)
    _, b, _ = tiny_models("tiny-sd1", seed=5)
    net = clone_encoder(a.unet)
    randomize(net.input_hint_block, seed=2)                   # as trained: none of these has a UNet counterpart
    randomize(net.zero_convs, seed=3)
    own = ("input_hint_block", "zero_convs", "middle_block_out")
    expected = clone_encoder(b.unet).state_dict() | {k: v for k, v in net.state_dict().items() if k.startswith(own)}
    files = {name: write(tmp_path / f"{name}.pth", sd) for name, sd in [
        ("a", full_state_dict(a)), ("b", full_state_dict(b)), ("control11", controlnet_state_dict(net)),
        ("control10", full_state_dict(a, net))]}

    cli = lambda *args: run_module("minicontrol.export", *args)
    for name in ("control11", "control10"):
        assert cli(files[name], tmp_path / f"moved-{name}.safetensors", "--transfer", files["a"], files["b"]) is None
        moved = load_controlnet(tmp_path / f"moved-{name}.safetensors", base=cfg).state_dict()
        assert all(torch.allclose(moved[k], v, rtol=0, atol=1e-6) for k, v in expected.items())
    moved_sd = load_base(tmp_path / "moved-control10.safetensors", cfg)
    assert same(moved_sd.vae, b.vae) and same(moved_sd.text, b.text)
    assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(moved_sd.unet.state_dict().values(),
                                                                       b.unet.state_dict().values()))
    code = cli(files["a"], tmp_path / "x.safetensors", "--transfer", files["a"], files["b"])
    assert "--transfer moves a ControlNet" in code and "\n" not in code
