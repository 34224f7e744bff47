"""Cost of the method: a BiDA training step vs a plain source+target cross-entropy step, and static-label
generation vs plain inference. Both ratios are measured in one run, interleaved, on the same model and crops.

    python benchmarks/bench_bida_step.py                       # light ResNet-18 at the synth2real crop (CPU)
    python benchmarks/bench_bida_step.py --backbone resnet101 --crop 512x512 --batch 2 --device cuda

Writes benchmarks/results/bida_step_<device>.md and .json (or under --out) with this command line and the machine
(``dass_deploy.machine``: CPU model, cores, instruction sets, library versions incl. torch, thread settings).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from dass_deploy.machine import describe_machine, machine_markdown
from dass_train import bida
from dass_train.config import LossConfig, MethodConfig
from dass_train.labels import NUM_CLASSES
from dass_train.network import deeplab_v2
from dass_train.trainer import bida_losses

RESULTS = Path(__file__).resolve().parent / "results"


def labels_like(n: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Blocky labels with ~12 classes per image and some ignore, like real crops (not uniform noise)."""
    coarse = torch.randint(0, NUM_CLASSES, (n, 1, max(1, h // 32), max(1, w // 32)), generator=gen).float()
    lab = torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")[:, 0].long()
    lab[torch.rand(n, h, w, generator=gen) < 0.05] = 255
    return lab


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--crop", default="192x128", help="WxH of the training crops")
    p.add_argument("--batch", type=int, default=4, help="images per domain per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=12, help="timed steps of each kind (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--freeze-bn", action="store_true")
    p.add_argument("--label-images", type=int, default=24, help="images for the static-label throughput check")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    host = describe_machine()  # before the timing: its load average is other work, not this run
    device = torch.device(args.device)
    w, h = (int(v) for v in args.crop.lower().split("x"))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = deeplab_v2(NUM_CLASSES, args.backbone, freeze_bn=args.freeze_bn).to(device).train()
    opt = torch.optim.SGD(model.param_groups(1e-4), lr=1e-4, momentum=0.9)
    memory = bida.PrototypeMemory(NUM_CLASSES, model.feature_dim, 0.99).to(device)
    method, weights = MethodConfig(), LossConfig()
    xs = torch.randn(args.batch, 3, h, w, generator=gen).to(device)
    xt = torch.randn(args.batch, 3, h, w, generator=gen).to(device)
    ys = labels_like(args.batch, h, w, gen).to(device)
    yt = labels_like(args.batch, h, w, gen).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def plain_step() -> None:
        logits = model(torch.cat([xs, xt]))
        loss = bida.segmentation_loss(logits[: args.batch], ys) + 0.3 * bida.segmentation_loss(logits[args.batch :], yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bida_step() -> None:
        logits, feats = model(torch.cat([xs, xt]), return_features=True)
        n = args.batch
        losses, _ = bida_losses(logits[:n], logits[n:], feats[:n], feats[n:], ys, yt, memory, method, weights)
        opt.zero_grad(set_to_none=True)
        torch.stack(list(losses.values())).sum().backward()
        opt.step()

    times: dict[str, list[float]] = {"plain": [], "bida": []}
    for i in range(args.steps + 3):
        for name, fn in (
            (("plain", plain_step), ("bida", bida_step)) if i % 2 else (("bida", bida_step), ("plain", plain_step))
        ):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if i >= 3:
                times[name].append(time.perf_counter() - t)
    plain_ms = statistics.median(times["plain"]) * 1000
    bida_ms = statistics.median(times["bida"]) * 1000
    overhead = bida_ms / plain_ms - 1

    label_ratio = static_label_ratio(model, device, args.label_images, (w, h))

    row = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "machine": host,
        "threads": torch.get_num_threads(),
        "backbone": args.backbone,
        "crop": [w, h],
        "batch_per_domain": args.batch,
        "plain_step_ms": round(plain_ms, 1),
        "bida_step_ms": round(bida_ms, 1),
        "bida_overhead": round(overhead, 4),
        "static_labels_vs_inference": label_ratio,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bida_step_{device.type}"
    (out / f"{stem}.json").write_text(json.dumps(row, indent=1) + "\n")
    md = [
        "# BiDA step overhead and static-label throughput",
        "",
        f"Command: `{row['command']}`",
        "",
        f"Device: {row['device']} ({row['threads']} threads), {args.backbone}, crop {w}x{h}, {args.batch}+{args.batch} "
        "images per step; median of interleaved steps.",
        "",
        machine_markdown(row["machine"]),
        "",
        "| step | ms |",
        "|---|---:|",
        f"| plain source+target cross-entropy | {plain_ms:.1f} |",
        f"| BiDA (Eq. 1-12: prototypes, dynamic+hybrid labels, FCL, BCL, entropy) | {bida_ms:.1f} |",
        f"| **overhead** | **{100 * overhead:+.1f}%** (limit +15%) |",
        "",
        f"Static-label pass (CBST histograms, cache, thresholds, PNG writes) vs plain inference over "
        f"{label_ratio['images']} images at {w}x{h}: {label_ratio['static_img_s']:.1f} vs "
        f"{label_ratio['inference_img_s']:.1f} img/s = **{100 * label_ratio['ratio']:.0f}%** (required >= 80%).",
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def static_label_ratio(model, device: torch.device, n: int, size: tuple[int, int]) -> dict:
    """Images/s of ``generate_static_labels`` vs a plain predict+argmax loop over the same in-memory images."""
    from dass_train.pseudo_labels import generate_static_labels

    w, h = size
    gen = torch.Generator().manual_seed(1)
    images = [torch.randn(3, h, w, generator=gen) for _ in range(n)]

    class Images(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            return {"image": images[i], "name": f"city/img{i:04d}_leftImg8bit.png", "full_size": (w, h)}

    model.eval()
    with torch.no_grad():
        for x in images[:2]:
            model(x[None].to(device))
        t = time.perf_counter()
        for x in images:
            logits = model(x[None].to(device))
            torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False).argmax(1).cpu()
        plain = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        res = generate_static_labels(
            model,
            Images(),
            Path(tmp) / "labels",
            num_classes=NUM_CLASSES,
            portion=0.1,
            image_portion=0.1,
            device=device,
            progress=False,
        )
    model.train()
    return {
        "images": n,
        "inference_img_s": n / plain,
        "static_img_s": n / res.seconds,
        "ratio": round(plain / res.seconds, 4),
    }


if __name__ == "__main__":
    sys.exit(main())
