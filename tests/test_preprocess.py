"""Canny against OpenCV on the same RGB input; HWC3 and the official resize rule against their closed forms."""
import cv2
import numpy as np
import pytest

from minicontrol.editing import inpainting
from minicontrol.preprocess import canny, cubic_resize, detect, gaussian_blur, hwc3, resize_image, shuffle


def images():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:200, :240]
    shapes = np.full((200, 240, 3), 30, np.uint8)
    shapes[(yy - 100) ** 2 + (xx - 120) ** 2 < 60 ** 2] = (200, 30, 90)
    shapes[20:60, 30:200] = (10, 180, 40)
    # photograph-like: smooth random colour fields with fine texture and noise
    field = cv2.resize(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), (320, 240), interpolation=cv2.INTER_CUBIC)
    photo = np.clip(cv2.GaussianBlur(field, (0, 0), 1.2) + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    waves = (np.sin(xx / 5.0) * 90 + np.cos(yy / 4.0) * 90 + 128).clip(0, 255).astype(np.uint8)
    return {"shapes": shapes, "photo": photo, "waves": np.stack([waves, 255 - waves, waves // 2], 2),
            "noise": rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)}


@pytest.mark.parametrize("low,high", [(100, 200), (50, 100), (20, 250)])
@pytest.mark.parametrize("name", ["shapes", "photo", "waves", "noise"])
def test_canny_matches_opencv(name, low, high):
    img = images()[name]
    ours, ref = canny(img, low, high), cv2.Canny(img, low, high)
    assert ours.dtype == np.uint8 and ours.shape == img.shape[:2] and set(np.unique(ours)) <= {0, 255}
    assert (ref > 0).mean() > 0.005                              # the image really has edges at these thresholds
    assert np.array_equal(ours, ref)                              # every pixel, as OpenCV decides it


@pytest.mark.parametrize("name", ["drawing", "photo", "noise"])
def test_scribble_map_is_opencvs_inverse_threshold_of_the_darkest_channel(name):
    # the official scribble demo: 255 where min(R, G, B) < 127, else 0, on all three channels
    drawing = np.full((120, 160, 3), 250, np.uint8)              # anti-aliased strokes: every grey on their edges
    cv2.line(drawing, (10, 20), (150, 100), (20, 20, 200), 5, cv2.LINE_AA)
    cv2.circle(drawing, (60, 60), 30, (0, 0, 0), 3, cv2.LINE_AA)
    img = drawing if name == "drawing" else images()[name]
    darkest = cv2.min(cv2.min(img[:, :, 0], img[:, :, 1]), img[:, :, 2])
    _, ref = cv2.threshold(darkest, 126, 255, cv2.THRESH_BINARY_INV)
    ours = detect(img, "scribble")
    assert ours.dtype == np.uint8 and (ours == ref[:, :, None]).all() and 0 < (ref > 0).mean() < 1


def test_hwc3():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (hwc3(grey) == grey[:, :, None]).all() and hwc3(grey).shape == (3, 4, 3)
    rgba = np.zeros((1, 2, 4), np.uint8)
    rgba[0, 0] = (100, 50, 0, 255)          # opaque pixel keeps its colour
    rgba[0, 1] = (100, 50, 0, 0)            # transparent pixel becomes white
    assert hwc3(rgba).tolist() == [[[100, 50, 0], [255, 255, 255]]]


@pytest.mark.parametrize("h,w,res,out", [(480, 640, 512, (512, 704)), (1000, 700, 512, (704, 512)),
                                          (512, 512, 256, (256, 256)), (300, 333, 512, (512, 576)),
                                          (333, 517, 256, (256, 384)), (512, 760, 512, (512, 768)),
                                          (500, 600, 500, (512, 576)), (37, 53, 64, (64, 64)),
                                          (1000, 1500, 512, (512, 768)), (200, 300, 100, (128, 128))])
@pytest.mark.parametrize("picture", ["noise", "lines", "photo"])
def test_resize_rule(h, w, res, out, picture):
    # annotator/util.py: k = res / min(h, w); each side k * side rounded to the nearest multiple of 64; then
    # cv2.resize with INTER_LANCZOS4 where k > 1, else INTER_AREA (which blends linearly where a side still grows:
    # 500x600 at 500, 512x760 at 512). OpenCV computes in fixed point: its pixels may differ by 1.
    rng = np.random.default_rng(h * w)
    if picture == "noise":
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    elif picture == "lines":                                        # a drawn map: 1-pixel lines
        img = np.zeros((h, w, 3), np.uint8)
        img[::7] = 255
        img[:, ::5, 1] = 255
    else:
        img = cv2.resize(images()["photo"], (w, h), interpolation=cv2.INTER_AREA)
    k = res / min(h, w)
    ref = cv2.resize(img, out[::-1], interpolation=cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA)
    ours = resize_image(img, res)
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_images_read_as_opencv_reads_them(tmp_path):
    # sample.py and train.py must see what the official code's cv2.imread sees: depth maps often come as 16-bit grey
    # PNGs (value >> 8, where PIL's convert("RGB") clips everything above 255 to white), and phone photos as JPEGs
    # stored sideways with an EXIF orientation.
    import sample
    from minicontrol.data import load_item
    from PIL import Image
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "grey16.png"), ramp)
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.stack([ramp, ramp // 3, 65535 - ramp], 2))
    photo = Image.fromarray(np.stack([ramp >> 8, ramp >> 9, np.full_like(ramp, 40)], 2).astype(np.uint8))
    exif = photo.getexif()
    exif[0x0112] = 6                                                    # "rotate 90 degrees clockwise to view"
    photo.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
    assert cv2.imread(str(tmp_path / "sideways.jpg")).shape == (64, 48, 3)
    for name in ["grey16.png", "rgb16.png", "sideways.jpg"]:
        ref = cv2.imread(str(tmp_path / name))[:, :, ::-1].astype(int)
        assert ref.std() > 50                                           # a real ramp, not a flat image
        tol = 2 if name.endswith(".jpg") else 0                         # two JPEG decoders may round differently
        ours = hwc3(sample.read_image(tmp_path / name))
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= tol
        hint, _, _ = load_item((tmp_path / name, tmp_path / name, "p"), None, 1)
        ours = (hint * 255).round().permute(1, 2, 0).numpy()
        assert ours.shape == ref.shape and np.abs(ours - ref).max() <= tol
    cv2.imwrite(str(tmp_path / "float.tiff"), np.zeros((8, 8), np.float32))
    with pytest.raises(SystemExit):
        sample.read_image(tmp_path / "float.tiff")


@pytest.mark.parametrize("h, w, sigma", [(64, 64, 5.0), (80, 128, 0.7), (128, 64, 3.3), (512, 512, 5.0)])
def test_inpainting_inputs_match_the_official_demos_opencv_steps(h, w, sigma):
    # gradio_inpaint.py: mask / 255, GaussianBlur(sigma), INTER_AREA down 8x for the latent mask, and the control is
    # the image / 255 with -255 / 255 where the blurred mask is over 0.5
    rng = np.random.default_rng(h + w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[h // 4:h // 2, w // 3:] = 255
    mask[rng.random((h, w)) < 0.05] = 255
    inputs = inpainting(image, mask, sigma)
    soft, latent, control = inputs.soft, 1 - inputs.kept[0, 0].numpy(), inputs.control
    ref = cv2.GaussianBlur(mask.astype(np.float32) / 255.0, (0, 0), sigma)
    assert np.abs(soft - ref).max() < 1e-6
    assert np.abs(gaussian_blur(ref, 1.5) - cv2.GaussianBlur(ref, (0, 0), 1.5)).max() < 1e-6   # a smooth input too
    assert np.abs(latent - cv2.resize(ref, (w // 8, h // 8), interpolation=cv2.INTER_AREA)).max() < 1e-6
    official = image.astype(np.float32)
    official[ref > 0.5] = -255.0
    clear = np.abs(ref - 0.5) > 1e-5                       # leave out pixels that rounding could put either side
    assert 0.05 < (ref > 0.5).mean() < 0.5 and np.abs(control - official / 255.0)[clear].max() < 1e-6


def official_shuffle(image, h, w, seed, f=256):
    # annotator/shuffle ContentShuffleDetector after gradio_shuffle.py's np.random.seed(seed), on OpenCV
    np.random.seed(seed)
    H, W = image.shape[:2]

    def noise_disk():
        noise = np.random.uniform(0, 1, (h // f + 2, w // f + 2, 1))
        noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        noise = noise - noise.min()
        return (noise / noise.max())[:, :, None]

    flow = np.concatenate([noise_disk() * float(W - 1), noise_disk() * float(H - 1)], axis=2).astype(np.float32)
    return cv2.remap(image, flow, None, cv2.INTER_LINEAR)


@pytest.mark.parametrize("h, w, seed", [(512, 704, 0), (512, 512, 12345), (64, 64, 3), (768, 576, 7)])
def test_shuffle_matches_the_official_detector_on_opencv(h, w, seed):
    image = images()["photo"]
    ours, ref = shuffle(image, h, w, seed).astype(int), official_shuffle(image, h, w, seed).astype(int)
    # equal but where float rounding of the flow tips a pixel over a half (OpenCV's cubic weights are float32)
    assert ours.shape == ref.shape == (h, w, 3) and np.abs(ours - ref).max() <= 1 and (ours == ref).mean() > 0.95
    assert not np.array_equal(ours, shuffle(image, h, w, seed + 1))          # the seed draws the shuffle
    x = np.random.default_rng(seed).uniform(0, 1, (4, 5))
    assert np.abs(cubic_resize(x, h, w) - cv2.resize(x, (w, h), interpolation=cv2.INTER_CUBIC)).max() < 1e-6
