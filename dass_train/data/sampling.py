"""Per-image class statistics (cached next to the data) and resumable, DDP-aware infinite samplers.

Rare-class sampling (DAFormer style, paper Sec. 3.4 "weighted rare-class sampling"): with f_c the share of labelled
source pixels of class c, draw a class with P(c) ∝ exp((1 - f_c) / T), then an image that contains it, uniformly.
A small T concentrates the draws on rare classes; ``temperature=None`` falls back to plain shuffling.

Both samplers are infinite streams cut into blocks ("epochs"): block k is a pure function of ``(seed, k)``, global
position g lives in block ``g // block_length``, and rank r of ``world_size`` takes the positions
``r, r + world_size, ...``. The only state is how many samples this rank has taken, so resuming is exact.
With ``with_draw=True`` they yield ``(index, g)``: datasets seed their augmentation with g, so every draw of the same
image gets a different crop, and the same one again after a resume.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

from dass_train.labels import NUM_CLASSES

__all__ = ["class_stats", "class_stats_cache_paths", "RareClassSampler", "InfiniteSampler", "CACHE_NAME"]

CACHE_NAME = ".dass_class_stats.npz"


def _default_cache_dir() -> Path:
    return Path(os.environ.get("DASS_CACHE_DIR", Path.home() / ".cache" / "dass"))


def class_stats_cache_paths(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """(next to the data, per-user fallback keyed by the resolved root path)."""
    root = Path(root)
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]
    fallback = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    return root / CACHE_NAME, fallback / f"class_stats-{key}.npz"


def _signature(dataset, root: Path) -> dict[str, np.ndarray]:
    """Relative label paths + (mtime_ns, size): any added, removed or rewritten label makes the cache stale."""
    files, mtimes, sizes = [], [], []
    for path in dataset.label_files:
        st = os.stat(path)
        try:
            files.append(Path(path).relative_to(root).as_posix())
        except ValueError:
            files.append(str(path))
        mtimes.append(st.st_mtime_ns)
        sizes.append(st.st_size)
    return {
        "files": np.array(files, dtype=np.str_),
        "mtime_ns": np.array(mtimes, dtype=np.int64),
        "size": np.array(sizes, dtype=np.int64),
        "kind": np.array(getattr(dataset, "kind", "dataset"), dtype=np.str_),
    }


def _load_cache(path: Path, signature: dict[str, np.ndarray], num_classes: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if any(k not in data or not np.array_equal(data[k], v) for k, v in signature.items()):
                return None
            counts = data["counts"]
    except (OSError, ValueError, KeyError):  # unreadable / half-written cache: just recompute
        return None
    if counts.shape != (len(signature["files"]), num_classes):
        return None
    return counts.astype(np.int64)


def _save_cache(path: Path, signature: dict[str, np.ndarray], counts: np.ndarray) -> None:
    """Atomic write (temp file in the same folder + os.replace); raises OSError where the folder is not writable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, counts=counts, **signature)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def class_stats(
    dataset,
    num_classes: int = NUM_CLASSES,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    num_workers: int = 4,
) -> np.ndarray:
    """Pixel count per trainId for every labelled image -> int64 ``[N, K]`` (full resolution, before augmentation).

    ``dataset`` is a labelled ``SegmentationDataset`` (uses ``label_files``, ``load_label``, ``root``). Computed once
    and cached in ``<root>/.dass_class_stats.npz``, or under ``~/.cache/dass/`` (``cache_dir``) when the data folder
    is read-only; a cache whose file list / mtimes / sizes differ from the data is recomputed.
    """
    if not getattr(dataset, "has_labels", False):
        raise ValueError("class statistics need a labelled dataset")
    root = Path(getattr(dataset, "root", dataset.image_dir))
    signature = _signature(dataset, root)
    paths = class_stats_cache_paths(root, cache_dir)
    if cache:
        for path in paths:
            counts = _load_cache(path, signature, num_classes)
            if counts is not None:
                return counts

    def count(i: int) -> np.ndarray:
        label = dataset.load_label(i)
        return np.bincount(label.ravel(), minlength=256)[:num_classes]

    indices = range(len(dataset))
    # Decoding PNGs releases the GIL, so threads overlap the I/O and zlib work.
    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        rows = pool.map(count, indices)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, total=len(dataset), desc=f"class statistics ({dataset.kind})", unit="img")
        counts = np.stack(list(rows)).astype(np.int64) if len(dataset) else np.zeros((0, num_classes), np.int64)

    if cache:
        for path in paths:
            try:
                _save_cache(path, signature, counts)
                break
            except OSError:
                continue
        else:
            warnings.warn(f"could not cache class statistics in {paths[0]} or {paths[1]}", stacklevel=2)
    return counts


