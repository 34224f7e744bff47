"""Gradio demo: segment street scenes with exported BiDA models, on CPU, in a browser.

Everything the page shows comes from ``dass_deploy`` (``Segmenter`` for inference, ``visualize`` for colours,
``pipeline`` for videos): the demo adds no inference code of its own, so what you see is what the CLI and the
runtime produce. Start it with ``dass-demo`` (the user's models and the bundled ones) or ``python app/app.py``.
"""

from __future__ import annotations

import atexit
import html
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python app/app.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cv2
import gradio as gr
import numpy as np
import rich_click as click
from PIL import Image, UnidentifiedImageError

from dass_deploy import visualize
from dass_deploy.cli_common import fail, finish, run_command
from dass_deploy.errors import DeployError
from dass_deploy.pipeline import run_video
from dass_deploy.repository import default_model_dir, list_models, model_roots
from dass_deploy.segmenter import Segmenter
from dass_deploy.sinks import Renderer, VideoSink
from dass_deploy.sources import VIDEO_EXTS, VideoItem, open_video, read_image

APP_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = APP_DIR / "examples"

#: Upload limit enforced by the server (``launch(max_file_size=...)``) and named in the UI.
MAX_FILE_SIZE = "25mb"
#: Larger images are refused before decoding: a CPU demo should answer in seconds, and this stops decompression bombs.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Videos are cut after this many frames (with a warning), so one upload cannot hold a worker for minutes.
MAX_VIDEO_FRAMES = 150
#: Downloads written for a request are deleted after this long (Gradio keeps its own copies for ``delete_cache``).
KEEP_OUTPUTS_S = 3600
RESOLUTIONS = ("original", "model size")
SOURCE_STAGES = ("source_only", "source")
ADAPTED_STAGES = ("adapt", "adapted", "distill", "bida")  # not "oracle": that one saw target labels
EXAMPLES_LABEL = "Examples: real Cityscapes photos and synthetic target-style scenes"
TABLE_HEADERS = ["class", "share (%)", "pixels"]


def read_upload(payload: dict[str, Any] | None) -> np.ndarray | None:
    """An uploaded image as Gradio hands it over unprocessed -> RGB ``uint8 [H,W,3]`` (None when cleared).

    The image events run with ``preprocess=False``: Gradio would otherwise decode the upload itself and a text file
    renamed ``.png`` would end in a generic "Error". Here it becomes one sentence naming the file. Gradio has
    already checked that the path is one of its own uploads (or an example), so no other file can be read.
    """
    if not payload:
        return None
    path = payload.get("path")
    name = Path(payload.get("orig_name") or path or "upload").name
    if not path:
        raise gr.Error(f"'{name}' did not arrive as a file; please upload it again.", title="Upload failed")
    try:
        with Image.open(path) as probe:  # reads the header only: cheap, and refuses huge images before decoding
            width, height = probe.size
    except Image.DecompressionBombError as exc:  # Pillow refuses to even open it: report its size ourselves
        raise gr.Error(_too_large(name, _bomb_pixels(exc)), title="Image too large") from exc
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise gr.Error(
            f"'{name}' is not an image this demo can read (PNG, JPEG, BMP, WebP or TIFF); "
            "please upload a photo of a street scene.",
            title="Not an image",
        ) from exc
    if width * height > MAX_IMAGE_PIXELS:
        raise gr.Error(_too_large(name, width * height, f"{width}x{height}"), title="Image too large")
    try:
        return read_image(path)
    except DeployError as exc:  # e.g. a truncated file behind a valid header
        raise gr.Error(f"'{name}' could not be decoded; is the file complete?", title="Not an image") from exc


