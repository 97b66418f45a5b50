"""Control-image preprocessing as the official demos do it (annotator/util.py), with no OpenCV at run time."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps


def hwc3(img: np.ndarray) -> np.ndarray:
    """uint8 grey, RGB or RGBA -> HxWx3 RGB; RGBA is composited over white."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[:, :, 3:].astype(np.float32) / 255.0
        return (img[:, :, :3] * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return img


def open_image(path) -> Image.Image:
    """An image file as OpenCV's imread sees it: upright by its EXIF orientation (phone photos), 16- or 32-bit
    integer grey (depth maps) cut to 8 bits (value >> 8; PIL's convert clips at 255); floats refused (no range)."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
    if im.mode == "F":
        raise ValueError("32-bit float image; save it as an 8- or 16-bit PNG")
    if im.mode.startswith("I"):
        return Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
    return im


def read_pixels(path) -> np.ndarray:
    """An image file's pixels (open_image): RGB, or RGBA where it may be transparent (hwc3 puts it over white)."""
    im = open_image(path)
    return np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))


def round64(x: float) -> int:
    """The nearest multiple of 64, halves to even: the official demos' rounding of image sides."""
    return int(np.round(x / 64.0)) * 64


def resize_image(img: np.ndarray, resolution: int) -> np.ndarray:
    """An HxWx3 uint8 image's short side to `resolution`, then each side rounded to the nearest multiple of 64, and
    resampled as the demos' cv2.resize: Lanczos-4 where that enlarges, else area (within 1 of OpenCV's fixed point)."""
    h, w = img.shape[:2]
    k = resolution / min(h, w)
    height, width = round64(h * k), round64(w * k)
    if k > 1:
        kind = "lanczos4"
    elif height <= h and width <= w:
        kind = "area"
    else:
        kind = "area_up"                                        # a side rounded up past its own length
    rows = axis_weights(h, height, kind).astype(np.float32)
    columns = axis_weights(w, width, kind).astype(np.float32)
    out = np.einsum("yh,hwc->ywc", rows, img.astype(np.float32), optimize=True)
    out = np.einsum("ywc,xw->yxc", out, columns, optimize=True)
    return out.round().clip(0, 255).astype(np.uint8)


def axis_weights(n_in: int, n_out: int, kind: str) -> np.ndarray:
    """(n_out, n_in) weights that resample one axis as OpenCV's cv2.resize: "area" averages the input pixels each
    output pixel covers, in part or whole (INTER_AREA where no side grows); "lanczos4" weighs 8 taps around each
    output pixel's centre by sinc(d) sinc(d / 4) (INTER_LANCZOS4); "area_up" blends the two nearest as INTER_AREA
    does where a side grows. Taps beyond an edge take the border pixel."""
    grow = n_out / n_in
    scale = 1 / grow                                            # as OpenCV computes it, so that floors agree
    out = np.arange(n_out)[:, None]
    if kind == "area":
        # the overlap of each output pixel's span [out scale, (out + 1) scale) with each input pixel [i, i + 1)
        covered = np.minimum((out + 1) * scale, np.arange(1, n_in + 1)) - np.maximum(out * scale, np.arange(n_in))
        return covered.clip(0, None) / scale
    if kind == "lanczos4":
        centre = (out + 0.5) * scale - 0.5
        taps = np.floor(centre) + np.arange(-3, 5)
        weights = np.sinc(centre - taps) * np.sinc((centre - taps) / 4)
    else:
        taps = np.floor(out * scale) + np.arange(2)             # OpenCV's sx and sx + 1
        right = (out + 1) - (taps[:, :1] + 1) * grow            # its fx: the weight of sx + 1, 0 where not above 0
        right = np.where(right <= 0, 0, right - np.floor(right))
        weights = np.concatenate([1 - right, right], axis=1)
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.broadcast_to(out, taps.shape), taps.clip(0, n_in - 1).astype(int)), weights)
    return matrix / matrix.sum(axis=1, keepdims=True)


