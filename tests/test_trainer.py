"""The trainer end to end on a tiny synthetic benchmark: stages, exact resume, NaN guard, 2-process DDP (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from dass_train.checkpoint import load_checkpoint
from dass_train.cli import main as train_main
from dass_train.data.synthetic import SyntheticConfig, ensure_dataset

REPO = Path(__file__).resolve().parents[1]
SYN = SyntheticConfig(width=128, height=64, n_source=12, n_target_train=8, n_target_val=4, seed=0)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_dataset(root, SYN, progress=False)
    return root


def tiny(root: Path, out: Path, **extra: object) -> list[str]:
    values: dict[str, object] = dict(stages__source_only_iters=4, stages__adapt_iters=6, method__refresh_every=4)
    return tiny_overrides(root, (12, 8, 4), out, **{**values, "run__ckpt_every": 1, "run__log_every": 1, **extra})


def history(ckpt: Path) -> list[dict]:
    return load_checkpoint(ckpt)["history"]


def test_all_stages_write_checkpoints_config_and_summary(synth_root, tmp_path):
    assert train_main(["synth2real", "--name", "full", *tiny(synth_root, tmp_path, stages__distill_iters=2)]) == 0
    run = tmp_path / "full"
    assert (run / "config.yaml").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["stages"]) == {"source_only", "adapt", "distill"}
    distill = load_checkpoint(run / "distill" / "last.pt")
    assert distill["iteration"] == 2 and all("kd" in row and "seg_s" in row for row in distill["history"])
    adapt = load_checkpoint(run / "adapt" / "last.pt")
    assert adapt["iteration"] == 6 and adapt["meta"]["stage"] == "adapt"
    # the static labels were regenerated at iteration 4 (refresh_every), so two rounds exist
    assert (run / "adapt" / "pseudo" / "round_00").is_dir() and (run / "adapt" / "pseudo" / "round_01").is_dir()
    assert adapt["pseudo_round"] == 1
    # every BiDA term was computed, finite, at every step
    for row in adapt["history"]:
        for key in ("seg_s", "seg_t", "ent_s", "ent_t", "fcl", "bcl"):
            assert key in row and torch.isfinite(torch.tensor(row[key]))
    stats = json.loads((run / "adapt" / "label_stats.json").read_text())
    assert set(stats) == {"static", "dyn_raw", "dyn_cal", "hybrid"}
    # hybrid labels (Eq. 10) are the union of the calibrated dynamic labels and the static ones: at least as dense
    # as the dynamic labels they take first, at most the two densities added (fails if hybrid used dyn_raw, or
    # labelled pixels neither scheme labelled)
    dens = {k: v["density"] for k, v in stats.items()}
    assert dens["dyn_cal"] <= dens["hybrid"] + 1e-9 <= dens["dyn_cal"] + dens["static"] + 2e-9
    # a second run with the same name goes to a new folder rather than overwriting
    assert train_main(["synth2real", "--name", "full", "--stage", "source_only", *tiny(synth_root, tmp_path)]) == 0
    assert (tmp_path / "full2" / "source_only" / "last.pt").is_file()


def test_resume_reproduces_the_uninterrupted_loss_curve(synth_root, tmp_path):
    args = tiny(synth_root, tmp_path)
    assert train_main(["synth2real", "--name", "straight", *args]) == 0
    # interrupted run: the adapt stage stops at iteration 3, before its label refresh at 4, then resumes
    assert train_main(["synth2real", "--name", "cut", "--stage", "source_only", *args]) == 0
    assert train_main(["synth2real", "--name", "cut", "--stage", "adapt", "--exist-ok", "--max-iters", "3", *args]) == 0
    assert load_checkpoint(tmp_path / "cut" / "adapt" / "last.pt")["iteration"] == 3
    assert train_main(["synth2real", "--name", "cut", "--stage", "adapt", "--resume", *args]) == 0

    straight = history(tmp_path / "straight" / "adapt" / "last.pt")
    resumed = history(tmp_path / "cut" / "adapt" / "last.pt")
    assert [r["it"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("total", "seg_s", "seg_t", "fcl", "bcl", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["it"], key)
    src_a = history(tmp_path / "straight" / "source_only" / "last.pt")
    src_b = history(tmp_path / "cut" / "source_only" / "last.pt")
    assert [r["total"] for r in src_a] == pytest.approx([r["total"] for r in src_b], rel=1e-6)


def test_non_finite_losses_skip_steps_then_stop_with_last_good_checkpoint(synth_root, tmp_path, capsys):
    # An absurd learning rate blows the weights up after the first update, so later losses are not finite.
    args = tiny(synth_root, tmp_path, stages__source_only_lr="1e30", run__max_bad_steps=2, stages__source_only_iters=8)
    code = train_main(["synth2real", "--name", "nan", "--stage", "source_only", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and "consecutive non-finite losses" in err and "Traceback" not in err
    log = (tmp_path / "nan" / "source_only" / "log.txt").read_text()
    assert "non-finite loss" in log and "step skipped (1/2)" in log
    last = load_checkpoint(tmp_path / "nan" / "source_only" / "last.pt")  # intact and loadable
    good = last["history"][-1]["it"]  # the last step whose loss was finite
    assert 1 <= last["iteration"] == good < 8
    assert all(torch.isfinite(torch.tensor(r["total"])) for r in last["history"])
    weights = {k: v for k, v in last["model"].items() if v.is_floating_point()}
    assert all(torch.isfinite(v).all() for v in weights.values())
    # the same run stopped right after that step holds the same weights: nothing after it was saved
    assert train_main(["synth2real", "--name", "ref", "--stage", "source_only", "--max-iters", str(good), *args]) == 0
    ref = load_checkpoint(tmp_path / "ref" / "source_only" / "last.pt")["model"]
    assert all(torch.equal(v, ref[k]) for k, v in weights.items())


def test_missing_data_lists_what_was_expected(tmp_path, capsys):
    code = train_main(
        [
            "gta2city",
            "--stage",
            "source_only",
            f"run.out={tmp_path}",
            "data.source_root=/nonexistent/GTA5",
            "model.init=null",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "GTA5 not found" in err and "/nonexistent/GTA5/images" in err


def test_missing_init_weights_say_where_they_go(synth_root, tmp_path, capsys):
    code = train_main(
        ["synth2real", "--stage", "source_only", *tiny(synth_root, tmp_path), "model.init=/nonexistent/resnet.pth"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "/nonexistent/resnet.pth" in err


def test_bad_override_is_one_line_error(capsys):
    assert train_main(["synth2real", "optim.lrr=1"]) == 2
    assert "unknown option 'optim.lrr'" in capsys.readouterr().err
    assert train_main(["synth2real", "optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_gloo_ddp(synth_root, tmp_path):
    """torchrun with 2 CPU processes: ranks share the sampler stream, prototypes are all-reduced, rank 0 saves."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "dass_train",
        "synth2real",
        "--name",
        "ddp",
        *tiny(synth_root, tmp_path, stages__adapt_iters=4),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "ddp" / "adapt" / "last.pt")
    assert ckpt["iteration"] == 4
    assert ckpt["memory"]["seen_src"].any() and torch.isfinite(ckpt["memory"]["mu_src"]).all()
    # each rank consumed batch/world = 1 sample per step from the shared stream
    assert ckpt["samplers"]["source"]["world_size"] == 2 and ckpt["samplers"]["source"]["position"] == 4
    assert proc.stdout.count("Summary of") == 1  # rank 0 alone reports


def test_eval_command_and_tensorboard_logs(synth_root, tmp_path, capsys):
    args = tiny(synth_root, tmp_path, run__tensorboard="true", run__val_every=2)
    assert train_main(["synth2real", "--name", "tb", "--stage", "source_only", *args]) == 0
    events = list((tmp_path / "tb" / "source_only" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 1000  # scalars and prediction images were written
    capsys.readouterr()
    ckpt = tmp_path / "tb" / "source_only" / "last.pt"
    assert train_main(["eval", "--checkpoint", str(ckpt), "--preset", "synth2real", "--flip", *args]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "on 4 images" in out
    assert train_main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--preset", "synth2real", *args]) == 2
    assert "missing.pt" in capsys.readouterr().err