def _bomb_pixels(exc: Exception) -> int | None:
    """The pixel count in Pillow's DecompressionBombError message ("Image size (N pixels) exceeds ...")."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    return int(match.group(1)) if match else None


def _too_large(name: str, pixels: int | None, size: str = "") -> str:
    """ "image too large (N megapixels, limit M)" with the file's name: Gradio alone would show {"error": null}."""
    megapixels = f"{pixels / 1e6:.0f} megapixels" if pixels else "too many pixels"
    size = f", {size}" if size else ""
    return (
        f"'{name}': image too large ({megapixels}{size}, limit {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels); "
        "please resize it."
    )


@dataclass
class ModelEntry:
    """One model of the repository as the page lists it."""

    name: str
    path: Path
    meta: dict[str, Any]

    @property
    def miou(self) -> float | None:
        """mIoU in percent from ``meta["metrics"]`` (flat or one level nested), if the exporter recorded one."""
        metrics = self.meta.get("metrics") or {}
        candidates = [metrics] + [v for v in metrics.values() if isinstance(v, dict)]
        for block in candidates:
            value = block.get("miou", block.get("mIoU"))
            if isinstance(value, (int, float)):
                return float(value) * 100.0 if value <= 1.0 else float(value)
        return None

    @property
    def stage(self) -> str:
        """Training stage (``source_only``, ``adapt``, ...): meta.json's own field, else what the exporter recorded."""
        return str(self.meta.get("stage") or (self.meta.get("export") or {}).get("checkpoint_stage") or "")

    @property
    def benchmark(self) -> str:
        """The preset the model was trained on (e.g. GTA5 -> Cityscapes); pairs for the Compare tab share it."""
        export = self.meta.get("export") or {}
        return str(self.meta.get("benchmark") or export.get("checkpoint_benchmark") or "")

    def label(self) -> str:
        """Dropdown text: name, stage and mIoU when known."""
        parts = [p for p in (self.stage.replace("_", " "), self.meta.get("backbone")) if p]
        if self.miou is not None:
            parts.append(f"mIoU {self.miou:.1f}")
        return f"{self.name} ({', '.join(parts)})" if parts else self.name

    def describe(self) -> str:
        """One Markdown sentence about the loaded model for the page's explanation."""
        spec = self.meta.get("input", {})
        text = f"Loaded model: **{self.name}**"
        details = [
            f"backbone {self.meta['backbone']}" if self.meta.get("backbone") else "",
            f"stage *{self.stage.replace('_', ' ')}*" if self.stage else "",
            f"benchmark {self.benchmark}" if self.benchmark else "",
            f"input {spec['height']}x{spec['width']}" if spec.get("height") and spec.get("width") else "",
            self.meta.get("precision", ""),
        ]
        details = [d for d in details if d]
        if details:
            text += " (" + ", ".join(details) + ")"
        if self.miou is not None:
            text += f"; mIoU on the target validation set: **{self.miou:.1f}**"
        return text + "."


@dataclass
class ComparePair:
    """A source-only and an adapted model of the same benchmark: the gain BiDA brings, side by side."""

    benchmark: str
    source: ModelEntry
    adapted: ModelEntry

    @property
    def key(self) -> str:
        return f"{self.benchmark}: {self.source.name} vs {self.adapted.name}"

    @property
    def source_title(self) -> str:
        return f"Source only: {self.source.label()}"

    @property
    def adapted_title(self) -> str:
        return f"Adapted: {self.adapted.label()}"


#: One model folder, several (the first holding a name wins), or None for ``model_roots()``.
ModelRoots = str | Path | list[Path] | None


def discover_models(models_root: ModelRoots) -> dict[str, ModelEntry]:
    """Every model directory under ``models_root`` (via ``dass_deploy.repository.list_models``), by name."""
    entries = {}
    for info in list_models(models_root):
        entries[info.name] = ModelEntry(name=info.name, path=info.path, meta=info.meta)
    if not entries:
        where = " or ".join(str(root) for root in _as_list(models_root))
        raise DeployError(f"no exported models found in {where} (export one with dass-export)")
    return entries


def _as_list(models_root: ModelRoots) -> list[Path]:
    if models_root is None:
        return model_roots()
    return [Path(models_root)] if isinstance(models_root, str | Path) else list(models_root)


