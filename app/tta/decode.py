"""Bytes -> an upright RGB picture, once per image: the format and pixel limits checked on
the header before any pixel is decoded, EXIF orientation applied, a large JPEG decoded at a
reduced DCT scale that still covers the largest resize the views ask for. JPEGs go through
libjpeg-turbo (simplejpeg: a numpy array the resizer takes without a copy); PIL decodes the
rest, and any JPEG simplejpeg cannot (CMYK, YCCK, any libjpeg warning)."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

try:  # libjpeg-turbo through simplejpeg; without it PIL decodes JPEGs too
    import simplejpeg
except ImportError:  # pragma: no cover - declared in pyproject.toml
    simplejpeg = None

from app.errors import ImageTooLargeError, InvalidImageError
from app.tta.limits import DecodeLimits

# Formats a browser or camera produces; anything else (SVG, PDF, EPS, ...) is refused.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
Picture = Image.Image | np.ndarray  # an upright RGB decode: PIL's, or [H, W, 3] uint8 pixels


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB. 16-bit and float modes are rescaled, not clipped."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class DecodedImage(NamedTuple):
    image: Image.Image  # upright RGB
    format: str
    original_size: tuple[int, int]  # (width, height) upright, before any reduced-size decode


class DecodedPicture(NamedTuple):
    """As ``DecodedImage``, but a JPEG libjpeg-turbo decoded stays its numpy array (the
    pipeline reads the pixels as they are: no copy into PIL and back)."""

    picture: Picture  # upright RGB
    format: str
    original_size: tuple[int, int]  # (width, height) upright, before any reduced-size decode


JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: the first picture is a plain JPEG stream


@dataclass(frozen=True)
class JpegDecoding:
    """How a JPEG is decoded.

    ``turbo``: by libjpeg-turbo through simplejpeg, straight into a numpy array, with the
    same pixels as PIL's decoder (studies/jpeg_decoders.py: an ImageNet-size photo
    prepared in 2.84 ms of CPU against 3.44, top-1 unchanged). PIL still decodes what it
    refuses: CMYK and YCCK, a damaged stream (any libjpeg warning, so a truncated file gets
    PIL's answer), and every JPEG when simplejpeg is not installed or ``turbo`` is off. The
    header, limits and EXIF orientation are read without PIL (``jpeg_headers``).
    ``scales``: the DCT scales a reduced-size decode may use: "halves" (1/2, 1/4, 1/8, as
    PIL's draft) or "eighths" (any n/8 libjpeg-turbo has). ``fast``: libjpeg's fast DCT
    and plain chroma upsampling (a few percent, different pixels)."""

    turbo: bool = True
    scales: Literal["halves", "eighths"] = "halves"
    fast: bool = False


SERVED_JPEG = JpegDecoding()
PIL_JPEG = JpegDecoding(turbo=False)

_ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {  # EXIF orientation -> upright
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: a.transpose(1, 0, 2)[:, ::-1],
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: a.transpose(1, 0, 2)[::-1],
}  # PIL's ImageOps.exif_transpose: FLIP_LEFT_RIGHT, ROTATE_180, ..., ROTATE_90


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int] | None:
    """The size to ask a JPEG's reduced-scale (DCT) decoder for, so that the shorter side
    stays at least ``min_side``; None when no 1/2, 1/4 or 1/8 scale could apply."""
    if min_side <= 0 or min(width, height) < 2 * min_side:
        return None
    k = min_side / min(width, height)
    return max(1, int(width * k + 0.999)), max(1, int(height * k + 0.999))


def _dct_size(width: int, height: int, min_side: int, scales: str) -> tuple[int, int]:
    """The least (width, height) libjpeg-turbo is to decode a JPEG at, so that the shorter
    side stays at least ``min_side``; (0, 0): full size. "halves" picks PIL's draft scale
    (its pixels, the same size); asking for exactly that size rules out the n/8 between."""
    if scales == "eighths":
        if min_side <= 0 or min(width, height) <= min_side:
            return 0, 0
        k = min_side / min(width, height)
        return max(1, int(width * k + 0.999)), max(1, int(height * k + 0.999))
    draft = _draft_size(width, height, min_side)
    if draft is None:
        return 0, 0
    most = min(width // draft[0], height // draft[1])
    s = next(s for s in (8, 4, 2, 1) if most >= s)
    return (width + s - 1) // s, (height + s - 1) // s


def jpeg_headers(data: bytes) -> tuple[int, str]:
    """(EXIF orientation 1-8, "JPEG" or "MPO") of a JPEG, read from its APP segments
    without PIL (which parses every marker in Python: a tenth of an ImageNet-size photo's
    preparation); orientation 1 when there is none or it cannot be read. An APP2 "MPF"
    segment makes it a multi-picture file, whose first picture is decoded."""
    at, end = 2, len(data)
    orientation, image_format = 1, "JPEG"
    while at + 4 <= end and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in (0xD8, 0x01, 0xFF) or 0xD0 <= marker <= 0xD7:  # no length field
            at += 1 if marker == 0xFF else 2
            continue
        size = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xDA or size < 2:  # the scan starts: no more headers
            break
        if marker == 0xE1 and data[at + 4 : at + 10] == b"Exif\0\0" and orientation == 1:
            orientation = _tiff_orientation(data[at + 10 : at + 2 + size])
        elif marker == 0xE2 and data[at + 4 : at + 8] == b"MPF\0":
            image_format = "MPO"
        at += 2 + size
    return orientation, image_format


def _tiff_orientation(tiff: bytes) -> int:
    """Tag 0x0112 of IFD0 of an EXIF TIFF block; 1 when absent or malformed."""
    order: Literal["little", "big"]
    if tiff[:2] == b"II":
        order = "little"
    elif tiff[:2] == b"MM":
        order = "big"
    else:
        return 1
    ifd = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[ifd : ifd + 2], order) if ifd + 2 <= len(tiff) else 0
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            break
        if int.from_bytes(tiff[entry : entry + 2], order) == 0x0112:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1
    return 1


def _check_size(width: int, height: int, limits: DecodeLimits) -> None:
    if width < 1 or height < 1:
        raise InvalidImageError(f"image has zero size ({width}x{height})")
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InvalidImageError(
            f"image is {width}x{height}, aspect ratio {ratio:.1f} > "
            f"{limits.max_aspect_ratio:g}; crop it before classifying"
        )


def _open(data: bytes, limits: DecodeLimits) -> Image.Image:
    """The image's header, checked against ``limits`` before any pixel is decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InvalidImageError(
            "not a recognised image (expected JPEG, PNG, GIF, WebP, BMP or TIFF)"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image has too many pixels: {exc}") from exc
    except Exception as exc:  # PIL parses hostile bytes: any failure means unreadable
        raise InvalidImageError(f"cannot read image header: {exc}") from exc
    if img.format not in ALLOWED_FORMATS:
        raise InvalidImageError(f"image format {img.format} is not accepted")
    _check_size(*img.size, limits)
    return img


def _decode_turbo_only(
    data: bytes, limits: DecodeLimits, min_side: int, jpeg: JpegDecoding
) -> DecodedPicture | None:
    """A baseline/progressive RGB or grayscale JPEG by libjpeg-turbo alone: its header read
    in C, the limits checked on it before any pixel, the EXIF orientation read by
    ``jpeg_headers``; None where PIL is to open it (not a JPEG, CMYK/YCCK, anything
    libjpeg-turbo warns about)."""
    if simplejpeg is None or not jpeg.turbo or data[:3] != b"\xff\xd8\xff":
        return None
    try:
        stored_h, stored_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except Exception:
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):  # CMYK / YCCK: PIL's inversion
        return None
    _check_size(stored_w, stored_h, limits)
    orientation, image_format = jpeg_headers(data)
    width, height = _dct_size(stored_w, stored_h, min_side, jpeg.scales)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=jpeg.fast, fastupsample=jpeg.fast,
            min_height=height, min_width=width, strict=True,
        )  # fmt: skip
    except Exception:  # any libjpeg warning or error: PIL decodes it, or says what is wrong
        return None
    turn = _ORIENT.get(orientation)
    if turn is not None:
        pixels = np.ascontiguousarray(turn(pixels))  # torch takes no negative strides
    turned = orientation in (5, 6, 7, 8)
    original = (stored_h, stored_w) if turned else (stored_w, stored_h)
    return DecodedPicture(pixels, image_format, original)


