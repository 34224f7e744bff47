"""The real datasets: GTA5 and SYNTHIA (source), Cityscapes (target / evaluation), and plain image folders.

Every item is a dict::

    image  float32 [3,H,W]   normalised per ``transforms.normalization`` (RGB in, optional BGR swap, (x-mean)/std)
    label  int64 [H,W]       trainIds, 255 = ignore (key absent when the dataset has no labels)
    index  int               position in the dataset
    name   str               path relative to the image folder (used to name pseudo labels and predictions)
    raw    uint8 [H,W,3]     the augmented RGB image before normalisation (only with ``keep_raw=True``)

Each label format has its own trap, handled here once:
GTA5 labels are palette PNGs whose *indices* are Cityscapes labelIds (reading colours gives nonsense ids);
SYNTHIA labels are 16-bit PNGs with the class id in the first (R) channel, which OpenCV returns last (BGR order);
Cityscapes ``*_gtFine_labelIds.png`` hold labelIds that go through the official table.

Augmentation randomness is derived from ``(seed, draw, index)``: ``dataset[i]`` uses the epoch set by
``set_epoch`` as the draw, ``dataset[(i, draw)]`` (what the samplers in ``sampling.py`` can yield) an explicit one,
so a resumed run sees exactly the same crops and flips.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from dass_train.data.transforms import EvalTransform, TransformConfig
from dass_train.errors import DataError
from dass_train.labels import label_ids_to_train_ids, synthia_ids_to_train_ids

__all__ = [
    "SegmentationDataset",
    "GTA5Dataset",
    "SynthiaDataset",
    "CityscapesDataset",
    "ImageFolderDataset",
    "read_rgb",
    "read_index_png",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
_SHOW = 5  # how many offending files an error message names


def _examples(items: Sequence[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _encoded(path: str | os.PathLike, what: str) -> np.ndarray:
    """The file's bytes, refused with a DataError naming it when missing, empty or a PNG cut short.

    A truncated PNG is caught here, before OpenCV sees it: libpng would print its own "libpng error: Read Error"
    lines to stderr (C code, not silenceable from Python) next to our one-line message.
    """
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise DataError(f"{what} {path} is an empty file")
    if data[:8].tobytes() == _PNG_SIGNATURE and b"IEND" not in data[-64:].tobytes():
        raise DataError(f"{what} {path} is truncated (the PNG has no end chunk): copy or regenerate it")
    return data


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file -> RGB uint8 ``[H,W,3]``; DataError naming the file when missing or corrupt."""
    image = cv2.imdecode(_encoded(path, "image"), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"cannot read image {path} (corrupt or not an image)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_index_png(path: str | os.PathLike, modes: Iterable[str] = ("P", "L")) -> np.ndarray:
    """Read a single-channel label PNG as its stored values (palette *indices* for 'P', never the colours).

    A colour (RGB/RGBA) label means a visualisation was put where the ids belong: refuse it, naming the file.
    """
    modes = tuple(modes)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in modes:
                im.load()
                array = np.array(im)
    except (OSError, SyntaxError, ValueError) as exc:  # PIL reports truncation / bad headers with these
        raise DataError(f"cannot read label {path}: {exc}") from None
    if mode not in modes:
        raise DataError(
            f"label {path} is a {mode} image; expected a single-channel id map (mode {'/'.join(modes)}), "
            "not a colour visualisation"
        )
    return array


def _header_size(path: Path) -> tuple[int, int] | None:
    """(W, H) from the file header only (PIL opens lazily); None if the header is unreadable."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError):
        return None


class SegmentationDataset(Dataset):
    """Paired image / label files plus the shared item logic; subclasses find the files and decode labels."""

    #: Human-readable dataset name for messages.
    kind = "dataset"

    def __init__(
        self,
        image_dir: Path,
        image_files: Sequence[Path],
        label_files: Sequence[Path] | None,
        transforms=None,
        seed: int = 0,
        keep_raw: bool = False,
    ) -> None:
        self.image_dir = Path(image_dir)
        self.image_files = [Path(p) for p in image_files]
        self.label_files = None if label_files is None else [Path(p) for p in label_files]
        self.transforms = transforms if transforms is not None else EvalTransform(TransformConfig(eval_size=None))
        self.seed = int(seed)
        self.keep_raw = keep_raw
        self.epoch = 0
        self.names = [p.relative_to(self.image_dir).as_posix() for p in self.image_files]

    @property
    def has_labels(self) -> bool:
        return self.label_files is not None

    def __len__(self) -> int:
        return len(self.image_files)

    def set_epoch(self, epoch: int) -> None:
        """The draw used by ``dataset[i]`` (integer keys); set it before each pass over the data."""
        self.epoch = int(epoch)

    # --- decoding --------------------------------------------------------------------------------------------
    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 ``[H,W,3]`` at full resolution, no transform."""
        return read_rgb(self.image_files[index])

    def load_label(self, index: int) -> np.ndarray | None:
        """trainIds uint8 ``[H,W]`` at full resolution (255 = ignore), or None without labels."""
        if self.label_files is None:
            return None
        return self._decode_label(self.label_files[index])

    def _decode_label(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    # --- checks ----------------------------------------------------------------------------------------------
    def problems(self, progress: bool = False) -> list[str]:
        """Unreadable headers and image/label size mismatches, from file headers only (cheap, no decoding)."""
        found: list[str] = []
        indices: Iterable[int] = range(len(self))
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"verify {self.kind}", unit="img")
        for i in indices:
            image_size = _header_size(self.image_files[i])
            if image_size is None:
                found.append(f"unreadable image {self.image_files[i]}")
            if self.label_files is None:
                continue
            label_size = _header_size(self.label_files[i])
            if label_size is None:
                found.append(f"unreadable label {self.label_files[i]}")
            elif image_size is not None and label_size != image_size:
                found.append(
                    f"size mismatch: {self.image_files[i]} is {image_size[0]}x{image_size[1]} but "
                    f"{self.label_files[i]} is {label_size[0]}x{label_size[1]}"
                )
        return found

    def verify(self, progress: bool = False) -> None:
        """Raise one DataError listing the broken files, before training starts rather than mid-epoch."""
        found = self.problems(progress=progress)
        if found:
            raise DataError(f"{self.kind}: {len(found)} problem(s): {_examples(found)}")

    # --- items -----------------------------------------------------------------------------------------------
    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        if isinstance(key, (tuple, list)):
            index, draw = int(key[0]), int(key[1])
        else:
            index, draw = int(key), self.epoch
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.kind} with {len(self)} images")
        rng = np.random.default_rng([self.seed, draw, index])
        image = self.load_image(index)
        label = self.load_label(index)
        if label is not None and label.shape != image.shape[:2]:
            raise DataError(
                f"size mismatch: {self.image_files[index]} is {image.shape[1]}x{image.shape[0]} but "
                f"{self.label_files[index]} is {label.shape[1]}x{label.shape[0]}"
            )
        out = self.transforms(image, label, rng)
        item = {"image": out["image"], "index": index, "name": self.names[index]}
        if out["label"] is not None:
            item["label"] = out["label"]
        if self.keep_raw:
            item["raw"] = out["raw"]
        return item

    # --- helpers for subclasses ------------------------------------------------------------------------------
    def _pair(self, images: Sequence[Path], label_of) -> list[Path]:
        """Label path for every image; one DataError naming the images whose label is missing."""
        labels = [label_of(p) for p in images]
        missing = [f"{img} (expected {lab})" for img, lab in zip(images, labels, strict=True) if not lab.is_file()]
        if missing:
            raise DataError(f"{self.kind}: {len(missing)} image(s) without a label: {_examples(missing)}")
        return labels


