"""Procedural street scenes in two styles: an embedded stand-in for GTA5 -> Cityscapes.

No real dataset can be downloaded in CI, so the package ships a generator of street scenes labelled with the 19
Cityscapes train classes. Two domains that differ the ways GTA5 and Cityscapes do (docs/PROXY.md):

* **appearance, texture, noise** (the renderers): the source (GTA5 stand-in) has a saturated "game" palette, flat
  shading, a fixed sun and razor-sharp edges; the target (Cityscapes stand-in) another palette (hue / brightness
  shifted per class, ``style_shift``), random illumination and sun side, haze, low-frequency shading, per-material
  grain, blur, sensor noise and JPEG artefacts;
* **camera geometry, object scale, class frequencies** (the scene priors, ``SCENE_PRIORS``): the target is seen by
  one low car-mounted camera with a narrower view (larger objects, a steadier horizon) and the ego-vehicle bonnet
  (void) at the bottom; its streets have fewer trucks and buses, lower buildings, more pedestrians, cyclists,
  trees and parked cars.

A third world, ``style="pretrain"``, is neither domain: every split is composed with the wide ``pretrain`` scene
prior and rendered by ``render_random`` (a new random palette, lighting, texture and camera per image). It is the
pretext the paper-regime backbone is pretrained on (the ImageNet / COCO analogue, ``benchmarks/pretrain_backbone.py``).

The road/pavement colour swap of version 1 (``class_shift``) is off by default: it made the source-only model
confidently wrong on a whole class, which no self-training can undo and which the real task does not have.

A scene is composed on an *instance map* (``int32 [H,W]``): every polygon is an instance of a *material* (road,
lane marking, car glass, ...), each material belongs to one trainId. Renderers colour instances from a per-domain
material table plus per-instance jitter, so colour is a good but imperfect cue inside a domain.

Geometry: pinhole camera at height ``h_c`` looking along +Z, horizon row ``y_h``, vanishing point column ``x_v``:
a world point (X, Y, Z) (Y up, ground Y=0) lands at ``x = x_v + f X / Z``, ``y = y_h + f (h_c - Y) / Z``.
Drawing is painter's order: ground, far skyline, street-side facades, then every object in the street corridor
sorted far to near.

Files follow the real layouts so the real loaders read them: GTA5 (``gta5/images``, ``gta5/labels`` as palette PNGs
of labelIds) and Cityscapes (``leftImg8bit`` / ``gtFine_labelIds``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from dass_train.errors import DataError
from dass_train.labels import IGNORE_INDEX, LABELS, TRAIN_ID_TO_LABEL_ID

GENERATOR_VERSION = 2
DEFAULT_STYLE_SHIFT = 0.6
DEFAULT_CLASS_SHIFT = 0.0

TARGET_CITIES: dict[str, tuple[str, ...]] = {
    "train": ("synthtown", "pixelburg", "rendermouth"),
    "val": ("synthville", "procton"),
}
_SPLIT_CODE = {"source": 0, "train": 1, "val": 2}


@dataclass
class SyntheticConfig:
    """Generator settings; everything that changes the files is here (and in ``synthetic.json``)."""

    width: int = 512
    height: int = 256
    n_source: int = 600
    n_target_train: int = 300
    n_target_val: int = 100
    seed: int = 0
    #: Strength of the global shift: 0 = target keeps the source palette (only camera effects, weakened), 1 = full
    #: target palette and effects. It makes the target *harder* as well as different: with generator v1 the
    #: synth2real preset (ResNet-18 DeepLab-V2, 1200 iterations) scored source-only vs target-trained 24.3 vs 36.5
    #: at 0.6 and 17.7 vs 29.5 at 0.8, the same gap of ~12 points.
    style_shift: float = DEFAULT_STYLE_SHIFT
    #: Road/pavement colour swap in [0, 1]: how far the materials of ``_TARGET_MATERIAL_SWAP`` move to their target
    #: city colours. Off by default since version 2: it made the source-only model confidently wrong on a whole
    #: class (pavement read as road), which no self-training can undo and which the real task does not have
    #: (docs/PROXY.md). The scene priors (``SCENE_PRIORS``) carry the content part of the shift instead.
    class_shift: float = DEFAULT_CLASS_SHIFT
    #: Which world the files show. ``synth2real``: the benchmark (game-like source split, camera-like target
    #: splits). ``pretrain``: the ImageNet / COCO analogue, a third domain for pretraining the backbone that is
    #: neither style: every split composed with the wide ``pretrain`` scene prior and rendered by
    #: ``render_random`` (a new random palette, lighting, texture and camera per image). ``newcamera``: the target
    #: city through a camera no training stage sees (``SCENE_PRIORS["newcamera"]``, ``render_new_camera``), for the
    #: deployment-time BN adaptation benchmark.
    style: str = "synth2real"


# --------------------------------------------------------------------------------------------------------------
# Materials: (name, trainId, source RGB, source jitter, target RGB, target jitter, target grain)
# jitter = std of the per-instance colour offset; grain = std of the per-pixel texture in the target style.
# --------------------------------------------------------------------------------------------------------------
_MATERIALS: tuple[tuple[str, int, tuple[int, int, int], float, tuple[int, int, int], float, float], ...] = (
    ("sky", 10, (110, 170, 245), 8, (196, 206, 216), 12, 2),
    ("road", 0, (82, 78, 94), 8, (108, 107, 110), 10, 7),
    ("lane_mark", 0, (245, 245, 240), 4, (196, 196, 190), 10, 5),
    ("sidewalk", 1, (196, 158, 150), 12, (152, 148, 140), 12, 9),
    ("curb", 1, (222, 214, 204), 6, (178, 174, 168), 10, 6),
    ("building", 2, (192, 138, 96), 28, (142, 132, 120), 28, 11),
    ("window", 2, (84, 124, 176), 14, (58, 64, 72), 12, 6),
    ("wall", 3, (218, 200, 156), 14, (162, 150, 134), 14, 12),
    ("fence", 4, (164, 120, 68), 14, (118, 124, 118), 12, 9),
    ("fence_frame", 4, (108, 78, 44), 10, (78, 84, 80), 10, 5),
    ("pole", 5, (150, 150, 168), 10, (96, 99, 96), 12, 5),
    ("tl_box", 6, (44, 44, 38), 6, (34, 38, 36), 6, 4),
    ("lamp_red", 6, (255, 40, 30), 5, (232, 112, 92), 14, 4),
    ("lamp_green", 6, (40, 255, 90), 5, (118, 222, 172), 14, 4),
    ("sign_red", 7, (236, 36, 36), 10, (182, 72, 66), 14, 5),
    ("sign_blue", 7, (30, 90, 236), 10, (62, 96, 160), 14, 5),
    ("sign_white", 7, (250, 250, 250), 4, (205, 205, 200), 10, 4),
    ("sign_back", 7, (172, 172, 178), 8, (122, 122, 122), 10, 4),
    ("vegetation", 8, (48, 172, 44), 18, (84, 110, 56), 14, 24),
    ("trunk", 8, (112, 74, 40), 10, (72, 64, 52), 10, 10),
    ("terrain", 9, (168, 198, 78), 14, (128, 130, 88), 14, 18),
    ("person_cloth", 11, (64, 64, 222), 55, (72, 66, 72), 34, 6),
    ("person_pants", 11, (52, 52, 74), 18, (46, 48, 62), 14, 5),
    ("person_skin", 11, (242, 192, 150), 14, (192, 152, 126), 18, 3),
    ("rider_cloth", 12, (242, 142, 30), 38, (62, 72, 92), 28, 6),
    ("rider_pants", 12, (52, 50, 60), 14, (40, 40, 46), 12, 5),
    ("rider_helmet", 12, (250, 250, 250), 16, (164, 164, 164), 45, 3),
    ("rider_skin", 12, (242, 192, 150), 14, (192, 152, 126), 18, 3),
    ("car_body", 13, (222, 42, 42), 42, (132, 132, 142), 52, 5),
    ("car_glass", 13, (92, 152, 192), 12, (42, 46, 56), 10, 3),
    ("car_tyre", 13, (26, 26, 26), 5, (26, 26, 30), 5, 3),
    ("truck_body", 14, (240, 212, 42), 24, (186, 186, 192), 24, 6),
    ("truck_glass", 14, (92, 152, 192), 12, (42, 46, 56), 10, 3),
    ("truck_tyre", 14, (26, 26, 26), 5, (26, 26, 30), 5, 3),
    ("bus_body", 15, (40, 200, 212), 20, (206, 196, 168), 26, 5),
    ("bus_glass", 15, (92, 152, 192), 12, (42, 46, 56), 10, 3),
    ("bus_tyre", 15, (26, 26, 26), 5, (26, 26, 30), 5, 3),
    ("train_body", 16, (62, 202, 102), 14, (190, 72, 62), 18, 5),
    ("train_glass", 16, (92, 152, 192), 12, (42, 46, 56), 10, 3),
    ("moto_body", 17, (232, 50, 192), 24, (62, 62, 72), 24, 5),
    ("moto_tyre", 17, (26, 26, 26), 5, (26, 26, 30), 5, 3),
    ("bike_frame", 18, (255, 152, 0), 24, (48, 48, 54), 18, 3),
    ("bike_tyre", 18, (30, 30, 30), 5, (28, 28, 30), 5, 3),
    ("static", IGNORE_INDEX, (122, 102, 82), 36, (102, 102, 96), 36, 8),
    ("ego_hood", IGNORE_INDEX, (40, 40, 46), 6, (34, 36, 42), 8, 3),
)
_MAT = {name: i for i, (name, *_rest) in enumerate(_MATERIALS)}
_MAT_CLASS = np.array([m[1] for m in _MATERIALS], dtype=np.uint8)
_MAT_RGB = {
    "source": np.array([m[2] for m in _MATERIALS], dtype=np.float32),
    "target": np.array([m[4] for m in _MATERIALS], dtype=np.float32),
}
_MAT_JITTER = {
    "source": np.array([m[3] for m in _MATERIALS], dtype=np.float32),
    "target": np.array([m[5] for m in _MATERIALS], dtype=np.float32),
}
_MAT_GRAIN = np.array([m[6] for m in _MATERIALS], dtype=np.float32)

#: The class-conditional part of the shift: materials the target city makes of something else, so that a target
#: class wears the colour the source gave to a *neighbouring* class. One swap, the confusion GTA5 -> Cityscapes
#: models are known for: light concrete roads and dark asphalt pavements, where the source has dark roads and light
#: pavements. A global colour change is undone by re-estimating BatchNorm statistics (AdaBN); a swap between two
#: classes is not, and a model trained on target labels still separates them (by colour, texture and layout).
_TARGET_MATERIAL_SWAP: dict[str, tuple[int, int, int]] = {
    "road": (150, 146, 138),  # light concrete, where the source road is dark asphalt
    "sidewalk": (86, 84, 94),  # dark asphalt pavements: the source road's colour
    "curb": (118, 116, 122),
}
_SWAP_MASK = np.zeros(len(_MATERIALS), dtype=bool)
_SWAP_RGB = np.zeros((len(_MATERIALS), 3), dtype=np.float32)
for _name, _rgb in _TARGET_MATERIAL_SWAP.items():
    _SWAP_MASK[_MAT[_name]] = True
    _SWAP_RGB[_MAT[_name]] = _rgb
#: Ground materials get per-pixel depth from their row (haze); everything else the depth of its object.
_MAT_GROUND = np.isin(
    np.arange(len(_MATERIALS)), [_MAT[n] for n in ("road", "lane_mark", "sidewalk", "curb", "terrain")]
)

# Face orientation of an instance, for shading: the sun lights one side of the street more than the other.
FRONT, LEFT_FACING, RIGHT_FACING, FLAT = 0, 1, 2, 3

# Surface patterns computed per pixel on planar instances after the background layer.
_PAT_NONE, _PAT_WINDOWS, _PAT_FENCE = 0, 1, 2
_PLANE_NONE, _PLANE_X, _PLANE_Z = 0, 1, 2


@dataclass
class Scene:
    """A composed scene: what both renderers need.

    ``instances`` int32 [H,W] indexes the per-instance tables; ``labels`` uint8 [H,W] trainIds (255 = void).
    """

    instances: np.ndarray
    material: np.ndarray  # int16 [N]
    face: np.ndarray  # uint8 [N] FRONT / LEFT_FACING / RIGHT_FACING / FLAT
    depth: np.ndarray  # float32 [N] metres (0 for ground and sky: per-pixel depth from the row)
    horizon: float
    vanish_x: float
    focal: float
    cam_height: float

    @property
    def labels(self) -> np.ndarray:
        return _MAT_CLASS[self.material[self.instances]]


@dataclass
class _Canvas:
    """Painter's-order drawing on the instance map; each ``new`` call registers one instance."""

    h: int
    w: int
    horizon: float
    vanish_x: float
    focal: float
    cam_height: float
    inst: np.ndarray = field(init=False)
    material: list[int] = field(default_factory=list)
    face: list[int] = field(default_factory=list)
    depth: list[float] = field(default_factory=list)
    # Planar pattern info per instance: (plane kind, plane coordinate, pattern kind, part instance, p1..p4)
    plane: dict[int, tuple] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.inst = np.zeros((self.h, self.w), dtype=np.int32)

    def new(self, mat: str, depth: float = 0.0, face: int = FRONT) -> int:
        self.material.append(_MAT[mat])
        self.face.append(face)
        self.depth.append(depth)
        return len(self.material) - 1

    # --- projection --------------------------------------------------------------------------------------------
    def proj(self, x: float, y: float, z: float) -> np.ndarray:
        """World point (X, Y, Z) -> pixel (x, y) float [2]."""
        k = self.focal / z
        return np.array((self.vanish_x + k * x, self.horizon + k * (self.cam_height - y)))

    def scale(self, z: float) -> float:
        return self.focal / z

    # --- primitives ---------------------------------------------------------------------------------------------
    def poly(self, pts: np.ndarray, inst: int) -> None:
        cv2.fillPoly(self.inst, [np.round(pts).astype(np.int32).reshape(-1, 1, 2)], (inst,))

    def world_quad(self, corners: list[tuple[float, float, float]], inst: int) -> None:
        """Fill the projection of a planar world polygon, corners [(X, Y, Z), ...]."""
        c = np.array(corners, dtype=np.float64)
        k = self.focal / c[:, 2]
        px = np.stack((self.vanish_x + k * c[:, 0], self.horizon + k * (self.cam_height - c[:, 1])), axis=1)
        self.poly(px, inst)

    def box2d(self, x0: float, y0: float, x1: float, y1: float, inst: int) -> None:
        """Axis-aligned pixel box, at least one pixel wide/high (thin poles stay visible)."""
        xa, xb = sorted((x0, x1))
        ya, yb = sorted((y0, y1))
        xa, xb = int(np.floor(xa + 0.5)), max(int(np.floor(xa + 0.5)), int(np.floor(xb + 0.5)) - 1)
        ya, yb = int(np.floor(ya + 0.5)), max(int(np.floor(ya + 0.5)), int(np.floor(yb + 0.5)) - 1)
        cv2.rectangle(self.inst, (xa, ya), (xb, yb), (inst,), thickness=-1)

    def disc(self, cx: float, cy: float, r: float, inst: int, thickness: int = -1) -> None:
        cv2.circle(self.inst, (int(round(cx)), int(round(cy))), max(1, int(round(r))), (inst,), thickness)

    def ellipse(self, cx: float, cy: float, ax: float, ay: float, inst: int) -> None:
        axes = (max(1, int(round(ax))), max(1, int(round(ay))))
        cv2.ellipse(self.inst, (int(round(cx)), int(round(cy))), axes, 0, 0, 360, (inst,), -1)

    def line(self, p0: np.ndarray, p1: np.ndarray, thickness: float, inst: int) -> None:
        t = max(1, int(round(thickness)))
        cv2.line(self.inst, tuple(int(round(v)) for v in p0), tuple(int(round(v)) for v in p1), (inst,), t)

    def scene(self) -> Scene:
        return Scene(
            instances=self.inst,
            material=np.array(self.material, dtype=np.int16),
            face=np.array(self.face, dtype=np.uint8),
            depth=np.array(self.depth, dtype=np.float32),
            horizon=self.horizon,
            vanish_x=self.vanish_x,
            focal=self.focal,
            cam_height=self.cam_height,
        )