def compare_pairs(models: dict[str, ModelEntry]) -> list[ComparePair]:
    """Pairs (source-only, adapted) sharing ``meta["benchmark"]``, e.g. GTA5->Cityscapes before and after BiDA."""
    by_benchmark: dict[str, list[ModelEntry]] = {}
    for entry in models.values():
        if entry.benchmark:
            by_benchmark.setdefault(entry.benchmark, []).append(entry)
    pairs = []
    for benchmark, entries in sorted(by_benchmark.items()):
        sources = [e for e in entries if e.stage in SOURCE_STAGES]
        adapted = [e for e in entries if e.stage in ADAPTED_STAGES]
        pairs += [ComparePair(benchmark, s, a) for s in sources for a in adapted]
    return pairs


def _default_model(models_root: ModelRoots, models: dict[str, ModelEntry]) -> str:
    """The repository's ``DEFAULT`` model (or ``$DASS_MODEL``) when it is listed, else the first by name."""
    try:
        name = default_model_dir(models_root).name
    except DeployError:
        return next(iter(models))
    return name if name in models else next(iter(models))


def available_backends() -> list[str]:
    """Backends whose runtime is importable here; "auto" lets ``Segmenter`` pick the best one per model."""
    import importlib.util

    names = ["auto"]
    for name, module in (("onnxruntime", "onnxruntime"), ("torch", "torch"), ("tensorrt", "tensorrt")):
        if importlib.util.find_spec(module) is not None:
            names.append(name)
    return names


def _legend_html(class_names: list[str], palette: np.ndarray) -> str:
    """The 19 Cityscapes classes as colour chips (HTML, so it wraps with the page width)."""
    chips = "".join(
        f'<span class="dass-chip"><span class="dass-swatch" style="background:rgb({r},{g},{b})"></span>'
        f"{html.escape(name)}</span>"
        for name, (r, g, b) in zip(class_names, palette.tolist(), strict=False)
    )
    return f'<div class="dass-legend">{chips}</div>'


CSS = """
.dass-legend {display:flex; flex-wrap:wrap; gap:6px 14px; font-size:0.9em;}
.dass-chip {display:inline-flex; align-items:center; gap:6px;}
.dass-swatch {width:14px; height:14px; border-radius:3px; border:1px solid #0003; display:inline-block;}
"""

INTRO = (
    "This demo segments street scenes into the 19 Cityscapes classes with DeepLab-V2 networks trained by "
    "**BiDA** (Bi-directional Contrastive Learning for Domain Adaptive Semantic Segmentation, ECCV 2022): a model "
    "learns from a *labelled* source domain and is adapted to an *unlabelled* target domain by pulling target pixel "
    "features towards the source prototype of their class and source pixels towards target prototypes, with "
    "dynamic pseudo labels transferred from the prototypes. The shipped models come from the package's embedded "
    "synthetic benchmark (game-like source scenes -> camera-like target scenes, no real data involved), so they "
    "segment the synthetic target-style examples; real photos need a model trained with `dass-train gta2city`. "
    "Upload an image or a short video, use the webcam, or click an example. It runs on CPU through `dass_deploy`, "
    "the same runtime as the `dass-segment` CLI."
)


@dataclass
class DemoState:
    """What the handlers share: the model list, cached segmenters and a private folder for downloads."""

    models: dict[str, ModelEntry]
    work_dir: Path
    _segmenters: dict[tuple[str, str], Segmenter] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def segmenter(self, model_name: str, backend: str) -> Segmenter:
        """Load once per (model, backend); sessions are reused across requests (ONNX Runtime ``run`` is thread-safe)."""
        if model_name not in self.models:
            raise gr.Error(f"unknown model '{model_name}'; pick one from the list.")
        key = (model_name, backend)
        with self._lock:
            if key not in self._segmenters:
                try:
                    self._segmenters[key] = Segmenter(self.models[model_name].path, backend=backend)
                except DeployError as exc:
                    raise gr.Error(str(exc), title="Cannot load model") from exc
            return self._segmenters[key]

    def out_dir(self) -> Path:
        """A fresh folder per request, so concurrent users never overwrite each other's downloads.

        Folders older than ``KEEP_OUTPUTS_S`` go first: Gradio has copied them into its own cache by then, and a
        long-running demo must not fill the disk.
        """
        cutoff = time.time() - KEEP_OUTPUTS_S
        for old in self.work_dir.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        path = self.work_dir / uuid.uuid4().hex[:12]
        path.mkdir(parents=True)
        return path