class GTA5Dataset(SegmentationDataset):
    """GTA5 (Richter et al. 2016): ``root/images/*.png`` with palette labels ``root/labels/*.png`` of labelIds.

    ``list_file`` (e.g. the usual ``train.txt``) restricts the images to the names it lists, one per line.
    """

    kind = "GTA5"

    def __init__(
        self,
        root: str | os.PathLike,
        transforms=None,
        list_file: str | os.PathLike | None = None,
        seed: int = 0,
        keep_raw: bool = False,
    ) -> None:
        root = Path(root)
        image_dir, label_dir = root / "images", root / "labels"
        images = sorted(image_dir.glob("*.png")) if image_dir.is_dir() else []
        if not images or not label_dir.is_dir():
            raise DataError(
                f"GTA5 not found: expected {image_dir}/*.png and {label_dir}/*.png (download GTA5 from "
                "https://download.visinf.tu-darmstadt.de/data/from_games/ and unpack there, or set --data.source_root)"
            )
        if list_file is not None:
            images = self._from_list(Path(list_file), image_dir)
        self.root = root
        labels = self._pair(images, lambda p: label_dir / p.name)
        super().__init__(image_dir, images, labels, transforms, seed, keep_raw)

    @staticmethod
    def _from_list(list_file: Path, image_dir: Path) -> list[Path]:
        if not list_file.is_file():
            raise DataError(f"GTA5 list file not found: {list_file}")
        names = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        paths = [image_dir / name for name in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"GTA5: {len(missing)} image(s) listed in {list_file} do not exist: {_examples(missing)}")
        return paths

    def _decode_label(self, path: Path) -> np.ndarray:
        return label_ids_to_train_ids(read_index_png(path, modes=("P", "L")))


