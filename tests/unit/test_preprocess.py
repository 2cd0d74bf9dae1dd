"""Awkward uploads: each gives a clear domain error or a correct prediction, never a crash."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import ImageTooLargeError, InvalidImageError
from app.runtime.engine import Engine
from app.tta.decode import decode_image
from app.tta.limits import DecodeLimits
from app.tta.preprocess import resized_shape
from app.tta.views import parse_view_spec
from tests.helpers import FLOAT32, classify, image_bytes, preparer

CENTER = parse_view_spec("center")


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge canvas (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


REFUSED: list[tuple[str, bytes, type[Exception], str]] = [
    ("empty", b"", InvalidImageError, "empty"),
    ("text", b"hello, I am not an image", InvalidImageError, "not a recognised image"),
    ("truncated jpeg", image_bytes(200, 150, fmt="JPEG")[:600], InvalidImageError, "(?i)truncated"),
    ("truncated png", image_bytes(200, 150, fmt="PNG")[:500], InvalidImageError, "decode"),
    ("bomb", _png_header_only(60000, 60000), ImageTooLargeError, "pixels"),
    ("1x5000", image_bytes(1, 5000), InvalidImageError, "aspect ratio"),
    ("20000x1", image_bytes(20000, 1), InvalidImageError, "aspect ratio"),
    (
        "svg",
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        InvalidImageError,
        "not a recognised image",
    ),
    (
        "pdf",
        b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        InvalidImageError,
        "not a recognised image",
    ),
]


@pytest.mark.parametrize(("case", "data", "error", "needle"), REFUSED, ids=[c[0] for c in REFUSED])
def test_bad_images_are_refused_clearly(
    tiny_engine: Engine, case: str, data: bytes, error: type[Exception], needle: str
) -> None:
    with pytest.raises(error, match=needle):
        classify(tiny_engine, data, CENTER)


def _accepted() -> list[tuple[str, bytes]]:
    rgb = Image.fromarray(_noise(90, 70), "RGB")
    rgba = Image.fromarray(np.dstack([_noise(90, 70), _noise(90, 70, 1)[..., :1]]), "RGBA")
    sixteen = Image.fromarray((np.arange(90 * 70).reshape(70, 90) * 10).astype(np.uint16))
    return [
        ("cmyk jpeg", _encode(rgb.convert("CMYK"), "JPEG")),
        ("palette png", _encode(rgb.convert("P"), "PNG")),
        ("palette png transparency", _encode(rgb.convert("P"), "PNG", transparency=3)),
        ("16-bit png", _encode(sixteen, "PNG")),
        ("rgba png", _encode(rgba, "PNG")),
        ("grayscale", _encode(rgb.convert("L"), "PNG")),
        ("1x1", image_bytes(1, 1)),
        ("gif", _encode(rgb.convert("P"), "GIF")),
        ("webp", _encode(rgb, "WEBP")),
        ("bmp", _encode(rgb, "BMP")),
        ("tiff", _encode(rgb, "TIFF")),
    ]


@pytest.mark.parametrize(("case", "data"), _accepted(), ids=[c[0] for c in _accepted()])
def test_awkward_but_valid_images_are_classified(
    tiny_engine: Engine, case: str, data: bytes
) -> None:
    pred = classify(tiny_engine, data, parse_view_spec("fixed:5"), top_k=3)
    assert len(pred.views) == 5 and len(pred.top) == 3
    assert abs(float(pred.probs.sum()) - 1.0) < 1e-4


def test_sixteen_bit_is_rescaled_not_clipped() -> None:
    img = Image.fromarray(np.full((10, 10), 32768, dtype=np.uint16))
    rgb, fmt, _ = decode_image(_encode(img, "PNG"), DecodeLimits())
    assert fmt == "PNG" and rgb.mode == "RGB"
    assert abs(int(np.asarray(rgb)[0, 0, 0]) - 128) <= 1


def test_exif_orientation_is_applied() -> None:
    img = Image.fromarray(_noise(80, 40), "RGB")  # landscape pixels ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... that the camera says must be rotated 90 degrees
    rgb, _, _ = decode_image(_encode(img, "JPEG", exif=exif), DecodeLimits())
    assert rgb.size == (40, 80)


def test_animated_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (30, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    rgb, _, _ = decode_image(buf.getvalue(), DecodeLimits())
    r, _g, b = np.asarray(rgb)[5, 5]
    assert r > 200 and b < 50


def test_pixel_limit_is_configurable() -> None:
    with pytest.raises(ImageTooLargeError, match="limit is 1000"):
        decode_image(image_bytes(40, 40), DecodeLimits(max_pixels=1000))


def test_resized_shape_keeps_aspect_like_torchvision() -> None:
    assert resized_shape(500, 375, 256) == (341, 256)
    assert resized_shape(375, 500, 256) == (256, 341)
    assert resized_shape(256, 256, 256) == (256, 256)


def _smooth(width: int, height: int) -> np.ndarray:
    """A photo-like image: smooth gradients, so a reduced-scale decode is close to the full."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 97.0)], axis=-1)
    return (rgb * 255).astype(np.uint8)


