"""Control maps from images as the official demos make them: the weight-free detectors of preprocess.py, and the
annotator networks through the ecosystem's libraries (controlnet-aux; transformers' UperNet for seg)."""
import contextlib
import importlib.util
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from . import cli, files
from .preprocess import hwc3, resize_image, shuffle
from .preprocess import detect as weight_free

ANNOTATORS = "https://huggingface.co/lllyasviel/Annotators"
UPERNET = "upernet-convnext-small"                   # https://huggingface.co/openmmlab/upernet-convnext-small


@dataclass
class Detector:
    models: str                                      # the official ControlNets its maps are for
    files: list = field(default_factory=list)        # in the annotators folder, under their published names
    aux: str = ""                                    # the class that runs it: controlnet-aux's, or transformers'
    fixed: dict = field(default_factory=dict)        # what that class is always called with for this detector


DETECTORS = {
    "none": Detector("any: the image already is the map (the default)"),
    "canny": Detector("control_sd15_canny, control_v11p_sd15_canny"),
    "invert": Detector("control_v11p_sd15_lineart, from lineart drawn dark on white"),
    "scribble": Detector("control_sd15_scribble, control_v11p_sd15_scribble, from a drawing, dark on light"),
    "shuffle": Detector("control_v11e_sd15_shuffle (drawn from --seed)"),
    "hed": Detector("control_sd15_hed, control_v11p_sd15_softedge", ["ControlNetHED.pth"], "HEDdetector"),
    "softedge": Detector("control_v11p_sd15_softedge (PiDiNet)", ["table5_pidinet.pth"], "PidiNetDetector"),
    "fake_scribble": Detector("control_sd15_scribble, control_v11p_sd15_scribble, from a photo (HED, thinned)",
                              ["ControlNetHED.pth"], "HEDdetector"),
    "mlsd": Detector("control_sd15_mlsd, control_v11p_sd15_mlsd", ["mlsd_large_512_fp32.pth"], "MLSDdetector"),
    "depth": Detector("control_sd15_depth, control_v11f1p_sd15_depth (MiDaS)", ["dpt_hybrid-midas-501f0c75.pt"],
                      "MidasDetector"),
    "normal": Detector("control_v11p_sd15_normalbae", ["scannet.pt"], "NormalBaeDetector"),
    "normal_midas": Detector("control_sd15_normal (MiDaS)", ["dpt_hybrid-midas-501f0c75.pt"], "MidasDetector",
                             {"depth_and_normal": True, "bg_th": 0.4}),        # the 1.0 demo's background
    "openpose": Detector("control_sd15_openpose, control_v11p_sd15_openpose",
                         ["body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"], "OpenposeDetector"),
    "lineart": Detector("control_v11p_sd15_lineart", ["sk_model.pth", "sk_model2.pth"], "LineartDetector"),
    "lineart_coarse": Detector("control_v11p_sd15_lineart", ["sk_model.pth", "sk_model2.pth"], "LineartDetector",
                               {"coarse": True}),
    "lineart_anime": Detector("control_v11p_sd15s2_lineart_anime", ["netG.pth"], "LineartAnimeDetector"),
    "seg": Detector("control_sd15_seg, control_v11p_sd15_seg (ADE20K colours)",
                    [f"{UPERNET}/config.json", f"{UPERNET}/preprocessor_config.json"], "UperNet"),
}


class DetectorError(cli.UsageError):
    """A detector that cannot run: its library not installed, or its weights missing; the message says what to do."""


def add_flags(parser):
    a = parser.add_argument
    names = "; ".join(f"{name}: {d.models}" for name, d in DETECTORS.items())
    a("--detector", choices=list(DETECTORS), default=None, help=f"turn each image into a control map for: {names}")
    a("--annotators", default=os.environ.get("MINICONTROL_ANNOTATORS"),
      help=f"folder of the network detectors' weights, as {ANNOTATORS} lays them out; for seg, the transformers "
           f"folder {UPERNET} in it (default: $MINICONTROL_ANNOTATORS)")
    a("--detect-resolution", type=int, default=512, help="short side the network detectors run at (default 512)")
    a("--low-threshold", type=float, default=100, help="Canny low threshold (default 100)")
    a("--high-threshold", type=float, default=200, help="Canny high threshold (default 200)")
    a("--safe", action="store_true", help="hed and softedge: the official 'safe' variant (edges in few levels)")
    a("--mlsd-score", type=float, default=0.1, help="M-LSD score threshold (default 0.1)")
    a("--mlsd-distance", type=float, default=0.1, help="M-LSD distance threshold (default 0.1)")
    a("--hands", action="store_true", help="openpose: the hands too")
    a("--face", action="store_true", help="openpose: the face too")


def published(f) -> str:
    """Where an annotators folder's file is published."""
    return "https://huggingface.co/openmmlab/" + UPERNET if f.startswith(UPERNET) else ANNOTATORS


def check(name, folder):
    """A DetectorError unless the detector can run: its libraries installed, its files in the annotators folder."""
    detector = DETECTORS[name or "none"]
    if not detector.files:
        return
    for module in ["controlnet_aux"] + (["transformers"] if name == "seg" else []):
        if importlib.util.find_spec(module) is None:
            raise DetectorError(f"--detector {name} needs {module}, not installed: pip install -e \".[detectors]\"")
    if folder is None:
        raise DetectorError(f"--detector {name} needs its weights: --annotators DIR (or MINICONTROL_ANNOTATORS) "
                            f"with {', '.join(detector.files)}, from {published(detector.files[0])}")
    for f in detector.files:
        if not (Path(folder) / f).exists():
            raise DetectorError(f"--annotators {folder}: {f} not found; it is published at {published(f)}")


