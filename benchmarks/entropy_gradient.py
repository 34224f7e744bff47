"""How strong is each entropy variant next to the segmentation terms? Gradient norms on the synthetic proxy.

``loss.entropy=paper`` is the entropy of softmax(logits); ``authors`` applies softmax twice (their code), which is
nearly flat, and their weights (0.4 source, 0.12 target) were tuned against that flat term. With the same weights,
the paper's term could dominate the objective. This measures, on real proxy batches through a trained model, the
gradient norm (w.r.t. the network parameters) of each weighted term of Eq. 11: cross-entropy on source labels and on
static target labels, and both entropy variants, at the preset's weights.

    python benchmarks/entropy_gradient.py runs/tables-seed0/row4/adapt/last.pt --batches 8

Writes benchmarks/results/entropy_gradient.{json,md} with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dass_deploy.machine import describe_machine, machine_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="an adapt-stage last.pt of a synth2real run (its run folder intact)")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    command = "python benchmarks/entropy_gradient.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))

    import torch
    from dynamic_threshold import adapted_stage

    from dass_train import bida
    from dass_train.engine import bn_statistics_frozen

    st = adapted_stage(args.checkpoint)
    cfg = st.cfg
    w = cfg.loss
    params = [p for p in st.model.parameters() if p.requires_grad]
    norms: dict[str, list[float]] = {}
    st.model.train()
    with bn_statistics_frozen(st.model):
        for _ in range(args.batches):
            src, tgt = st.source.next(), st.target.next()
            logit_s, logit_t, _, _ = st.forward_pair(src["image"], tgt["image"])
            terms = {
                "seg_s": w.seg_source * bida.segmentation_loss(logit_s, src["label"]),
                "seg_t": w.seg_target * bida.segmentation_loss(logit_t, tgt["label"]),
                "ent_s (paper)": w.ent_source * bida.entropy_loss(logit_s, "paper"),
                "ent_t (paper)": w.ent_target * bida.entropy_loss(logit_t, "paper"),
                "ent_s (authors)": w.ent_source * bida.entropy_loss(logit_s, "authors"),
                "ent_t (authors)": w.ent_target * bida.entropy_loss(logit_t, "authors"),
            }
            for name, loss in terms.items():
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                total = torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None))
                norms.setdefault(name, []).append(float(total))
    means = {k: sum(v) / len(v) for k, v in norms.items()}
    ratio = {
        "paper entropy / source CE": (means["ent_s (paper)"] + means["ent_t (paper)"]) / means["seg_s"],
        "authors entropy / source CE": (means["ent_s (authors)"] + means["ent_t (authors)"]) / means["seg_s"],
        "paper / authors entropy": (means["ent_s (paper)"] + means["ent_t (paper)"])
        / (means["ent_s (authors)"] + means["ent_t (authors)"]),
    }
    result = {
        "command": command,
        "checkpoint": str(args.checkpoint),
        "machine": describe_machine(),
        "weights": {
            "seg_source": w.seg_source,
            "seg_target": w.seg_target,
            "ent_source": w.ent_source,
            "ent_target": w.ent_target,
        },
        "gradient_norm": means,
        "ratios": ratio,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "entropy_gradient.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Entropy term: gradient norm of each weighted term of Eq. 11 (synthetic proxy)",
        "",
        f"Command: `{command}`; weights {result['weights']}; mean over {args.batches} (source, target) training "
        "batches, gradient w.r.t. all trainable parameters.",
        "",
        machine_markdown(result["machine"]),
        "",
        "| term | gradient norm |",
        "|---|---:|",
        *(f"| {k} | {v:.4g} |" for k, v in means.items()),
        "",
        "| ratio | value |",
        "|---|---:|",
        *(f"| {k} | {v:.3g} |" for k, v in ratio.items()),
        "",
    ]
    (args.out / "entropy_gradient.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