@pytest.mark.parametrize(("orientation", "upright"), [(1, (1200, 800)), (6, (800, 1200))])
def test_large_jpeg_decodes_at_reduced_scale_and_keeps_its_size(
    orientation: int, upright: tuple[int, int]
) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(_smooth(1200, 800)), "JPEG", exif=exif)
    full = decode_image(data, DecodeLimits())
    reduced = decode_image(data, DecodeLimits(), draft_min_side=200)
    assert full.image.size == full.original_size == upright
    assert reduced.original_size == upright  # what view boxes are mapped back to
    assert reduced.image.size == (upright[0] // 4, upright[1] // 4)  # 1/4: shorter side 200
    # a small JPEG, or any PNG, is decoded whole
    assert decode_image(data, DecodeLimits(), draft_min_side=500).image.size == upright
    png = _encode(Image.fromarray(_smooth(1200, 800)), "PNG")
    assert decode_image(png, DecodeLimits(), draft_min_side=200).image.size == (1200, 800)


def test_reduced_scale_decode_keeps_view_boxes_and_prediction(tiny_repo) -> None:
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")  # resize size 80: drafts at >= 160
    whole = Engine(model, FLOAT32.with_changes(jpeg_draft=False))
    draft = Engine(model, FLOAT32)  # the default
    data = _encode(Image.fromarray(_smooth(1200, 800)), "JPEG", quality=95)
    spec = parse_view_spec("fixed:5,mfixed:5")
    a, b = classify(whole, data, spec, seed=1), classify(draft, data, spec, seed=1)
    assert preparer(draft).views(data, spec, 1).image.original_size == (1200, 800)
    np.testing.assert_allclose(np.asarray(b.boxes), np.asarray(a.boxes), atol=2.0)
    assert a.top[0].index == b.top[0].index
    assert float((a.probs - b.probs).abs().max()) < 0.05


def test_preprocessing_takes_plain_values_not_a_model_config() -> None:
    import ast
    from dataclasses import dataclass
    from pathlib import Path

    import torch

    import app.tta.preprocess as preprocess

    @dataclass(frozen=True)
    class Plain:  # what preprocessing needs, nothing of app.model_config
        resize_size: int = 40
        interpolation: str = "bilinear"
        mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
        std: tuple[float, float, float] = (0.25, 0.25, 0.25)

    img = Image.fromarray(_noise(90, 60))
    prepared = preprocess.prepare_image(img, Plain(), torch.device("cpu"))
    assert prepared.resized_size == (60, 40) and prepared.hwc.shape == (40, 60, 3)
    tree = ast.parse(Path(preprocess.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m and m.startswith(("app.model_config", "app.runtime"))}


def test_draft_decode_keeps_twice_the_largest_resize_the_policy_asks_for(tiny_repo) -> None:
    from app.repository import ModelRepository
    from app.tta.stages import parse_policy

    model = ModelRepository(tiny_repo).load("tiny", "cpu")  # input 64, resize 80
    prep = preparer(Engine(model, FLOAT32))
    data = _encode(Image.fromarray(_smooth(1200, 800)), "JPEG", quality=95)
    assert prep.draft_side([parse_policy("center")]) == 160
    assert prep.draft_side([parse_policy("center|margin<0.5|full@300")]) == 600
    # shorter side 800 >= 2 x 160: a quarter-scale decode (200); 600 leaves it whole
    image, _ = prep.image(data, prep.draft_side([parse_policy("center")]))
    assert image.decoded_size == (300, 200)
    image, _ = prep.image(data, prep.draft_side([parse_policy("full@300")]))
    assert image.decoded_size == (1200, 800)
    off = preparer(Engine(model, FLOAT32.with_changes(jpeg_draft=False)))
    assert off.draft_side([parse_policy("center")]) == 0


@pytest.mark.parametrize("size", [(1200, 800), (90, 300), (40, 30)])
def test_uint8_views_from_resized_boxes_match_the_whole_image_path(tiny_repo, size) -> None:
    """The served path (resize only the views' boxes, uint8, normalised in the forward)
    gives the older path's inputs: equal where the image is shrunk, within rounding of one
    level where it is enlarged (it is then resized whole, as before)."""
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    data = _encode(Image.fromarray(_smooth(*size)), "PNG")
    spec = parse_view_spec("center,fixed:5,mfixed:5,full@96,mfull@96")
    new = Engine(model, FLOAT32)
    old = Engine(model, FLOAT32.with_changes(uint8_views=False))
    a, b = preparer(new).views(data, spec, 3), preparer(old).views(data, spec, 3)
    for ga, gb in zip(a.groups, b.groups, strict=True):
        assert ga.batch.dtype == torch.uint8 and gb.batch.dtype == torch.float32
        assert ga.batch.is_contiguous(memory_format=torch.channels_last)
        mean = torch.tensor(model.cfg.mean).view(1, 3, 1, 1) * 255
        std = torch.tensor(model.cfg.std).view(1, 3, 1, 1) * 255
        pixels_old = gb.batch * std + mean
        assert float((ga.batch.float() - pixels_old).abs().max()) <= 1.0 + 1e-3
    pa, pb = classify(new, data, spec, seed=3), classify(old, data, spec, seed=3)
    assert pa.top[0].index == pb.top[0].index
    torch.testing.assert_close(pa.probs, pb.probs, atol=2e-3, rtol=0)
    if size == (1200, 800):  # torch resizes the whole image: faster than PIL's box alone
        center = preparer(new).views(data, parse_view_spec("center"), 3)
        (region,) = center.image.scaled.values()
        assert tuple(region.pixels.shape) == (80, 120, 3)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [(500, 375), (90, 300)])  # shrunk, enlarged
def test_served_resize_gives_pils_pixels_within_rounding(interpolation: str, size) -> None:
    """The served uint8 resize (torch's antialiased one; PIL's box for "nearest") gives
    PIL's whole-image resize: over 98 % of the pixels exactly, the rest one level off (on
    an enlarged noise image a few, under 1 in 10,000, two)."""
    from app.tta.preprocess import RESAMPLE, Resizer

    img = Image.fromarray(_noise(*size))
    resizer = Resizer(interpolation, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    target = resized_shape(*size, 256)
    pil = np.asarray(img.resize(target, RESAMPLE[interpolation]), dtype=np.int16)
    box = (8, 16, target[0] - 8, target[1] - 4)
    whole = box if resizer.resizes_boxes(size, target) else (0, 0, *target)
    ours = resizer(resizer.source(img), target, whole).numpy().astype(np.int16)
    x0, y0 = box[0] - whole[0], box[1] - whole[1]
    ours = ours[y0 : y0 + box[3] - box[1], x0 : x0 + box[2] - box[0]]
    diff = np.abs(ours - pil[box[1] : box[3], box[0] : box[2]])
    assert diff.max() <= 2 and (diff > 1).mean() < 1e-4
    assert (diff > 0).mean() < 0.02
    assert resizer.on_pixels == (interpolation != "nearest")


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_served_resize_keeps_pixels_interleaved(interpolation: str) -> None:
    """Decoded HWC pixels come back from the resize still interleaved (channels_last), so a
    view is cut by one plain copy; a batch-of-one tensor whose strides read as planes sends
    torch to its planar kernel, slower, and returns planes. Both give PIL's filter in the
    same integer arithmetic (identical here; within one level allowed for other CPUs'
    kernels)."""
    from app.tta.preprocess import Resizer

    pixels = torch.from_numpy(_noise(500, 376))
    resizer = Resizer(interpolation, (0.5,) * 3, (0.25,) * 3, torch.device("cpu"))
    target = resized_shape(500, 376, 256)
    ours = resizer(pixels, target, (0, 0, *target))
    assert ours.stride() == (3 * target[0], 3, 1)  # [h, w, 3] rows of interleaved pixels
    planar = torch.nn.functional.interpolate(
        pixels.permute(2, 0, 1).contiguous().unsqueeze(0),
        size=(target[1], target[0]), mode=interpolation, antialias=True,
    )  # fmt: skip
    assert int((ours.int() - planar[0].permute(1, 2, 0).int()).abs().max()) <= 1