# ---------------------------------------------------------------------------------------------------------------
# Scene composition
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScenePrior:
    """What a domain's streets contain and how its camera sees them: the *content* part of the shift.

    GTA5 and Cityscapes differ in more than looks: camera height and field of view (so the horizon row and object
    scale), the ego-vehicle bonnet Cityscapes keeps in every frame, and class frequencies (GTA5 has more vehicles and
    taller buildings, Cityscapes more pedestrians, cyclists and trees). Ranges are uniform draws per scene.
    """

    horizon: tuple[float, float]  # horizon row / image height
    focal: tuple[float, float]  # focal length / image width (larger = narrower view, larger objects)
    cam_height: tuple[float, float]  # metres
    hood: tuple[float, float]  # ego-vehicle bonnet height at the centre / image height (0 = none)
    vehicle_p: float  # chance that a slot in a lane holds a vehicle
    bus_p: float  # of those vehicles, buses
    truck_p: float  # and trucks
    parking_p: float  # chance of a parking lane
    pedestrians: int  # at most this many per sidewalk (uniform 0..n-1)
    tree_p: float  # chance of a row of trees along a sidewalk
    rider_p: float  # chance of a cyclist / motorcyclist on each road edge side (right; left gets half)
    building_height: tuple[float, float]  # metres