class SynthiaDataset(SegmentationDataset):
    """SYNTHIA-RAND-CITYSCAPES: ``root/RGB/*.png`` with 16-bit labels ``root/GT/LABELS/*.png`` (class id in R)."""

    kind = "SYNTHIA"

    def __init__(self, root: str | os.PathLike, transforms=None, seed: int = 0, keep_raw: bool = False) -> None:
        root = Path(root)
        image_dir, label_dir = root / "RGB", root / "GT" / "LABELS"
        images = sorted(image_dir.glob("*.png")) if image_dir.is_dir() else []
        if not images or not label_dir.is_dir():
            raise DataError(
                f"SYNTHIA not found: expected {image_dir}/*.png and {label_dir}/*.png (download "
                "SYNTHIA-RAND-CITYSCAPES from https://synthia-dataset.net and unpack there, or set --data.source_root)"
            )
        self.root = root
        labels = self._pair(images, lambda p: label_dir / p.name)
        super().__init__(image_dir, images, labels, transforms, seed, keep_raw)

    def _decode_label(self, path: Path) -> np.ndarray:
        ids = cv2.imdecode(_encoded(path, "label"), cv2.IMREAD_UNCHANGED)
        if ids is None:
            raise DataError(f"cannot read label {path} (corrupt or not a PNG)")
        if ids.ndim == 3:
            # The file stores (R=class, G=instance, B); OpenCV hands channels back as B, G, R(, A): R is index 2.
            ids = ids[:, :, 2]
        return synthia_ids_to_train_ids(ids)


class CityscapesDataset(SegmentationDataset):
    """Cityscapes ``root/leftImg8bit/{split}/<city>/*_leftImg8bit.png`` with ``gtFine/.../*_gtFine_labelIds.png``.

    Names are ``<city>/<file>`` relative to ``leftImg8bit/{split}``, sorted like the official lists.
    """

    kind = "Cityscapes"

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "val",
        transforms=None,
        with_labels: bool = True,
        seed: int = 0,
        keep_raw: bool = False,
    ) -> None:
        root = Path(root)
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        images = sorted(image_dir.glob("*/*_leftImg8bit.png")) if image_dir.is_dir() else []
        if not images or (with_labels and not label_dir.is_dir()):
            expected = f"{image_dir}/<city>/*_leftImg8bit.png"
            if with_labels:
                expected += f" and {label_dir}/<city>/*_gtFine_labelIds.png"
            raise DataError(
                f"Cityscapes ({split}) not found: expected {expected} (download leftImg8bit_trainvaltest.zip and "
                "gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com and unpack there, "
                "or set --data.target_root)"
            )
        self.root, self.split = root, split

        def label_of(p: Path) -> Path:
            stem = p.name[: -len("_leftImg8bit.png")]
            return label_dir / p.parent.name / f"{stem}_gtFine_labelIds.png"

        labels = self._pair(images, label_of) if with_labels else None
        super().__init__(image_dir, images, labels, transforms, seed, keep_raw)

    def _decode_label(self, path: Path) -> np.ndarray:
        return label_ids_to_train_ids(read_index_png(path, modes=("L", "P", "I", "I;16")))


class ImageFolderDataset(SegmentationDataset):
    """Unlabelled images: a folder (its image files, sorted, not recursive) or an explicit list of files.

    Names are relative to the folder, or to the common parent of the listed files.
    """

    kind = "image folder"

    def __init__(
        self,
        paths: str | os.PathLike | Iterable[str | os.PathLike],
        transforms=None,
        seed: int = 0,
        keep_raw: bool = False,
    ) -> None:
        if isinstance(paths, (str, os.PathLike)) and Path(paths).is_dir():
            base = Path(paths)
            files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {base}")
        else:
            files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
            if not files:
                raise DataError("empty list of images")
            missing = [str(p) for p in files if not p.is_file()]
            if missing:
                raise DataError(f"{len(missing)} image(s) not found: {_examples(missing)}")
            base = Path(os.path.commonpath([p.resolve().parent for p in files]))
            files = [p.resolve() for p in files]
        super().__init__(base, files, None, transforms, seed, keep_raw)

    def _decode_label(self, path: Path) -> np.ndarray:  # pragma: no cover - no labels here
        raise DataError(f"{self.kind} has no labels ({path})")
