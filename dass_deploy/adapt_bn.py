"""``--adapt-bn``: a model's BatchNorm statistics re-estimated on unlabelled frames of the user's camera, before
export (``dass-export``) or inference (``dass-segment --checkpoint``; ``adapt_bn_onnx`` does it without PyTorch for
an exported model that kept its BatchNorm nodes).

A deployed model meets a city and a camera that were never its target domain. On the synthetic benchmark the
strongest effect measured is not a loss term but BN statistics: re-estimating them on unlabelled target images took
the source-only model from 17.71 to 29.94 mIoU over three seeds, with no training
(``benchmarks/results/table3_seeds.json``). Here every BatchNorm layer (frozen ones too: the user asked for it) gets
the population statistics of ``dass_train.bn_statistics.population_bn_statistics``: the mean and variance of its
input over every pixel of every frame, as inference meets them, in passes over the frames (kept in memory, so a
camera is read once); they do not depend on the order of the frames. This module also writes down what was done:
the ``adapt_bn`` record of meta.json, the summary line and the model card's section. Torch is imported only by
``adapt_bn`` itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dass_deploy.adapt_frames import DEFAULT_ADAPT_PASSES, MIN_ADAPT_FRAMES, AdaptFrames
from dass_deploy.errors import DeployError
from dass_deploy.segmenter import resize_to

ESTIMATOR = (
    "population statistics: running_mean and running_var are the mean and unbiased variance of each layer's input "
    "over every pixel of every frame, in {passes} over the frames (pass 1 normalises each frame by its own "
    "statistics, as BatchNorm in train mode; each further pass runs the model in eval mode with the statistics of "
    "the pass before, so a layer sees its input as inference will); independent of the frame order"
)
#: What the checkpoint's statistics were, by how its BatchNorm trained (``bn_training``).
BEFORE = {
    "trainable": "the checkpoint's running statistics, accumulated in training (trainable BatchNorm)",
    "frozen": "the checkpoint's running statistics, kept from its initialisation (frozen BatchNorm, e.g. ImageNet)",
    "unknown": "the checkpoint's running statistics (the checkpoint does not say whether its BatchNorm trained)",
}

#: name -> (running_mean, running_var, eps) as float64 numpy arrays
Statistics = dict[str, tuple[np.ndarray, np.ndarray, float]]


@dataclass(frozen=True)
class Measured:
    """What the new-camera benchmark measured for one kind of BatchNorm: the mIoU points ``--adapt-bn`` gained on a
    synthetic camera no training saw (256 frames, the CLI's estimator), smallest and largest over the checkpoints."""

    checkpoints: int
    low: float
    high: float
    where: str


#: The figures the warnings and the model card quote, by ``bn_training``; tests/test_adapt_bn.py recomputes each one
#: from its results files, so a new measurement that changes them fails the suite until the text follows it.
MEASURED = {
    "trainable": Measured(8, 10.45, 21.5, "benchmarks/results/adapt_bn_passes.md and adapt_bn.md"),
    "frozen": Measured(9, -5.59, 1.36, "benchmarks/results/adapt_bn.md and adapt_bn_passes.md"),
}


@dataclass
class Adaptation:
    """What ``adapt_bn`` did: the meta.json record, the one-line summary, notes and warnings for the user
    (``note:`` / ``warning:`` lines) and the first frame as the model saw it (``float32 [3,H,W]`` RGB 0..255: a real
    input for the export's parity check)."""

    record: dict[str, Any]
    summary: str
    notes: list[str] = field(default_factory=list)
    sample: np.ndarray | None = None

    @property
    def warnings(self) -> list[str]:
        """The record's warnings: meta.json and the CLI's stderr say the same thing."""
        return self.record["warnings"]


def bn_training(ckpt_meta: dict[str, Any]) -> str:
    """How the checkpoint's BatchNorm trained: 'trainable', 'frozen' or 'unknown' (foreign or older checkpoints)."""
    frozen = ckpt_meta.get("freeze_bn")
    if frozen is None:
        frozen = ((ckpt_meta.get("config") or {}).get("model") or {}).get("freeze_bn")
    return "unknown" if frozen is None else "frozen" if frozen else "trainable"


class FrameFeed:
    """The frames as the model sees them, once per pass: each resized to ``size`` (H, W) as ``Segmenter.preprocess``
    does (``None``: each at its own size, as a bare checkpoint runs) and given as ``float32 [1,3,H,W]`` RGB 0..255,
    the input of the exported graph. The first pass reads the source and keeps the resized frames (uint8), so later
    passes see the same frames even from a camera. On the way it fingerprints them (sha256 in reading order), keeps
    the first (a real input for the export's parity check) and drives one progress bar over all passes, whichever
    runtime estimates the statistics."""

    def __init__(
        self, frames: AdaptFrames, size: tuple[int, int] | None, progress: bool, passes: int = DEFAULT_ADAPT_PASSES
    ) -> None:
        from tqdm import tqdm

        if passes < 0:
            raise DeployError(f"--adapt-passes {passes}: must be at least 1, or exact")
        self.frames, self.size, self.passes = frames, size, passes  # 0: exact (as many as it takes)
        self.passes_run = 0
        self.digest = hashlib.sha256()
        self.sample: np.ndarray | None = None
        self.kept: list[np.ndarray] = []
        self.count = 0
        self.bar = tqdm(
            total=frames.planned * max(passes, 1),
            desc=f"adapt-bn, {passes} passes" if passes > 1 else "adapt-bn, pass 1" if not passes else "adapt-bn",
            unit="frame",
            disable=not progress,
            dynamic_ncols=True,
        )

    def __iter__(self) -> Iterator[np.ndarray]:
        """The first pass: read, resize, fingerprint and keep; ends with ``check`` (too few frames: one line)."""
        for rgb in self.frames:
            rgb = np.ascontiguousarray(resize_to(rgb, self.size))
            self.digest.update(f"{rgb.shape}".encode() + rgb.tobytes())
            self.kept.append(rgb)
            x = _as_input(rgb)
            if self.sample is None:
                self.sample = x[0]
            yield x
            self.count += 1
            self.bar.update(1)
        if self.count != self.frames.planned:  # some did not decode: the bar counts what the passes will run
            self.bar.total = self.count * max(self.passes, 1)
            self.bar.refresh()
        self.passes_run = 1
        self.check()

    def replay(self) -> Iterator[np.ndarray]:
        """A later pass: the kept frames again, in reading order."""
        self.passes_run += 1
        if not self.passes:  # exact: one bar per pass, their number is not known in advance
            self.bar.reset(total=self.count)
            self.bar.set_description(f"adapt-bn, pass {self.passes_run}")
        for rgb in self.kept:
            yield _as_input(rgb)
            self.bar.update(1)

    def pass_frames(self) -> Iterator[np.ndarray]:
        """The next pass: the first reads the source, every later one replays what it kept."""
        return iter(self) if self.passes_run == 0 else self.replay()

    def close(self) -> None:
        self.bar.close()
        self.kept = []

    def check(self) -> None:
        """Too few frames came (some could not be decoded, or a video or stream ended): one line naming SOURCE."""
        frames, seen = self.frames, self.count
        if seen >= MIN_ADAPT_FRAMES:
            return
        why = f" ({frames.skipped[0]})" if frames.skipped else ""
        if seen == 0:
            raise DeployError(f"--adapt-bn {frames.spec}: no decodable frame{why}")
        raise DeployError(
            f"--adapt-bn {frames.spec}: {seen} decodable frame{'s' * (seen != 1)}, fewer than the minimum "
            f"{MIN_ADAPT_FRAMES}{why} (docs/ADAPT_BN.md)"
        )

    def adaptation(
        self, before: Statistics, after: Statistics, training: str, runtime: str, movement: list[float]
    ) -> Adaptation:
        """The record, summary line and notes of an estimate made on these frames in ``self.passes`` passes, each
        after the first having moved the statistics by ``movement`` (``statistics_movement``)."""
        record = adaptation_record(self, after, training, statistics_shift(before, after), runtime, movement)
        return Adaptation(record, summary_line(record), _notes(training), self.sample)


def _as_input(rgb: np.ndarray) -> np.ndarray:
    """``uint8 [H,W,3]`` RGB -> ``float32 [1,3,H,W]``, the exported graph's input."""
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32)[None]


