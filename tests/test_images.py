"""Real images of any size and pixel mode are read faithfully and fitted to the model's size."""

import numpy as np
import pytest
import torch
from PIL import Image

from editing.images import fit_image, load_image, read_rgb
from sdattn.errors import UserError

from .conftest import SHARED


@pytest.mark.parametrize("size", [(20, 40), (500, 375), (500, 333), (64, 64)])
@pytest.mark.parametrize("resize", ["squash", "squash_nearest", "crop"])
def test_every_size_is_accepted_and_reported(size, resize):
    img = Image.new("RGB", size, (200, 30, 30))
    x, fit = fit_image(img, (32, 32), resize)
    assert x.shape == (1, 3, 32, 32)
    assert torch.allclose(x[0, :, 16, 16], torch.tensor([200, 30, 30]) / 255, atol=1 / 255)
    assert fit.resized == (size != (32, 32)) and fit.upsampled == (size[0] < 32 or size[1] < 32)


def test_squash_keeps_the_whole_image_crop_cuts_the_sides():
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :10] = 255  # a white band on the left edge
    img = Image.fromarray(a)
    squash, _ = fit_image(img, (32, 32), "squash")
    crop, _ = fit_image(img, (32, 32), "crop")
    assert squash[0, :, 16, 0].min() > 0.9  # the band survives squashing ...
    assert crop[0].max() < 0.05  # ... and is cut off by the centre crop


def test_the_official_squash_is_pil_resize():
    photo = SHARED / "benchmarks" / "fpe" / "000141.jpg"
    if not photo.exists():
        pytest.skip("shared photo missing")
    ref = np.asarray(Image.open(photo).convert("RGB").resize((48, 40)))  # what the official code does
    ours = load_image(photo, (40, 48), "squash")
    assert torch.equal((ours[0].permute(1, 2, 0) * 255).round().to(torch.uint8), torch.from_numpy(ref.copy()))


def test_squash_nearest_is_the_official_fpe_and_masactrl_load_image():
    photo = SHARED / "benchmarks" / "fpe" / "000141.jpg"
    if not photo.exists():
        pytest.skip("shared photo missing")
    # edit_real.ipynb: read_image → [:3] → float / 127.5 - 1 → F.interpolate(image, (512, 512)) (nearest)
    raw = torch.from_numpy(np.asarray(Image.open(photo).convert("RGB")).copy()).permute(2, 0, 1)
    ref = torch.nn.functional.interpolate(raw[None].float() / 127.5 - 1.0, (40, 48))
    ours = load_image(photo, (40, 48), "squash_nearest") * 2 - 1
    assert ours.shape == ref.shape and torch.allclose(ours, ref, atol=1e-6)
    assert not torch.allclose(ours, load_image(photo, (40, 48), "squash") * 2 - 1, atol=1e-3)


@pytest.mark.parametrize("shape", [(40, 80), (80, 40), (33, 33)])
def test_crop_is_p2p_load_512(shape):
    """P2P's load_512: the centred square (offset (w - h) // 2), then Image.resize((512, 512))."""
    a = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    h, w = shape
    sq = a[:, (w - h) // 2:(w - h) // 2 + h] if h < w else a[(h - w) // 2:(h - w) // 2 + w] if w < h else a
    ref = np.asarray(Image.fromarray(sq).resize((32, 32)))
    ours, _ = fit_image(Image.fromarray(a), (32, 32), "crop")
    assert torch.equal((ours[0].permute(1, 2, 0) * 255).round().to(torch.uint8), torch.from_numpy(ref.copy()))


def _save(tmp_path, name, img, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_sixteen_bit_png_is_not_white(tmp_path):
    ramp = (np.linspace(0, 65535, 64)[None].repeat(8, 0)).astype(np.uint16)  # (8, 64) full 16-bit range
    path = _save(tmp_path, "ramp16.png", Image.fromarray(ramp))
    assert Image.open(path).mode.startswith("I")
    x = np.asarray(read_rgb(path))[..., 0].astype(float)
    assert x[0, 0] == 0 and x[0, -1] == 255 and abs(x[0, 32] - 255 * 32 / 63) < 2  # the ramp, not all white


def test_modes_convert_like_their_colours(tmp_path):
    red = (220, 20, 60)
    base = Image.new("RGB", (16, 16), red)
    paths = {
        "palette": _save(tmp_path, "p.png", base.convert("P", palette=Image.Palette.ADAPTIVE)),
        "cmyk": _save(tmp_path, "c.jpg", base.convert("CMYK"), quality=100),
        "rgba": _save(tmp_path, "a.png", base.convert("RGBA")),
        "gif": _save(tmp_path, "g.gif", base.convert("P", palette=Image.Palette.ADAPTIVE)),
    }
    for name, path in paths.items():
        got = np.asarray(read_rgb(path))[8, 8].astype(int)
        assert np.abs(got - red).max() <= 12, (name, got)
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black → composited on white
    assert np.asarray(read_rgb(_save(tmp_path, "la.png", la))).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, :5] = 255  # white on the left of a landscape image
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    out = np.asarray(read_rgb(path))
    assert out.shape[:2] == (20, 10) and out[:5].mean() > 200 and out[-5:].mean() < 50  # white on top now


def test_unconvertible_modes_are_refused(tmp_path):
    path = _save(tmp_path, "f.tif", Image.fromarray(np.ones((4, 4), np.float32)))
    with pytest.raises(UserError, match="pixel mode 'F'"):
        read_rgb(path)
    with pytest.raises(UserError, match="resize='stretch' is not one of"):
        fit_image(Image.new("RGB", (4, 4)), (4, 4), "stretch")


@pytest.mark.parametrize("make,match", [
    (lambda p: p / "missing.jpg", "does not exist"),
    (lambda p: (p / "bad.jpg").write_text("no image") and p / "bad.jpg", "cannot be read"),
])
def test_bad_images(make, match, tmp_path):
    with pytest.raises(UserError, match=match):
        load_image(make(tmp_path), (32, 32))