def load(name, folder, device="cpu"):
    """The detector's network(s) on `device`, read from `folder`; None for the weight-free ones. Nothing is
    downloaded: a file or library missing is a DetectorError."""
    detector = DETECTORS[name or "none"]
    if not detector.files:
        return None
    check(name, folder)
    with warnings.catch_warnings():                  # its import warns of optional packages it does without
        warnings.simplefilter("ignore")
        import controlnet_aux
    if name == "seg":                                # the network from its config, the weights read as ours are
        from transformers import AutoImageProcessor, UperNetConfig, UperNetForSemanticSegmentation
        path = Path(folder) / UPERNET
        weights = path / "model.safetensors"
        if not weights.is_file():
            weights = path / "pytorch_model.bin"     # what the published folder holds
        config = UperNetConfig.from_pretrained(path, local_files_only=True, use_pretrained_backbone=False)
        net = UperNetForSemanticSegmentation(config)
        net.load_state_dict(files.read(weights)[0])
        return AutoImageProcessor.from_pretrained(path, local_files_only=True), net.to(device).eval()
    # controlnet-aux reads its files with torch.load, which before torch 2.6 runs whatever a pickle names, and has no
    # way to be given weights read otherwise. While it builds a detector, torch.load is files.load_pickle (weights only;
    # a refused file named in one line), which calls torch.serialization.load, left as it is.
    weights_only = mock.patch.object(torch, "load", lambda f, *args, **kwargs: files.load_pickle(f)[0])
    try:                                             # its networks print as they are built
        with weights_only, contextlib.redirect_stdout(io.StringIO()):
            built = getattr(controlnet_aux, detector.aux).from_pretrained(folder, local_files_only=True)
    except files.CheckpointError:
        raise
    except Exception as e:                           # a file of another network, cut short, or not weights at all
        raise DetectorError(f"--annotators {folder}: {', '.join(detector.files)} cannot be read as {detector.aux}'s "
                            f"weights ({files.reason(e)}); download them again from {ANNOTATORS}") from None
    return built.to(device)


def settings(args) -> dict:
    """detect()'s keywords for these flags: what the detector runs at, and what controlnet-aux's is called with."""
    chosen = dict(detect_resolution=args.detect_resolution, seed=args.seed, low=args.low_threshold,
                  high=args.high_threshold)
    if args.detector in ("hed", "softedge"):
        chosen["safe"] = args.safe
    if args.detector == "mlsd":
        chosen.update(thr_v=args.mlsd_score, thr_d=args.mlsd_distance)
    if args.detector == "openpose":
        chosen.update(include_hand=args.hands, include_face=args.face)
    return chosen


def segment(models, image: np.ndarray) -> np.ndarray:
    """ADE20K's class of each pixel (UperNet), drawn in the ADE20K palette the seg ControlNets were trained on."""
    from controlnet_aux.util import ade_palette
    processor, net = models
    with torch.no_grad():
        outputs = net(**processor(images=image, return_tensors="pt").to(net.device))
    labels = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])[0]
    return np.array(ade_palette(), dtype=np.uint8)[labels.cpu().numpy()]


def detect(image: np.ndarray, resolution: int, name="none", net=None, detect_resolution=512, seed=0, low=100,
           high=200, **aux):
    """(map, image resized): an image (H, W, 1 to 4 channels) brought to `resolution` by the official rule, and its
    control map (HxWx3 uint8) at that size. Shuffle shuffles the whole image to that size; a network detector (net
    from load()) runs, as in the ControlNet 1.1 demos, on the image brought to `detect_resolution` by the same rule,
    and its map is resized to the output linearly. aux: controlnet-aux's keywords (settings())."""
    name = name or "none"
    original = hwc3(image)
    img = resize_image(original, resolution)
    if name == "shuffle":
        return shuffle(original, *img.shape[:2], seed), img
    if net is None and DETECTORS[name].files:
        raise ValueError(f"the {name} detector needs its network: net = detectors.load({name!r}, annotators folder)")
    if net is None:
        return weight_free(img, name, low, high), img
    import cv2
    from controlnet_aux.util import nms, resize_image as official_resize
    small = official_resize(original, detect_resolution)
    if name == "seg":
        found = segment(net, small)
    else:
        # controlnet-aux brings the image to detect_resolution, then its map to image_resolution by the same rule:
        # given the short side of the image it detected on, that second resize leaves the map as it is
        found = net(original, output_type="np", detect_resolution=detect_resolution,
                    image_resolution=min(small.shape[:2]), **DETECTORS[name].fixed, **aux)
    if name == "normal_midas":                       # (depth, normal); the normal's channels come reversed, as
        found = found[1]                             # the 1.0 demo hands them to the model
    control = cv2.resize(hwc3(np.ascontiguousarray(found)), img.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    if name == "fake_scribble":
        # the 1.0 fake-scribble demo's strokes: non-maximum suppression at 127, a blur of sigma 3, all over 4 white
        control = np.where(cv2.GaussianBlur(nms(control, 127, 3.0), (0, 0), 3.0) > 4, 255, 0).astype(np.uint8)
    return control, img