def _run(
    state: DemoState, rgb: np.ndarray, model_name: str, backend: str, resolution: str
) -> tuple[np.ndarray, np.ndarray, Segmenter, float]:
    """Segment one RGB image -> ``(image shown, trainIds [H,W], segmenter, latency ms)``.

    "model size" shows exactly what the network sees (the image resized to its input size); "original" lets the
    segmenter resize the labels back to the upload's size.
    """
    seg = state.segmenter(model_name, backend)
    if resolution == "model size" and seg.size is not None:
        rgb = cv2.resize(rgb, (seg.size[1], seg.size[0]), interpolation=cv2.INTER_AREA)
    start = time.perf_counter()
    try:
        labels = seg.predict(rgb)
    except DeployError as exc:
        raise gr.Error(str(exc)) from exc
    return rgb, labels, seg, (time.perf_counter() - start) * 1000.0


def _share_rows(labels: np.ndarray, seg: Segmenter) -> list[list[Any]]:
    """Present classes sorted by pixel share: ``[[name, percent, pixels], ...]``."""
    num_classes = len(seg.class_names)
    counts = np.bincount(labels.ravel(), minlength=256)[:num_classes]
    shares = visualize.class_shares(labels, num_classes) * 100.0
    order = np.argsort(-shares, kind="stable")
    return [[seg.class_names[i], round(float(shares[i]), 3), int(counts[i])] for i in order if counts[i] > 0]


