"""Datasets on disk: the MVTec AD layout, or a plain folder of good images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engines.decode import IMAGE_SUFFIXES
from engines.errors import UserError


@dataclass(frozen=True)
class Sample:
    """One test image: its kind ("good" or a defect kind) and its ground-truth mask, if any.

    A defect image without a mask is labelled at image level only: it counts for image metrics
    and per-kind recall, not for pixel metrics or recall per defect size.
    """

    path: Path
    kind: str
    mask: Path | None = None

    @property
    def is_good(self) -> bool:
        return self.kind == "good"


@dataclass(frozen=True)
class Dataset:
    """Good images to fit on, and labelled test images (possibly none)."""

    root: Path
    train_good: tuple[Path, ...]
    test: tuple[Sample, ...]

    @property
    def test_good(self) -> tuple[Sample, ...]:
        return tuple(s for s in self.test if s.is_good)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(sorted({s.kind for s in self.test if not s.is_good}))

    @property
    def unmasked(self) -> tuple[Sample, ...]:
        """Defect images without a ground-truth mask (image labels only)."""
        return tuple(s for s in self.test if not s.is_good and s.mask is None)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_dataset(root: Path) -> Dataset:
    """Read an MVTec-layout dataset (train/good, test/<kind>, ground_truth/<kind>) or a plain folder.

    Ground-truth masks (``ground_truth/<kind>/<stem>_mask.png``) are optional: real datasets often
    label images only.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory (expected a dataset folder)")
    if (root / "train" / "good").is_dir():
        train = tuple(list_images(root / "train" / "good"))
        test = tuple(_test_samples(root))
    else:
        train, test = tuple(list_images(root)), ()
    if not train:
        where = root / "train" / "good" if (root / "train").is_dir() else root
        raise UserError(f"{where}: no images (expected PNG, TIFF, BMP or JPEG files of good parts)")
    return Dataset(root, train, test)


def load_test_folder(root: Path) -> Dataset:
    """A dataset whose test images are required (evaluate); refuse one without any."""
    ds = load_dataset(root)
    if not ds.test:
        raise UserError(f"{root}: no test/ folder with labelled images (expected the MVTec AD layout)")
    return ds


def _test_samples(root: Path) -> list[Sample]:
    test_dir = root / "test"
    if not test_dir.is_dir():
        return []
    samples = []
    for kind_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        kind = kind_dir.name
        for image in list_images(kind_dir):
            mask = root / "ground_truth" / kind / f"{image.stem}_mask.png"
            has_mask = kind != "good" and mask.is_file()
            samples.append(Sample(image, kind, mask if has_mask else None))
    return samples