class _StreamSampler(Sampler):
    """Infinite stream of dataset indices, cut into deterministic blocks; see the module docstring."""

    def __init__(self, seed: int, rank: int, world_size: int, with_draw: bool) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.seed, self.rank, self.world_size, self.with_draw = int(seed), int(rank), int(world_size), with_draw
        self.position = 0  # samples this rank has handed out
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def block_length(self) -> int:
        raise NotImplementedError

    def _make_block(self, block: int) -> np.ndarray:
        raise NotImplementedError

    def _block(self, block: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != block:
            self._cached = (block, self._make_block(block))
        return self._cached[1]

    def global_position(self, position: int | None = None) -> int:
        """Position in the shared stream of this rank's ``position``-th sample."""
        return (self.position if position is None else position) * self.world_size + self.rank

    def take(self, count: int, start: int | None = None) -> np.ndarray:
        """The ``count`` indices this rank yields from ``start`` (default: current position), without advancing."""
        start = self.position if start is None else start
        g = (start + np.arange(count)) * self.world_size + self.rank
        blocks, offsets = np.divmod(g, self.block_length)
        out = np.empty(count, dtype=np.int64)
        for b in np.unique(blocks):
            sel = blocks == b
            out[sel] = self._block(int(b))[offsets[sel]]
        return out

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        while True:
            g = self.global_position()
            block, offset = divmod(g, self.block_length)
            index = int(self._block(block)[offset])
            self.position += 1
            yield (index, g) if self.with_draw else index

    def state_dict(self, consumed: int | None = None) -> dict:
        """``consumed``: samples this rank actually trained on (e.g. ``iteration * batch_per_rank``). Pass it when
        iterating through a DataLoader: its workers prefetch, so the sampler's own counter runs ahead."""
        position = self.position if consumed is None else int(consumed)
        return {"seed": self.seed, "position": position, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Resume; a different world size resumes at the same point of the shared stream (rounded down)."""
        self.seed = int(state["seed"])
        self._cached = None
        consumed_global = int(state["position"]) * int(state.get("world_size", self.world_size))
        self.position = consumed_global // self.world_size


class RareClassSampler(_StreamSampler):
    """Source-image sampler favouring images with rare classes.

    Args:
        stats: int ``[N, K]`` pixel counts per image (``class_stats``).
        temperature: T of P(c) ∝ exp((1 - f_c) / T); None = uniform shuffling of the images.
        num_samples: block length (one "epoch" of draws); default N.
        min_pixels: an image "contains" c when it has at least this many pixels of c.
    """

    def __init__(
        self,
        stats: np.ndarray,
        temperature: float | None = 0.01,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        min_pixels: int = 1,
        with_draw: bool = False,
    ) -> None:
        super().__init__(seed, rank, world_size, with_draw)
        stats = np.asarray(stats, dtype=np.int64)
        if stats.ndim != 2 or stats.shape[0] == 0:
            raise ValueError(f"stats must be a non-empty [N, K] array, got shape {stats.shape}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0 or None, got {temperature}")
        self.num_images, num_classes = stats.shape
        self.num_samples = int(num_samples) if num_samples else self.num_images
        self.temperature = temperature
        total = stats.sum()
        self.class_freq = stats.sum(axis=0) / total if total > 0 else np.zeros(num_classes)

        # Images containing each class, as one CSR-style array: members[offsets[c] : offsets[c] + counts[c]].
        cls, img = np.nonzero(stats.T >= min_pixels)
        self._members = img
        self._counts = np.bincount(cls, minlength=num_classes)
        self._offsets = np.cumsum(self._counts) - self._counts

        present = self._counts > 0
        if temperature is None or not present.any():
            self.class_probs = None
        else:
            logits = np.where(present, (1.0 - self.class_freq) / temperature, -np.inf)
            weights = np.exp(logits - logits[present].max())
            self.class_probs = weights / weights.sum()

    @property
    def block_length(self) -> int:
        return self.num_samples

    def _make_block(self, block: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, block])
        if self.class_probs is None:
            reps = -(-self.num_samples // self.num_images)
            return np.concatenate([rng.permutation(self.num_images) for _ in range(reps)])[: self.num_samples]
        classes = rng.choice(len(self.class_probs), size=self.num_samples, p=self.class_probs)
        pick = (rng.random(self.num_samples) * self._counts[classes]).astype(np.int64)
        return self._members[self._offsets[classes] + pick]


class InfiniteSampler(_StreamSampler):
    """Endless reshuffled passes over ``size`` items (the target set): block k is permutation k of ``range(size)``."""

    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        with_draw: bool = False,
    ) -> None:
        super().__init__(seed, rank, world_size, with_draw)
        if size < 1:
            raise ValueError("InfiniteSampler needs a non-empty dataset")
        self.size, self.shuffle = int(size), shuffle

    @property
    def block_length(self) -> int:
        return self.size

    def _make_block(self, block: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, block]).permutation(self.size)