SCENE_PRIORS: dict[str, ScenePrior] = {
    # game: varied, wide-angle cameras, traffic-heavy streets, few pedestrians, tall buildings
    "source": ScenePrior(
        horizon=(0.34, 0.48),
        focal=(0.8, 1.05),
        cam_height=(1.5, 2.1),
        hood=(0.0, 0.0),
        vehicle_p=0.62,
        bus_p=0.08,
        truck_p=0.1,
        parking_p=0.4,
        pedestrians=4,
        tree_p=0.45,
        rider_p=0.35,
        building_height=(8.0, 32.0),
    ),
    # city: one car-mounted camera (low, narrower view, bonnet at the bottom), pedestrians, cyclists and trees
    "target": (
        TARGET_PRIOR := ScenePrior(
            horizon=(0.4, 0.47),
            focal=(1.05, 1.3),
            cam_height=(1.15, 1.4),
            hood=(0.05, 0.09),
            vehicle_p=0.45,
            bus_p=0.04,
            truck_p=0.05,
            parking_p=0.65,
            pedestrians=9,
            tree_p=0.75,
            rider_p=0.65,
            building_height=(9.0, 22.0),
        )
    ),
    # the pretext world (ImageNet / COCO analogue): any camera, any street, between and beyond the two domains
    "pretrain": ScenePrior(
        horizon=(0.3, 0.55),
        focal=(0.7, 1.4),
        cam_height=(1.1, 2.4),
        hood=(0.0, 0.08),
        vehicle_p=0.55,
        bus_p=0.06,
        truck_p=0.08,
        parking_p=0.5,
        pedestrians=7,
        tree_p=0.6,
        rider_p=0.5,
        building_height=(6.0, 32.0),
    ),
    # the new-camera benchmark (deployment's --adapt-bn): the target city seen by another camera, which no training
    # stage sees. Same streets as "target" (class frequencies, buildings), but a roof / dashboard camera mounted
    # higher (1.7-2.2 m: a van or bus), a wider lens (0.8-0.95 x width: objects about 0.75x the target's size) and
    # no bonnet in view; the horizon moves accordingly. Chosen before anything was measured on it: a geometry
    # change that BN statistics can partly follow (object scale) next to one they cannot (viewpoint).
    "newcamera": replace(TARGET_PRIOR, horizon=(0.36, 0.44), focal=(0.8, 0.95), cam_height=(1.7, 2.2), hood=(0.0, 0.0)),
}
STYLES = ("synth2real", "pretrain", "newcamera")


def _ego_hood(cv: _Canvas, rng: np.random.Generator, height: float) -> None:
    """The ego-vehicle bonnet (void, like Cityscapes' "ego vehicle"): a flat arc across the bottom rows."""
    if height <= 0:
        return
    xs = np.linspace(-0.1, 1.1, 25) * cv.w
    centre = cv.w * rng.uniform(0.45, 0.55)
    bulge = 1 - ((xs - centre) / (0.75 * cv.w)) ** 2  # highest at the centre, down to the corners
    top = cv.h - height * cv.h * np.clip(bulge, 0.25, 1.0)
    pts = np.concatenate([np.stack([xs, top], 1), [[xs[-1], cv.h + 1], [xs[0], cv.h + 1]]])
    cv.poly(pts, cv.new("ego_hood", face=FLAT))


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Depths drawn log-uniformly: as many objects per octave of distance, like a real street."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _ground_layer(
    cv: _Canvas,
    rng: np.random.Generator,
    road_l: float,
    road_r: float,
    sw_l: float,
    sw_r: float,
    z_near: float,
    z_far: float,
) -> tuple[int, int]:
    """Sky above the horizon, terrain below, then sidewalks and road as strips converging to the vanishing point."""
    sky = cv.new("sky", face=FLAT)
    cv.inst[:] = sky
    terrain = cv.new("terrain", face=FLAT)
    top = int(np.floor(cv.horizon + 0.5))
    cv.inst[max(top, 0) :] = terrain

    def strip(x0: float, x1: float, inst: int) -> None:
        cv.world_quad([(x0, 0, z_near), (x1, 0, z_near), (x1, 0, z_far), (x0, 0, z_far)], inst)

    sidewalk = cv.new("sidewalk", face=FLAT)
    strip(-road_l - sw_l, -road_l, sidewalk)
    strip(road_r, road_r + sw_r, sidewalk)
    road = cv.new("road", face=FLAT)
    strip(-road_l, road_r, road)
    return road, sidewalk


def _ground_patterns(
    cv: _Canvas, rng: np.random.Generator, road: int, sidewalk: int, road_l: float, road_r: float, lane_x: list[float]
) -> None:
    """Lane markings, crossings and curbs, evaluated on ground coordinates of every road/sidewalk pixel."""
    top = int(np.ceil(cv.horizon + 0.5))
    if top >= cv.h:
        return
    sub = cv.inst[top:]
    rows = np.arange(top, cv.h, dtype=np.float32)[:, None]
    z = cv.focal * cv.cam_height / (rows - cv.horizon)  # [h,1] metres
    x = (np.arange(cv.w, dtype=np.float32)[None, :] - cv.vanish_x) * z / cv.focal  # [h,w]
    on_road = sub == road
    mark = np.zeros_like(on_road)
    dash_len, dash_on = rng.uniform(6, 12), rng.uniform(0.3, 0.5)
    phase = rng.uniform(0, 1)
    for lx in lane_x:  # a handful of lines, vectorized over pixels
        mark |= (np.abs(x - lx) < 0.08) & ((z / dash_len + phase) % 1.0 < dash_on)
    for ex in (-road_l + 0.35, road_r - 0.35):
        mark |= np.abs(x - ex) < 0.08
    if rng.random() < 0.35:  # zebra crossing
        z0 = rng.uniform(10, 25)
        mark |= (z > z0) & (z < z0 + 3.5) & ((x / 1.0) % 1.0 < 0.5)
    mark &= on_road
    if mark.any():
        sub[mark] = cv.new("lane_mark", face=FLAT)
    curb = (sub == sidewalk) & ((np.abs(x + road_l) < 0.25) | (np.abs(x - road_r) < 0.25))
    if curb.any():
        sub[curb] = cv.new("curb", face=FLAT)


def _planar(cv: _Canvas, inst: int, plane: int, coord: float, pattern: int, part: int, *params: float) -> None:
    cv.plane[inst] = (plane, coord, pattern, part, *params)


def _frac(x: np.ndarray) -> np.ndarray:
    return x - np.floor(x)


def _apply_plane_patterns(cv: _Canvas) -> None:
    """Windows on facades, slats on fences: periodic in the plane's own metric coordinates, so they shrink with
    perspective. One vectorized pass over every pixel of a patterned instance."""
    if not cv.plane:
        return
    n = len(cv.material)
    table = np.zeros((n, 8), dtype=np.float32)
    has = np.zeros(n, dtype=bool)
    for i, p in cv.plane.items():
        table[i, : len(p)] = p
        has[i] = True
    flat = cv.inst.reshape(-1)
    idx = np.flatnonzero(has[flat])
    if idx.size == 0:
        return
    t = table[flat[idx]]  # [P,8] per-pixel plane parameters
    py = idx // cv.w
    dx = (idx - py * cv.w).astype(np.float32) + (0.5 - cv.vanish_x)
    dy = py.astype(np.float32) + (0.5 - cv.horizon)
    on_x = t[:, 0] == _PLANE_X
    coord = t[:, 1]
    dx[on_x & (np.abs(dx) < 1e-3)] = 1e-3
    z = np.where(on_x, cv.focal * coord / dx, coord)  # depth of the pixel on its plane
    u = np.where(on_x, z, dx * z / cv.focal)  # metres along the plane
    v = cv.cam_height - dy * z / cv.focal  # metres above the ground
    pattern, p1, p2, p3, p4 = t[:, 2], t[:, 4], t[:, 5], t[:, 6], t[:, 7]
    # windows: p1 column spacing, p2 floor height, p3 window width fraction, p4 facade top
    fv = _frac(v / p2)
    win = (pattern == _PAT_WINDOWS) & (_frac(u / p1) < p3) & (fv > 0.35) & (fv < 0.8) & (v > p2 * 0.9) & (v < p4 - 0.6)
    # fence frame: p1 post spacing, p2 fence height
    fence = (pattern == _PAT_FENCE) & (
        (_frac(u / p1) < 0.07) | (np.abs(v - 0.12 * p2) < 0.06) | (np.abs(v - 0.88 * p2) < 0.06)
    )
    hit = win | fence
    flat[idx[hit]] = t[hit, 3].astype(np.int32)


