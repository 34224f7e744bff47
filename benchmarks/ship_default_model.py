"""Export the embedded default models into models/ with their model cards.

    python benchmarks/ship_default_model.py --run runs/synth2real-demo

Takes the source-only and the BiDA-adapted checkpoints of a `dass-train synth2real` run, exports both with
`dass-export` (INT8, calibrated on synthetic target-train images, refused if mIoU drops by more than 1 point),
scores the exported ONNX models on the synthetic target val split with `dass-segment --eval`, and writes
models/<name>/README.md and models/DEFAULT.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from dass_deploy.cli import segment_main
from dass_deploy.cli_export import export_main

REPO = Path(__file__).resolve().parents[1]
MODELS = {"adapt": "synth2real-bida-r18", "source_only": "synth2real-source-only-r18"}


def onnx_miou(model_dir: Path, val_images: Path, val_labels: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        code = segment_main(
            [
                str(val_images),
                "--model",
                str(model_dir),
                "--out",
                tmp,
                "--save",
                "labels",
                "--eval",
                str(val_labels),
                "--quiet",
            ]
        )
        if code:
            raise SystemExit(f"dass-segment --eval failed for {model_dir}")
        return json.loads((Path(tmp) / "eval.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a dass-train synth2real run folder")
    p.add_argument("--data", default="data/synthetic", help="the synthetic benchmark root")
    p.add_argument("--out", default=str(REPO / "models"))
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    run, data, out = Path(args.run), Path(args.data), Path(args.out)
    target = data / "cityscapes"
    val_images, val_labels = target / "leftImg8bit" / "val", target / "gtFine" / "val"
    summary = json.loads((run / "summary.json").read_text())
    cards = {}
    for stage, name in MODELS.items():
        ckpt = run / stage / "last.pt"
        export_cmd = [
            str(ckpt),
            "--name",
            name,
            "--out",
            str(out),
            "--height",
            str(args.height),
            "--width",
            str(args.width),
            "--int8",
            "--calib",
            str(target / "leftImg8bit" / "train"),
            "--int8-val",
            str(target),
            "--overwrite",
            "--quiet",
        ]
        if export_main(export_cmd):
            raise SystemExit(f"dass-export failed for {ckpt}")
        meta = json.loads((out / name / "meta.json").read_text())
        ev = onnx_miou(out / name, val_images, val_labels)
        cards[stage] = {
            "name": name,
            "export": "dass-export " + " ".join(shlex.quote(a) for a in export_cmd),
            "torch_miou": summary["stages"][stage]["miou"],
            "onnx_miou": ev["miou"],
            "meta": meta,
        }
    for stage, card in cards.items():
        write_card(out / card["name"], stage, card, cards, summary, command, run)
    (out / "DEFAULT").write_text(MODELS["adapt"] + "\n")
    print(json.dumps({k: {"torch": v["torch_miou"], "onnx_int8": v["onnx_miou"]} for k, v in cards.items()}, indent=1))
    return 0


def write_card(folder: Path, stage: str, card: dict, cards: dict, summary: dict, command: str, run: Path) -> None:
    meta = card["meta"]
    int8 = meta["export"].get("int8") or {}
    what = (
        "adapted with BiDA (source-only initialisation, then Eq. 12 with static, dynamic and hybrid pseudo labels)"
        if stage == "adapt"
        else "trained on the labelled source (game-like) domain only: the baseline"
    )
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    lines = [
        f"# {card['name']}",
        "",
        f"DeepLab-V2 ResNet-18 (light backbone), 19 Cityscapes classes, {what}, on the embedded synthetic",
        "domain-shift benchmark (`synth2real`: procedurally generated street scenes, game-like source style ->",
        "camera-like target style). It is a demonstration model: it has never seen a real image and will not",
        "segment real street photos well.",
        "",
        "## How it was made",
        "",
        f"1. `dass-train synth2real` (run folder `{run}`, {summary['minutes']:.0f} min on 2 CPU cores; the resolved",
        "   config is in the run's `config.yaml`).",
        f"2. `{card['export']}`",
        f"3. Model cards written by `{command}`.",
        "",
        "## Scores (synthetic target val, 100 images, 19-class mIoU)",
        "",
        "| model | PyTorch checkpoint (eval protocol) | this ONNX INT8 export (`dass-segment --eval`) |",
        "|---|---:|---:|",
    ]
    for st, c in cards.items():
        label = "BiDA-adapted" if st == "adapt" else "source-only"
        lines.append(
            f"| {label}{' (this model)' if st == stage else ''} | {100 * c['torch_miou']:.2f} | "
            f"{100 * c['onnx_miou']:.2f} |"
        )
    lines += [
        "",
        "The checkpoint column predicts at 256x128 and upsamples logits to the 512x256 labels; the export column runs",
        "the exported graph at 256x128 and resizes class maps with nearest neighbour, as `dass-segment` does.",
        "",
        "## Files",
        "",
        f"- `1/model.onnx`: INT8 (QDQ, calibrated on {int8.get('calibration_images', 'synthetic target-train')} images), "
        f"input RGB float32 0..255 [N,3,{meta['input']['height']},{meta['input']['width']}], output uint8 class map.",
        f"- INT8 vs fp32 on CPU: {int8.get('cpu_speedup', float('nan')):.2f}x; mIoU change "
        f"{-int8.get('miou_drop', float('nan')):+.2f} points (export-size protocol).",
        "- `meta.json`: classes, palette, normalisation, parity figures, source checkpoint sha256.",
        "- `config.pbtxt`: Triton Inference Server configuration.",
        f"- Total size {size:.1f} MB.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
