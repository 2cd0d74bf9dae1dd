"""Labelled-folder readers: every layout, and clear errors for folders we cannot use."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import DataError, InvalidRequestError
from app.jobs.datasets import read_labelled_folder, scan_unlabelled
from app.labels import LabelSet
from tests.helpers import image_bytes

SYNSETS = ("n01440764", "n01443537", "n01484850")
LABELS = LabelSet(SYNSETS, ("tench", "goldfish", "great white shark"))


def _img(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(40, 30, seed=seed))
    return path


def _pairs(folder) -> list[tuple[str, int]]:  # noqa: ANN001
    return [(it.path.name, it.target) for it in folder.items]


def test_imagefolder_with_synset_folder_names(tmp_path: Path) -> None:
    _img(tmp_path / "n01484850" / "b.png")
    _img(tmp_path / "n01440764" / "a.jpg")
    _img(tmp_path / "n01440764" / "c.JPEG")
    (tmp_path / "n01440764" / "notes.txt").write_text("not an image")
    found = read_labelled_folder(tmp_path, LABELS)
    assert found.layout == "imagefolder"
    assert _pairs(found) == [("a.jpg", 0), ("c.JPEG", 0), ("b.png", 2)]


def test_imagefolder_with_index_folder_names(tmp_path: Path) -> None:
    _img(tmp_path / "1" / "x.png")
    _img(tmp_path / "2" / "y.png")
    assert _pairs(read_labelled_folder(tmp_path, LABELS)) == [("x.png", 1), ("y.png", 2)]


def test_flat_folder_with_val_txt(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        _img(tmp_path / f"ILSVRC2012_val_0000000{n}.JPEG", seed=n)
    (tmp_path / "val.txt").write_text(
        "ILSVRC2012_val_00000001.JPEG 2\n"
        "ILSVRC2012_val_00000002.JPEG n01443537\n"
        "ILSVRC2012_val_00000009.JPEG 0\n"  # listed but absent: a subset is fine
    )
    found = read_labelled_folder(tmp_path, LABELS)
    assert found.layout == "labels-file"
    assert _pairs(found) == [
        ("ILSVRC2012_val_00000001.JPEG", 2),
        ("ILSVRC2012_val_00000002.JPEG", 1),
    ]
    assert found.unlabelled == ["ILSVRC2012_val_00000003.JPEG"]


def test_flat_folder_with_loc_val_solution_csv_given_explicitly(tmp_path: Path) -> None:
    data = tmp_path / "val"
    _img(data / "ILSVRC2012_val_00000001.JPEG")
    _img(data / "ILSVRC2012_val_00000002.JPEG", seed=1)
    labels_file = tmp_path / "LOC_val_solution.csv"
    labels_file.write_text(
        "ImageId,PredictionString\n"
        "ILSVRC2012_val_00000001,n01484850 10 20 30 40 n01484850 1 2 3 4\n"
        "ILSVRC2012_val_00000002,n01440764 5 6 7 8\n"
    )
    found = read_labelled_folder(data, LABELS, labels_file)
    assert _pairs(found) == [
        ("ILSVRC2012_val_00000001.JPEG", 2),
        ("ILSVRC2012_val_00000002.JPEG", 0),
    ]


def test_flat_folder_with_synset_prefixed_names(tmp_path: Path) -> None:
    _img(tmp_path / "n01443537_goldfish.JPEG")
    _img(tmp_path / "n01440764_tench.JPEG")
    found = read_labelled_folder(tmp_path, LABELS)
    assert found.layout == "prefix"
    assert _pairs(found) == [("n01440764_tench.JPEG", 0), ("n01443537_goldfish.JPEG", 1)]


def test_folder_names_that_are_not_model_classes_are_named(tmp_path: Path) -> None:
    _img(tmp_path / "n01440764" / "a.png")
    _img(tmp_path / "n99999999" / "b.png")
    _img(tmp_path / "7" / "c.png")
    with pytest.raises(DataError, match=r"2 folder names are not classes.*'7'.*n99999999"):
        read_labelled_folder(tmp_path, LABELS)


def test_labels_file_labels_that_are_not_model_classes_are_named(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    (tmp_path / "val.txt").write_text("a.png n12345678\n")
    with pytest.raises(DataError, match="n12345678"):
        read_labelled_folder(tmp_path, LABELS)


def test_devkit_ground_truth_numbers_are_refused_with_the_reason(tmp_path: Path) -> None:
    _img(tmp_path / "ILSVRC2012_val_00000001.JPEG")
    gt = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("490\n361\n")
    with pytest.raises(DataError, match="ILSVRC2012_IDs, not class indices"):
        read_labelled_folder(tmp_path, LABELS, gt)


@pytest.mark.parametrize("layout", ["empty", "text-only", "empty-subfolders", "missing"])
def test_folders_without_images_are_refused(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "text-only":
        (root / "readme.txt").write_text("hello")
    if layout == "empty-subfolders":
        (root / "n01440764").mkdir()
    with pytest.raises(DataError, match=r"no (labelled )?images|does not exist"):
        read_labelled_folder(root, LABELS)


def test_files_without_a_label_prefix_are_counted_not_guessed(tmp_path: Path) -> None:
    _img(tmp_path / "n01440764_tench.png")
    _img(tmp_path / "holiday.png")
    found = read_labelled_folder(tmp_path, LABELS)
    assert _pairs(found) == [("n01440764_tench.png", 0)]
    assert found.unlabelled == ["holiday.png"]


# -- shared with finetune: class order 'sorted', images at any depth, unlabelled folders ------
def test_imagefolder_finds_images_at_any_depth(tmp_path: Path) -> None:
    _img(tmp_path / "n01443537" / "day1" / "a.png")
    _img(tmp_path / "n01443537" / "b.png")
    _img(tmp_path / "n01443537" / ".cache" / "hidden.png")
    found = read_labelled_folder(tmp_path, LABELS)
    assert [(str(it.path.relative_to(tmp_path)), it.target) for it in found.items] == [
        ("n01443537/b.png", 1),
        ("n01443537/day1/a.png", 1),
    ]


def test_sorted_class_order_numbers_the_folders(tmp_path: Path) -> None:
    for name in ("shark", "goldfish", "tench"):
        _img(tmp_path / name / f"{name}.png")
    (tmp_path / "tench" / "empty").mkdir()
    found = read_labelled_folder(tmp_path, LABELS, class_order="sorted")
    assert found.layout == "imagefolder"
    assert _pairs(found) == [("goldfish.png", 0), ("shark.png", 1), ("tench.png", 2)]
    with pytest.raises(DataError, match="do not match the model's classes: goldfish"):
        read_labelled_folder(tmp_path, LABELS)  # the default: names must be label ids


def test_sorted_class_order_needs_one_folder_per_class(tmp_path: Path) -> None:
    _img(tmp_path / "a" / "x.png")
    _img(tmp_path / "b" / "y.png")
    with pytest.raises(DataError, match="has 2 class folders.*exactly one per model class \\(3\\)"):
        read_labelled_folder(tmp_path, LABELS, class_order="sorted")
    flat = tmp_path / "flat"
    _img(flat / "n01440764_tench.png")
    with pytest.raises(DataError, match="no class folders"):
        read_labelled_folder(flat, LABELS, class_order="sorted")
    (flat / "val.txt").write_text("n01440764_tench.png 0\n")
    with pytest.raises(InvalidRequestError, match="does not apply to a labels file"):
        read_labelled_folder(flat, LABELS, flat / "val.txt", class_order="sorted")


def test_empty_folders_with_unknown_names_are_ignored(tmp_path: Path) -> None:
    _img(tmp_path / "n01440764" / "a.png")
    (tmp_path / "checkpoints").mkdir()
    assert _pairs(read_labelled_folder(tmp_path, LABELS)) == [("a.png", 0)]


def test_flat_folder_without_labels_says_which_layouts_work(tmp_path: Path) -> None:
    _img(tmp_path / "holiday.png")
    with pytest.raises(DataError, match=r"1 images without a label.*one folder per class"):
        read_labelled_folder(tmp_path, LABELS, what="val")


def test_unlabelled_folder_lists_every_image(tmp_path: Path) -> None:
    _img(tmp_path / "a.png")
    _img(tmp_path / "sub" / "b.JFIF")
    (tmp_path / "notes.txt").write_text("no")
    assert [(p.path.name, p.target) for p in scan_unlabelled(tmp_path)] == [
        ("a.png", -1),
        ("b.JFIF", -1),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        scan_unlabelled(tmp_path / "empty")