def _as_rgb(image: np.ndarray) -> np.ndarray:
    """Gradio gives RGB uint8 with ``image_mode="RGB"``; webcam frames can still carry alpha."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3].astype(np.uint8, copy=False))


def build_demo(models_root: ModelRoots = None) -> gr.Blocks:
    """The whole page; tests launch it with :func:`launch` on a free port."""
    models = discover_models(models_root)
    pairs = compare_pairs(models)
    work_dir = Path(tempfile.mkdtemp(prefix="dass-demo-"))
    atexit.register(shutil.rmtree, work_dir, ignore_errors=True)
    state = DemoState(models=models, work_dir=work_dir)
    backends = available_backends()
    default_model = _default_model(models_root, models)
    default_meta = models[default_model].meta  # checked by load_model_dir: class_names and palette are there
    examples = sorted(str(p) for p in EXAMPLES_DIR.glob("*.png"))

    def segment_image(image, model_name, backend, alpha, resolution):
        """Image tab: overlay, colour mask, legend, share table, latency, downloads."""
        rgb = read_upload(image)
        if rgb is None:
            return None, None, None, [], "", None
        shown, labels, seg, ms = _run(state, rgb, model_name, backend, resolution)
        pal = np.asarray(seg.palette, dtype=np.uint8)
        mask = visualize.color_mask(labels, pal)
        present = np.bincount(labels.ravel(), minlength=256)[: len(seg.class_names)] > 0
        out = state.out_dir()
        Image.fromarray(mask).save(out / "segmentation_color.png")
        Image.fromarray(labels.astype(np.uint8)).save(out / "segmentation_trainIds.png")
        latency = f"**{ms:.0f} ms** on `{seg.backend_name}` · {labels.shape[1]}x{labels.shape[0]} output"
        return (
            visualize.overlay(shown, labels, pal, alpha=float(alpha)),
            mask,
            visualize.legend(seg.class_names, pal, present=present),
            _share_rows(labels, seg),
            latency,
            [str(out / "segmentation_color.png"), str(out / "segmentation_trainIds.png")],
        )

    def segment_frame(frame, model_name, backend, alpha):
        """Webcam stream: overlay only, at model size, to keep up with the camera on CPU."""
        if frame is None:
            return None
        shown, labels, seg, _ = _run(state, _as_rgb(frame), model_name, backend, "model size")
        return visualize.overlay(shown, labels, np.asarray(seg.palette, dtype=np.uint8), alpha=float(alpha))

    # ``progress`` is never called: declaring it makes Gradio mirror the pipeline's tqdm bar in the page.
    def segment_video(video, model_name, backend, alpha, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
        """Video tab: the same pipeline as ``dass-segment`` on a video; returns the rendered video and its download."""
        if video is None:
            raise gr.Error("Upload a video first (MP4, AVI, MOV, MKV or WebM).")
        path = Path(video)
        if path.suffix.lower() not in VIDEO_EXTS:
            raise gr.Error(f"'{path.name}' is not a video this demo can read ({', '.join(sorted(VIDEO_EXTS))}).")
        seg = state.segmenter(model_name, backend)
        out = state.out_dir() / f"{path.stem}_segmented.mp4"
        start = time.perf_counter()
        try:
            frames, truncated = _segment_video(seg, path, out, float(alpha))
        except DeployError as exc:
            raise gr.Error(f"'{path.name}' could not be read as a video ({exc}).", title="Not a video") from exc
        if frames == 0:
            raise gr.Error(f"'{path.name}' has no readable frames.", title="Not a video")
        seconds = time.perf_counter() - start
        if truncated:
            gr.Warning(f"Only the first {MAX_VIDEO_FRAMES} frames were processed (CPU demo limit).")
        latency = f"**{1000 * seconds / max(frames, 1):.0f} ms/frame** on `{seg.backend_name}` · {frames} frames"
        return str(out), latency, [str(out)]

    def find_pair(key: str) -> ComparePair:
        pair = next((p for p in pairs if p.key == key), None)
        if pair is None:
            raise gr.Error("pick a model pair from the list.")
        return pair

    def pair_titles(key):
        """Compare tab: the two outputs are titled with the models of the chosen pair."""
        pair = find_pair(key)
        return gr.Image(label=pair.source_title), gr.Image(label=pair.adapted_title)

    def compare(image, pair_key, backend, alpha, resolution):
        """Compare tab: the same input through the source-only and the adapted model."""
        rgb = read_upload(image)
        if rgb is None:
            return None, None, ""
        pair = find_pair(pair_key)
        shown, src_labels, src_seg, src_ms = _run(state, rgb, pair.source.name, backend, resolution)
        _, ada_labels, ada_seg, ada_ms = _run(state, rgb, pair.adapted.name, backend, resolution)
        pal = np.asarray(src_seg.palette, dtype=np.uint8)
        changed = float((src_labels != ada_labels).mean() * 100.0)
        summary = (
            f"{changed:.1f}% of the pixels change class after adaptation. "
            f"Latency: source-only {src_ms:.0f} ms, adapted {ada_ms:.0f} ms on `{ada_seg.backend_name}`."
        )
        return (
            visualize.overlay(shown, src_labels, pal, alpha=float(alpha)),
            visualize.overlay(shown, ada_labels, pal, alpha=float(alpha)),
            summary,
        )

    with gr.Blocks(title="dass · BiDA domain-adaptive segmentation", delete_cache=(3600, 3600)) as demo:
        gr.Markdown("# dass · domain-adaptive semantic segmentation (BiDA)")
        gr.Markdown(INTRO)
        model_info = gr.Markdown(models[default_model].describe())
        with gr.Row():
            model_dd = gr.Dropdown(
                choices=[(m.label(), name) for name, m in models.items()],
                value=default_model,
                label="Model",
                scale=3,
            )
            backend_dd = gr.Dropdown(choices=backends, value="auto", label="Backend", scale=1)
            alpha = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity", scale=2)
            resolution = gr.Radio(list(RESOLUTIONS), value="original", label="Output resolution", scale=2)
        gr.HTML(_legend_html(list(default_meta["class_names"]), np.asarray(default_meta["palette"], dtype=np.uint8)))

        with gr.Tabs():
            with gr.Tab("Image"):
                with gr.Row():
                    with gr.Column():
                        image_in = gr.Image(
                            sources=["upload", "clipboard"],
                            type="numpy",
                            image_mode="RGB",
                            label=f"Street scene (PNG/JPEG, up to {MAX_FILE_SIZE})",
                            height=320,
                            elem_id="input_image",
                        )
                        gr.Examples(
                            examples=[[p] for p in examples],
                            inputs=[image_in],
                            label=EXAMPLES_LABEL,
                            elem_id="examples",
                        )
                    overlay_out = gr.Image(
                        label="Overlay", format="png", height=320, interactive=False, elem_id="overlay"
                    )
                with gr.Row():
                    mask_out = gr.Image(label="Colour mask", format="png", height=320, interactive=False, scale=3)
                    legend_out = gr.Image(
                        label="Classes present",
                        show_label=False,
                        format="png",
                        height=320,
                        interactive=False,
                        buttons=[],
                        scale=1,
                    )
                with gr.Row():
                    table_out = gr.Dataframe(
                        headers=TABLE_HEADERS,
                        datatype=["str", "number", "number"],
                        label="Share of pixels per class",
                        interactive=False,
                        max_height=320,
                        scale=2,
                        elem_id="shares",
                    )
                    with gr.Column(scale=1):
                        latency_out = gr.Markdown(elem_id="latency")
                        files_out = gr.File(label="Downloads", file_count="multiple", interactive=False)
            with gr.Tab("Video"):
                with gr.Row():
                    video_in = gr.Video(sources=["upload"], label=f"Video (up to {MAX_FILE_SIZE})", elem_id="video_in")
                    video_out = gr.Video(label="Segmented video", interactive=False, elem_id="video_out")
                video_btn = gr.Button("Segment video", variant="primary")
                with gr.Row():
                    video_latency = gr.Markdown()
                    video_files = gr.File(label="Download", file_count="multiple", interactive=False)
            with gr.Tab("Webcam"):
                with gr.Row():
                    cam_in = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam")
                    cam_out = gr.Image(label="Live overlay", interactive=False)
            if pairs:
                with gr.Tab("Compare"):
                    gr.Markdown("The same image through the source-only model and the BiDA-adapted model.")
                    with gr.Row():
                        cmp_in = gr.Image(
                            sources=["upload", "clipboard"],
                            type="numpy",
                            image_mode="RGB",
                            label="Street scene",
                            elem_id="compare_image",
                        )
                        pair_dd = gr.Dropdown([p.key for p in pairs], value=pairs[0].key, label="Model pair")
                    gr.Examples(examples=[[p] for p in examples], inputs=[cmp_in], label=EXAMPLES_LABEL)
                    with gr.Row():
                        src_out = gr.Image(label=pairs[0].source_title, interactive=False)
                        ada_out = gr.Image(label=pairs[0].adapted_title, interactive=False, elem_id="compare_adapted")
                    cmp_summary = gr.Markdown()
                pair_dd.change(
                    pair_titles,
                    inputs=pair_dd,
                    outputs=[src_out, ada_out],
                    queue=False,
                    api_visibility="private",
                )
                gr.on(
                    [cmp_in.change, pair_dd.change],
                    compare,
                    inputs=[cmp_in, pair_dd, backend_dd, alpha, resolution],
                    outputs=[src_out, ada_out, cmp_summary],
                    api_name="compare",
                    preprocess=False,
                )

        model_dd.change(lambda name: models[name].describe(), inputs=model_dd, outputs=model_info, queue=False)
        gr.on(
            [image_in.change, model_dd.change, backend_dd.change, resolution.change, alpha.release],
            segment_image,
            inputs=[image_in, model_dd, backend_dd, alpha, resolution],
            outputs=[overlay_out, mask_out, legend_out, table_out, latency_out, files_out],
            api_name="segment",
            preprocess=False,  # read_upload decodes the image, so a bad file gets a clear message
        )
        video_btn.click(
            segment_video,
            inputs=[video_in, model_dd, backend_dd, alpha],
            outputs=[video_out, video_latency, video_files],
            api_name="segment_video",
        )
        cam_in.stream(
            segment_frame,
            inputs=[cam_in, model_dd, backend_dd, alpha],
            outputs=[cam_out],
            stream_every=0.5,
            time_limit=120,
            concurrency_limit=1,
            api_visibility="undocumented",
        )

    demo.queue(default_concurrency_limit=2, max_size=16)
    return demo


def _segment_video(seg: Segmenter, src: Path, dst: Path, alpha: float) -> tuple[int, bool]:
    """``dass_deploy.pipeline.run_video`` with the CLI's renderer (overlay + legend) -> (frames written, truncated)."""
    capture, info = open_video(VideoItem(source=str(src), name=src.stem, kind="video"))
    sink = VideoSink(dst, info.fps, info.width, info.height)
    render = Renderer(seg.class_names, seg.palette, alpha=alpha, with_legend=True)
    total = min(info.frames, MAX_VIDEO_FRAMES) if info.frames else MAX_VIDEO_FRAMES
    stats = run_video(
        seg, capture, sink, render, total=total, progress=True, desc=src.name, max_frames=MAX_VIDEO_FRAMES
    )
    truncated = stats.frames >= MAX_VIDEO_FRAMES and (info.frames is None or info.frames > MAX_VIDEO_FRAMES)
    return stats.frames, truncated


