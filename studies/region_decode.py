"""The floor of a center crop's preparation when only the pixels its view covers are
decoded: libjpeg-turbo's cropped decode (``jpeg_crop_scanline``, ``jpeg_skip_scanlines``,
the rows below never read) and a resize of that box (and its margin) alone, against the
served way (the whole photo decoded by simplejpeg, resized whole, the crop cut).

    PYTHONPATH=. .venv/bin/python -m studies.region_decode [--repeats 3] [--no-top1]

simplejpeg exposes no cropped decode, so this builds ``studies/region_decode.c`` against the
system's libjpeg-turbo (gcc and Debian's libjpeg62-turbo-dev; it says so and stops where
either is missing) into a temporary folder and calls it through ctypes.

Reported: (1) the box's pixels against a whole decode's, every JPEG of imagenet-samples,
decoded with a margin of 16 px around the box (so chroma upsampling at its edges sees what
a whole decode sees) and with none; (2) per photo, one thread, the ways in turn, the best
of ``--repeats``: the thread's CPU time for the decode alone and for the whole preparation
of the view; (3) top-1 of the tuned model on both views of every JPEG of imagenet-samples
and imagenet-samples-extra: the box and its margin are resized on their own at the photo's
scale, so the view is sampled a fraction of a source pixel off the whole-photo resize's
grid, and this counts what that changes. ``python -m studies.request_floor --region`` puts
the same decode in the floor's server, beside the served one.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
import torch

from app.tta.views import resized_shape

SOURCE = Path(__file__).with_suffix(".c")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MARGIN = 16  # px decoded around a box: chroma upsampling at its edges reads beyond it
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in the stored photo


def build(folder: Path) -> Path:
    """The helper compiled into ``folder``; SystemExit saying what is missing."""
    if shutil.which("gcc") is None:
        raise SystemExit("gcc is not installed: cannot build the cropped-decode helper")
    if not Path("/usr/include/jpeglib.h").is_file():
        raise SystemExit("jpeglib.h is missing (apt-get install libjpeg62-turbo-dev)")
    lib = folder / "libregion_decode.so"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(SOURCE), "-ljpeg"],
                   check=True)  # fmt: skip
    return lib


class RegionDecoder:
    """ctypes around the helper (ctypes releases the GIL for the call)."""

    def __init__(self, lib: Path) -> None:
        self.lib = ctypes.CDLL(str(lib))

    @staticmethod
    def size(data: bytes) -> tuple[int, int]:
        """The stored (width, height), from the header (simplejpeg's reader)."""
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        return width, height

    def box(self, data: bytes, box: Box, size: tuple[int, int], margin: int = MARGIN
            ) -> tuple[np.ndarray, int, int]:  # fmt: skip
        """RGB of ``box`` and up to ``margin`` px around it, and where the box starts in it
        (x, y)."""
        x0, y0, x1, y1 = box
        w, h = size
        mx0, my0 = max(0, x0 - margin), max(0, y0 - margin)
        mx1, my1 = min(w, x1 + margin), min(h, y1 + margin)
        out = np.empty((my1 - my0, w, 3), np.uint8)
        left, wide = ctypes.c_int(), ctypes.c_int()
        rc = self.lib.region_jpeg_decode(
            data, len(data), mx0, my0, mx1, my1, out.ctypes.data_as(ctypes.c_void_p), w * 3,
            ctypes.byref(left), ctypes.byref(wide),
        )  # fmt: skip
        if rc:
            raise ValueError(f"cropped decode failed ({rc})")
        return out[:, mx0 - left.value : mx1 - left.value], x0 - mx0, y0 - my0

    def exact(self, data: bytes, box: Box, size: tuple[int, int], margin: int = MARGIN
              ) -> np.ndarray:  # fmt: skip
        """[y1 - y0, x1 - x0, 3]: ``box`` alone (its margin decoded, then left out)."""
        pixels, x, y = self.box(data, box, size, margin)
        return pixels[y : y + box[3] - box[1], x : x + box[2] - box[0]]


@dataclass(frozen=True)
class CenterCrop:
    """The model's center crop (shorter side resized to ``resize``, ``crop`` square cut
    from the middle) made two ways."""

    resize: int
    crop: int
    mode: str  # torch's interpolation, antialiased

    def _resize(self, pixels: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        nchw = torch.from_numpy(pixels).unsqueeze(0).permute(0, 3, 1, 2)  # channels_last
        out = torch.nn.functional.interpolate(nchw, size=size, mode=self.mode, antialias=True)
        return out[0].permute(1, 2, 0)

    def whole(self, data: bytes) -> np.ndarray:
        """As served: the whole photo decoded and resized, the crop cut."""
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB")
        rw, rh = resized_shape(pixels.shape[1], pixels.shape[0], self.resize)
        resized = self._resize(pixels, (rh, rw))
        y, x = (resized.shape[0] - self.crop) // 2, (resized.shape[1] - self.crop) // 2
        return np.ascontiguousarray(resized.numpy()[y : y + self.crop, x : x + self.crop])

    def source_box(self, w: int, h: int) -> Box:
        """The crop's box in the stored photo (its edges rounded to whole pixels)."""
        rw, rh = resized_shape(w, h, self.resize)
        bx, by = (rw - self.crop) // 2, (rh - self.crop) // 2
        return (round(bx * w / rw), round(by * h / rh), min(w, round((bx + self.crop) * w / rw)),
                min(h, round((by + self.crop) * h / rh)))  # fmt: skip

    def boxed(self, data: bytes, decoder: RegionDecoder) -> np.ndarray:
        """Only the crop's box and a margin around it decoded, resized at the whole photo's
        scale (the margin under the filter's reach at the box's edges), the crop cut."""
        w, h = size = decoder.size(data)
        x0, y0, x1, y1 = self.source_box(w, h)
        pixels, x, y = decoder.box(data, (x0, y0, x1, y1), size)
        k = self.resize / min(w, h)
        ph, pw = pixels.shape[:2]
        resized = self._resize(pixels, (round(ph * k), round(pw * k)))
        top, left = round(y * k), round(x * k)
        return np.ascontiguousarray(resized.numpy()[top : top + self.crop, left : left + self.crop])


def jpegs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))


