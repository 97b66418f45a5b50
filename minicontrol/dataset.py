"""A training set for any condition, made as the paper made its own: each image's control map computed from it.

    python -m minicontrol.dataset --images photos/ --detector hed --annotators ckpts/ --out data/hed

writes the fill50k layout that train.py reads: target/ (each image at --resolution by the official rule), source/ (its
map) and prompt.json (one JSON object per line: source, target, prompt). Captions come from a .txt beside each image,
or from --captions, a JSONL file of {"file": ..., "caption": ...} (or file_name and text, as Hugging Face's
metadata.jsonl). A run stopped and started again with the same flags (kept in dataset.json) skips the images it
has finished.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from . import detectors
from .cli import not_finite
from .preprocess import read_pixels

IMAGES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of training images (not searched below)")
    p.add_argument("--captions", help="JSONL of file and caption per image (default: a .txt beside each image)")
    p.add_argument("--out", required=True, help="folder to write prompt.json, source/ and target/ in")
    p.add_argument("--resolution", type=int, default=512, help="short side of the images written (default 512)")
    p.add_argument("--seed", type=int, default=0, help="the shuffle detector's seed (default 0)")
    p.add_argument("--device", default="cpu", help="where the detector network runs (default cpu)")
    detectors.add_flags(p)
    return p


def read_captions(path) -> dict:
    """file name -> caption, from a JSONL file."""
    captions = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            name = item.get("file", item.get("file_name"))
            captions[Path(name).name] = item.get("caption", item.get("text"))
        except (ValueError, AttributeError, TypeError):
            raise ValueError(f"--captions {path} line {n}: expected JSON with file and caption") from None
    return captions


def caption(image: Path, captions):
    """The image's caption, or None where it has none."""
    if captions is not None:
        return captions.get(image.name)
    txt = image.with_suffix(".txt")
    return txt.read_text(encoding="utf-8").strip() if txt.is_file() else None


def written_whole(path: Path, write):
    """write(a temporary path), then a rename: a stopped run leaves no half-written file to be taken for a finished
    one."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def main(argv=None):
    args = parser().parse_args(argv)
    images_dir = Path(args.images)
    out = Path(args.out)
    if not images_dir.is_dir():
        raise SystemExit(f"error: --images {images_dir}: no such folder")
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGES)
    if not images:
        raise SystemExit(f"error: --images {images_dir}: no {', '.join(IMAGES)} files in it")
    stems = [p.stem for p in images]
    if len(set(stems)) < len(stems):
        twice = sorted({s for s in stems if stems.count(s) > 1})
        raise SystemExit(f"error: --images {images_dir}: {twice[0]} is there in two formats; keep one of them")
    bad = not_finite(args)
    if bad:
        raise SystemExit(f"error: {bad}")
    if not 64 <= args.resolution <= 4096:
        raise SystemExit(f"error: --resolution {args.resolution}: give 64 to 4096")
    if args.detector in (None, "none"):
        raise SystemExit("error: give --detector: the control map to compute from each image (--help lists them)")
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {args.device}: this machine has no CUDA device; use --device cpu")
    made = {"detector": args.detector, "resolution": args.resolution, **detectors.settings(args)}
    record = out / "dataset.json"                    # a set is finished with the settings it was begun with
    if record.is_file() and json.loads(record.read_text(encoding="utf-8")) != made:
        raise SystemExit(f"error: --out {out} was begun with other settings ({record}); give the same flags, or "
                         "another --out")
    try:
        captions = read_captions(args.captions) if args.captions else None
        detectors.check(args)
        net = detectors.load(args.detector, args.annotators, args.device)
    except (ValueError, OSError) as e:               # DetectorError, CheckpointError, a bad captions file
        raise SystemExit(f"error: {e}") from None
    settings = detectors.settings(args)
    for folder in ("source", "target"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(made), encoding="utf-8")

    rows = []
    skipped = 0
    for image in tqdm(images, desc="images", unit="image"):
        text = caption(image, captions)
        if text is None:
            tqdm.write(f"skipped {image}: no caption", file=sys.stderr)
            skipped += 1
            continue
        row = {"source": f"source/{image.stem}.png", "target": f"target/{image.stem}.png", "prompt": text}
        if not (out / row["source"]).is_file():      # the map is written last: a finished image has it
            try:
                pixels = read_pixels(image)
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else ""
                tqdm.write(f"skipped {image}: cannot read it as an image ({type(e).__name__}: {reason})",
                           file=sys.stderr)
                skipped += 1
                continue
            control, img = detectors.detect(pixels, args.resolution, args.detector, net, **settings)
            written_whole(out / row["target"], lambda path: Image.fromarray(img).save(path, format="PNG"))
            written_whole(out / row["source"], lambda path: Image.fromarray(control).save(path, format="PNG"))
        rows.append(row)
    index = "".join(json.dumps(row) + "\n" for row in rows)
    written_whole(out / "prompt.json", lambda path: path.write_text(index, encoding="utf-8"))
    print(f"wrote {len(rows)} items to {out / 'prompt.json'}; {skipped} image(s) skipped")


if __name__ == "__main__":
    main()