def _decode_pil(img: Image.Image, min_side: int) -> DecodedPicture:
    """Any accepted format by PIL, upright RGB (a large JPEG at a reduced scale)."""
    width, height = img.size
    img.seek(0)  # animated GIF/WebP: the first frame
    image_format = str(img.format)
    draft = _draft_size(width, height, min_side)
    if draft is not None and image_format in JPEG_FORMATS:
        img.draft("RGB", draft)
    img.load()
    decoded_size = img.size
    upright = ImageOps.exif_transpose(img) or img
    turned = upright.size != decoded_size  # a 90-degree EXIF orientation
    original = (height, width) if turned else (width, height)
    return DecodedPicture(_to_rgb(upright), image_format, original)


def decode_picture(
    data: bytes, limits: DecodeLimits, draft_min_side: int = 0, jpeg: JpegDecoding = SERVED_JPEG
) -> DecodedPicture:
    """Bytes -> upright RGB pixels, or a domain error saying what is wrong.

    The header is checked against ``limits`` before any pixel is decoded.
    ``draft_min_side``: a JPEG at least twice that on its shorter side is decoded at a
    reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling) that keeps the shorter side at
    least that long (studies/jpeg_draft.py: 3000 px photos prepared about 3x faster).
    A JPEG comes as libjpeg-turbo's numpy array (``jpeg``), anything else as PIL's image."""
    if not data:
        raise InvalidImageError("empty image: no bytes received")
    fast = _decode_turbo_only(data, limits, draft_min_side, jpeg)
    if fast is not None:
        return fast
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = _open(data, limits)
        try:
            return _decode_pil(img, draft_min_side)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLargeError(f"image has too many pixels: {exc}") from exc
        except Exception as exc:  # OSError, EOFError, ... and TypeError seen from TIFF fuzzing
            raise InvalidImageError(f"cannot decode image (truncated or corrupt?): {exc}") from exc


def decode_image(
    data: bytes, limits: DecodeLimits, draft_min_side: int = 0, jpeg: JpegDecoding = SERVED_JPEG
) -> DecodedImage:
    """As ``decode_picture``, always as a PIL image (fine-tuning augments PIL images)."""
    picture, image_format, original = decode_picture(data, limits, draft_min_side, jpeg)
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(picture)
    return DecodedImage(picture, image_format, original)
