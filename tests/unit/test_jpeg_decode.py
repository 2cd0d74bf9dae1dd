"""JPEGs decoded by libjpeg-turbo (simplejpeg) mean what PIL's decode meant: the same size,
orientation and pixels, the same refusals, and PIL still decodes what simplejpeg cannot."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from app.errors import ImageTooLargeError, InvalidImageError
from app.runtime.engine import Engine
from app.tta.decode import PIL_JPEG, JpegDecoding, decode_image, decode_picture
from app.tta.limits import DecodeLimits
from app.tta.stages import parse_policy
from tests.helpers import FLOAT32, preparer

simplejpeg = pytest.importorskip("simplejpeg")


def _photo(width: int, height: int) -> np.ndarray:
    """Smooth gradients and edges: a reduced-scale decode stays close to the full one."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [x / width, y / height, 0.5 + 0.5 * np.sin((x + 2 * y) / 37.0)], axis=-1
    )  # fmt: skip
    rgb[height // 3 : height // 2, width // 4 : width // 2] = (0.9, 0.1, 0.2)
    return (rgb * 255).astype(np.uint8)


def _jpeg(pixels: np.ndarray, orientation: int = 1, mode: str = "RGB", **kw: object) -> bytes:
    img = Image.fromarray(pixels)
    if mode != "RGB":
        img = img.convert(mode)
    exif = Image.Exif()
    if orientation != 1:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=kw.pop("quality", 92), **kw)
    return buf.getvalue()


def _pil_reference(data: bytes) -> np.ndarray:
    """What PIL gives, decoded whole: upright, RGB."""
    img = Image.open(io.BytesIO(data))
    return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def _diff(a: object, b: object) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_size_and_pixels_match_pil_at_full_scale(orientation: int) -> None:
    data = _jpeg(_photo(90, 60), orientation)
    ours = decode_picture(data, DecodeLimits())
    assert isinstance(ours.picture, np.ndarray)  # libjpeg-turbo's pixels, no PIL copy
    assert ours.picture.dtype == np.uint8 and ours.picture.flags.c_contiguous
    upright = (60, 90) if orientation >= 5 else (90, 60)
    assert ours.original_size == upright and ours.format == "JPEG"
    reference = _pil_reference(data)
    assert ours.picture.shape == reference.shape == (upright[1], upright[0], 3)
    assert _diff(ours.picture, reference) <= 1
    pil = decode_picture(data, DecodeLimits(), jpeg=PIL_JPEG)
    assert isinstance(pil.picture, Image.Image) and pil.original_size == upright
    assert _diff(ours.picture, pil.picture) <= 1


@pytest.mark.parametrize(
    ("case", "kw"),
    [
        ("4:4:4", {"subsampling": 0}),
        ("4:2:2", {"subsampling": 1}),
        ("progressive", {"progressive": True}),
        ("optimized, restart markers", {"optimize": True, "restart_marker_blocks": 4}),
    ],
)
def test_encodings_decode_by_libjpeg_turbo_as_pil_does(case: str, kw: dict) -> None:
    data = _jpeg(_photo(123, 77), **kw)
    ours = decode_picture(data, DecodeLimits()).picture
    assert isinstance(ours, np.ndarray) and ours.shape == (77, 123, 3)
    assert _diff(ours, _pil_reference(data)) <= 1


def test_grayscale_jpeg_comes_as_three_equal_channels() -> None:
    data = _jpeg(_photo(64, 48), mode="L")
    ours = decode_picture(data, DecodeLimits()).picture
    assert isinstance(ours, np.ndarray) and ours.shape == (48, 64, 3)
    assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 1] == ours[..., 2]).all()
    assert _diff(ours, _pil_reference(data)) <= 1


def test_cmyk_jpeg_is_decoded_by_pil() -> None:
    data = _jpeg(_photo(64, 48), mode="CMYK")
    decoded = decode_picture(data, DecodeLimits())
    assert isinstance(decoded.picture, Image.Image) and decoded.picture.mode == "RGB"
    assert decoded.picture.size == decoded.original_size == (64, 48)
    assert _diff(decoded.picture, _pil_reference(data)) == 0


def test_mpo_decodes_its_first_picture() -> None:
    first, second = Image.fromarray(_photo(80, 60)), Image.new("RGB", (80, 60), (0, 0, 255))
    buf = io.BytesIO()
    first.save(buf, format="MPO", save_all=True, append_images=[second], quality=92)
    decoded = decode_picture(buf.getvalue(), DecodeLimits())
    assert decoded.format == "MPO" and decoded.original_size == (80, 60)
    assert _diff(decoded.picture, _pil_reference(buf.getvalue())) <= 1


