"""``dass-train`` as a click group: subcommands, the ``dass-train PRESET`` short form, exit codes, one-line errors
(a truncated PNG read by a real DataLoader worker included), Ctrl-C, and the generated CLI reference."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import tiny_overrides

from dass_train.checkpoint import load_checkpoint
from dass_train.cli import cli, main
from dass_train.data.synthetic import SyntheticConfig, ensure_dataset

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ("run", "eval", "synthesize", "presets", "config")
SYN = SyntheticConfig(width=128, height=64, n_source=4, n_target_train=2, n_target_val=2, seed=0)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_dataset(root, SYN, progress=False)
    return root


def tiny(root: Path, out: Path, **extra: object) -> list[str]:
    """Overrides for a seconds-long source-only run on the tiny benchmark above."""
    return tiny_overrides(root, (4, 2, 2), out, **{"stages__source_only_iters": 2, **extra})


def dass_train(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m dass_train`` (what torchrun runs, and the same ``main`` as the console script)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dass_train", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------------------------- CliRunner
def test_help_on_every_level_names_its_options():
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"])
    assert top.exit_code == 0
    assert runner.invoke(cli, ["--version"]).output.startswith("dass-train 0.")
    for name in SUBCOMMANDS:
        assert f"  {name} " in top.output
    expected = {
        "run": ("--stage", "--name", "--init", "--resume", "--exist-ok", "--teacher", "--max-iters"),
        "eval": ("--checkpoint", "--preset", "--flip", "--scales", "--target-bn"),
        "synthesize": ("--out", "--counts", "--size", "--seed", "--style-shift", "--class-shift", "--workers"),
        "presets": (),
        "config": ("PRESET",),
    }
    for name, options in expected.items():
        result = runner.invoke(cli, [name, "--help"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: dass-train {name} ")
        for option in options:
            assert option in result.output, (name, option)


def test_presets_lists_each_preset_with_the_first_comment_line():
    result = CliRunner().invoke(cli, ["presets"])
    assert result.exit_code == 0
    lines = dict(line.split(None, 1) for line in result.output.splitlines())
    assert set(lines) == {
        "gta2city", "gta2city_authors", "synthia2city", "synthia2city_authors", "synth2real", "synth2real_demo",
        "synth2real_paper", "synth2real_pretrain",
    }  # fmt: skip
    assert lines["synth2real_paper"].startswith("The synthetic benchmark in the paper's regime")
    assert lines["synth2real_pretrain"].startswith("The pretext that makes the paper-regime backbone")
    assert lines["synth2real_demo"].startswith("What `make demo` trains: synth2real with a third of its training")
    assert lines["gta2city"].startswith("GTA5 -> Cityscapes")
    assert lines["synthia2city"].startswith("SYNTHIA-RAND-CITYSCAPES -> Cityscapes")
    assert lines["gta2city_authors"].startswith("GTA5 -> Cityscapes as the authors' public code runs it")


def test_config_prints_the_resolved_yaml_of_a_name_or_a_file(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["config", "synth2real", "optim.lr=0.5", "data.crop=96,48"])
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load(result.output)
    assert cfg["optim"]["lr"] == 0.5 and cfg["data"]["crop"] == [96, 48] and cfg["data"]["source"] == "synthetic"
    # a preset file: its stem becomes the preset name, its values apply
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my preset\noptim:\n  batch_size: 3\n")
    cfg = yaml.safe_load(runner.invoke(cli, ["config", str(mine)]).output)
    assert cfg["preset"] == "mine" and cfg["optim"]["batch_size"] == 3


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["evl"], "'evl' is neither a command"),
        (["run", "gta2cty"], "unknown preset 'gta2cty'"),
        (["run", "missing.yaml"], "preset file missing.yaml does not exist"),
        (["synth2real", "--stage", "bogus"], "'bogus' is not one of"),
        (["--stage", "bogus", "synth2real"], "'bogus' is not one of"),  # options first: still the short form
        (["synth2real", "--init", "/nonexistent/init.pt"], "/nonexistent/init.pt"),
        (["eval"], "Missing option '--checkpoint'"),
        (["eval", "--checkpoint", "/nonexistent/last.pt"], "/nonexistent/last.pt"),
        (["synthesize", "--counts", "1,2"], "expected 3 numbers"),
        (["synthesize", "--style-shift", "2"], "--style-shift"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_wrong(args, says):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert "Traceback" not in result.output


def test_bad_scales_are_a_usage_error(tmp_path):
    ckpt = tmp_path / "c.pt"
    ckpt.write_bytes(b"not read: the option fails first")
    result = CliRunner().invoke(cli, ["eval", "--checkpoint", str(ckpt), "--scales", "1,big"])
    assert result.exit_code == 2 and "1,big" in result.output


def test_user_errors_are_one_line_exit_2_in_both_forms(tmp_path, capsys):
    args = ["--stage", "source_only", f"run.out={tmp_path}", "data.source_root=/nonexistent/GTA5", "model.init=null"]
    # short form through CliRunner: the group maps it to `run` and turns the DataError into `error: ...`
    result = CliRunner().invoke(cli, ["gta2city", *args])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: GTA5 not found") and result.stderr.count("\n") == 1
    # main() returns the code instead of exiting (what the tests in test_trainer.py call)
    assert main(["run", "gta2city", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: GTA5 not found") and "/nonexistent/GTA5/images" in err and err.count("\n") == 1
    assert main(["synth2real", "optim.lrr=1"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown option 'optim.lrr'")


def test_eval_defaults_to_the_preset_recorded_in_the_checkpoint(synth_root, tmp_path, capsys):
    args = tiny(synth_root, tmp_path)
    assert main(["synth2real", "--name", "e", "--stage", "source_only", *args]) == 0
    capsys.readouterr()
    # no --preset: the checkpoint says synth2real (the old default, gta2city, has no data here)
    assert main(["eval", "--checkpoint", str(tmp_path / "e" / "source_only" / "last.pt"), *args]) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and "(synth2real val" in out and "on 2 images" in out


def test_synthesize_writes_reuses_replaces_and_never_touches_real_data(tmp_path):
    runner = CliRunner()
    out = tmp_path / "syn"
    base = ["synthesize", "--out", str(out), "--counts", "2,1,1", "--size", "64,32", "--no-progress"]
    result = runner.invoke(cli, [*base, "--seed", "3", "--style-shift", "0.7", "--class-shift", "0"])
    assert result.exit_code == 0, result.output
    assert "2 source, 1 target-train, 1 target-val images of 64x32, seed 3" in result.output
    meta = json.loads((out / "synthetic.json").read_text())
    assert (meta["seed"], meta["width"], meta["height"], meta["style_shift"], meta["class_shift"]) == (
        3,
        64,
        32,
        0.7,
        0,
    )
    assert len(list((out / "gta5" / "images").glob("*.png"))) == 2
    first = out / "gta5" / "images" / "00001.png"
    image, mtime = first.read_bytes(), first.stat().st_mtime_ns
    # same settings: reused, not rewritten
    result = runner.invoke(cli, [*base, "--seed", "3", "--style-shift", "0.7", "--class-shift", "0"])
    assert result.exit_code == 0 and "replacing" not in result.output
    assert first.stat().st_mtime_ns == mtime
    # other settings: regenerated, and it says why
    result = runner.invoke(cli, [*base, "--seed", "4", "--style-shift", "0.7", "--class-shift", "0"])
    assert result.exit_code == 0, result.output
    assert "replacing the synthetic benchmark" in result.output and "seed 3 -> 4" in result.output
    assert json.loads((out / "synthetic.json").read_text())["seed"] == 4 and first.read_bytes() != image
    # a folder with real-looking data and no synthetic.json is never overwritten
    real = tmp_path / "real"
    (real / "gta5" / "images").mkdir(parents=True)
    (real / "gta5" / "images" / "mine.png").write_bytes(image)
    result = runner.invoke(cli, ["synthesize", "--out", str(real), "--counts", "1,1,1", "--no-progress"])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and "refusing to overwrite" in result.stderr
    assert (real / "gta5" / "images" / "mine.png").read_bytes() == image


# ----------------------------------------------------------------------------------------------- subprocess
def test_short_form_runs_a_real_tiny_training(synth_root, tmp_path):
    proc = dass_train("synth2real", "--name", "t", "--stage", "source_only", *tiny(synth_root, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "t" / "source_only" / "last.pt")
    assert ckpt["iteration"] == 2 and ckpt["meta"]["stage"] == "source_only"
    assert "Summary of" in proc.stdout
    # benchmarks/time_demo.py reads make demo's figures from this summary
    spec = importlib.util.spec_from_file_location("time_demo", REPO / "benchmarks" / "time_demo.py")
    time_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(time_demo)
    parsed = time_demo.parse_log(proc.stdout)
    assert parsed["miou_source_only"] == pytest.approx(100 * ckpt["meta"]["metrics"]["miou"], abs=0.005)
    assert parsed["train_min"] is not None and parsed["miou_bida"] is None
    saved = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    assert saved["stages"]["source_only_iters"] == 2


def test_truncated_png_in_a_dataloader_worker_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / "syn"
    ensure_dataset(root, SyntheticConfig(width=128, height=64, n_source=2, n_target_train=1, n_target_val=1), False)
    broken = root / "gta5" / "images" / "00002.png"
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])  # header intact (passes verify()), pixel data cut short
    args = tiny(
        root,
        tmp_path / "runs",
        data__synthetic_counts="2,1,1",
        data__num_workers=1,  # a real worker process reads the file
        data__rare_class_temperature="null",  # uniform sampler: both source images are in the first batch
    )
    proc = dass_train("synth2real", "--name", "t", "--stage", "source_only", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and str(broken) in lines[0] and "truncated" in lines[0]
    assert (tmp_path / "runs" / "t" / "config.yaml").is_file()  # what was written before stays


def test_ctrl_c_exits_130_with_one_line_and_an_intact_checkpoint(synth_root, tmp_path):
    args = tiny(synth_root, tmp_path, stages__source_only_iters=100000, run__ckpt_every=1, data__num_workers=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def as_in_a_terminal() -> None:
        # Its own process group, so Ctrl-C reaches the DataLoader worker too (as a terminal sends it to the
        # foreground group); SIGINT back to default, as a suite started in the background (`cmd &`) ignores it.
        os.setpgrp()
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, "-m", "dass_train", "synth2real", "--name", "c", "--stage", "source_only", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=as_in_a_terminal,
    )
    last = tmp_path / "c" / "source_only" / "last.pt"
    deadline = time.time() + 120
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and last.is_file(), "training did not reach its first checkpoint"
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.splitlines() == ["interrupted: the last checkpoint is intact; continue with --resume"]
    assert load_checkpoint(last)["iteration"] >= 1


# ----------------------------------------------------------------------------------------------- reference
def test_cli_reference_is_up_to_date():
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from make_cli_train_reference import render
    finally:
        sys.path.pop(0)
    assert (REPO / "docs" / "CLI_TRAIN.md").read_text() == render(), "run: python docs/make_cli_train_reference.py"


def test_command_references_are_current():
    """docs/CLI.md (dass-segment, dass-export, dass-demo) is generated from --help like docs/CLI_TRAIN.md, must match
    the code, and the README points to both."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        from make_cli_reference import TARGET, render
    finally:
        sys.path.pop(0)
    assert TARGET.read_text() == render(), "run: python docs/make_cli_reference.py"
    readme = (REPO / "README.md").read_text()
    assert "(docs/CLI.md)" in readme and "(docs/CLI_TRAIN.md)" in readme
