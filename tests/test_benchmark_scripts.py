"""Every documented benchmark command still runs: each script in benchmarks/ answers --help, and the two scripts
behind the regime and Table 3 figures run end to end on a tiny synthetic set (a script no test runs rots:
benchmarks/proxy_regime.py once stopped importing)."""

from __future__ import annotations

import json
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

from dass_deploy.adapt_frames import DEFAULT_ADAPT_PASSES

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (REPO / "benchmarks").rglob("*.py") if p.name != "machine.py")


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=subprocess_env()
    )


def test_every_script_is_covered():
    names = {p.name for p in SCRIPTS}
    assert {
        "proxy_regime.py",
        "synth_tables.py",
        "pretrain_backbone.py",
        "time_demo.py",
        "adapt_bn.py",
        "anchor_check.py",
    } <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO / "benchmarks")))
def test_help(script: Path, monkeypatch, capsys):
    """``python <script> --help`` exits 0 with a usage line; run in-process (runpy, as ``python`` runs it) so the
    twenty scripts share one interpreter's imports."""
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setattr(sys, "path", [str(script.parent), *sys.path])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def tiny(data: Path) -> list[str]:
    return [
        f"data.synthetic_root={data}",
        "data.synthetic_size=128,64",
        "data.synthetic_counts=8,6,3",
        "data.resize_short=64",
        "data.crop=64,64",
        "data.eval_size=128,64",
        "data.num_workers=0",
        "stages.source_only_resize_short=64",
        "stages.source_only_crop=64,64",
        "stages.source_only_iters=2",
        "stages.oracle_iters=2",
        "stages.adapt_iters=2",
        "optim.batch_size=2",
        "run.tensorboard=false",
    ]


@pytest.mark.slow
def test_proxy_regime_tiny_run(tmp_path):
    out = tmp_path / "results"
    proc = run(
        "benchmarks/proxy_regime.py",
        "--preset",
        "synth2real_paper",
        "--parallel",
        "1",
        "--runs",
        str(tmp_path / "runs"),
        "--out",
        str(out),
        *tiny(tmp_path / "data"),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "proxy_regime-paper-seed0.json").read_text())
    assert result["preset"] == "synth2real_paper" and result["oracle_iters"] == 2
    labels = result["static_labels"]
    assert 0.0 <= labels["accuracy"] <= 1.0 and 0.0 < labels["density"] <= 1.0
    assert labels["domain_bn"] is False  # the paper's regime: the start model keeps its BN statistics
    assert labels["start_model_miou"] == pytest.approx(result["source_only_miou"], abs=1e-9)
    assert set(result["checks"]) == {"label_accuracy", "label_density", "ratio", "ratio_adapt_start"}
    md = (out / "proxy_regime-paper-seed0.md").read_text()
    assert "python benchmarks/proxy_regime.py --preset synth2real_paper" in md and "BN frozen" in md
    assert len(list((tmp_path / "runs" / "proxy-paper-seed0" / "static_labels").rglob("*_pseudo.png"))) == 6


