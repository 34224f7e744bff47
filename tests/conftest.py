"""Shared test fixtures: the real sample images, a real checkpoint and a real exported model directory."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: Real Cityscapes samples shipped in the repository (362 KB), so a bare clone runs every test; DASS_SAMPLES overrides.
SAMPLES = Path(os.environ.get("DASS_SAMPLES", REPO / "tests" / "data" / "cityscapes"))
EXPORT_SIZE = (128, 256)


def tiny_overrides(root: Path, counts: tuple[int, int, int], out: Path, **values: object) -> list[str]:
    """Overrides for a seconds-long run on a tiny synthetic benchmark at ``root`` (128x64 images, ``counts`` source /
    target-train / target-val) into ``out``; ``values`` add or replace entries (``stages__adapt_iters=6``)."""
    base: dict[str, object] = {
        "data.synthetic_root": root,
        "data.synthetic_size": "128,64",
        "data.synthetic_counts": ",".join(map(str, counts)),
        "data.resize_short": 64,
        "data.crop": "64,64",
        "data.eval_size": "128,64",
        "data.num_workers": 0,
        "stages.source_only_resize_short": 64,
        "stages.source_only_crop": "64,64",
        "optim.batch_size": 2,
        "run.out": out,
        "run.val_every": 0,
        "run.progress": "false",
        "run.tensorboard": "false",
        "run.threads": 1,
    }
    base.update({k.replace("__", "."): v for k, v in values.items()})
    return [f"{k}={v}" for k, v in base.items()]


def subprocess_env() -> dict[str, str]:
    """The repo importable in child processes, whether or not the package is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def stop_server(proc: subprocess.Popen) -> tuple[str, str]:
    """SIGTERM a server started by a test (killed after 30 s); returns its (stdout, stderr)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.fixture(scope="session")
def samples() -> Path:
    if not (SAMPLES / "street_1024x512.png").is_file():
        pytest.fail(f"sample images not found in {SAMPLES} (set DASS_SAMPLES)")
    return SAMPLES


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A random-init DeepLab-V2 ResNet-18 saved with the real ``save_checkpoint`` (seeded: runs agree)."""
    import torch

    from dass_train.checkpoint import checkpoint_meta_default, save_checkpoint
    from dass_train.network import deeplab_v2

    path = tmp_path_factory.mktemp("r18") / "r18.pt"
    torch.manual_seed(0)
    model = deeplab_v2(num_classes=19, backbone="resnet18")
    meta = checkpoint_meta_default(backbone="resnet18", stage="source")
    save_checkpoint(path, {"format": "dass-checkpoint", "version": 1, "model": model.state_dict(), "meta": meta})
    return path


@pytest.fixture(scope="session")
def model_dir(checkpoint, tmp_path_factory) -> Path:
    """``models/r18`` exported with the real ``export_model`` at 128x256 (fixed size, uint8 labels)."""
    from dass_deploy.export import export_model

    out = tmp_path_factory.mktemp("models")
    result = export_model(checkpoint, out=out, name="r18", height=EXPORT_SIZE[0], width=EXPORT_SIZE[1], progress=False)
    return Path(result.model_dir)


@pytest.fixture(scope="session", autouse=True)
def every_config_pbtxt_parses_as_triton_config(tmp_path_factory):
    """After the session: every ``config.pbtxt`` any test wrote (exports, copies, hand-written cases) must parse
    with Triton's own ``ModelConfig`` protobuf schema, as Triton's model loader would parse it."""
    yield
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # the test extra is not installed: tests/test_triton_config.py reports the skip
        return
    bad = []
    for path in sorted(tmp_path_factory.getbasetemp().rglob("config.pbtxt")):
        try:
            text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        except (text_format.ParseError, UnicodeDecodeError) as exc:
            bad.append(f"{path}: {exc}")
    assert not bad, "config.pbtxt that Triton would refuse:\n" + "\n".join(bad)