def launch(
    demo: gr.Blocks,
    models_root: ModelRoots,
    host: str = "127.0.0.1",
    port: int = 7860,
    share: bool = False,
    block: bool = True,
) -> tuple[Any, str]:
    """Serve with the demo's limits: upload size, and file access only to the examples and the models.

    Returns ``(fastapi app, local URL)``; ``block=False`` returns at once (tests run the server in a thread).
    """
    app, local_url, _ = demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        prevent_thread_lock=not block,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(EXAMPLES_DIR), *(str(root.resolve()) for root in _as_list(models_root))],
        show_error=False,
        quiet=not block,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
    )
    return app, local_url


@click.command(
    "dass-demo",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Exit status: 0 after Ctrl-C, 2 usage or setup error (e.g. no loadable model in --models).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="GRADIO_SERVER_NAME",
    show_envvar=True,
    help="Interface to listen on (0.0.0.0 for the LAN).",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=7860,
    show_default=True,
    envvar="GRADIO_SERVER_PORT",
    show_envvar=True,
    help="Port to listen on.",
)
@click.option("--share", is_flag=True, help="Also open a public gradio.live link.")
@click.option(
    "--models",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model repository (folders written by dass-export) to show instead of the default ones: ./models (or "
    "$DASS_MODELS) and the bundled models. Broken folders are skipped with a warning.",
)
def demo_command(host: str, port: int, share: bool, models: Path | None) -> None:
    """Serve the web demo: segment street scenes with exported BiDA models, on CPU, in a browser."""
    models_root = models if models is not None else model_roots()
    try:
        demo = build_demo(models_root)
    except DeployError as exc:
        fail(str(exc))
    launch(demo, models_root, host=host, port=port, share=share, block=True)
    finish(0)


def main(argv: list[str] | None = None) -> int:
    """``dass-demo``: serve the demo until Ctrl+C; returns the exit status (2: no usable model)."""
    return run_command(demo_command, argv, "dass-demo")


if __name__ == "__main__":
    raise SystemExit(main())
