"""Cityscapes label table, GTA5 / SYNTHIA mappings, class names and palette.

Torch-free on purpose: the runtime side (``dass_deploy``) imports it to colour and
score predictions without pulling in torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE_INDEX = 255


@dataclass(frozen=True)
class Label:
    """One row of the official Cityscapes table (``cityscapesscripts/helpers/labels.py``)."""

    name: str
    id: int
    train_id: int
    color: tuple[int, int, int]


# The official 34 labelIds (plus license plate, -1), with their trainIds.
LABELS: tuple[Label, ...] = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
)

NUM_CLASSES = 19

#: The 19 evaluation classes in trainId order.
CLASS_NAMES: tuple[str, ...] = tuple(
    lab.name for lab in sorted((lab for lab in LABELS if lab.train_id != IGNORE_INDEX), key=lambda lab: lab.train_id)
)

#: ``PALETTE[trainId]`` is the Cityscapes RGB colour of that class.
PALETTE: np.ndarray = np.array(
    [
        lab.color
        for lab in sorted((lab for lab in LABELS if lab.train_id != IGNORE_INDEX), key=lambda lab: lab.train_id)
    ],
    dtype=np.uint8,
)

#: SYNTHIA evaluation subsets (trainIds): the 16 classes SYNTHIA has, and the 13 without wall, fence, pole.
SYNTHIA_16: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_13: tuple[int, ...] = tuple(c for c in SYNTHIA_16 if c not in (3, 4, 5))


def _lut(pairs: dict[int, int], size: int) -> np.ndarray:
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in pairs.items():
        lut[src] = dst
    return lut


#: labelId (0..255) -> trainId; ids outside the table (and -1 license plate) map to 255.
LABEL_ID_TO_TRAIN_ID: np.ndarray = _lut({lab.id: lab.train_id for lab in LABELS}, 256)

#: trainId (0..255) -> labelId, for submissions to the Cityscapes server; 255 -> 0 (unlabeled).
TRAIN_ID_TO_LABEL_ID: np.ndarray = np.zeros(256, dtype=np.uint8)
for _lab in LABELS:
    if _lab.train_id != IGNORE_INDEX:
        TRAIN_ID_TO_LABEL_ID[_lab.train_id] = _lab.id

#: SYNTHIA-RAND-CITYSCAPES class id (first channel of GT/LABELS) -> trainId.
SYNTHIA_ID_TO_TRAIN_ID: np.ndarray = _lut(
    {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18},
    65536,
)


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a Cityscapes / GTA5 labelId map ``[H,W]`` (any int dtype) to trainIds (uint8, 255 = ignore)."""
    return LABEL_ID_TO_TRAIN_ID[np.clip(label_ids, 0, 255).astype(np.intp)]


def synthia_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """Map SYNTHIA class ids ``[H,W]`` (uint16) to trainIds (uint8, 255 = ignore)."""
    return SYNTHIA_ID_TO_TRAIN_ID[ids.astype(np.intp)]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Map trainIds ``[H,W]`` to Cityscapes labelIds for the official test server."""
    return TRAIN_ID_TO_LABEL_ID[train_ids.astype(np.intp)]


def colorize(train_ids: np.ndarray, palette: np.ndarray = PALETTE) -> np.ndarray:
    """Colour a trainId map ``[H,W]`` with the Cityscapes palette -> ``[H,W,3]`` uint8 RGB; ignore is black."""
    full = np.zeros((256, 3), dtype=np.uint8)
    full[: len(palette)] = palette
    return full[train_ids.astype(np.intp)]
