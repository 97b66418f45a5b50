"""Annotator weights in the published lllyasviel/Annotators layout, random, built with controlnet-aux's own
networks (and a small UperNet in transformers' folder layout), for tests that must not download."""
import functools
import warnings
from pathlib import Path

import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import controlnet_aux  # noqa: F401  (its import warns about optional packages)
from controlnet_aux.hed import ControlNetHED_Apache2
from controlnet_aux.lineart import Generator
from controlnet_aux.lineart_anime import UnetGenerator
from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel
from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large
from controlnet_aux.normalbae import NNET
from controlnet_aux.open_pose.face import FaceNet
from controlnet_aux.open_pose.model import bodypose_model, handpose_model
from controlnet_aux.pidi.model import pidinet


def without_first_name(sd: dict) -> dict:
    """OpenPose's published files name each layer without the block that holds it (its loader adds the block)."""
    return {k.split(".", 1)[1]: v for k, v in sd.items()}


def normalbae_args():
    from types import SimpleNamespace
    return SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                           importance_ratio=0.7)


def upernet(folder: Path):
    """A small UperNet-ConvNeXt for ADE20K's 150 classes, saved as openmmlab/upernet-convnext-small is (its main
    branch holds pytorch_model.bin)."""
    from transformers import ConvNextConfig, SegformerImageProcessor, UperNetConfig, UperNetForSemanticSegmentation
    backbone = ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                              out_features=["stage1", "stage2", "stage3", "stage4"])
    config = UperNetConfig(backbone_config=backbone, hidden_size=16, auxiliary_in_channels=32, num_labels=150)
    folder.mkdir()
    config.save_pretrained(folder)
    torch.save(UperNetForSemanticSegmentation(config).state_dict(), folder / "pytorch_model.bin")
    SegformerImageProcessor(size={"height": 512, "width": 512}).save_pretrained(folder)


def make(folder: Path, names=None) -> Path:
    """Write the files named (default: all) into `folder`, each as it is published."""
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    builders = {
        "ControlNetHED.pth": lambda: ControlNetHED_Apache2().state_dict(),
        "table5_pidinet.pth": lambda: {"state_dict": {"module." + k: v for k, v in pidinet().state_dict().items()}},
        "mlsd_large_512_fp32.pth": lambda: MobileV2_MLSD_Large().state_dict(),
        "dpt_hybrid-midas-501f0c75.pt": lambda: DPTDepthModel(path=None, backbone="vitb_rn50_384",
                                                              non_negative=True).state_dict(),
        "scannet.pt": lambda: {"model": NNET(normalbae_args()).state_dict()},
        "body_pose_model.pth": lambda: without_first_name(bodypose_model().state_dict()),
        "hand_pose_model.pth": lambda: without_first_name(handpose_model().state_dict()),
        "facenet.pth": lambda: FaceNet().state_dict(),
        "sk_model.pth": lambda: Generator(3, 1, 3).state_dict(),
        "sk_model2.pth": lambda: Generator(3, 1, 3).state_dict(),
        "netG.pth": lambda: {"module." + k: v for k, v in
                             UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False).state_dict().items()},
    }
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    for name, build in builders.items():
        if (names is None or name in names) and not (folder / name).exists():
            torch.save(build(), folder / name)
    if (names is None or "upernet-convnext-small" in names) and not (folder / "upernet-convnext-small").exists():
        upernet(folder / "upernet-convnext-small")
    return folder
