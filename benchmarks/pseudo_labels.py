"""Per-class quality of the static pseudo labels an adaptation run trained on, round by round.

    python benchmarks/pseudo_labels.py runs/tables-paper-seed0/row0/adapt --preset synth2real_paper --seed 0

The adapt stage writes each round of static (CBST) labels to <run>/pseudo/round_NN/. Against target-train ground
truth that training never sees, this reports, per round and per class c: the share of the labelled pixels that
are c (what the round trains on), the precision of the label c (labelled c and truly c, over labelled c where the
ground truth has a class: pixels the ground truth ignores, such as the bonnet, are left out as in mIoU), and its
recall (truly c and labelled c, over truly c). Where self-training loses a class, these say whether its labels were
wrong (low precision), missing (low recall or share), or crowded out by another class's wrong labels.
Each round's accuracy and density are computed as synth_tables.py's regime figures are (one function scores both):
over the pixels where the ground truth has a class.

Writes benchmarks/results/pseudo_labels-<name>.{json,md} (``--name``, default from the run folder).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synth_tables import (  # noqa: E402  (the regime figures' own label scoring; it puts the repo on sys.path)
    label_accuracy_density,
    static_label_confusion,
    target_train_labelled,
)

from dass_deploy.machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def class_quality(conf: np.ndarray, gt_pixels: np.ndarray) -> list[dict]:
    """Share, precision and recall of each class's labels from a round's confusion (see the module docstring)."""
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
    from dass_train.labels import CLASS_NAMES

    adapt = Path(args.adapt_dir)
    rounds = sorted((adapt / "pseudo").glob("round_*"))
    if not rounds:
        p.error(f"{adapt}: no pseudo/round_NN folders (not an adapt stage folder)")
    ds = target_train_labelled(args.preset, args.seed, args.overrides)
    per_round = []
    for round_dir in rounds:
        conf, gt_pixels = static_label_confusion(round_dir, ds)
        accuracy, density = label_accuracy_density(conf, gt_pixels)
        per_round.append(
            {
                "round": round_dir.name,
                "accuracy": accuracy,
                "density": density,
                "classes": class_quality(conf, gt_pixels),
                "confusion": conf.tolist(),
            }
        )
    name = args.name or "-".join(adapt.resolve().parts[-3:-1])
    words = [args.adapt_dir, "--preset", args.preset, "--seed", str(args.seed)]
    words += [*(["--name", args.name] if args.name else []), *args.overrides]  # the command remakes this very file
    result = {
        "command": "python benchmarks/pseudo_labels.py " + " ".join(shlex.quote(w) for w in words),
        "machine": describe_machine(),
        "images": len(ds.names),
        "gt_share": (gt_pixels / gt_pixels.sum()).tolist(),  # the same in every round
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