def _facade(
    cv: _Canvas, rng: np.random.Generator, side: int, x_f: float, z1: float, z2: float, height: float, kind: str
) -> None:
    """A wall/building/fence plane along the street at lateral ``side * x_f`` from ``z1`` (near) to ``z2``."""
    face = LEFT_FACING if side > 0 else RIGHT_FACING  # a right-side facade faces left
    xs = side * x_f
    if kind == "building":
        inst = cv.new("building", depth=z1, face=face)
        # front face (towards the camera) at the near end, seen where the nearer block is lower
        front = cv.new("building", depth=z1, face=FRONT)
        cv.world_quad([(xs, 0, z1), (xs, height, z1), (xs + side * 12, height, z1), (xs + side * 12, 0, z1)], front)
        spacing, floor_h = rng.uniform(2.5, 4.5), rng.uniform(2.8, 3.6)
        win = cv.new("window", depth=z1, face=face)
        _planar(cv, inst, _PLANE_X, xs, _PAT_WINDOWS, win, spacing, floor_h, rng.uniform(0.35, 0.6), height)
        winf = cv.new("window", depth=z1, face=FRONT)
        _planar(cv, front, _PLANE_Z, z1, _PAT_WINDOWS, winf, spacing, floor_h, rng.uniform(0.35, 0.6), height)
    elif kind == "fence":
        inst = cv.new("fence", depth=z1, face=face)
        _planar(
            cv,
            inst,
            _PLANE_X,
            xs,
            _PAT_FENCE,
            cv.new("fence_frame", depth=z1, face=face),
            rng.uniform(1.5, 2.5),
            height,
        )
    elif kind == "hedge":
        inst = cv.new("vegetation", depth=z1, face=face)
    else:
        inst = cv.new(kind, depth=z1, face=face)
    cv.world_quad([(xs, 0, z1), (xs, height, z1), (xs, height, z2), (xs, 0, z2)], inst)


def _tree(cv: _Canvas, rng: np.random.Generator, x: float, z: float) -> None:
    s = cv.scale(z)
    trunk_h = rng.uniform(2.0, 3.5)
    trunk = cv.new("trunk", depth=z)
    foot = cv.proj(x, 0, z)
    cv.box2d(foot[0] - 0.14 * s, foot[1], foot[0] + 0.14 * s, foot[1] - trunk_h * s, trunk)
    crown = cv.new("vegetation", depth=z)
    r = rng.uniform(1.4, 2.8)
    n = int(rng.integers(3, 6))
    offs = rng.uniform(-1, 1, size=(n, 2)) * r * 0.6
    for ox, oy in offs:
        c = cv.proj(x + ox, trunk_h + r * 0.8 + oy, z)
        cv.disc(c[0], c[1], r * s * rng.uniform(0.6, 0.9), crown)


def _pole(cv: _Canvas, rng: np.random.Generator, x: float, z: float, road_edge: float) -> None:
    """A pole, sometimes with a traffic light (on top or on an arm over the road) and/or a sign."""
    s = cv.scale(z)
    height = rng.uniform(4.0, 7.5)
    pole = cv.new("pole", depth=z)
    half = max(0.5, 0.09 * s)
    foot = cv.proj(x, 0, z)
    cv.box2d(foot[0] - half, foot[1], foot[0] + half, foot[1] - height * s, pole)
    r = rng.random()
    if r < 0.45:
        on_arm = rng.random() < 0.4
        bx = x
        top = height
        if on_arm:  # arm towards the road centre, light hangs from it
            bx = road_edge - np.sign(x) * rng.uniform(1.5, 3.5)
            p0, p1 = cv.proj(x, height - 0.2, z), cv.proj(bx, height - 0.2, z)
            cv.line(p0, p1, max(1.0, 0.12 * s), pole)
            top = height - 0.2
        box = cv.new("tl_box", depth=z)
        c0, c1 = cv.proj(bx - 0.2, top - 1.0, z), cv.proj(bx + 0.2, top, z)
        cv.box2d(c0[0], c0[1], c1[0], c1[1], box)
        lit = cv.new("lamp_red" if rng.random() < 0.5 else "lamp_green", depth=z)
        ly = top - 0.2 if cv.material[lit] == _MAT["lamp_red"] else top - 0.8
        c = cv.proj(bx, ly, z)
        cv.disc(c[0], c[1], 0.12 * s, lit)
    if r > 0.3:
        sign_y = rng.uniform(2.2, 3.0) if r < 0.75 else height - 0.5
        size = rng.uniform(0.55, 0.8)
        c = cv.proj(x, sign_y, z)
        rad = size * s / 2
        back = rng.random() < 0.25
        shape = int(rng.integers(3))
        if back:
            sign = cv.new("sign_back", depth=z)
            cv.box2d(c[0] - rad, c[1] - rad, c[0] + rad, c[1] + rad, sign)
        elif shape == 0:  # round prohibition sign
            cv.disc(c[0], c[1], rad, cv.new("sign_red", depth=z))
            cv.disc(c[0], c[1], rad * 0.65, cv.new("sign_white", depth=z))
        elif shape == 1:  # blue rectangle
            cv.box2d(c[0] - rad, c[1] - rad * 0.8, c[0] + rad, c[1] + rad * 0.8, cv.new("sign_blue", depth=z))
        else:  # warning triangle
            tri = np.array([[c[0], c[1] - rad], [c[0] + rad, c[1] + rad * 0.8], [c[0] - rad, c[1] + rad * 0.8]])
            cv.poly(tri, cv.new("sign_red", depth=z))
            cv.poly(c + (tri - c) * 0.55, cv.new("sign_white", depth=z))