def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """Canny edges of an HxWx3 uint8 RGB image as OpenCV's cv2.Canny(image, low, high) computes them: per pixel the
    channel with the largest |dx|+|dy|, L1 magnitude, non-maximum suppression, hysteresis. Returns HxW uint8 0/255."""
    # 3x3 Sobel derivatives with replicated borders, in integers: (H, W, C) each
    p = np.pad(hwc3(np.asarray(image)).astype(np.int32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    dy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    mags = np.abs(dx) + np.abs(dy)
    pick = mags.argmax(axis=2)[:, :, None]                         # first channel wins ties, as OpenCV
    dx, dy, mag = (np.take_along_axis(a, pick, 2)[:, :, 0] for a in (dx, dy, mags))
    low, high = sorted([int(np.floor(low)), int(np.floor(high))])

    # non-maximum suppression in OpenCV's fixed point: tan(22.5 deg) in Q15
    m = np.pad(mag, 1)                                              # zero outside the image; m[1:-1, 1:-1] is mag
    h, w = mag.shape
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22 = x * int(0.4142135623730950488 * (1 << 15) + 0.5)
    tg67 = tg22 + (x << 16)
    horizontal = (mag > m[1:-1, :-2]) & (mag >= m[1:-1, 2:])
    vertical = (mag > m[:-2, 1:-1]) & (mag >= m[2:, 1:-1])
    diag_pos = (mag > m[:-2, :-2]) & (mag > m[2:, 2:])            # dx and dy of one sign
    diag_neg = (mag > m[:-2, 2:]) & (mag > m[2:, :-2])            # of opposite signs
    diagonal = np.where((dx ^ dy) < 0, diag_neg, diag_pos)
    keep = np.where(y < tg22, horizontal, np.where(y > tg67, vertical, diagonal))
    candidate = (mag > low) & keep
    strong = candidate & (mag > high)

    # hysteresis: keep candidates 8-connected to a strong pixel
    cand = np.pad(candidate, 1).ravel()
    edges = np.zeros_like(cand)
    stride = w + 2
    stack = list(np.flatnonzero(np.pad(strong, 1).ravel()))
    edges[stack] = True
    offsets = (-stride - 1, -stride, -stride + 1, -1, 1, stride - 1, stride, stride + 1)
    while stack:
        i = stack.pop()
        for o in offsets:
            j = i + o
            if cand[j] and not edges[j]:
                edges[j] = True
                stack.append(j)
    return edges.reshape(h + 2, w + 2)[1:-1, 1:-1].astype(np.uint8) * 255


def detect(image: np.ndarray, detector: str, low: float = 100, high: float = 200) -> np.ndarray:
    """The control map (HxWx3 uint8) for a detector: canny, invert (white lines on black from dark lineart), none,
    or scribble (the official scribble demos: white where any channel of a drawing is under 127, else black)."""
    image = hwc3(image)
    if detector == "canny":
        return hwc3(canny(image, low, high))
    if detector == "invert":
        return 255 - image
    if detector == "scribble":
        return hwc3(np.where(image.min(axis=2) < 127, 255, 0).astype(np.uint8))
    if detector == "none":
        return image
    raise ValueError(f"unknown detector {detector!r}; choose canny, invert, scribble or none")


def gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's GaussianBlur(x, (0, 0), sigma) of a float (H, W) image: a kernel round(8 sigma + 1) | 1 wide,
    borders mirrored without repeating the edge."""
    r = (int(np.round(sigma * 8 + 1)) | 1) // 2
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    p = np.pad(x.astype(np.float64), r, mode="reflect")
    p = sum(k[i] * p[i:i + x.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * p[:, i:i + x.shape[1]] for i in range(2 * r + 1)).astype(np.float32)


def cubic_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """OpenCV's INTER_CUBIC resize of a float (H, W) array to (h, w), which PyTorch's bicubic is: Keys' cubic
    (a = -0.75), pixel centres aligned, edges repeated."""
    resized = F.interpolate(torch.from_numpy(x)[None, None], (h, w), mode="bicubic", align_corners=False)
    return resized[0, 0].numpy()


def shuffle(image: np.ndarray, h: int, w: int, seed: int, f: int = 256) -> np.ndarray:
    """The ControlNet 1.1 shuffle model's "content shuffle" of an HxWx3 uint8 image into h x w: each output pixel
    reads the image (bilinear) at a smooth random place, from noise on a grid f pixels apart, cubic-interpolated and
    stretched over the image, drawn as np.random.seed(seed) would."""
    rng = np.random.RandomState(seed)
    H, W = image.shape[:2]
    flow = []                                                           # the x, then the y, of the place read
    for scale in (W - 1, H - 1):
        noise = cubic_resize(rng.uniform(0, 1, (h // f + 2, w // f + 2)), h + 2 * f, w + 2 * f)[f:f + h, f:f + w]
        noise = (noise - noise.min()) / (noise - noise.min()).max()
        flow.append((noise * scale).astype(np.float32))
    x, y = np.floor(flow).astype(int)
    fx, fy = (flow - np.floor(flow))[..., None]                         # (h, w, 1) each
    img = np.pad(image.astype(np.float32), ((0, 1), (0, 1), (0, 0)))    # the pixel past the edge has weight 0
    top = img[y, x] * (1 - fx) + img[y, x + 1] * fx
    low = img[y + 1, x] * (1 - fx) + img[y + 1, x + 1] * fx
    return np.rint(top * (1 - fy) + low * fy).clip(0, 255).astype(np.uint8)

