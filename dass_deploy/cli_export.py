"""``dass-export``: checkpoint -> Triton model folder (ONNX fp32 / fp16 / INT8, optional TensorRT plan).

``dass_deploy.cli`` re-exports ``export_main``; the pyproject entry point is ``dass_deploy.cli:export_main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dass_deploy.errors import DeployError

EPILOG = """examples:
  dass-export runs/bida/final.pt                              # models/final-fp32, 512x1024, uint8 labels
  dass-export final.pt --name bida-r101 --dynamic             # any batch / height / width
  dass-export final.pt --int8 --calib data/cityscapes/leftImg8bit/train/aachen
  dass-export authors_gta2city.pth --from bida-authors --stem target --output logits
  dass-export final.pt --trt --fp16                           # needs a CUDA GPU and pip install 'dass[gpu]'
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dass-export",
        description="Export a DeepLab-V2 checkpoint (dass, AdaptSegNet, BiDA authors', ProDA layouts) to ONNX in a "
        "Triton model-repository folder <out>/<name>/{config.pbtxt, meta.json, 1/model.onnx[, 1/model.plan]}. "
        "The graph takes RGB float32 0..255 [N,3,H,W], normalises inside and returns full-resolution class maps. "
        "A parity check against torch runs before anything is written.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint file (.pt / .pth), loaded with torch.load(weights_only=True)")
    p.add_argument("--name", default=None, help="model folder name (default: <checkpoint stem>-<precision>[-trt])")
    p.add_argument("--out", default="models", help="model repository folder (default: models)")
    p.add_argument("--height", type=int, default=512, help="input height the graph is built for (default: 512)")
    p.add_argument("--width", type=int, default=1024, help="input width the graph is built for (default: 1024)")
    p.add_argument("--dynamic", action="store_true", help="dynamic height/width axes (batch is always dynamic)")
    p.add_argument(
        "--output",
        choices=("labels", "logits"),
        default="labels",
        help="labels: uint8 [N,H,W] class map (argmax in the graph); logits: float32 [N,K,H,W] (default: labels)",
    )
    prec = p.add_argument_group("precision")
    prec.add_argument("--fp16", action="store_true", help="float16 weights and convolutions, float32 IO")
    prec.add_argument("--int8", action="store_true", help="INT8 static quantisation (QDQ); needs --calib")
    prec.add_argument("--calib", default=None, help="folder of target-domain images for INT8 calibration")
    prec.add_argument(
        "--calib-max", type=int, default=64, help="use at most this many calibration images (default: 64)"
    )
    prec.add_argument(
        "--int8-val",
        default=None,
        help="Cityscapes-layout val folder (leftImg8bit/, gtFine/): refuse INT8 if mIoU drops by more than 1 point",
    )
    prec.add_argument("--trt", action="store_true", help="also build a TensorRT plan (needs a CUDA GPU and tensorrt)")
    src = p.add_argument_group("checkpoint layout")
    src.add_argument(
        "--from",
        dest="source",
        choices=("auto", "dass", "adaptseg", "bida-authors", "proda"),
        default="auto",
        help="key layout of the checkpoint (default: auto, detected from the keys)",
    )
    src.add_argument(
        "--stem",
        choices=("source", "target"),
        default=None,
        help="which stem of the authors' two-stem checkpoints to use (default: target, the one for real images)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing <out>/<name>")
    p.add_argument("--force", action="store_true", help="write the model even if the parity check fails")
    p.add_argument("--parity-samples", type=int, default=3, help="inputs for the parity check (default: 3)")
    p.add_argument("--quiet", action="store_true", help="no progress messages, only the summary")
    return p


def export_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``dass-export``; returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    from dass_train.errors import UserError

    try:
        from dass_deploy.export import export_model

        result = export_model(
            args.checkpoint,
            out=args.out,
            name=args.name,
            height=args.height,
            width=args.width,
            dynamic=args.dynamic,
            output=args.output,
            fp16=args.fp16,
            int8=args.int8,
            calib=args.calib,
            trt=args.trt,
            source=args.source,
            stem=args.stem,
            overwrite=args.overwrite,
            force=args.force,
            parity_samples=args.parity_samples,
            progress=not args.quiet,
            int8_val=args.int8_val,
            calib_max=args.calib_max,
        )
    except (DeployError, UserError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(result.summary))
    return 0


if __name__ == "__main__":
    sys.exit(export_main())