def test_decode_image_still_gives_a_pil_image() -> None:
    rgb, fmt, size = decode_image(_jpeg(_photo(90, 60), 6), DecodeLimits())
    assert isinstance(rgb, Image.Image) and rgb.mode == "RGB"
    assert fmt == "JPEG" and rgb.size == size == (60, 90)


@pytest.mark.parametrize("orientation", [1, 6, 8])
@pytest.mark.parametrize("min_side", [200, 100, 60])
def test_reduced_scale_matches_pils_draft(orientation: int, min_side: int) -> None:
    """Halves (the served scales) decode at PIL's draft size, with its pixels."""
    data = _jpeg(_photo(1200, 800), orientation)
    ours = decode_picture(data, DecodeLimits(), min_side)
    pil = decode_picture(data, DecodeLimits(), min_side, PIL_JPEG)
    upright = (800, 1200) if orientation != 1 else (1200, 800)
    assert ours.original_size == pil.original_size == upright
    assert isinstance(ours.picture, np.ndarray)
    assert ours.picture.shape[:2] == np.asarray(pil.picture).shape[:2]
    assert min(ours.picture.shape[:2]) >= min_side
    assert _diff(ours.picture, pil.picture) <= 1


def test_eighths_decode_to_the_least_n_over_8_scale_covering_the_side() -> None:
    data = _jpeg(_photo(1200, 800))
    eighths = JpegDecoding(scales="eighths")
    # 300 px: 3/8 (450) covers it where halves must stay at 1/2 (600)
    assert decode_picture(data, DecodeLimits(), 300, eighths).picture.shape == (300, 450, 3)
    assert decode_picture(data, DecodeLimits(), 300).picture.shape == (400, 600, 3)
    # 700 px: 7/8; halves decode whole
    assert decode_picture(data, DecodeLimits(), 700, eighths).picture.shape == (700, 1050, 3)
    assert decode_picture(data, DecodeLimits(), 700).picture.shape == (800, 1200, 3)
    assert decode_picture(data, DecodeLimits(), 800, eighths).picture.shape == (800, 1200, 3)


def test_fast_dct_still_decodes_close_to_pil() -> None:
    data = _jpeg(_photo(160, 120))
    fast = decode_picture(data, DecodeLimits(), jpeg=JpegDecoding(fast=True)).picture
    assert fast.shape == (120, 160, 3)
    off = np.abs(fast.astype(np.int16) - _pil_reference(data).astype(np.int16))
    assert 0 < off.mean() < 2.0  # plain upsampling: colour edges differ, the rest barely


def _claiming(data: bytes, width: int, height: int) -> bytes:
    """The JPEG with its frame header (SOF0) saying another size: no pixels to back it."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def test_limits_refuse_from_the_header_before_decoding() -> None:
    data = _jpeg(_photo(90, 60))
    with pytest.raises(ImageTooLargeError, match="limit is 1000"):
        decode_picture(data, DecodeLimits(max_pixels=1000))
    bomb = _claiming(data, 30000, 30000)  # 900 MP claimed, 2 KB sent
    with pytest.raises(ImageTooLargeError, match="pixels"):
        decode_picture(bomb, DecodeLimits())
    with pytest.raises(InvalidImageError, match="aspect ratio"):
        decode_picture(_jpeg(_photo(400, 20)), DecodeLimits(max_aspect_ratio=16))


def test_a_damaged_jpeg_gets_pils_answer() -> None:
    data = _jpeg(_photo(200, 150))
    with pytest.raises(InvalidImageError, match="(?i)truncated"):
        decode_picture(data[: len(data) // 2], DecodeLimits())
    with pytest.raises(InvalidImageError):
        decode_picture(data[:300], DecodeLimits())


def test_the_preparer_gives_the_same_views_either_way(tiny_repo) -> None:
    from app.repository import ModelRepository

    model = ModelRepository(tiny_repo).load("tiny", "cpu")
    prep = preparer(Engine(model, FLOAT32))
    for size, orientation in (((1200, 800), 6), ((90, 300), 1)):
        data = _jpeg(_photo(*size), orientation)
        side = prep.draft_side([parse_policy("center")])
        turbo, _ = prep.image(data, side)
        pil, _ = prep.image(data, side, PIL_JPEG)
        assert turbo.original_size == pil.original_size
        assert turbo.decoded_size == pil.decoded_size
        a, b = turbo.at(turbo.resized_size), pil.at(pil.resized_size)
        assert a.dtype == torch.uint8 and a.shape == b.shape
        assert float((a.float() - b.float()).abs().max()) <= 1.0
