"""Per-class quality of the static pseudo labels an adaptation run trained on, round by round.

    python benchmarks/pseudo_labels.py runs/tables-paper-seed0/row0/adapt --preset synth2real_paper --seed 0

The adapt stage writes each round of static (CBST) labels to <run>/pseudo/round_NN/. Against target-train ground
truth that training never sees, this reports, per round and per class c: the share of the labelled pixels that
are c (what the round trains on), the precision of the label c (labelled c and truly c, over labelled c where the
ground truth has a class: pixels the ground truth ignores, such as the bonnet, are left out as in mIoU), and its
recall (truly c and labelled c, over truly c). Where self-training loses a class, these say whether its labels were
wrong (low precision), missing (low recall or share), or crowded out by another class's wrong labels.

Writes benchmarks/results/pseudo_labels-<name>.{json,md} (``--name``, default from the run folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dass_deploy.machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def round_confusion(round_dir: Path, dataset) -> list[list[int]]:
    """``[K+1, K]`` counts: rows = ground truth (last row: ignored ground truth), columns = the pseudo label."""
    import numpy as np
    from PIL import Image

    from dass_train.labels import IGNORE_INDEX, NUM_CLASSES
    from dass_train.pseudo_labels import label_path

    k = NUM_CLASSES
    conf = np.zeros((k + 1, k), dtype=np.int64)
    for i, name in enumerate(dataset.names):
        pseudo = np.asarray(Image.open(label_path(round_dir, name))).astype(np.int64)
        gt = np.asarray(dataset.load_label(i)).astype(np.int64)
        gt = np.where(gt == IGNORE_INDEX, k, gt)
        labelled = pseudo != IGNORE_INDEX
        conf += np.bincount(gt[labelled] * k + pseudo[labelled], minlength=(k + 1) * k).reshape(k + 1, k)
    return conf.tolist()


def class_quality(conf: list[list[int]], gt_pixels: list[int]) -> list[dict]:
    """Share, precision and recall of each class's labels from a round's confusion (see the module docstring)."""
    import numpy as np

    c = np.asarray(conf, dtype=np.float64)
    k = c.shape[1]
    labelled = c.sum(0)  # per pseudo class, ignored ground truth included
    judged = c[:k].sum(0)  # where the ground truth has a class
    total = labelled.sum()
    rows = []
    for j in range(k):
        rows.append(
            {
                "share": float(labelled[j] / total) if total else 0.0,
                "precision": float(c[j, j] / judged[j]) if judged[j] else None,
                "recall": float(c[j, j] / gt_pixels[j]) if gt_pixels[j] else None,
                "on_ignored": float(c[k, j] / labelled[j]) if labelled[j] else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapt_dir", help="an adapt stage folder (holds pseudo/round_NN/)")
    p.add_argument("--preset", default="synth2real", help="the run's preset (for the data location)")
    p.add_argument("--seed", type=int, default=0, help="the run's seed (data/synthetic-seed<S>)")
    p.add_argument("--name", default=None, help="results name (default: from the run folder)")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("overrides", nargs="*", help="config overrides (e.g. another data.synthetic_root)")
    args = p.parse_args(argv)
    import numpy as np

    from dass_train.config import build_config
    from dass_train.data.domains import target_dataset
    from dass_train.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES

    adapt = Path(args.adapt_dir)
    rounds = sorted((adapt / "pseudo").glob("round_*"))
    if not rounds:
        p.error(f"{adapt}: no pseudo/round_NN folders (not an adapt stage folder)")
    data = f"data.synthetic_root=data/synthetic-seed{args.seed}"
    cfg = build_config(args.preset, [f"run.seed={args.seed}", data, *args.overrides])
    ds = target_dataset(cfg, "train", None, with_labels=True, seed=args.seed + 1)
    gt_pixels = np.zeros(NUM_CLASSES, dtype=np.int64)
    for i in range(len(ds.names)):
        gt = np.asarray(ds.load_label(i)).astype(np.int64)
        gt_pixels += np.bincount(gt[gt != IGNORE_INDEX], minlength=NUM_CLASSES)[:NUM_CLASSES]
    per_round = []
    for round_dir in rounds:
        conf = round_confusion(round_dir, ds)
        c = np.asarray(conf)
        labelled = c.sum()
        per_round.append(
            {
                "round": round_dir.name,
                "accuracy": float(np.trace(c[:NUM_CLASSES]) / max(c[:NUM_CLASSES].sum(), 1)),
                "density": float(labelled / gt_pixels.sum()),
                "classes": class_quality(conf, gt_pixels.tolist()),
                "confusion": conf,
            }
        )
    name = args.name or "-".join(adapt.resolve().parts[-3:-1])
    words = [args.adapt_dir, "--preset", args.preset, "--seed", str(args.seed), *args.overrides]
    result = {
        "command": "python benchmarks/pseudo_labels.py " + " ".join(shlex.quote(w) for w in words),
        "machine": describe_machine(),
        "images": len(ds.names),
        "gt_share": (gt_pixels / gt_pixels.sum()).tolist(),
        "rounds": per_round,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pseudo_labels-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Static pseudo labels per class: {adapt}",
        "",
        f"    {result['command']}",
        "",
        f"{len(ds.names)} target-train images; ground truth is used only here. Share: of the labelled pixels; "
        "precision: labelled c and truly c / labelled c (ignored ground truth left out); recall: labelled c and truly "
        "c / truly c (%).",
        "",
        "| round | accuracy | density |",
        "|---|---:|---:|",
        *(f"| {r['round']} | {100 * r['accuracy']:.1f} | {100 * r['density']:.1f} |" for r in per_round),
        "",
        "| class | GT share | " + " | ".join(f"{r['round']} share / prec. / recall" for r in per_round) + " |",
        "|---|---:|" + "---:|" * len(per_round),
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    for j, cls in enumerate(CLASS_NAMES):
        cells = [
            f"{pct(q['share'])} / {pct(q['precision'])} / {pct(q['recall'])}"
            for q in (r["classes"][j] for r in per_round)
        ]
        lines.append(f"| {cls} | {pct(result['gt_share'][j])} | " + " | ".join(cells) + " |")
    (out / f"pseudo_labels-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
