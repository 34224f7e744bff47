"""How many passes ``--adapt-bn`` makes, chosen on selection models and a selection camera, before the table.

    python benchmarks/adapt_bn_passes.py CKPT [CKPT ...]        # new camera seed 600, N = 256, at 128x256
    python benchmarks/adapt_bn_passes.py runs/proxy-paper-scratch-seed0/source_only/source_only/last.pt \\
        runs/proxy-paper-scratch-seed0/oracle/oracle/last.pt --label scratch-source-only --label scratch-oracle

``--adapt-bn`` gives every BatchNorm layer the population statistics of its input over every pixel of every frame,
as inference meets them (``dass_train.bn_statistics.population_bn_statistics``). A layer's input depends on the
statistics of the layers before it, so the estimate is made in passes over the frames: after P passes the first P
layers of the chain are exact, and a pass more than the chain is deep changes nothing (``converged``). Each pass
costs a forward pass per frame, so the CLI's default should be the fewest passes that give what convergence gives.

For each checkpoint this measures, on the new camera's val (mIoU at the labels' resolution, as ``dass-segment
--eval``) after re-estimating on N of its train frames (one frame per batch, as the CLI):

- before (the checkpoint's statistics);
- the estimator the CLI used before this one: the average of per-frame means and of per-frame variances
  (``dass_train.bn_statistics.cumulative_bn_statistics``, one frame per batch);
- the same frames in batches of 8, that estimator (as ``dass-train eval --target-bn`` runs);
- the population estimate after 1, 2, 3, 5 and 8 passes and at convergence (a pass that changes nothing beyond
  float rounding, ``dass_train.bn_statistics.converged``: where ``--adapt-passes exact`` stops; or
  ``--max-passes``), with each pass's movement and seconds.

**The rule, written before any figure:** the default is the smallest P in {1, 2, 3, 5, 8} whose mIoU is within 0.1
point of the converged estimate's on every selection model; 8 if none is. The selection data are not the table's:
the new camera of seed 100 (``data/newcamera-seed600``; the table uses seeds 500-502) and checkpoints that are not
among ``benchmarks/adapt_bn.py``'s models. Results: benchmarks/results/adapt_bn_passes.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapt_bn import (  # noqa: E402
    NEWCAMERA_COUNTS,
    NEWCAMERA_SEED,
    SIZE,
    _rel,
    evaluate,
    make_newcamera,
    per_frame_average,
    read_frames,
)

from dass_deploy.machine import describe_machine, machine_key, machine_markdown  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SELECTION_SEED = 100  # the new camera of seed 100: data/newcamera-seed600, no table's
REPORTED = (1, 2, 3, 5, 8)
TOLERANCE = 0.001  # mIoU as a fraction: 0.1 point


def measure(ckpt: Path, label: str, newcam: Path, count: int, max_passes: int) -> dict:
    from dass_deploy.adapt_bn import bn_training
    from dass_deploy.segmenter import Segmenter
    from dass_train.bn_statistics import batchnorm_layers, converged, pooled_bn_pass, statistics_movement
    from dass_train.checkpoint import file_sha256

    seg = Segmenter(str(ckpt), backend="torch", size=SIZE)
    backend, network = seg.backend, seg.backend.network
    original = {k: v.clone() for k, v in network.state_dict().items()}
    layers = list(batchnorm_layers(network, include_frozen=True).values())
    frames = read_frames(str(newcam / "cityscapes" / "leftImg8bit" / "train"), count)
    xs = [backend.prepare(x) for x in frames]
    row = {
        "label": label,
        "checkpoint": _rel(ckpt),
        "sha256": file_sha256(ckpt),
        "bn": bn_training(backend.checkpoint_meta),
        "layers": len(layers),
        "frames": len(xs),
        "before": evaluate(seg, newcam),
    }
    for name, batch in (("per_frame_average", 1), ("batches_of_8", 8)):
        per_frame_average(backend, frames, batch)
        row[name] = evaluate(seg, newcam)
        network.load_state_dict(original)

    passes, previous, done = [], None, False
    for index in range(max_passes):
        start = time.perf_counter()
        pooled_bn_pass(network, xs, layers, first=index == 0)
        seconds = time.perf_counter() - start
        now = [(m.running_mean.double().clone(), m.running_var.double().clone()) for m in layers]
        movement = None if previous is None else statistics_movement(previous, now)
        done = previous is not None and converged(previous, now)
        previous = now
        entry = {"passes": index + 1, "seconds": seconds, "movement": movement}
        if index + 1 in REPORTED or done or index + 1 == max_passes:
            entry["miou"] = evaluate(seg, newcam)
        passes.append(entry)
        text = "" if movement is None else f", moved {movement:.2e} sd"
        score = f", mIoU {100 * entry['miou']:.2f}" if "miou" in entry else ""
        print(f"  {label}: pass {index + 1} ({seconds:.1f} s{text}{score})")
        if done:
            break
    row["passes"] = passes
    row["converged_at"] = passes[-1]["passes"] if done else None
    row["converged"] = passes[-1]["miou"]
    network.load_state_dict(original)
    return row


def choose(models: list[dict]) -> int | None:
    """The rule of the docstring: the smallest reported P within TOLERANCE of convergence on every model; None when
    a model did not converge within ``--max-passes`` (no reference to compare with)."""
    if any(m["converged_at"] is None for m in models):
        return None
    for p in REPORTED:
        ok = True
        for m in models:
            got = next((e.get("miou") for e in m["passes"] if e["passes"] == p), None)
            if got is None:  # converged before p: p passes give the converged statistics; else never measured
                got = m["converged"] if m["converged_at"] else None
            if got is None:
                return REPORTED[-1]
            ok &= abs(got - m["converged"]) <= TOLERANCE
        if ok:
            return p
    return REPORTED[-1]


def markdown(result: dict) -> str:
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    lines = [
        "# How many passes `--adapt-bn` makes (selection models, selection camera)",
        "",
        *(f"    {c}" for c in result["commands"]),
        "",
        f"New camera seed {result['newcamera']['seed']} (not a table's), N = {result['frames']} train frames one per "
        f"batch, mIoU (%) on its val at {result['size'][0]}x{result['size'][1]}. Rule fixed before measuring: the "
        "default is the smallest P in {1, 2, 3, 5, 8} within 0.1 point of the converged estimate on every model.",
        "",
        "| model | BN | before | per-frame average (old CLI) | batches of 8 | "
        + " | ".join(f"P = {p}" for p in REPORTED)
        + " | converged (P) |",
        "|---|---|" + "---:|" * (4 + len(REPORTED)),
    ]
    for m in result["models"]:
        by_p = {e["passes"]: e.get("miou") for e in m["passes"]}
        cells = [pct(by_p[p]) if by_p.get(p) is not None else "=" if m["converged_at"] else "-" for p in REPORTED]
        at = m["converged_at"] or f">{m['passes'][-1]['passes']}"
        lines.append(
            f"| {m['label']} | {m['bn']} | {pct(m['before'])} | {pct(m['per_frame_average'])} | "
            f"{pct(m['batches_of_8'])} | " + " | ".join(cells) + f" | {pct(m['converged'])} ({at}) |"
        )
    lines += [
        "",
        "`=`: converged before P passes, so P passes give the converged figure; `-`: not reached (`--max-passes`).",
        "",
        "Movement of each pass (median |mean change| / std over all channels) and seconds per pass:",
        "",
    ]
    for m in result["models"]:
        moves = ", ".join(f"{e['movement']:.1e}" for e in m["passes"] if e["movement"] is not None)
        secs = sum(e["seconds"] for e in m["passes"]) / len(m["passes"])
        lines.append(f"- {m['label']}: {moves} ({secs:.1f} s per pass)")
    from dass_deploy.adapt_frames import DEFAULT_ADAPT_PASSES

    chosen = result["chosen"]
    lines += [
        "",
        f"The rule written before measuring gives **P = {chosen}**."
        if chosen
        else "The rule gives no choice: a model did not converge within `--max-passes`, so there is no reference.",
        f"The CLI's default (`DEFAULT_ADAPT_PASSES`, dass_deploy/adapt_frames.py) is **{DEFAULT_ADAPT_PASSES}**"
        + (" (exact)" if DEFAULT_ADAPT_PASSES == 0 else "")
        + ("." if DEFAULT_ADAPT_PASSES == chosen else ": docs/ADAPT_BN.md says why it departs from the rule."),
        "",
    ]
    machines = {machine_key(m["machine"]): m["machine"] for m in result["models"]}
    lines += ["Machines:", "", *(f"- {machine_markdown(m)}" for m in machines.values()), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path, help="selection checkpoints (not the table's models)")
    p.add_argument("--label", action="append", default=[], help="a name per checkpoint (default: its path)")
    p.add_argument("--frames", type=int, default=256, help="N train frames of the new camera (default 256)")
    p.add_argument("--max-passes", type=int, default=20, help="stop there if not converged (default 20)")
    p.add_argument("--newcamera", default=str(REPO / "data"), help="folder of the newcamera-seed<S> sets")
    p.add_argument("--newcamera-counts", default=NEWCAMERA_COUNTS, help="its source,train,val image counts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--summary-only", action="store_true", help="only rewrite the .md from the .json")
    args = p.parse_args(argv)
    if args.summary_only:
        result = json.loads((Path(args.out) / "adapt_bn_passes.json").read_text())
        (Path(args.out) / "adapt_bn_passes.md").write_text(markdown(result))
        print(markdown(result))
        return 0
    if not args.checkpoints:
        p.error("give at least one checkpoint (or --summary-only)")
    missing = [str(c) for c in args.checkpoints if not c.is_file()]
    if missing:
        p.error(f"no such checkpoint: {', '.join(missing)}")
    if args.label and len(args.label) != len(args.checkpoints):
        p.error(f"--label: {len(args.label)} given for {len(args.checkpoints)} checkpoints")
    labels = args.label or [_rel(c) for c in args.checkpoints]
    ns = argparse.Namespace(newcamera=args.newcamera, newcamera_counts=args.newcamera_counts, overrides=[])
    newcam = make_newcamera(SELECTION_SEED, ns, REPO / "runs" / "adapt_bn")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    models = [
        measure(c, lab, newcam, args.frames, args.max_passes) for c, lab in zip(args.checkpoints, labels, strict=True)
    ]
    words = [_rel(c) for c in args.checkpoints] + [f"--label {lab}" for lab in args.label]
    words += ["--threads", str(args.threads)] if args.threads else []
    for flag, value, default in (("--frames", args.frames, 256), ("--max-passes", args.max_passes, 20)):
        words += [flag, str(value)] if value != default else []
    if args.newcamera_counts != NEWCAMERA_COUNTS:
        words += ["--newcamera-counts", args.newcamera_counts]
    command = "python benchmarks/adapt_bn_passes.py " + " ".join(words)
    for m in models:
        m["command"], m["machine"] = command, describe_machine()
    result = {
        "newcamera": {"root": _rel(newcam), "seed": NEWCAMERA_SEED + SELECTION_SEED, "counts": args.newcamera_counts},
        "frames": args.frames,
        "size": list(SIZE),
        "rule": "smallest P in {1,2,3,5,8} within 0.1 mIoU point of the converged estimate on every model; 8 if none",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    before = out / "adapt_bn_passes.json"
    if before.is_file():  # models measured by earlier runs on the same camera and frames are kept (resumable)
        old = json.loads(before.read_text())
        if all(old.get(k) == result[k] for k in ("newcamera", "frames", "size")):
            labels = {m["label"] for m in models}
            models = [m for m in old["models"] if m["label"] not in labels] + models
    result["commands"] = sorted({m["command"] for m in models})
    result["models"] = models
    result["chosen"] = choose(models)
    (out / "adapt_bn_passes.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "adapt_bn_passes.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
