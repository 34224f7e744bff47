"""The stages on a tiny real synthetic benchmark: domain BN during adaptation, static labels written exactly as
computed, the authors' LR rounds, the source-only batch size and the rare-class pixel threshold reaching the run."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_trainer import SYN, tiny

from dass_train import bida
from dass_train.checkpoint import load_checkpoint
from dass_train.cli import main as train_main
from dass_train.config import build_config
from dass_train.data.domains import SizedTarget, target_dataset
from dass_train.data.synthetic import ensure_dataset
from dass_train.data.transforms import EvalTransform, TransformConfig
from dass_train.distributed import DistInfo
from dass_train.engine import init_model
from dass_train.labels import IGNORE_INDEX, NUM_CLASSES
from dass_train.pseudo_labels import _quantize, generate_static_labels, label_path
from dass_train.schedules import rounds_factor
from dass_train.stages import make_stage
from dass_train.trainer import build_model


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    ensure_dataset(root, SYN, progress=False)
    return root


@pytest.fixture(scope="module")
def source_only(synth_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert train_main(["synth2real", "--name", "so", "--stage", "source_only", *tiny(synth_root, out)]) == 0
    return out / "so" / "source_only" / "last.pt"


def _stage(cfg, stage: str, run_dir: Path, init: Path | None = None):
    st = make_stage(cfg, stage, run_dir, DistInfo(), init_checkpoint=init)
    st.stage_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    st._build_model()
    st.build_streams()
    init_model(st.model, cfg, init, st.log)
    return st


def _bn_buffers(model) -> list[torch.Tensor]:
    return [
        b.clone()
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for b in (m.running_mean, m.running_var)
    ]


def test_domain_bn_running_statistics_follow_the_target_batch_only(synth_root, source_only, tmp_path):
    cfg = build_config("synth2real", tiny(synth_root, tmp_path))
    assert cfg.model.domain_bn and not cfg.model.freeze_bn
    st = _stage(cfg, "adapt", tmp_path / "run", init=source_only)
    st.on_start()  # target BN statistics, then static labels
    batches = {}
    for name in ("source", "target"):
        stream = getattr(st, name)
        real_next = stream.next

        def record(real_next=real_next, name=name):
            batches[name] = real_next()
            return batches[name]

        stream.next = record
    before = copy.deepcopy(st.model)
    assert st.step() is not None
    target_only, mixed = copy.deepcopy(before).train(), copy.deepcopy(before).train()
    with torch.no_grad():
        target_only(batches["target"]["image"])
        mixed(torch.cat([batches["source"]["image"], batches["target"]["image"]]))
    after, want, old = _bn_buffers(st.model), _bn_buffers(target_only), _bn_buffers(mixed)
    assert all(torch.allclose(a, w, atol=1e-6) for a, w in zip(after, want, strict=True))
    assert any(not torch.allclose(a, o, atol=1e-4) for a, o in zip(after, old, strict=True))  # the old bug


def test_static_labels_are_written_exactly_as_computed(synth_root, source_only, tmp_path):
    cfg = build_config("synth2real", tiny(synth_root, tmp_path))
    model = build_model(cfg, torch.device("cpu"))
    model.load_state_dict(load_checkpoint(source_only)["model"])
    model.eval()
    norm = dict(load_checkpoint(source_only)["meta"]["normalization"])
    tf = EvalTransform(TransformConfig(eval_size=tuple(cfg.data.eval_size)), norm)
    ds = SizedTarget(target_dataset(cfg, "train", tf, with_labels=False, seed=1))
    out = tmp_path / "labels"
    result = generate_static_labels(
        model,
        ds,
        out,
        num_classes=NUM_CLASSES,
        portion=0.2,
        image_portion=0.1,
        device=torch.device("cpu"),
        progress=False,
    )
    with torch.no_grad():
        probs = torch.cat(
            [
                bida.upsample_logits(model(ds[i]["image"][None]), ds[i]["image"].shape[1:]).softmax(1)
                for i in range(len(ds))
            ]
        )
    cbst = bida.ClassBalancedThresholds(NUM_CLASSES, 0.2)
    cbst.update(probs)
    grid = 65535.0
    quantised = _quantize(probs).double() / grid  # the cache stores confidences on a 1/65535 grid
    labels = bida.static_pseudo_labels(quantised, _quantize(cbst.thresholds()).double() / grid, image_portion=0.1)
    assert result.thresholds == pytest.approx(cbst.thresholds().tolist(), abs=1e-6)
    labelled = 0
    for i in range(len(ds)):
        w, h = ds[i]["full_size"]
        want = Image.fromarray(labels[i].numpy().astype(np.uint8)).resize((w, h), Image.NEAREST)
        got = np.asarray(Image.open(label_path(out, ds.base.names[i])))
        assert got.shape == (h, w) and np.array_equal(got, np.asarray(want)), ds.base.names[i]
        labelled += int((got != IGNORE_INDEX).sum())
    assert labelled > 0


def test_rounds_schedule_halves_the_lr_and_refreshes_labels_each_round(synth_root, source_only, tmp_path):
    assert rounds_factor(0, 100, 0.9, 10, 0.5) == 1.0
    assert rounds_factor(10, 100, 0.9, 10, 0.5) == 0.5 and rounds_factor(95, 100, 0.9, 10, 0.5) < 0.5**9
    assert rounds_factor(5, 100, 0.9, 10, 0.5) == pytest.approx(0.5**0.9)
    args = tiny(synth_root, tmp_path, optim__schedule="rounds", optim__rounds=3, method__refresh_every=0)
    assert train_main(["synth2real", "--name", "r", "--stage", "adapt", "--init", str(source_only), *args]) == 0
    ckpt = load_checkpoint(tmp_path / "r" / "adapt" / "last.pt")
    lr0 = build_config("synth2real", args).optim.lr
    lrs = {row["it"]: row["lr"] for row in ckpt["history"]}  # row "it" is the iteration after the step
    close = dict(rel=1e-3)  # the history keeps 6 decimals
    assert lrs[1] == pytest.approx(lr0, **close) and lrs[3] == pytest.approx(lr0 / 2, **close)
    assert lrs[5] == pytest.approx(lr0 / 4, **close)
    assert lrs[2] == pytest.approx(lr0 * 0.5**0.9, **close)
    assert ckpt["pseudo_round"] == 2 and all(
        (tmp_path / "r" / "adapt" / "pseudo" / f"round_0{r}").is_dir() for r in range(3)
    )


def test_source_only_batch_size_is_its_own(synth_root, tmp_path):
    args = tiny(synth_root, tmp_path, stages__source_only_batch_size=1)
    assert train_main(["synth2real", "--name", "b1", "--stage", "source_only", *args]) == 0
    assert train_main(["synth2real", "--name", "b2", "--stage", "source_only", *tiny(synth_root, tmp_path)]) == 0
    one = load_checkpoint(tmp_path / "b1" / "source_only" / "last.pt")
    two = load_checkpoint(tmp_path / "b2" / "source_only" / "last.pt")
    assert one["samplers"]["source"]["position"] == 4 and two["samplers"]["source"]["position"] == 8


def test_rare_class_min_pixels_reaches_the_sampler(synth_root, tmp_path):
    counts = {}
    for m in (1, 2000):
        cfg = build_config("synth2real", tiny(synth_root, tmp_path, data__rare_class_min_pixels=m))
        st = _stage(cfg, "source_only", tmp_path / f"m{m}")
        sampler = st.source.sampler
        counts[m] = sampler._counts.copy()
    from dass_train.data.sampling import class_stats

    cfg = build_config("synth2real", tiny(synth_root, tmp_path))
    stats = class_stats(st.source.dataset, progress=False)
    assert np.array_equal(counts[1], (stats >= 1).sum(0)) and np.array_equal(counts[2000], (stats >= 2000).sum(0))
    assert (counts[2000] < counts[1]).any()


def test_eval_uses_the_checkpoints_upsampling(synth_root, source_only, tmp_path, capsys):
    """`dass-train eval` takes align_corners from the checkpoint's meta (part of the model), not from the preset."""
    from dass_train.checkpoint import save_checkpoint

    payload = load_checkpoint(source_only)
    payload["meta"]["upsampling"] = {"mode": "bilinear", "align_corners": True}
    marked = save_checkpoint(tmp_path / "aligned.pt", payload)
    args = tiny(synth_root, tmp_path)
    results = {}
    for name, ckpt in (("plain", source_only), ("aligned", marked)):
        capsys.readouterr()
        assert train_main(["eval", "--checkpoint", str(ckpt), "--preset", "synth2real", *args]) == 0
        out = capsys.readouterr().out
        results[name] = out
    assert "align_corners=False (from the checkpoint)" in results["plain"]
    assert "align_corners=True (from the checkpoint)" in results["aligned"]