@pytest.mark.slow
def test_synth_tables_tiny_run(tmp_path):
    out = tmp_path / "results"
    args = ["--preset", "synth2real_paper", "--seeds", "0", "--parallel", "2", "--runs", str(tmp_path / "runs")]
    proc = run("benchmarks/synth_tables.py", *args, "--out", str(out), *tiny(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads((out / "table3_paper_regime" / "seed0.json").read_text())
    assert record["adabn"] is None  # frozen BN: no target statistics, so no AdaBN row
    assert record[
        "command"
    ] == "python benchmarks/synth_tables.py --preset synth2real_paper --seeds 0 --parallel 2 " + (
        " ".join(tiny(tmp_path / "data"))
    )
    assert len(record["rows"]) == 5 and set(record["table4"]) == {"static", "dyn_raw", "dyn_cal", "hybrid"}
    assert set(record["stage_minutes"]) == {"source_only", "oracle", *(f"row{i}" for i in range(5))}
    assert 0.0 <= record["static_labels"]["accuracy"] <= 1.0
    summary = json.loads((out / "table3_paper_regime.json").read_text())
    assert summary["seeds"] == [0] and summary["regime"]["adapt_start"] == "source-only"
    pairs = {(p["row"], p["vs"]): p for p in summary["paired"]}
    assert ("L_base", "source-only") in pairs and ("+ y_D (w/ cal.) = BiDA", "L_base") in pairs
    assert all(p["n"] == 1 and p["ci95"] is None for p in pairs.values())  # one seed: no interval yet
    md = (out / "table3_paper_regime.md").read_text()
    assert "n/a (one seed)" in md and "AdaBN" not in md
    assert len(list((out / "table3_paper_regime").glob("diagnostics_row*.png"))) == 5


@pytest.mark.slow
def test_adapt_bn_tiny_run(tmp_path):
    """The new-camera benchmark end to end: it trains the two missing checkpoints with synth_tables' stages (a
    trainable-BN source-only model, a frozen-BN BiDA model), makes the new camera, adapts each with N frames through
    the CLI's own functions and scores both domains before and after."""
    out, runs = tmp_path / "results", tmp_path / "runs"
    args = ["--seeds", "0", "--models", "source-only,paper-bida", "--frames", "16", "--newcamera-counts", "0,16,3"]
    places = ["--newcamera", str(tmp_path / "cameras"), "--runs", str(runs), "--out", str(out), "--threads", "1"]
    # trained first and measured later (--train-only, then --no-train), as on a machine that is busy, then idle
    refused = run("benchmarks/adapt_bn.py", *args, *places, "--no-train", *tiny(tmp_path / "data"))
    assert refused.returncode != 0 and "--no-train: missing" in refused.stderr and not (out / "adapt_bn.json").exists()
    proc = run("benchmarks/adapt_bn.py", *args, *places, "--train-only", *tiny(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (runs / "tables-seed0" / "source_only" / "source_only" / "last.pt").is_file()
    assert (runs / "tables-paper-seed0" / "row4" / "adapt" / "last.pt").is_file()
    assert not (runs / "tables-seed0" / "row4").exists()  # only what --models asks for is trained
    assert len(list((tmp_path / "cameras" / "newcamera-seed500").rglob("*_leftImg8bit.png"))) == 19
    assert not list((out / "adapt_bn").glob("*.json"))  # nothing measured
    proc = run("benchmarks/adapt_bn.py", *args, *places, "--no-train", *tiny(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    models = {}
    for key in ("source-only", "paper-bida"):  # one file per seed and model, with the command that remakes it
        record = json.loads((out / "adapt_bn" / f"seed0-{key}.json").read_text())
        words = ["--seeds", "0", "--models", key, *args[4:], *tiny(tmp_path / "data")]
        assert record["command"] == "python benchmarks/adapt_bn.py " + " ".join(words)
        models[key] = record["model"]
    # recorded where the command (no --runs) finds it, whatever folder it was measured in
    assert models["paper-bida"]["checkpoint"] == "runs/tables-paper-seed0/row4/adapt/last.pt"
    assert models["source-only"]["bn"] == "trainable" and models["paper-bida"]["bn"] == "frozen"
    for m in models.values():
        assert 0.0 <= m["before"]["newcamera"] <= 1.0 and 0.0 <= m["before"]["target"] <= 1.0
        (adapted,) = m["adapted"]
        assert adapted["frames"] == 16 and adapted["seconds"] > 0 and 0.0 <= adapted["newcamera"] <= 1.0
        assert adapted["shift"]["mean_shift_sd"]["median"] > 0  # the statistics did move
        assert m["passes"] == DEFAULT_ADAPT_PASSES and len(adapted["movement"]) == DEFAULT_ADAPT_PASSES - 1
        assert m["batches_of_8"]["frames"] == 16 and m["per_frame_average"]["frames"] == 16
    summary = json.loads((out / "adapt_bn.json").read_text())
    assert summary["seeds"] == [0] and [m["model"] for m in summary["models"]] == ["source-only", "paper-bida"]
    gain = summary["models"][0]["adapted"][0]["newcamera_gain"]
    assert gain["n"] == 1 and gain["ci95"] is None  # one seed: no interval
    md = (out / "adapt_bn.md").read_text()
    assert "N = 16" in md and "python benchmarks/adapt_bn.py --seeds 0" in md and "(one seed)" in md
    # resumable and cumulative: measured models are skipped, a model added later is measured alone (its checkpoint,
    # the paper chain's source-only model, is already there) and joins the summary
    more = ["--seeds", "0", "--models", "source-only,paper-bida,paper-source-only", *args[4:]]
    rerun = run("benchmarks/adapt_bn.py", *more, *places, *tiny(tmp_path / "data"))
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "seed 0 source-only: done" in rerun.stdout and "seed 0 paper-bida: done" in rerun.stdout
    assert "seed 0 paper-source-only: written" in rerun.stdout and rerun.stdout.count(": written") == 1
    summary = json.loads((out / "adapt_bn.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["source-only", "paper-source-only", "paper-bida"]
    assert all(m["seeds"] == [0] and m["n"] == 1 for m in summary["models"])

    # item 3 on the same tiny model: folded and kept exports timed, the torch-free adaptation against PyTorch's
    ckpt = runs / "tables-paper-seed0" / "row4" / "adapt" / "last.pt"
    frames = tmp_path / "cameras" / "newcamera-seed500" / "cityscapes" / "leftImg8bit" / "train"
    words = ["--checkpoint", str(ckpt), "--frames", str(frames), "--counts", "16", "--sizes", "64x128"]
    proc = run("benchmarks/keep_bn.py", *words, "--size", "64x128", "--repeats", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keep = json.loads((out / "keep_bn.json").read_text())
    timed = {(r["export"], r["runtime"]) for r in keep["latency"] if r.get("p50_ms", 0) > 0}
    assert {("folded", "onnxruntime"), ("kept", "onnxruntime")} <= timed
    (adapted,) = keep["adaptation"]
    assert adapted["same_frames"] and adapted["label_agreement"] > 0.99 and adapted["onnxruntime_s"] > 0
    assert "kept / folded" in (out / "keep_bn.md").read_text()

    # the passes of the estimate, chosen on a selection camera (seed 600), for the same tiny checkpoint
    words = [str(ckpt), "--label", "tiny", "--frames", "16", "--max-passes", "3", "--newcamera-counts", "0,16,3"]
    proc = run("benchmarks/adapt_bn_passes.py", *words, "--newcamera", str(tmp_path / "cameras"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "cameras" / "newcamera-seed600").is_dir()
    passes = json.loads((out / "adapt_bn_passes.json").read_text())
    (model,) = passes["models"]
    assert model["label"] == "tiny" and model["frames"] == 16 and model["bn"] == "frozen"
    assert [e["passes"] for e in model["passes"]] == [1, 2, 3][: len(model["passes"])]
    assert all(0.0 <= e["miou"] <= 1.0 for e in model["passes"] if "miou" in e)
    assert "--max-passes 3" in passes["commands"][0]
    assert passes["chosen"] in (1, 2, 3, 5, 8) if model["converged_at"] else passes["chosen"] is None
    assert "per-frame average (old CLI)" in (out / "adapt_bn_passes.md").read_text()


def test_synth_tables_summary_of_the_committed_seeds(tmp_path):
    """The summary over the three committed synth2real seeds: every row paired with the one before and with L_base,
    a 95 % interval from Student's t with 2 degrees of freedom, a verdict only where it excludes 0."""
    shutil.copytree(REPO / "benchmarks" / "results" / "table3_seeds", tmp_path / "table3_seeds")
    proc = run("benchmarks/synth_tables.py", "--summary-only", "--out", str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "table3_seeds.json").read_text())
    pairs = {(p["row"], p["vs"]): p for p in summary["paired"]}
    assert len(pairs) == 8  # 5 rows vs the row before (L_base vs AdaBN), 3 more vs L_base (+ L_FC: the same pair)
    base = pairs[("L_base", "AdaBN")]
    diffs = [a - b for a, b in zip(summary["rows"][0]["miou"], summary["adabn"], strict=True)]
    assert base["n"] == 3 and base["mean"] == pytest.approx(sum(diffs) / 3)
    assert base["ci95"][0] > 0  # self-training from the AdaBN start helps on every seed: the interval excludes 0
    md = (tmp_path / "table3_seeds.md").read_text()
    assert "| L_base |" in md and "**yes**" in md and "no (CI contains 0)" in md


def test_paired_confidence_interval():
    """Student t with n - 1 degrees of freedom on the per-seed differences."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from synth_tables import paired_ci

    p = paired_ci([0.30, 0.32, 0.31], [0.29, 0.30, 0.30])  # differences 1, 2, 1 points
    assert p["n"] == 3 and p["mean"] == pytest.approx(4 / 300)
    half = 4.303 * p["std"] / 3**0.5
    assert p["ci95"] == pytest.approx([p["mean"] - half, p["mean"] + half])
    assert paired_ci([0.3], [0.2])["ci95"] is None


def _recipe_result(scores: dict[str, float], accuracy: dict[str, float] | None = None) -> dict:
    """A base_recipe result with these target-train scores; first-round labels in the regime unless ``accuracy``."""
    accuracy = accuracy or {}
    return {
        "variants": {
            k: {
                "target_train": {"miou": v},
                "labels": {"first": {"accuracy": accuracy.get(k, 0.93), "density": 0.17}},
            }
            for k, v in scores.items()
        }
    }


def test_base_recipe_rule():
    """The rule written in docs/PROXY.md before measuring: a change must beat A by 1 point, stay in the label
    regime, and D needs 0.5 point over the better single change."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from base_recipe import choose

    base = {"A": 0.25, "control": 0.24}
    assert choose(_recipe_result({**base, "B": 0.259, "C": 0.255, "D": 0.2595}))[0] == "A"  # none by 1 point
    assert choose(_recipe_result({**base, "B": 0.266, "C": 0.265, "D": 0.27}))[0] == "B"  # D < B + 0.5
    assert choose(_recipe_result({**base, "B": 0.262, "C": 0.265, "D": 0.272}))[0] == "D"
    out_of_regime = {"C": 0.893, "D": 0.893}
    assert choose(_recipe_result({**base, "B": 0.266, "C": 0.29, "D": 0.30}, out_of_regime))[0] == "B"
    assert choose(_recipe_result({**base, "B": 0.255, "C": 0.29, "D": 0.30}, out_of_regime))[0] == "A"


def selection_tiny_run(script: str, tmp_path: Path) -> tuple[dict, Path]:
    """A selection-seed check (base_recipe, anchor_check) end to end on the tiny set, seed 7: (its json, results)."""
    out = tmp_path / "results"
    args = ["--seed", "7", "--parallel", "2", "--runs", str(tmp_path / "runs"), "--out", str(out)]
    proc = run(f"benchmarks/{script}.py", *args, *tiny(tmp_path / "data"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / f"{script}-seed7.json").read_text()), out


@pytest.mark.slow
def test_base_recipe_tiny_run(tmp_path):
    record, out = selection_tiny_run("base_recipe", tmp_path)
    assert record["command"] == "python benchmarks/base_recipe.py --seed 7 --parallel 2 " + " ".join(
        tiny(tmp_path / "data")
    )
    assert set(record["variants"]) == {"A", "B", "C", "D", "control"}
    assert record["choice"] in {"A", "B", "C", "D"} and record["why"]
    for v in record["variants"].values():
        assert 0.0 <= v["target_train"]["miou"] <= 1.0 and len(v["target_train"]["iou"]) == 19
        first = v["labels"]["first"]
        assert first["round"] == "round_00" and 0.0 <= first["road_share"] <= 1.0
    import yaml

    def config(variant: str) -> dict:
        return yaml.safe_load(
            (tmp_path / "runs" / "base-recipe-seed7" / f"variant-{variant}" / "config.yaml").read_text()
        )

    d, a = config("D"), config("A")
    assert (d["loss"]["entropy"], d["method"]["image_portion"], d["method"]["cbst_portion"]) == ("authors", 0, 0.2)
    assert (a["method"]["use_fcl"], a["method"]["dynamic_labels"]) == (False, "off")  # L_base only
    assert config("control")["loss"]["seg_target"] == 0
    assert "Rule's choice" in (out / "base_recipe-seed7.md").read_text()


def test_anchor_check_rule():
    """The rule written in docs/RESULTS.md before measuring: BiDA must end below L_base on the seed, and a repair
    must beat BiDA by 1 point; of two, the higher."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from anchor_check import choose

    def verdict(l_base: float, bida: float, balanced: float, fixed: float) -> str:
        scores = {"L_base": l_base, "BiDA": bida, "BiDA-class": balanced, "BiDA-fixed": fixed}
        return choose({"variants": {k: {"target_train": {"miou": v}} for k, v in scores.items()}})[0]

    assert verdict(0.25, 0.255, 0.28, 0.28) == "no failure"  # BiDA above L_base: nothing to repair
    assert verdict(0.25, 0.24, 0.249, 0.2495) == "no repair"  # within a point of BiDA
    assert verdict(0.25, 0.24, 0.251, 0.249) == "BiDA-class"
    assert verdict(0.25, 0.24, 0.255, 0.262) == "BiDA-fixed"


@pytest.mark.slow
def test_anchor_check_tiny_run(tmp_path):
    record, out = selection_tiny_run("anchor_check", tmp_path)
    assert record["command"] == "python benchmarks/anchor_check.py --seed 7 " + " ".join(tiny(tmp_path / "data"))
    assert set(record["variants"]) == {"L_base", "BiDA", "BiDA-class", "BiDA-fixed"}
    assert record["choice"] in {"no failure", "no repair", "BiDA-class", "BiDA-fixed"} and record["why"]
    for v in record["variants"].values():
        assert 0.0 <= v["target_train"]["miou"] <= 1.0 and len(v["target_train"]["iou"]) == 19
        assert set(v["diagnostics"]) >= {"own_sim", "margin", "spread", "proto_cos"}
    import yaml

    def loss_and_method(variant: str) -> tuple[dict, dict]:
        cfg = yaml.safe_load(
            (tmp_path / "runs" / "anchor-check-seed7" / f"variant-{variant}" / "config.yaml").read_text()
        )
        return cfg["loss"], cfg["method"]

    assert loss_and_method("L_base")[1]["use_fcl"] is False
    bida_loss, bida_method = loss_and_method("BiDA")
    assert (bida_method["dynamic_labels"], bida_loss["contrastive_mean"], bida_loss["detach_prototypes"]) == (
        "calibrated",
        "pixel",
        False,
    )
    assert loss_and_method("BiDA-class")[0]["contrastive_mean"] == "class"
    assert loss_and_method("BiDA-fixed")[0]["detach_prototypes"] is True
    assert "Rule's verdict" in (out / "anchor_check-seed7.md").read_text()