def _vehicle(cv: _Canvas, rng: np.random.Generator, kind: str, x: float, z: float) -> None:
    """A box-like vehicle seen from behind (or the front) plus its side towards the camera axis.

    Part sizes in metres: width w, height h, length L; glass and tyres are separate materials of the same class.
    """
    dims = {"car": (1.8, 1.45, 4.3), "truck": (2.45, 3.4, 8.0), "bus": (2.55, 3.1, 12.0), "train": (2.65, 3.6, 28.0)}
    w, h, length = dims[kind]
    w *= rng.uniform(0.92, 1.08)
    h *= rng.uniform(0.9, 1.1)
    length *= rng.uniform(0.9, 1.1)
    body_mat, glass_mat = f"{kind}_body", f"{kind}_glass"
    tyre_mat = {"car": "car_tyre", "truck": "truck_tyre", "bus": "bus_tyre", "train": "train_body"}[kind]
    side_x = x - w / 2 if x > 0 else x + w / 2  # side plane facing the camera axis
    show_side = abs(x) > w / 2
    face = RIGHT_FACING if x < 0 else LEFT_FACING
    body = cv.new(body_mat, depth=z, face=face)
    glass = cv.new(glass_mat, depth=z, face=face)
    tyre = cv.new(tyre_mat, depth=z, face=face)
    if show_side:
        z2 = z + length
        if kind == "car":
            cv.world_quad([(side_x, 0.2, z), (side_x, 0.62 * h, z), (side_x, 0.62 * h, z2), (side_x, 0.2, z2)], body)
            cv.world_quad(
                [
                    (side_x, 0.6 * h, z + 0.18 * length),
                    (side_x, h, z + 0.3 * length),
                    (side_x, h, z + 0.7 * length),
                    (side_x, 0.6 * h, z + 0.85 * length),
                ],
                body,
            )
            cv.world_quad(
                [
                    (side_x, 0.64 * h, z + 0.24 * length),
                    (side_x, 0.94 * h, z + 0.33 * length),
                    (side_x, 0.94 * h, z + 0.68 * length),
                    (side_x, 0.64 * h, z + 0.8 * length),
                ],
                glass,
            )
            wheels = (0.17, 0.83)
        elif kind == "truck":
            cv.world_quad(
                [(side_x, 0.55, z), (side_x, h, z), (side_x, h, z + 0.74 * length), (side_x, 0.55, z + 0.74 * length)],
                body,
            )
            cab = cv.new(body_mat, depth=z, face=face)
            cv.world_quad(
                [
                    (side_x, 0.5, z + 0.76 * length),
                    (side_x, 0.78 * h, z + 0.76 * length),
                    (side_x, 0.78 * h, z + length),
                    (side_x, 0.5, z + length),
                ],
                cab,
            )
            cv.world_quad(
                [
                    (side_x, 0.5 * h, z + 0.8 * length),
                    (side_x, 0.72 * h, z + 0.8 * length),
                    (side_x, 0.72 * h, z + 0.97 * length),
                    (side_x, 0.5 * h, z + 0.97 * length),
                ],
                glass,
            )
            wheels = (0.12, 0.25, 0.88)
        else:  # bus / train: a long box with a window band
            cv.world_quad([(side_x, 0.3, z), (side_x, h, z), (side_x, h, z2), (side_x, 0.3, z2)], body)
            cv.world_quad(
                [
                    (side_x, 0.42 * h, z + 0.03 * length),
                    (side_x, 0.8 * h, z + 0.03 * length),
                    (side_x, 0.8 * h, z + 0.97 * length),
                    (side_x, 0.42 * h, z + 0.97 * length),
                ],
                glass,
            )
            if kind == "train":  # pillars between windows
                for k in range(1, 12):
                    zk = z + length * k / 12
                    cv.world_quad(
                        [
                            (side_x, 0.4 * h, zk - 0.25),
                            (side_x, 0.82 * h, zk - 0.25),
                            (side_x, 0.82 * h, zk + 0.25),
                            (side_x, 0.4 * h, zk + 0.25),
                        ],
                        body,
                    )
            wheels = (0.15, 0.85) if kind == "bus" else ()
        for wz in wheels:
            zc = z + wz * length
            r = 0.34 if kind == "car" else 0.5
            c = cv.proj(side_x, r, zc)
            ax = abs(cv.proj(side_x, r, zc - r)[0] - cv.proj(side_x, r, zc + r)[0]) / 2
            cv.ellipse(c[0], c[1], ax, r * cv.scale(zc), tyre)
    # rear (or front) face at depth z, drawn last: it is the nearest surface
    rear = cv.new(body_mat, depth=z, face=FRONT)
    if kind == "car":
        cv.world_quad(
            [(x - w / 2, 0.2, z), (x + w / 2, 0.2, z), (x + w / 2, 0.62 * h, z), (x - w / 2, 0.62 * h, z)], rear
        )
        cv.world_quad(
            [(x - 0.46 * w, 0.6 * h, z), (x + 0.46 * w, 0.6 * h, z), (x + 0.36 * w, h, z), (x - 0.36 * w, h, z)], rear
        )
        cv.world_quad(
            [
                (x - 0.38 * w, 0.65 * h, z),
                (x + 0.38 * w, 0.65 * h, z),
                (x + 0.3 * w, 0.93 * h, z),
                (x - 0.3 * w, 0.93 * h, z),
            ],
            cv.new(glass_mat, depth=z, face=FRONT),
        )
        for sx in (-1, 1):
            cv.world_quad(
                [
                    (x + sx * 0.48 * w, 0, z),
                    (x + sx * 0.3 * w, 0, z),
                    (x + sx * 0.3 * w, 0.3, z),
                    (x + sx * 0.48 * w, 0.3, z),
                ],
                tyre,
            )
    else:
        bottom = 0.3 if kind != "truck" else 0.55
        cv.world_quad([(x - w / 2, bottom, z), (x + w / 2, bottom, z), (x + w / 2, h, z), (x - w / 2, h, z)], rear)
        if kind in ("bus", "train"):
            top_g = 0.9 if kind == "train" else 0.85
            cv.world_quad(
                [
                    (x - 0.42 * w, 0.45 * h, z),
                    (x + 0.42 * w, 0.45 * h, z),
                    (x + 0.42 * w, top_g * h, z),
                    (x - 0.42 * w, top_g * h, z),
                ],
                cv.new(glass_mat, depth=z, face=FRONT),
            )
        if kind != "train":
            for sx in (-1, 1):
                cv.world_quad(
                    [
                        (x + sx * 0.48 * w, 0, z),
                        (x + sx * 0.28 * w, 0, z),
                        (x + sx * 0.28 * w, bottom, z),
                        (x + sx * 0.48 * w, bottom, z),
                    ],
                    tyre,
                )


def _person(
    cv: _Canvas,
    rng: np.random.Generator,
    x: float,
    z: float,
    rider: bool = False,
    seat: tuple[float, float] | None = None,
) -> None:
    """A walking person (or, with ``seat`` = (X offset, seat height), a rider leaning to the handlebar)."""
    s = cv.scale(z)
    prefix = "rider" if rider else "person"
    cloth = cv.new(f"{prefix}_cloth", depth=z)
    pants = cv.new(f"{prefix}_pants", depth=z)
    skin = cv.new(f"{prefix}_skin", depth=z)
    height = rng.uniform(1.6, 1.9)
    p = lambda dx, y: cv.proj(x + dx, y, z)  # noqa: E731 - local shorthand for readability
    if seat is None:
        stride = rng.uniform(0.0, 0.25)
        hip = 0.5 * height
        for sx in (-1, 1):
            cv.poly(
                np.array([p(sx * 0.02, hip), p(sx * 0.14, hip), p(sx * (0.06 + stride), 0), p(sx * stride, 0)]), pants
            )
        sh = 0.82 * height
        cv.poly(np.array([p(-0.15, hip - 0.02), p(0.15, hip - 0.02), p(0.21, sh), p(-0.21, sh)]), cloth)
        for sx in (-1, 1):
            cv.poly(
                np.array([p(sx * 0.2, sh), p(sx * 0.28, sh - 0.05), p(sx * 0.27, hip + 0.02), p(sx * 0.2, hip + 0.02)]),
                cloth,
            )
            c = p(sx * 0.24, hip - 0.02)
            cv.disc(c[0], c[1], 0.045 * s, skin)
        head = p(0, height - 0.12)
        cv.disc(head[0], head[1], 0.12 * s, skin)
    else:
        sx_off, seat_y = seat
        hip = p(sx_off, seat_y)
        fwd = -np.sign(sx_off) if sx_off != 0 else 1.0  # facing the handlebar
        knee = p(sx_off + fwd * 0.35, seat_y - 0.1)
        foot = p(sx_off + fwd * 0.3, seat_y - 0.55)
        cv.line(hip, knee, 0.14 * s, pants)
        cv.line(knee, foot, 0.12 * s, pants)
        sh = p(sx_off + fwd * 0.28, seat_y + 0.62)
        cv.poly(
            np.array(
                [
                    p(sx_off - fwd * 0.12, seat_y),
                    p(sx_off + fwd * 0.12, seat_y),
                    sh + np.array([fwd * 0.1 * s, 0]),
                    sh - np.array([fwd * 0.1 * s, 0]),
                ]
            ),
            cloth,
        )
        hand = p(sx_off + fwd * 0.68, seat_y + 0.18)
        cv.line(sh, hand, 0.09 * s, cloth)
        head = p(sx_off + fwd * 0.34, seat_y + 0.8)
        cv.disc(head[0], head[1], 0.12 * s, skin)
        cv.disc(head[0], head[1] - 0.04 * s, 0.12 * s, cv.new("rider_helmet", depth=z))


def _two_wheeler(cv: _Canvas, rng: np.random.Generator, kind: str, x: float, z: float, ridden: bool) -> None:
    """Bicycle (thin rings and frame) or motorcycle (filled wheels and body), side view, optionally ridden."""
    s = cv.scale(z)
    facing = 1.0 if rng.random() < 0.5 else -1.0
    p = lambda dx, y: cv.proj(x + dx, y, z)  # noqa: E731
    if kind == "bicycle":
        frame = cv.new("bike_frame", depth=z)
        tyre = cv.new("bike_tyre", depth=z)
        r = 0.34
        back, front = p(-facing * 0.52, r), p(facing * 0.52, r)
        for c in (back, front):
            cv.disc(c[0], c[1], r * s, tyre, thickness=max(1, int(round(0.06 * s))))
        seat, bar, crank = p(-facing * 0.2, 0.95), p(facing * 0.4, 1.0), p(0, 0.3)
        t = max(1.0, 0.05 * s)
        for a, b in ((back, seat), (seat, crank), (crank, back), (seat, bar), (bar, front), (crank, bar)):
            cv.line(a, b, t, frame)
        seat_h = 1.0
    else:
        body = cv.new("moto_body", depth=z)
        tyre = cv.new("moto_tyre", depth=z)
        r = 0.32
        for dx in (-0.7, 0.7):
            c = p(facing * dx, r)
            cv.disc(c[0], c[1], r * s, tyre)
        cv.poly(
            np.array(
                [
                    p(-facing * 0.75, 0.55),
                    p(-facing * 0.3, 0.85),
                    p(facing * 0.45, 0.95),
                    p(facing * 0.7, 0.65),
                    p(facing * 0.2, 0.3),
                    p(-facing * 0.35, 0.35),
                ]
            ),
            body,
        )
        seat_h = 0.9
    if ridden:
        _person(cv, rng, x, z, rider=True, seat=(-facing * 0.2, seat_h))


