"""Export the embedded default models into models/ with their model cards.

    python benchmarks/ship_default_model.py --run runs/synth2real-demo
    python benchmarks/ship_default_model.py --source-only runs/tables-seed0/source_only/source_only/last.pt \
        --adapted runs/tables-seed0/row4/adapt/last.pt

Takes the source-only and the BiDA-adapted checkpoints of a `dass-train synth2real` run, exports both with
`dass-export` (fp16 by default, see --precision),
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

from dass_deploy.adapt_bn import card_lines
from dass_deploy.cli import segment_main
from dass_deploy.cli_export import export_main
from dass_train.checkpoint import load_checkpoint

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
    p.add_argument("--run", default=None, help="a dass-train synth2real run folder (source_only/, adapt/)")
    p.add_argument("--source-only", default=None, help="source-only checkpoint (default <run>/source_only/last.pt)")
    p.add_argument("--adapted", default=None, help="BiDA checkpoint (default <run>/adapt/last.pt)")
    p.add_argument("--data", default="data/synthetic", help="the synthetic benchmark root")
    p.add_argument("--out", default=str(REPO / "models"))
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=256)
    p.add_argument(
        "--precision",
        default="--fp16",
        help="dass-export precision flags (default --fp16: fp32 is ~47 MB, over the 25 MB budget in git)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also ship the adapted model in INT8 (NNCF, calibrated on 300 target-train images; refused by "
        "dass-export's gate if it loses more than 1 mIoU point on target val)",
    )
    args = p.parse_args(argv)
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])])
    data, out = Path(args.data), Path(args.out)
    ckpts = {
        "adapt": Path(args.adapted or Path(args.run or ".") / "adapt" / "last.pt"),
        "source_only": Path(args.source_only or Path(args.run or ".") / "source_only" / "last.pt"),
    }
    target = data / "cityscapes"
    val_images, val_labels = target / "leftImg8bit" / "val", target / "gtFine" / "val"
    cards = {}
    plan = [(stage, name, args.precision.split()) for stage, name in MODELS.items()]
    if args.int8:
        int8 = ["--int8", "--calib", str(target / "leftImg8bit" / "train"), "--calib-max", "300"]
        int8 += ["--int8-val", str(target)]
        plan.append(("adapt-int8", MODELS["adapt"] + "-int8", int8))
    for stage, name, flags in plan:
        ckpt = ckpts[stage.split("-")[0]]
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
            *flags,
            "--overwrite",
            "--quiet",
        ]
        if export_main(export_cmd):
            raise SystemExit(f"dass-export failed for {ckpt}")
        meta = json.loads((out / name / "meta.json").read_text())
        ev = onnx_miou(out / name, val_images, val_labels)
        cards[stage] = {
            "name": name,
            # the card shows --out relative to the repository: the same command works in any clone
            "export": "dass-export " + " ".join(shlex.quote(_in_repo(a)) for a in export_cmd),
            "torch_miou": load_checkpoint(ckpt)["meta"]["metrics"]["miou"],
            "onnx_miou": ev["miou"],
            "meta": meta,
            "checkpoint": str(ckpt),
        }
    for stage, card in cards.items():
        write_card(out / card["name"], stage, card, cards, command)
    (out / "DEFAULT").write_text(MODELS["adapt"] + "\n")
    print(json.dumps({k: {"torch": v["torch_miou"], "onnx": v["onnx_miou"]} for k, v in cards.items()}, indent=1))
    return 0


def _in_repo(arg: str) -> str:
    """``arg`` relative to the repository when it is an absolute path inside it."""
    path = Path(arg)
    return str(path.relative_to(REPO)) if path.is_absolute() and path.is_relative_to(REPO) else arg


def write_card(folder: Path, stage: str, card: dict, cards: dict, command: str) -> None:
    meta = card["meta"]
    what = (
        "adapted with BiDA (source-only initialisation, then Eq. 12 with static, dynamic and hybrid pseudo labels)"
        if stage.startswith("adapt")
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
        f"1. `dass-train synth2real` -> checkpoint `{card['checkpoint']}` (the resolved config is in its run's",
        "   `config.yaml`).",
        f"2. `{card['export']}`",
        f"3. Model cards written by `{command}`.",
        "",
        "## Scores (synthetic target val, 100 images, 19-class mIoU)",
        "",
        "| model | PyTorch checkpoint (eval protocol) | this ONNX export (`dass-segment --eval`) |",
        "|---|---:|---:|",
    ]
    for st, c in cards.items():
        label = {"adapt": "BiDA-adapted", "source_only": "source-only", "adapt-int8": "BiDA-adapted, INT8"}[st]
        lines.append(
            f"| {label}{' (this model)' if st == stage else ''} | {100 * c['torch_miou']:.2f} | "
            f"{100 * c['onnx_miou']:.2f} |"
        )
    lines += [
        "",
        "The checkpoint column predicts at 256x128 and upsamples logits to the 512x256 labels; the export column runs",
        "the exported graph at 256x128 and resizes class maps with nearest neighbour, as `dass-segment` does.",
        "",
        *(card_lines(meta["adapt_bn"]) if meta.get("adapt_bn") else []),
        "## Files",
        "",
        f"- `1/model.onnx`: {meta['precision']} weights, input RGB float32 0..255 "
        f"[N,3,{meta['input']['height']},{meta['input']['width']}], output uint8 class map; parity with PyTorch: "
        f"argmax agreement {100 * meta['parity']['argmax_agreement']:.2f}% on {meta['parity']['samples']} inputs"
        + (
            " (mostly synthetic noise images, which INT8 rounding moves far more than street scenes: the gate below"
            " is the figure that counts)."
            if meta["precision"] == "int8"
            else "."
        ),
        "- `meta.json`: classes, palette, normalisation, upsampling, parity figures, source checkpoint sha256.",
        *(
            [
                f"- INT8 gate (`meta.json` `export.int8.gate`): mIoU drop {gate['miou_drop']:.2f} points against fp32 "
                f"on target val (limit 1 point), passed: {gate['passed']}; `dass-segment --backend auto` runs it with "
                "OpenVINO when installed (`dass[openvino]`), else ONNX Runtime."
            ]
            if (gate := ((meta.get("export") or {}).get("int8") or {}).get("gate"))
            else []
        ),
        "- `config.pbtxt`: Triton Inference Server configuration.",
        f"- Total size {size:.1f} MB.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
