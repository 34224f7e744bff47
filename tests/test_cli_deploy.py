"""The click commands ``dass-segment``, ``dass-export``, ``dass-demo``: click's CliRunner for the parsing and the exit
codes, real subprocesses of the installed console scripts for help, completion and the demo server, and the INT8
mIoU gate of ``dass-export --int8-val`` refusing and accepting real exports.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import SAMPLES, stop_server, subprocess_env

from dass_deploy.backends import BACKENDS
from dass_deploy.cli import segment
from dass_deploy.cli_export import export, export_main

BIN = Path(sys.executable).parent
FRANKFURT = SAMPLES / "frankfurt_000000_000294_leftImg8bit.png"


def script(name: str) -> str:
    path = BIN / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed beside {sys.executable} (pip install -e .)")
    return str(path)


def run_script(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [script(name), *args], capture_output=True, text=True, timeout=120, env=subprocess_env() | (env or {})
    )


# --- parsing and exit codes (CliRunner) ----------------------------------------------------------------------------


def test_backend_choices_come_from_the_backends_registry():
    (backend,) = [p for p in segment.params if p.name == "backend"]
    assert tuple(backend.type.choices) == BACKENDS
    result = CliRunner().invoke(segment, ["x.png", "--backend", "caffe"])
    assert result.exit_code == 2 and "Invalid value for '--backend'" in result.output
    assert all(name in result.output for name in BACKENDS)


def test_int8_calibration_choices_are_the_exporters():
    """The click option lists the quantisers by hand (importing precision would pull onnx into --help)."""
    from dass_deploy.export.precision import CALIBRATIONS

    (option,) = [p for p in export.params if p.name == "int8_calibration"]
    assert tuple(option.type.choices) == CALIBRATIONS


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "give at least one SOURCE"),
        (["x.png", "--model", ".", "--checkpoint", "pyproject.toml"], "mutually exclusive"),
        (["x.png", "--checkpoint", "no_such.pt"], "'--checkpoint'"),
        (["x.png", "--threads", "0"], "'--threads'"),
        (["x.png", "--no-such-option"], "No such option"),
    ],
)
def test_segment_usage_errors_exit_2_with_usage(argv, needle):
    result = CliRunner().invoke(segment, argv)
    assert result.exit_code == 2 and "Usage: dass-segment" in result.output and needle in result.output


def test_segment_runs_through_click(model_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(segment, [str(FRANKFURT), "--model", str(model_dir), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    assert cv2.imread(str(out / "frankfurt_000000_000294_leftImg8bit_color.png")).shape == (128, 256, 3)
    missing = CliRunner().invoke(segment, [str(tmp_path / "gone.png"), "--model", str(model_dir), "--quiet"])
    assert missing.exit_code == 1 and "gone.png: not found" in missing.output


@pytest.mark.parametrize("name", ['my"model', "a/b", ".hidden", "two words"])
def test_export_refuses_model_names_triton_cannot_take(checkpoint, tmp_path, name):
    result = CliRunner().invoke(export, [str(checkpoint), "--name", name, "--out", str(tmp_path / "m")])
    assert result.exit_code == 2 and "Invalid value for '--name'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "m").exists()


def test_export_usage_and_setup_errors(tmp_path):
    calib = CliRunner().invoke(export, ["x.pt", "--int8", "--calib", str(tmp_path / "nope")])
    assert calib.exit_code == 2 and "'--calib'" in calib.output
    prec = CliRunner().invoke(export, ["x.pt", "--output", "probabilities"])
    assert prec.exit_code == 2 and "'--output'" in prec.output
    # a missing checkpoint is the exporter's own one-line error (exit 2), not a usage error
    assert export_main([str(tmp_path / "none.pt"), "--out", str(tmp_path / "m"), "--quiet"]) == 2


def test_demo_reads_gradio_env_vars():
    from app.app import demo_command

    result = CliRunner().invoke(demo_command, [], env={"GRADIO_SERVER_PORT": "99999"})
    assert result.exit_code == 2 and "GRADIO_SERVER_PORT" in result.output
    ok = CliRunner().invoke(
        demo_command, ["--port", "7861", "--models", "no/such/folder"], env={"GRADIO_SERVER_PORT": "x"}
    )
    assert ok.exit_code == 2 and "GRADIO_SERVER_PORT" not in ok.output  # the flag wins over a bad env value
    assert "error: no exported models found in no/such/folder" in ok.output


# --- the installed console scripts (subprocesses) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options",
    [
        ("dass-segment", ["--model", "--backend", "--save", "--eval", "--benchmark", "Exit status"]),
        ("dass-export", ["--int8-val", "--calib", "--trt", "--from", "--stem", "default: 512"]),
        ("dass-demo", ["--host", "--port", "--share", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"]),
    ],
)
def test_console_scripts_help_and_completion(name, options):
    help_ = run_script(name, "--help", env={"COLUMNS": "160"})
    assert help_.returncode == 0 and f"Usage: {name}" in help_.stdout
    for option in options:
        assert option in help_.stdout, option
    var = "_" + name.upper().replace("-", "_") + "_COMPLETE"
    completion = run_script(name, env={var: "bash_source"})
    assert completion.returncode == 0 and f"complete -o nosort -F _{name.replace('-', '_')}_completion" in (
        completion.stdout
    )
    words = run_script(name, env={var: "bash_complete", "COMP_WORDS": f"{name} --h", "COMP_CWORD": "1"})
    assert "--help" in words.stdout


def test_console_script_exit_codes(model_dir, tmp_path):
    ok = run_script("dass-segment", str(FRANKFURT), "--model", str(model_dir), "--out", str(tmp_path / "o"), "--quiet")
    assert ok.returncode == 0 and "1 image in" in ok.stdout, ok.stderr
    usage = run_script("dass-segment", str(FRANKFURT), "--alpha", "2")
    assert usage.returncode == 2 and "Usage: dass-segment" in usage.stderr and "Traceback" not in usage.stderr
    failed = run_script("dass-segment", str(tmp_path / "missing.png"), "--model", str(model_dir), "--quiet")
    assert failed.returncode == 1 and "warning:" in failed.stderr and "Traceback" not in failed.stderr


#: Runs ``dass-export`` (the console script's entry point) with the modules named in argv[1] made unimportable.
EXPORT_WITHOUT = (
    "import sys; sys.modules.update(dict.fromkeys(sys.argv[1].split(','))); "
    "from dass_deploy.cli import export_main; sys.exit(export_main(sys.argv[2:]))"
)


@pytest.mark.parametrize(
    "hidden, options, line",
    [
        ("openvino", ["--openvino"], "dass-export --openvino needs OpenVINO: pip install 'dass[openvino]'"),
        ("nncf", ["--int8"], "dass-export --int8 needs NNCF: pip install 'dass[int8]'"),
        ("nncf", ["--int8", "--int8-calibration", "nncf-accuracy"],
         "dass-export --int8-calibration nncf-accuracy needs NNCF: pip install 'dass[int8]'"),
    ],
)  # fmt: skip
def test_export_options_without_their_extra_name_it_in_one_line(tmp_path, hidden, options, line):
    """Like every command without its extra: exit 1, one line, before the checkpoint is read or anything written."""
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "calib").mkdir()
    args = ["model.pt", "--out", "models", *options] + (["--calib", "calib"] if "--int8" in options else [])
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_WITHOUT, hidden, *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert (proc.returncode, proc.stderr.strip(), proc.stdout) == (1, line, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib", "model.pt"]


def test_export_int8_with_an_ort_quantiser_does_not_need_nncf(tmp_path):
    """Only the NNCF quantisers need dass[int8]: without nncf, --int8-calibration percentile goes on to read the
    checkpoint (and names it: this one is not a checkpoint)."""
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "calib").mkdir()
    shutil.copy(FRANKFURT, tmp_path / "calib")
    args = ["model.pt", "--out", "models", "--int8", "--calib", "calib", "--int8-calibration", "percentile"]
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_WITHOUT, "nncf", *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )  # fmt: skip
    assert proc.returncode == 2 and "NNCF" not in proc.stderr and "model.pt" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "models").exists()


def test_benchmark_saves_its_table_in_a_run_folder(tmp_path, monkeypatch, capsys):
    """Run outside the clone, --benchmark writes runs/benchmark/expN/ (the next free N) in the working folder, never
    a benchmarks/ folder there; --out still chooses the folder. The summary line names the files."""
    from dass_deploy.cli import segment_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DASS_MODEL", raising=False)
    monkeypatch.delenv("DASS_MODELS", raising=False)
    args = ["--benchmark", "--backend", "onnxruntime", "--sizes", "128x256", "--repeats", "1", "--quiet"]
    for expected in ("runs/benchmark/exp1", "runs/benchmark/exp2", "mine"):
        extra = ["--out", "mine"] if expected == "mine" else []
        assert segment_main([*args, *extra]) == 0
        summary = capsys.readouterr().out.strip().splitlines()[-1]
        md, js = Path(expected) / "segment_cpu.md", Path(expected) / "segment_cpu.json"
        assert summary == f"saved {md} and {js}"
        rows = json.loads(js.read_text())["rows"]
        assert [(r["backend"], r["size"]) for r in rows] == [("onnxruntime", "128x256")] and "p50_ms" in rows[0]
        assert md.read_text().startswith("# Benchmark: segment_cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "runs"]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["benchmark"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_demo_starts_beside_a_broken_model_folder_flag_over_env(model_dir, tmp_path):
    """A broken model folder is skipped with a warning; ``--port`` wins over ``GRADIO_SERVER_PORT``."""
    import httpx

    models = tmp_path / "models"
    shutil.copytree(model_dir, models / "good")
    shutil.copytree(model_dir, models / "broken")
    meta = json.loads((models / "broken" / "meta.json").read_text())
    del meta["input"]["height"]
    (models / "broken" / "meta.json").write_text(json.dumps(meta))
    env_port, flag_port = _free_port(), _free_port()
    env = subprocess_env() | {"GRADIO_SERVER_PORT": str(env_port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    proc = subprocess.Popen(
        [script("dass-demo"), "--models", str(models), "--port", str(flag_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline, status = time.time() + 120, None
        while time.time() < deadline and proc.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{flag_port}/", timeout=2).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None and status == 200, "the demo did not start"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{env_port}/", timeout=2)
    finally:
        _, stderr = stop_server(proc)
    warning = [line for line in stderr.splitlines() if line.startswith("warning: skipped model folder broken")]
    assert len(warning) == 1 and "input.height" in warning[0]
    assert "Traceback" not in stderr.split("warning: skipped")[0]


# --- the INT8 mIoU gate (dass-export --int8-val) ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_data(tmp_path_factory) -> dict[str, Path]:
    """Two real frames at the export size (256x128) as calibration images and as a Cityscapes-layout val set."""
    from dass_deploy.sources import read_image

    root = tmp_path_factory.mktemp("int8")
    images = root / "val" / "leftImg8bit" / "val" / "frankfurt"
    images.mkdir(parents=True)
    (root / "val" / "gtFine" / "val" / "frankfurt").mkdir(parents=True)
    (root / "calib").mkdir()
    for i, src in enumerate([FRANKFURT, SAMPLES / "street_1024x512.png"]):
        rgb = cv2.resize(read_image(src), (256, 128), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(images / f"frankfurt_000000_00000{i}_leftImg8bit.png"), rgb[..., ::-1])
        cv2.imwrite(str(root / "calib" / f"{i}.png"), rgb[..., ::-1])
    return {"root": root, "val": root / "val", "calib": root / "calib"}


def _write_labels(val: Path, labels_for) -> None:
    """gtFine/val/<city>/*_gtFine_labelTrainIds.png from ``labels_for(rgb)`` for every val image."""
    from dass_deploy.sources import read_image

    for image in sorted((val / "leftImg8bit").rglob("*_leftImg8bit.png")):
        label = val / "gtFine" / image.relative_to(val / "leftImg8bit")
        label = label.with_name(image.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png"))
        cv2.imwrite(str(label), labels_for(read_image(image)))


def test_int8_gate_refuses_a_large_mIoU_drop(model_dir, checkpoint, int8_data, tmp_path, capsys):
    """Ground truth = the fp32 model's own predictions (fp32 mIoU 100): INT8 on a random-init network moves many
    pixels of its small classes, the drop is far over 1 point, and nothing is written."""
    from dass_deploy.segmenter import Segmenter

    fp32 = Segmenter(model_dir)
    _write_labels(int8_data["val"], fp32.predict)
    out = tmp_path / "models"
    argv = [str(checkpoint), "--out", str(out), "--height", "128", "--width", "256", "--int8", "--quiet"]
    code = export_main(argv + ["--calib", str(int8_data["calib"]), "--int8-val", str(int8_data["val"])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "INT8 mIoU drop" in err and "> 1.0 points" in err and "nothing written" in err
    assert not out.exists() or not any(out.iterdir())


def test_nncf_accuracy_refuses_a_model_it_had_to_put_back_in_float(model_dir, checkpoint, int8_data, tmp_path, capsys):
    """The model the gate refuses above (random-init, ground truth = its own fp32 labels): accuracy control puts
    convolutions back in float, those that cost the most mIoU first, until the drop is within 1 point; here that
    takes every one of them, and an "INT8" model without an INT8 convolution is refused, not shipped."""
    from dass_deploy.segmenter import Segmenter

    fp32 = Segmenter(model_dir)
    _write_labels(int8_data["val"], fp32.predict)
    out = tmp_path / "models"
    argv = [str(checkpoint), "--out", str(out), "--height", "128", "--width", "256", "--int8", "--quiet"]
    argv += ["--calib", str(int8_data["calib"]), "--int8-val", str(int8_data["val"])]
    code = export_main([*argv, "--int8-calibration", "nncf-accuracy"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "nncf-accuracy returned all 24 convolutions to float" in err and "nothing written" in err
    assert "INT8 mIoU drop" not in err  # the gate itself holds: it is the speed that is gone
    assert not out.exists() or not any(out.iterdir())


def test_nncf_accuracy_needs_a_val_set(checkpoint, int8_data, tmp_path, capsys):
    argv = [str(checkpoint), "--out", str(tmp_path), "--int8", "--calib", str(int8_data["calib"]), "--quiet"]
    code = export_main([*argv, "--int8-calibration", "nncf-accuracy"])
    err = capsys.readouterr().err
    assert (
        code == 2
        and err == "error: --int8-calibration nncf-accuracy needs --int8-val (the mIoU it keeps within the gate)\n"
    )
    assert not any(tmp_path.iterdir())


def test_int8_gate_accepts_when_int8_keeps_the_mIoU(checkpoint, int8_data, tmp_path, capsys):
    """A network whose road logit dominates everywhere (a +1000 classifier bias): fp32 and INT8 both label every
    pixel road, as the ground truth does; the drop is 0 and the model is written with both mIoUs recorded."""
    import torch

    from dass_train.checkpoint import save_checkpoint

    obj = torch.load(checkpoint, weights_only=True)
    obj["model"]["layer5.conv2d_list.0.bias"][0] += 1000.0
    road = tmp_path / "road.pt"
    save_checkpoint(road, obj)
    _write_labels(int8_data["val"], lambda rgb: np.zeros(rgb.shape[:2], np.uint8))
    out = tmp_path / "models"
    argv = [str(road), "--out", str(out), "--height", "128", "--width", "256", "--int8", "--quiet", "--name", "road"]
    code = export_main(argv + ["--calib", str(int8_data["calib"]), "--int8-val", str(int8_data["val"])])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    int8 = json.loads((out / "road" / "meta.json").read_text())["export"]["int8"]
    assert int8["val_images"] == 2 and int8["miou_fp32"] == pytest.approx(100.0)
    assert int8["miou_drop"] <= 1.0 and "mIoU 100.00 -> 100.00 on 2 val images" in stdout


def test_cli_reference_lists_every_option():
    """docs/CLI.md is generated from --help (docs/make_cli_reference.py): every option of the three commands is in it."""
    from app.app import demo_command

    text = (Path(__file__).resolve().parents[1] / "docs" / "CLI.md").read_text()
    for name, command in (("dass-segment", segment), ("dass-export", export), ("dass-demo", demo_command)):
        assert f"$ {name} --help" in text
        for param in command.params:
            for opt in param.opts if param.param_type_name == "option" else []:
                assert opt in text, (name, opt)