def compose_scene(rng: np.random.Generator, width: int, height: int, domain: str = "source") -> Scene:
    """Draw one street scene (instances + camera) from ``rng`` with ``domain``'s scene prior (``SCENE_PRIORS``)."""
    pr = SCENE_PRIORS[domain]
    horizon = height * rng.uniform(*pr.horizon)
    vanish_x = width * (0.5 + rng.uniform(-0.08, 0.08))
    focal = width * rng.uniform(*pr.focal)
    cam_h = rng.uniform(*pr.cam_height)
    hood = rng.uniform(*pr.hood)
    cv = _Canvas(height, width, horizon, vanish_x, focal, cam_h)
    z_bottom = focal * cam_h / (height - horizon)  # ground depth at the bottom row
    z_near, z_far, z_end = max(1.0, 0.35 * z_bottom), 3000.0, rng.uniform(90, 220)

    n_lanes = int(rng.integers(2, 5))
    lane_w = rng.uniform(3.0, 3.6)
    ego_lane = int(rng.integers(n_lanes))
    road_l = (ego_lane + 0.5) * lane_w + rng.uniform(-0.4, 0.4)
    road_r = n_lanes * lane_w - road_l
    parking = rng.random() < pr.parking_p  # a parking lane widens the road on one side
    if parking:
        road_r += 2.2
    sw_l, sw_r = rng.uniform(2.0, 4.5), rng.uniform(2.0, 4.5)
    lane_x = [-road_l + k * lane_w for k in range(1, n_lanes)]
    road, sidewalk = _ground_layer(cv, rng, road_l, road_r, sw_l, sw_r, z_near, z_far)
    _ground_patterns(cv, rng, road, sidewalk, road_l, road_r, lane_x)

    # --- skyline at the end of the street: blocks and tree clumps across the whole width ---------------------
    half_span = (width / focal) * z_end * 1.2
    xb = -half_span
    while xb < half_span:
        bw = rng.uniform(8, 30)
        if rng.random() < 0.22:
            crown = cv.new("vegetation", depth=z_end)
            c = cv.proj(xb + bw / 2, rng.uniform(4, 9), z_end)
            cv.ellipse(c[0], c[1], bw / 2 * cv.scale(z_end), rng.uniform(4, 9) * cv.scale(z_end), crown)
        else:
            bh = rng.uniform(8, 40)
            block = cv.new("building", depth=z_end, face=FRONT)
            cv.world_quad([(xb, 0, z_end), (xb + bw, 0, z_end), (xb + bw, bh, z_end), (xb, bh, z_end)], block)
        xb += bw
    # grass strip between sidewalk and facades on some sides: terrain already covers the ground beyond the
    # sidewalk, so the strip only moves the facades outwards
    setback = {}
    for side, road_edge, sw in ((-1, road_l, sw_l), (1, road_r, sw_r)):
        grass = rng.uniform(1.0, 6.0) if rng.random() < 0.4 else 0.0
        setback[side] = road_edge + sw + grass

    # --- street-side structures, far to near, per side -----------------------------------------------------
    corridor: list[tuple[float, Callable[[], None]]] = []
    for side in (-1, 1):
        x_base = setback[side]
        z = z_end
        segments: list[tuple[float, float]] = []
        while z > z_near:
            length = rng.uniform(8, 30)
            segments.append((max(z - length, z_near), z))
            z -= length
        for z1, z2 in segments:  # built far to near: the painter's order
            kind = rng.choice(["building", "building", "building", "vegetation", "gap"], p=[0.3, 0.3, 0.2, 0.12, 0.08])
            x_f = x_base + rng.uniform(0, 2.5)
            if kind == "building":
                _facade(cv, rng, side, x_f, z1, z2, rng.uniform(*pr.building_height), "building")
            elif kind == "vegetation":
                _facade(cv, rng, side, x_f + 4, z1, z2, rng.uniform(5, 10), "hedge")
            front_kind = rng.choice(["none", "wall", "fence", "hedge"], p=[0.55, 0.17, 0.17, 0.11])
            if front_kind != "none":
                _facade(cv, rng, side, x_base - 0.3, z1, z2, rng.uniform(1.0, 2.4), str(front_kind))
    _apply_plane_patterns(cv)

    # --- objects in the street corridor, collected then drawn far to near ----------------------------------
    def add(zz: float, fn: Callable[..., None], *args) -> None:
        corridor.append((zz, lambda: fn(cv, rng, *args)))

    z_min_obj = 0.8 * z_bottom
    for side, road_edge, sw in ((-1, road_l, sw_l), (1, road_r, sw_r)):
        outer = road_edge + sw
        zp = rng.uniform(z_min_obj, z_min_obj + 15)
        spacing = rng.uniform(12, 30)
        while zp < 120:
            add(zp, _pole, side * (outer - 0.5), zp, side * road_edge)
            zp += spacing * rng.uniform(0.7, 1.3)
        if rng.random() < pr.tree_p:
            zt = rng.uniform(z_min_obj, z_min_obj + 10)
            while zt < 100:
                add(zt + 0.01, _tree, side * (outer - rng.uniform(0.6, 1.5)), zt)
                zt += rng.uniform(8, 20)
        for _ in range(int(rng.integers(0, pr.pedestrians))):  # pedestrians on the sidewalk
            zz = _log_uniform(rng, z_min_obj, 70)
            add(zz, _person, side * (road_edge + rng.uniform(0.4, sw - 0.3)), zz)
        if rng.random() < 0.3:  # parked two-wheelers
            zz = _log_uniform(rng, z_min_obj, 40)
            add(zz, _two_wheeler, str(rng.choice(["bicycle", "motorcycle"])), side * (road_edge + 0.8), zz, False)
        if rng.random() < 0.3:  # street furniture: void ("static") boxes
            zz = _log_uniform(rng, z_min_obj, 50)
            add(zz, _static_box, side * (outer - 0.6), zz)
    if rng.random() < 0.15:  # someone crossing
        zz = _log_uniform(rng, z_min_obj + 3, 50)
        add(zz, _person, rng.uniform(-road_l, road_r), zz)

    lane_centres = [-road_l + (k + 0.5) * lane_w for k in range(n_lanes)]
    for lc in lane_centres:
        zz = rng.uniform(z_min_obj + 2, 14)
        while zz < 150:
            r = rng.random()
            if r < pr.bus_p:
                kind = "bus"
            elif r < pr.bus_p + pr.truck_p:
                kind = "truck"
            else:
                kind = "car"
            if rng.random() < pr.vehicle_p:
                add(zz, _vehicle, kind, lc + rng.uniform(-0.3, 0.3), zz)
            zz += rng.uniform(10, 40)
    if parking:  # parked cars along the right edge
        zz = rng.uniform(z_min_obj, z_min_obj + 8)
        while zz < 90:
            if rng.random() < 0.7:
                add(zz, _vehicle, "car", road_r - 1.1, zz)
            zz += rng.uniform(5, 9)
    if rng.random() < pr.rider_p:  # cyclist / motorcyclist near the right road edge
        zz = _log_uniform(rng, z_min_obj + 2, 45)
        add(zz, _two_wheeler, str(rng.choice(["bicycle", "motorcycle"])), road_r - rng.uniform(0.8, 1.6), zz, True)
    if rng.random() < pr.rider_p / 2:
        zz = _log_uniform(rng, z_min_obj + 4, 45)
        add(zz, _two_wheeler, str(rng.choice(["bicycle", "motorcycle"])), -road_l + rng.uniform(1, 2.5), zz, True)
    if rng.random() < 0.08:  # a tram, rare like trains in Cityscapes
        zz = rng.uniform(z_min_obj + 4, 40)
        add(zz, _vehicle, "train", rng.choice(lane_centres), zz)

    corridor.sort(key=lambda item: -item[0])
    for _, draw in corridor:
        draw()
    _ego_hood(cv, rng, hood)
    return cv.scene()


def _static_box(cv: _Canvas, rng: np.random.Generator, x: float, z: float) -> None:
    inst = cv.new("static", depth=z)
    bw, bh = rng.uniform(0.4, 0.9), rng.uniform(0.6, 1.2)
    cv.world_quad([(x - bw / 2, 0, z), (x + bw / 2, 0, z), (x + bw / 2, bh, z), (x - bw / 2, bh, z)], inst)


def render_layout(rng: np.random.Generator, width: int, height: int, domain: str = "source") -> np.ndarray:
    """trainId map uint8 [H,W] of a new scene (255 = void: "static" objects and the target's ego-vehicle bonnet)."""
    return compose_scene(rng, width, height, domain).labels


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def _as_scene(layout: Scene | np.ndarray) -> Scene:
    """Plain trainId maps render with one instance per class (no parts); scenes keep their parts and instances."""
    if isinstance(layout, Scene):
        return layout
    base = {c: i for i, (_n, c, *_r) in reversed(list(enumerate(_MATERIALS)))}  # first material of each class
    lut = np.array([base.get(c, _MAT["static"]) for c in range(256)], dtype=np.int16)
    h, w = layout.shape
    return Scene(
        instances=layout.astype(np.int32),
        material=lut,
        face=np.full(256, FRONT, dtype=np.uint8),
        depth=np.zeros(256, dtype=np.float32),
        horizon=h * 0.42,
        vanish_x=w / 2,
        focal=float(w),
        cam_height=1.6,
    )