def statistics_movement(before: Statistics, after: Statistics) -> float:
    """How far a pass moved the statistics: the median over all channels of ``|mean change| / new std`` (the same
    figure as ``dass_train.bn_statistics.statistics_movement``, in numpy for the runtime-only path). The lower median,
    as ``torch.median`` takes it: ``np.median`` would average the middle two of an even count."""
    shift = np.sort(
        np.concatenate([np.abs(after[n][0] - before[n][0]) / np.sqrt(np.maximum(after[n][1], 1e-12)) for n in before])
    )
    return float(shift[(shift.size - 1) // 2])


def adapt_bn(
    model: Any,
    frames: AdaptFrames,
    size: tuple[int, int] | None,
    to_tensor: Callable[[np.ndarray], Any],
    forward: Callable[[Any], object] | None = None,
    training: str = "unknown",
    progress: bool = True,
    passes: int = DEFAULT_ADAPT_PASSES,
) -> Adaptation:
    """Re-estimate every BatchNorm layer of ``model`` (a torch module) on ``frames`` in ``passes`` passes (0:
    exact, until a pass changes nothing), in place.

    Each frame goes through ``FrameFeed`` (resized to ``size``, ``float32 [1,3,H,W]`` RGB 0..255), then
    ``to_tensor``; ``forward`` (default: ``model``) runs on the result, so the caller decides where normalisation
    happens, exactly as at inference. Too few frames (or a failure on the way) raise and leave the statistics as
    they were.
    """
    import torch

    from dass_train.bn_statistics import batchnorm_layers, population_bn_statistics

    layers = batchnorm_layers(model, include_frozen=True)
    if not layers:
        raise DeployError("--adapt-bn: the model has no BatchNorm layer, so it has no statistics to adapt")
    saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in layers.items()}
    before = _statistics(layers)
    feed = FrameFeed(frames, size, progress, passes)

    def batches() -> Iterator[Any]:
        return (to_tensor(x) for x in feed.pass_frames())

    try:
        movement = population_bn_statistics(model, batches, list(layers.values()), forward, passes)
    except BaseException:
        for name, m in layers.items():
            m.load_state_dict(saved[name])
        raise
    finally:
        feed.close()
    return feed.adaptation(before, _statistics(layers), training, f"torch {torch.__version__}", movement)


def _statistics(layers: dict[str, Any]) -> Statistics:
    return {
        name: (
            m.running_mean.detach().double().cpu().numpy(),
            m.running_var.detach().double().cpu().numpy(),
            float(m.eps),
        )
        for name, m in layers.items()
    }


def statistics_shift(before: Statistics, after: Statistics) -> dict[str, Any]:
    """How far the statistics moved, per channel in units of the old standard deviation (mean shift) and as the
    ratio of new to old standard deviation; medians and tails over all channels, and the layer that moved most."""
    names = list(before)
    sizes = [len(before[n][0]) for n in names]
    mean_b, mean_a = (np.concatenate([s[n][0] for n in names]) for s in (before, after))
    eps = np.repeat([before[n][2] for n in names], sizes)
    var_b = np.concatenate([before[n][1] for n in names]) + eps
    var_a = np.concatenate([after[n][1] for n in names]) + eps
    shift = np.abs(mean_a - mean_b) / np.sqrt(var_b)
    ratio = np.sqrt(var_a / var_b)
    per_layer = np.add.reduceat(shift, np.cumsum([0, *sizes[:-1]])) / np.asarray(sizes)
    top = int(per_layer.argmax())
    return {
        "mean_shift_sd": {
            "median": float(np.median(shift)),
            "p95": float(np.percentile(shift, 95)),
            "max": float(shift.max()),
        },
        "std_ratio": {
            "p5": float(np.percentile(ratio, 5)),
            "median": float(np.median(ratio)),
            "p95": float(np.percentile(ratio, 95)),
        },
        "largest_layer": {"name": names[top], "mean_shift_sd": float(per_layer[top])},
    }


def adaptation_record(
    feed: FrameFeed, after: Statistics, training: str, shift: dict[str, Any], runtime: str, movement: list[float]
) -> dict[str, Any]:
    """meta.json's ``adapt_bn``: the source and frames, the layers, the estimator and the statistics' provenance."""
    import dass_deploy

    return {
        "source": feed.frames.record(),
        "frames": feed.count,
        "size": list(feed.size) if feed.size else None,
        "frames_sha256": feed.digest.hexdigest(),
        "layers": len(after),
        "channels": int(sum(len(mean) for mean, _, _ in after.values())),
        "layer_names": list(after),
        "bn_training": training,
        "estimator": ESTIMATOR.format(passes=passes_phrase(feed.passes)),
        "passes": feed.passes_run,
        "exact": feed.passes == 0,
        # per pass after the first: median |mean change| / std over all channels (0 once the chain is exact)
        "movement": movement,
        "statistics": {
            "before": BEFORE.get(training, BEFORE["unknown"]),
            "after": f"re-estimated on these {feed.count} frames by dass {dass_deploy.__version__} with {runtime}; "
            "nothing of the checkpoint's statistics is kept",
        },
        "shift": shift,
        "warnings": _warnings(training),
    }


def summary_line(record: dict[str, Any]) -> str:
    """One line: how many frames of what, and how far the statistics moved."""
    shift, size = record["shift"], record["size"]
    at = f"{size[0]}x{size[1]}" if size else "their own size"
    return (
        f"BN statistics re-estimated on {record['frames']} frames of {record['source']['spec']} at {at} "
        f"({record['layers']} layers, {record['channels']} channels): mean shift median "
        f"{shift['mean_shift_sd']['median']:.2f} sd (most in {shift['largest_layer']['name']}: "
        f"{shift['largest_layer']['mean_shift_sd']:.2f} sd), std ratio median {shift['std_ratio']['median']:.2f} "
        f"({shift['std_ratio']['p5']:.2f}-{shift['std_ratio']['p95']:.2f}); {passes_text(record)}"
    )


def passes_phrase(passes: int) -> str:
    """``1 pass`` / ``3 passes`` / ``as many passes as it takes to change nothing (exact)`` for ``passes`` 0."""
    return f"{passes} pass{'es' * (passes != 1)}" if passes else "as many passes as it takes to change nothing (exact)"


def passes_text(record: dict[str, Any]) -> str:
    """``3 passes, the last moved the means by a median 0.004 sd``: how many ran, and whether they had converged."""
    passes, movement = record.get("passes", 1), record.get("movement") or []
    last = f", the last moved the means by a median {movement[-1]:.3f} sd" if movement else ""
    exact = " (exact)" if record.get("exact") else ""
    return f"{passes} pass{'es' * (passes != 1)}{exact}{last}"


def _gain_text(kind: str) -> str:
    m = MEASURED[kind]
    return f"{m.low:+.1f} to {m.high:+.1f} mIoU over {m.checkpoints} {kind}-BN checkpoints"


def _warnings(training: str) -> list[str]:
    """Issue 20's honest answer: frozen-BN models are adapted as asked, but the benchmark says it does not reliably
    help them, so the user is told so with the figures instead of finding out on the road."""
    if training != "frozen":
        return []
    return [
        "this checkpoint was trained with frozen BatchNorm (the statistics of its initialisation, e.g. ImageNet), and "
        f"re-estimating has not been shown to help such models: on a synthetic camera no training saw it changed "
        f"them by {_gain_text('frozen')} (256 frames), against {_gain_text('trainable')} "
        f"({MEASURED['frozen'].where}; docs/ADAPT_BN.md). Score the adapted model on labelled frames of this camera "
        "(dass-segment --eval) before relying on it"
    ]


def _notes(training: str) -> list[str]:
    """A checkpoint that does not say how its BN trained gets the figures of both kinds, as a note."""
    if training != "unknown":
        return []
    return [
        "the checkpoint does not say whether its BatchNorm trained (a foreign or older checkpoint); on a synthetic "
        f"camera no training saw, re-estimating changed {_gain_text('trainable')} and {_gain_text('frozen')} "
        "(256 frames; docs/ADAPT_BN.md)"
    ]


def card_lines(record: dict[str, Any]) -> list[str]:
    """The model card's section on the adaptation (markdown lines)."""
    source, shift, size = record["source"], record["shift"], record["size"]
    skipped = f"; {source['skipped']} input(s) could not be decoded and were skipped" if source["skipped"] else ""
    return [
        "## BatchNorm statistics adapted to the deployment camera (`--adapt-bn`)",
        "",
        f"The running statistics of all {record['layers']} BatchNorm layers ({record['channels']} channels) were "
        f"re-estimated on {record['frames']} unlabelled frames of `{source['spec']}` ({source['kind']}; "
        f"{source['selection']}{skipped}), resized to {f'{size[0]}x{size[1]}' if size else 'their own size'}.",
        "",
        f"- Replaced: {record['statistics']['before']}.",
        f"- Now: {record['statistics']['after']}.",
        f"- Estimator: {record['estimator']}; {passes_text(record)}.",
        f"- Frames fingerprint (sha256 of the resized RGB frames in reading order): `{record['frames_sha256']}`.",
        f"- Shift: mean moved by a median {shift['mean_shift_sd']['median']:.2f} old standard deviations "
        f"(95th percentile {shift['mean_shift_sd']['p95']:.2f}; most in `{shift['largest_layer']['name']}`, "
        f"{shift['largest_layer']['mean_shift_sd']:.2f}); standard deviation ratio new/old median "
        f"{shift['std_ratio']['median']:.2f} (5-95 %: {shift['std_ratio']['p5']:.2f}-{shift['std_ratio']['p95']:.2f}).",
        f"- Whether it helps: on a synthetic camera no training saw, re-estimating on 256 frames changed "
        f"{_gain_text('trainable')} and {_gain_text('frozen')} ({MEASURED['frozen'].where}; docs/ADAPT_BN.md). "
        "No label was used here, so nothing measures this model on this camera.",
        *(f"- **Warning**: {warning}." for warning in record.get("warnings", [])),
        "",
    ]


def model_card(meta: dict[str, Any]) -> str:
    """A short model card (README.md) for a model exported with ``--adapt-bn``: what it is and what was done."""
    checkpoint = meta.get("source_checkpoint") or {}
    inp = meta["input"]
    lines = [
        f"# {meta['name']}",
        "",
        f"DeepLab-V2 {meta.get('backbone') or ''}, {meta['num_classes']} classes, exported by `dass-export` from "
        f"`{checkpoint.get('path')}` (sha256 `{checkpoint.get('sha256')}`, stage {meta.get('stage')}) to "
        f"{meta['precision']} ONNX for RGB float32 0..255 input of {inp['height']}x{inp['width']}"
        f"{' (dynamic size)' if inp.get('dynamic') else ''}; `meta.json` holds every detail.",
        "",
        *card_lines(meta["adapt_bn"]),
    ]
    return "\n".join(lines)


def adapt_torch_backend(
    backend: Any,
    frames: AdaptFrames,
    size: tuple[int, int] | None,
    progress: bool,
    passes: int = DEFAULT_ADAPT_PASSES,
) -> Adaptation:
    """``dass-segment --checkpoint CKPT --adapt-bn SOURCE``: adapt the torch backend's network in place, through
    the backend's own input preparation (colour order, mean, std, device), at the size inference will run at."""
    from dass_deploy.backends.torch_backend import TorchBackend

    if not isinstance(backend, TorchBackend):
        raise DeployError(f"--adapt-bn re-estimates statistics in PyTorch: it needs --checkpoint, not {backend.name}")
    training = bn_training(backend.checkpoint_meta)
    return adapt_bn(backend.network, frames, size, backend.prepare, training=training, progress=progress, passes=passes)
