"""CPU side of the GPU suite: synthetic data in the GTA5 / Cityscapes layouts at their real resolutions, a random
ResNet-101 checkpoint to start the adapt stage from, and the ONNX export the TensorRT timings start from.

    python benchmarks/gpu/prepare.py --work runs/gpu_suite [--source-size 1914x1052] [--target-size 2048x1024]
        [--images 8] [--export-size 1024x2048] [--backbone resnet101]

Writes ``<work>/prepare.json`` (paths, sizes, seconds) and prints it. Runs without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def parse_wxh(text: str) -> tuple[int, int]:
    """``1914x1052`` -> (width, height)."""
    w, _, h = text.lower().partition("x")
    return int(w), int(h)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="working folder (data, checkpoint, export)")
    p.add_argument("--source-size", default="1914x1052", help="GTA5 image size WxH (default: GTA5's 1914x1052)")
    p.add_argument("--target-size", default="2048x1024", help="Cityscapes image size WxH (default: 2048x1024)")
    p.add_argument("--images", type=int, default=8, help="images per split (default 8)")
    p.add_argument("--export-size", default="1024x2048", help="ONNX export size HxW (default 1024x2048)")
    p.add_argument("--backbone", default="resnet101")
    args = p.parse_args(argv)

    import torch

    from dass_deploy.export import export_model
    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.data.synthetic import SyntheticConfig, generate
    from dass_train.network import CAFFE_BGR, deeplab_v2

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    (sw, sh), (tw, th) = parse_wxh(args.source_size), parse_wxh(args.target_size)
    n = max(1, args.images)
    # Two generator runs: the source split at GTA5's size, the target splits at Cityscapes' size.
    src = generate(work / "data_source", SyntheticConfig(sw, sh, n, 0, 0), progress=False)
    tgt = generate(work / "data_target", SyntheticConfig(tw, th, 0, n, max(1, n // 2)), progress=False)

    torch.manual_seed(0)
    model = deeplab_v2(num_classes=19, backbone=args.backbone)
    ckpt = work / f"{args.backbone}_random.pt"
    meta = checkpoint_meta_default(backbone=args.backbone, normalization=CAFFE_BGR, stage="source_only", iteration=0)
    save_checkpoint(ckpt, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    eh, _, ew = args.export_size.lower().partition("x")
    exported = export_model(
        ckpt, out=work / "models", name=f"{args.backbone}-fp32", height=int(eh), width=int(ew), parity_samples=1,
        progress=False, overwrite=True,
    )  # fmt: skip
    info = {
        "source_root": src["gta5"],
        "target_root": tgt["cityscapes"],
        "source_size": [sw, sh],
        "target_size": [tw, th],
        "images": {"source": n, "target_train": n, "target_val": max(1, n // 2)},
        "checkpoint": str(ckpt),
        "model_dir": str(exported.model_dir),
        "export_size": [int(eh), int(ew)],
        "seconds": round(time.perf_counter() - start, 1),
    }
    (work / "prepare.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