def same_pixels(decoder: RegionDecoder, photos: list[bytes], crop: CenterCrop) -> dict[str, int]:
    """The box decoded alone, with ``MARGIN`` around it and with none, against the same box
    of a whole decode (the helper's): how many photos' boxes differ."""
    differ = {"margin": 0, "no_margin": 0}
    for data in photos:
        size = decoder.size(data)
        box = crop.source_box(*size)
        want = decoder.exact(data, (0, 0, *size), size)[box[1] : box[3], box[0] : box[2]]
        for name, margin in (("margin", MARGIN), ("no_margin", 0)):
            differ[name] += not np.array_equal(decoder.exact(data, box, size, margin), want)
    return {"photos": len(photos), **{f"boxes_differing_{k}": n for k, n in differ.items()}}


def cpu_times(ways: dict[str, Callable[[bytes], object]], photos: list[bytes],
              repeats: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """ms of this thread's CPU per photo, the best of ``repeats`` (ways interleaved)."""
    best: dict[str, list[float]] = {name: [] for name in ways}
    for data in photos:
        runs: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, way in ways.items():
                t = time.thread_time()
                way(data)
                runs[name].append(time.thread_time() - t)
        for name, r in runs.items():
            best[name].append(1000 * min(r))
    return {
        n: {"median_ms": round(statistics.median(v), 3), "mean_ms": round(statistics.mean(v), 3)}
        for n, v in best.items()
    }


def top1(decoder: RegionDecoder, crop: CenterCrop, model: str, folders: list[str]) -> dict:
    """Right answers of both views per folder, and how many answers differ."""
    from app.config import default_models_dir
    from app.jobs.datasets import read_labelled_folder
    from app.repository import ModelRepository
    from app.runtime.load import load_engine
    from app.runtime.plan import EngineOptions

    engine = load_engine(ModelRepository(default_models_dir()), model, EngineOptions(tune=True))
    out = {}
    for folder in folders:
        found = read_labelled_folder(DATA / folder, engine.model.labels)
        items = [i for i in found.items if i.path.suffix.lower() in (".jpeg", ".jpg")]
        answers: dict[str, list[int]] = {"whole": [], "boxed": []}
        for item in items:
            data = item.path.read_bytes()
            views = np.stack([crop.whole(data), crop.boxed(data, decoder)])
            logits = engine.run_views(torch.from_numpy(views).permute(0, 3, 1, 2)).logits
            answers["whole"].append(int(logits[0].argmax()))
            answers["boxed"].append(int(logits[1].argmax()))
        targets = [i.target for i in items]
        out[folder] = {
            "photos": len(items),
            **{f"right_{n}": sum(a == t for a, t in zip(got, targets, strict=True))
               for n, got in answers.items()},
            "answers_differing": sum(a != b for a, b in zip(*answers.values(), strict=True)),
        }  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--no-top1", action="store_true")
    args = parser.parse_args()
    if not (DATA / "imagenet-samples").is_dir():
        raise SystemExit(f"no photos at {DATA}: the shared data is missing")
    torch.set_num_threads(1)
    from app.config import default_models_dir
    from app.repository import ModelRepository

    cfg = ModelRepository(default_models_dir()).config(args.model)
    crop = CenterCrop(cfg.resize_size, cfg.input_size, cfg.interpolation)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = RegionDecoder(build(Path(tmp)))
        photos = [p.read_bytes() for p in jpegs(DATA / "imagenet-samples")]
        print("pixels:", same_pixels(decoder, photos, crop))

        def box_only(data: bytes) -> np.ndarray:
            size = decoder.size(data)
            return decoder.box(data, crop.source_box(*size), size)[0]

        ways: dict[str, Callable[[bytes], object]] = {
            "decode whole (simplejpeg)": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
            "decode the box": box_only,
            "view, whole photo (served way)": crop.whole,
            "view, the box alone": lambda d: crop.boxed(d, decoder),
        }
        for name, t in cpu_times(ways, photos, args.repeats).items():
            print(f"{name:32s} {t['median_ms']:.3f} ms median, {t['mean_ms']:.3f} mean")
        if not args.no_top1:
            print("top-1:", top1(decoder, crop, args.model,
                                 ["imagenet-samples", "imagenet-samples-extra"]))  # fmt: skip


if __name__ == "__main__":
    main()