def _instance_colours(
    scene: Scene, rng: np.random.Generator, palette: np.ndarray, jitter: np.ndarray, face_gain: np.ndarray
) -> np.ndarray:
    """Per-instance RGB float32 [N,3]: domain mean + brightness and colour jitter, times face shading."""
    mat = scene.material.astype(np.intp)
    n = len(mat)
    j = jitter[mat][:, None]
    offset = (
        rng.standard_normal((n, 1)).astype(np.float32) * j + rng.standard_normal((n, 3)).astype(np.float32) * j * 0.5
    )
    return (palette[mat] + offset) * face_gain[scene.face][:, None]


def _sky_gradient(rows: np.ndarray, horizon: float, zenith: np.ndarray, low: np.ndarray) -> np.ndarray:
    t = np.clip(rows / max(horizon, 1.0), 0, 1)[:, None]  # 0 at the top, 1 at the horizon
    return zenith[None, :] * (1 - t) + low[None, :] * t  # [H,3]


def render_source(layout: Scene | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Game-like rendering, RGB uint8 [H,W,3]: saturated palette, flat faces, fixed sun, no blur, no noise."""
    scene = _as_scene(layout)
    face_gain = np.array([1.0, 0.82, 0.9, 1.0], dtype=np.float32)  # the sun always comes from the left
    colours = _instance_colours(scene, rng, _MAT_RGB["source"], _MAT_JITTER["source"], face_gain)
    colours = np.clip(colours, 0, 255).astype(np.uint8)
    inst = scene.instances
    h = inst.shape[0]
    top = min(h, int(np.ceil(scene.horizon + 0.5)) + 1)  # only rows above the horizon can be sky
    sky = scene.material[inst[:top]] == _MAT["sky"]
    grad = _sky_gradient(
        np.arange(top, dtype=np.float32),
        scene.horizon,
        np.array([70, 140, 240], np.float32),
        np.array([180, 214, 250], np.float32),
    ).astype(np.uint8)  # [top,3]
    planes = []
    for c in range(3):  # colour planes, not a pixel loop
        plane = colours[:, c][inst]
        np.copyto(plane[:top], grad[:, c : c + 1], where=sky)
        planes.append(plane)
    return cv2.merge(planes)


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise float32 [H,W] in about [-1,1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, cells * h // w), max(2, cells)
    grid = rng.uniform(-1, 1, size=(gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _uniform_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Zero-mean unit-variance noise float32 from random bytes (uniform; 4x cheaper than Gaussian)."""
    return (rng.integers(0, 256, size=shape, dtype=np.uint8).astype(np.float32) - 127.5) * (1 / 73.9)


def render_target(
    layout: Scene | np.ndarray,
    rng: np.random.Generator,
    style_shift: float = DEFAULT_STYLE_SHIFT,
    class_shift: float = DEFAULT_CLASS_SHIFT,
) -> np.ndarray:
    """Camera-like rendering, RGB uint8 [H,W,3].

    Shifted palette (interpolated from the source one by ``style_shift``), random exposure, white balance and sun
    side, depth haze, blotchy low-frequency shading, per-material grain, lens blur, sensor noise, JPEG artefacts.
    Per-pixel work is folded into one multiplicative and one additive map and done per colour plane (speed).
    """
    scene = _as_scene(layout)
    k = float(style_shift)
    palette = (1 - k) * _MAT_RGB["source"] + k * _MAT_RGB["target"]
    c = np.float32(class_shift) * _SWAP_MASK[:, None]
    palette = (1 - c) * palette + c * _SWAP_RGB
    jitter = (1 - k) * _MAT_JITTER["source"] + k * _MAT_JITTER["target"]
    sun_left = rng.random() < 0.5
    lit, shade = rng.uniform(0.9, 1.05), rng.uniform(0.55, 0.8)
    face_gain = np.array(
        [rng.uniform(0.8, 1.0), lit if sun_left else shade, shade if sun_left else lit, 1.0], dtype=np.float32
    )
    colours = _instance_colours(scene, rng, palette, jitter, face_gain)
    inst = scene.instances
    h, w = inst.shape
    mat = scene.material[inst]

    # camera: exposure + white balance (per channel), vignetting (per pixel)
    gain = (rng.uniform(0.78, 1.12) * (1 + k * rng.uniform(-0.06, 0.06, size=3))).astype(np.float32)
    xx = (np.arange(w, dtype=np.float32) - w / 2) / (w / 2)
    yy = (np.arange(h, dtype=np.float32) - h / 2) / (h / 2)
    vignette = 1 - 0.09 * k * (xx[None, :] ** 2 + yy[:, None] ** 2)  # [H,W]

    # haze by distance: ground pixels from their row, objects from their depth; sky is left to its gradient
    rows = np.arange(h, dtype=np.float32)[:, None]
    below = rows > scene.horizon + 0.5
    row_depth = scene.focal * scene.cam_height / np.where(below, rows - scene.horizon, 1e-3)
    depth = np.where(_MAT_GROUND[mat], row_depth, scene.depth[inst])
    haze = (1 - np.exp(depth * np.float32(-1 / rng.uniform(70, 220)))) * np.float32(rng.uniform(0.5, 0.85) * k)

    zen = (1 - k) * np.array([70, 140, 240], np.float32) + k * (
        np.array([150, 172, 200], np.float32) + rng.uniform(-15, 30)
    )
    low = (1 - k) * np.array([180, 214, 250], np.float32) + k * (
        np.array([206, 212, 218], np.float32) + rng.uniform(-15, 20)
    )

    # Per colour plane: (colour + grain + sensor noise) * (1 + blotches) * (1 - haze) * vignette * gain
    #                   + haze * vignette * gain * haze colour. Planes keep every op contiguous and 2-D.
    grain = _MAT_GRAIN[mat] * np.float32(k) * _uniform_noise(rng, (h, w))
    mult = (1 + np.float32(0.13 * k) * _value_noise(rng, h, w, 24)) * (1 - haze) * vignette
    add = haze * vignette
    sensor = np.float32(rng.uniform(4, 9) * max(k, 0.3))  # before the blur, which correlates it like demosaicing
    top = min(h, int(np.ceil(scene.horizon + 0.5)) + 1)  # only rows above the horizon can be sky
    sky = mat[:top] == _MAT["sky"]
    sky_grad = _sky_gradient(rows[:top, 0], scene.horizon, zen, low)  # [top,3]
    clouds = np.float32(18 * k) * _value_noise(rng, top, w, 10) if top > 0 else None
    planes = []
    for c in range(3):  # three colour planes, not a pixel loop
        plane = colours[:, c][inst]
        plane += grain
        plane += _uniform_noise(rng, (h, w)) * sensor
        plane *= mult
        plane *= gain[c]
        plane += add * (low[c] * gain[c])
        if top > 0:
            sky_plane = (sky_grad[:, c : c + 1] + clouds) * vignette[:top] * gain[c]
            np.copyto(plane[:top], sky_plane, where=sky)
        planes.append(np.clip(plane, 0, 255, out=plane).astype(np.uint8))
    img = cv2.merge(planes[::-1])  # BGR, what the JPEG codec expects
    img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.5, 1.1) * max(k, 0.3))
    quality = int(rng.integers(45, 80))
    _, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])  # planes were merged as BGR
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def render_random(layout: Scene | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Style-randomised rendering for the pretext domain, RGB uint8 [H,W,3].

    Every image draws its own palette (each material a uniform random colour), instance jitter, sun side, exposure,
    sky, grain and noise, and sometimes blur: colour says nothing about the class across images, so a network
    pretrained on it must learn shape, layout and context, as ImageNet / COCO features carry them to GTA5 and
    Cityscapes alike. Neither the source nor the target palette is used.
    """
    scene = _as_scene(layout)
    n_mat = len(_MATERIALS)
    palette = rng.uniform(15, 240, size=(n_mat, 3)).astype(np.float32)
    jitter = rng.uniform(4, 40, size=n_mat).astype(np.float32)
    sun = rng.uniform(0.5, 1.05, size=2).astype(np.float32)
    face_gain = np.array([rng.uniform(0.75, 1.0), sun[0], sun[1], 1.0], dtype=np.float32)
    colours = _instance_colours(scene, rng, palette, jitter, face_gain)
    inst = scene.instances
    h, w = inst.shape
    mat = scene.material[inst]
    gain = rng.uniform(0.7, 1.2, size=3).astype(np.float32)
    grain = np.float32(rng.uniform(0, 25)) * _uniform_noise(rng, (h, w))
    mult = 1 + np.float32(rng.uniform(0, 0.25)) * _value_noise(rng, h, w, int(rng.integers(6, 32)))
    top = min(h, int(np.ceil(scene.horizon + 0.5)) + 1)
    sky = mat[:top] == _MAT["sky"]
    sky_grad = _sky_gradient(
        np.arange(top, dtype=np.float32), scene.horizon, rng.uniform(30, 250, 3).astype(np.float32), palette[0]
    )
    planes = []
    for c in range(3):  # colour planes, not a pixel loop
        plane = colours[:, c][inst]
        plane += grain
        plane *= mult
        plane *= gain[c]
        if top > 0:
            np.copyto(plane[:top], sky_grad[:, c : c + 1] * gain[c], where=sky)
        planes.append(np.clip(plane, 0, 255, out=plane).astype(np.uint8))
    img = cv2.merge(planes)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (0, 0), sigmaX=rng.uniform(0.4, 1.2))
    return img


def render_new_camera(layout: Scene | np.ndarray, rng: np.random.Generator, style_shift: float) -> np.ndarray:
    """The target city through another camera, RGB uint8 [H,W,3]: the target rendering (same materials and
    weather) followed by that camera's processing. A warm white balance (R x1.12, B x0.82), a darker exposure
    (x0.8), a filmic tone curve (gamma 1.25) and stronger sensor noise (std 6): a cheaper sensor, different
    firmware. Fixed before anything was measured: appearance changes of the kind a re-estimation of BN statistics
    is known to absorb, so the new-camera benchmark shows whether --adapt-bn recovers them."""
    rgb = render_target(layout, rng, style_shift).astype(np.float32)
    rgb *= np.array([1.12, 1.0, 0.82], dtype=np.float32) * np.float32(0.8)
    rgb = 255.0 * np.power(np.clip(rgb, 0, 255) / 255.0, np.float32(1.25))
    rgb += np.float32(6.0) * _uniform_noise(rng, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

#: 'P'-mode palette of GTA5 labels: index = labelId, colour = Cityscapes colour of that labelId.
_LABEL_ID_PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _lab in LABELS:
    if _lab.id >= 0:
        _LABEL_ID_PALETTE[_lab.id] = _lab.color


def _settings(cfg: SyntheticConfig) -> dict:
    return {"generator": "dass_train.data.synthetic", "version": GENERATOR_VERSION, **asdict(cfg)}


def _city_of(split: str, index: int, count: int) -> str:
    cities = TARGET_CITIES[split]
    return cities[min(index * len(cities) // max(count, 1), len(cities) - 1)]


def image_rng(seed: int, split: str, index: int, style: str = "synth2real") -> np.random.Generator:
    """The RNG of one image: any image can be regenerated alone, whatever the order or number of workers. The
    pretext style draws from its own streams, so its scenes are not the benchmark's scenes under another prior."""
    extra = [] if style == "synth2real" else [STYLES.index(style)]
    return np.random.default_rng([seed, _SPLIT_CODE[split], index, *extra])


def _paths(root: Path, split: str, index: int, count: int) -> tuple[Path, Path]:
    if split == "source":
        name = f"{index + 1:05d}.png"
        return root / "gta5" / "images" / name, root / "gta5" / "labels" / name
    city = _city_of(split, index, count)
    stem = f"{city}_000000_{index:06d}"
    return (
        root / "cityscapes" / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
        root / "cityscapes" / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
    )


def _write_one(args: tuple[str, SyntheticConfig, str, int, int]) -> None:
    """Render and write one image + label (top level so worker processes can run it)."""
    root, cfg, split, index, count = args
    rng = image_rng(cfg.seed, split, index, cfg.style)
    if cfg.style == "pretrain":
        scene = compose_scene(rng, cfg.width, cfg.height, "pretrain")
        rgb = render_random(scene, rng)
    elif cfg.style == "newcamera":  # every split is the new camera's (its train split: frames for --adapt-bn)
        scene = compose_scene(rng, cfg.width, cfg.height, "newcamera")
        rgb = render_new_camera(scene, rng, cfg.style_shift)
    elif split == "source":
        scene = compose_scene(rng, cfg.width, cfg.height, "source")
        rgb = render_source(scene, rng)
    else:
        scene = compose_scene(rng, cfg.width, cfg.height, "target")
        rgb = render_target(scene, rng, cfg.style_shift, cfg.class_shift)
    label_ids = TRAIN_ID_TO_LABEL_ID[scene.labels]
    img_path, lbl_path = _paths(Path(root), split, index, count)
    cv2.imwrite(str(img_path), rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if split == "source":  # GTA5 style: palette PNG whose indices are labelIds
        lbl = Image.fromarray(label_ids, mode="P")
        lbl.putpalette(_LABEL_ID_PALETTE.reshape(-1).tolist())
    else:
        lbl = Image.fromarray(label_ids, mode="L")
    lbl.save(lbl_path, compress_level=1)


def _init_worker() -> None:
    cv2.setNumThreads(1)


#: Written first and removed last by ``generate``: a folder holding it and no synthetic.json is a half-written dataset.
PARTIAL = "synthetic.json.partial"


def generate(root: str | Path, cfg: SyntheticConfig, progress: bool = True, workers: int = 1) -> dict:
    """Write the source split (GTA5 layout) and target train/val splits (Cityscapes layout) under ``root``.

    Returns a summary: root, dataset folders, counts, seconds and images/s. ``synthetic.json`` is written last,
    so a half-written dataset is never taken for a finished one.
    """
    if cfg.width < 64 or cfg.height < 32:
        raise DataError(f"synthetic dataset: image size {cfg.width}x{cfg.height} is too small (min 64x32)")
    if min(cfg.n_source, cfg.n_target_train, cfg.n_target_val) < 0:
        raise DataError("synthetic dataset: image counts must be >= 0")
    if cfg.style not in STYLES:
        raise DataError(f"synthetic dataset: unknown style {cfg.style!r} (choose from {', '.join(STYLES)})")
    root = Path(root)
    counts = {"source": cfg.n_source, "train": cfg.n_target_train, "val": cfg.n_target_val}
    root.mkdir(parents=True, exist_ok=True)
    # Marks the folder as this generator's until synthetic.json replaces it: an interrupted run (Ctrl-C, a killed
    # job) is then regenerated by the next ensure_dataset, not mistaken for a real dataset and refused.
    (root / PARTIAL).write_text(json.dumps(_settings(cfg), indent=2) + "\n")
    (root / "gta5" / "images").mkdir(parents=True, exist_ok=True)
    (root / "gta5" / "labels").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        for city in TARGET_CITIES[split]:
            (root / "cityscapes" / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "cityscapes" / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), cfg, split, i, n) for split, n in counts.items() for i in range(n)]
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc="synthetic dataset", unit="img")
    if workers <= 1:
        for job in jobs:
            _write_one(job)
            if bar is not None:
                bar.update(1)
    else:
        # spawn, not fork: forking a process whose torch / OpenMP threads are running can deadlock the children
        with ProcessPoolExecutor(
            max_workers=workers, initializer=_init_worker, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            for _ in pool.map(_write_one, jobs, chunksize=8):
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    meta = {**_settings(cfg), "counts": counts, "cities": {k: list(v) for k, v in TARGET_CITIES.items()}}
    tmp = root / "synthetic.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, root / "synthetic.json")
    (root / PARTIAL).unlink(missing_ok=True)
    return {
        "root": str(root),
        "gta5": str(root / "gta5"),
        "cityscapes": str(root / "cityscapes"),
        "counts": counts,
        "images": len(jobs),
        "seconds": seconds,
        "images_per_s": len(jobs) / seconds if seconds > 0 else float("inf"),
    }


def _remove_images(root: Path) -> None:
    """Delete what ``generate`` wrote under ``root`` (its two dataset folders), before writing it again."""
    for sub in ("gta5", "cityscapes"):
        shutil.rmtree(root / sub, ignore_errors=True)


def ensure_dataset(root: str | Path, cfg: SyntheticConfig, progress: bool = True, workers: int = 1) -> Path:
    """Reuse ``root`` if its ``synthetic.json`` records the same settings, otherwise (re)generate it.

    A folder holding ``gta5``/``cityscapes`` data without ``synthetic.json`` may be a real dataset: refuse to touch it,
    unless the generator's own ``PARTIAL`` marker says it is a generation that was interrupted.
    """
    root = Path(root)
    meta_path = root / "synthetic.json"
    if not meta_path.is_file() and (root / PARTIAL).is_file():
        _remove_images(root)  # an interrupted generation: start it again
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{meta_path}: unreadable synthetic dataset settings ({exc})") from None
        if all(old.get(k) == v for k, v in _settings(cfg).items()):
            return root
        meta_path.unlink()  # stale synthetic data: remove it so no image of the old settings survives
        _remove_images(root)
    elif (root / "gta5").exists() or (root / "cityscapes").exists():
        raise DataError(f"{root}: holds gta5/ or cityscapes/ data without synthetic.json; refusing to overwrite it")
    generate(root, cfg, progress=progress, workers=workers)
    return root
