"""Training data in the fill50k layout: the index, one item's images, the order of batches, reading ahead, and the
VAE's moments of every image cached once."""
import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .cli import UsageError
from .preprocess import open_image


class DataError(UsageError):
    """A training set that cannot be used; the message names the file and line."""


def read_index(folder) -> list:
    """(source path, target path, prompt) of every prompt.json line, every file checked up front, so that a bad line
    fails before any training."""
    folder = Path(folder)
    index = folder / "prompt.json"
    if not index.is_file():
        raise DataError(f"{index}: no such file; --data must be a folder with prompt.json (fill50k layout)")
    items = []
    for n, line in enumerate(index.read_text(encoding="utf-8").split("\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            paths = [folder / item["source"], folder / item["target"]]
            prompt = item["prompt"]
            if not isinstance(prompt, str):
                raise TypeError(f"prompt is {type(prompt).__name__}, not text")
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{index} line {n}: expected JSON with source, target and prompt ({e})")
        for path in paths:
            if not path.is_file():
                raise DataError(f"{index} line {n}: {path} does not exist")
        items.append((*paths, prompt))
    if not items:
        raise DataError(f"{index} lists no images")
    return items


def center_square(img: Image.Image, resolution: int) -> Image.Image:
    """The short side resized to `resolution` (bicubic) and the middle square kept, as diffusers' training script
    does (Resize, then CenterCrop)."""
    w, h = img.size
    size = (resolution, int(resolution * h / w)) if w < h else (int(resolution * w / h), resolution)
    left = round((size[0] - resolution) / 2)
    top = round((size[1] - resolution) / 2)
    return img.resize(size, Image.BICUBIC).crop((left, top, left + resolution, top + resolution))


def load_item(item, resolution, line):
    """hint (3, R, R) in [0, 1], target (3, R, R) in [-1, 1], prompt; resolution None keeps the images' own size."""
    imgs = []
    for path in item[:2]:
        try:
            imgs.append(open_image(path).convert("RGB"))
        except Exception as e:
            raise DataError(f"prompt.json line {line}: cannot read {path} ({type(e).__name__}: {str(e)[:80]})")
    hint, target = imgs
    if hint.size != target.size:
        raise DataError(f"prompt.json line {line}: {item[0]} is {hint.size[0]}x{hint.size[1]} but {item[1]} is "
                        f"{target.size[0]}x{target.size[1]}; a control image and its target must be the same size")
    if resolution and hint.size != (resolution, resolution):
        hint = center_square(hint, resolution)
        target = center_square(target, resolution)
    hint = torch.from_numpy(np.asarray(hint).copy()).permute(2, 0, 1).float() / 255.0
    target = torch.from_numpy(np.asarray(target).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return hint, target, item[2]


def collate(batch):
    """Loaded items -> hints (B, 3, R, R), targets (B, 3, R, R), prompts."""
    hints, targets, prompts = zip(*batch)
    return torch.stack(hints), torch.stack(targets), list(prompts)


def batch_indices(n_items, global_batch, step, seed):
    """Items of global step `step`: epochs are seeded permutations, so data order is a function of the step alone."""
    per_epoch = max(1, n_items // global_batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[pos * global_batch:(pos + 1) * global_batch].tolist()


def prefetched(load, keys, ahead=2):
    """load(key) for each key in order, each started `ahead` keys early on a second thread: reading and decoding the
    next batch's images overlaps this step (on a GPU, the CPU mostly waits for the step)."""
    keys = iter(keys)
    with ThreadPoolExecutor(1) as pool:
        queue = deque(pool.submit(load, key) for key in islice(keys, ahead))
        while queue:
            result = queue.popleft().result()
            queue.extend(pool.submit(load, key) for key in islice(keys, 1))
            yield result


@torch.no_grad()
def encode_all(vae, items, resolution, batch=64):
    """The VAE's moments (mean and logvar, stacked on channels) of every training image, kept on the CPU."""
    def targets(first):                              # the targets of items first .. first + batch - 1
        rows = range(first, min(first + batch, len(items)))
        return torch.stack([load_item(items[j], resolution, j + 1)[1] for j in rows])
    batches = prefetched(targets, range(0, len(items), batch))              # the next images read while these encode
    device = next(vae.parameters()).device
    return torch.cat([torch.cat(vae.moments(x.to(device)), dim=1).cpu() for x in batches])


def vae_scale_factor(vae, items, resolution):
    """LDM's scale_factor: 1 / std of the latents (the posterior means), over up to 256 training images."""
    mean, _ = encode_all(vae, items[:256], resolution).chunk(2, dim=1)
    return 1.0 / mean.std().item()
