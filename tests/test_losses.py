"""The composition of one BiDA step (losses.bida_step): which domain feeds which term, checked against an
independent recomputation from bida.py's equations; and the fidelity switches of the loss."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dass_train import bida
from dass_train.config import LossConfig, MethodConfig
from dass_train.labels import IGNORE_INDEX, NUM_CLASSES
from dass_train.losses import bida_step

K = NUM_CLASSES
N, C, H, W = 2, 8, 6, 8  # features at 1/1 of the label size keeps the wiring easy to follow


def _inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    classes = torch.tensor([0, 1, 2, 8, 10, 13])  # a few classes present in both domains
    label_s = classes[torch.randint(0, len(classes), (N, H, W), generator=g)]
    static_t = classes[torch.randint(0, len(classes), (N, H, W), generator=g)]
    static_t[:, :, : W // 2] = IGNORE_INDEX  # static labels are sparse: the dynamic ones add the other half
    return {
        "logit_s": torch.randn(N, K, H, W, generator=g),
        "logit_t": torch.randn(N, K, H, W, generator=g),
        "f_s": torch.randn(N, C, H, W, generator=g),
        "f_t": torch.randn(N, C, H, W, generator=g),
        "label_s": label_s,
        "static_t": static_t,
    }


def _memory(seed: int = 1) -> bida.PrototypeMemory:
    """A memory that has seen every class in both domains, with a large domain bias (so calibration matters)."""
    g = torch.Generator().manual_seed(seed)
    mem = bida.PrototypeMemory(K, C, momentum=0.9)
    mem.mu_src.copy_(torch.randn(K, C, generator=g))
    mem.mu_tgt.copy_(mem.mu_src + 3.0 * torch.randn(K, C, generator=g))
    mem.seen_src.fill_(True)
    mem.seen_tgt.fill_(True)
    return mem


METHOD = MethodConfig(dynamic_labels="calibrated", dynamic_threshold=-1.0)  # T=-1: every pixel gets a dynamic label
WEIGHTS = LossConfig()


def _reference(x: dict, mem: bida.PrototypeMemory, method: MethodConfig, weights: LossConfig) -> dict:
    """Eq. 1-12 recomputed here, straight from the paper's text."""
    y_s, y_f = x["label_s"], x["static_t"]
    rho_s, pres_s = bida.class_prototypes(x["f_s"], y_s, K)  # Eq. 1 on source ground truth
    rho_cal = rho_s + (mem.mu_tgt - mem.mu_src)  # Eq. 6-7: the *source* prototypes are calibrated
    y_d = bida.dynamic_pseudo_labels(x["f_t"], rho_cal, pres_s, method.dynamic_threshold)  # Eq. 8-9
    y_t = bida.hybrid_pseudo_labels(y_d, y_f)  # Eq. 10
    rho_t, pres_t = bida.class_prototypes(x["f_t"], y_t, K)  # Eq. 1 on *hybrid* target labels
    lam = mem.momentum
    return {
        "y_d": y_d,
        "y_t": y_t,
        "rho_s": rho_s,
        "rho_t": rho_t,
        "fcl": weights.fcl * bida.contrastive_loss(x["f_t"], y_t, rho_s, pres_s, weights.tau),  # Eq. 2
        "bcl": weights.bcl * bida.contrastive_loss(x["f_s"], y_s, rho_t, pres_t, weights.tau),  # Eq. 3
        "mu_src": torch.where(pres_s[:, None], lam * mem.mu_src + (1 - lam) * rho_s, mem.mu_src),  # Eq. 4
        "mu_tgt": torch.where(pres_t[:, None], lam * mem.mu_tgt + (1 - lam) * rho_t, mem.mu_tgt),  # Eq. 5
        "seg_s": weights.seg_source * bida.segmentation_loss(x["logit_s"], y_s),
        "seg_t": weights.seg_target * bida.segmentation_loss(x["logit_t"], y_f),
        "ent_s": weights.ent_source * bida.entropy_loss(x["logit_s"]),
        "ent_t": weights.ent_target * bida.entropy_loss(x["logit_t"]),
    }


def _step(x: dict, mem: bida.PrototypeMemory, method: MethodConfig = METHOD, weights: LossConfig = WEIGHTS):
    return bida_step(x["logit_s"], x["logit_t"], x["f_s"], x["f_t"], x["label_s"], x["static_t"], mem, method, weights)


def test_step_matches_the_paper_term_by_term():
    x, mem = _inputs(), _memory()
    ref = _reference(x, _memory(), METHOD, WEIGHTS)
    step = _step(x, mem)
    for key in ("seg_s", "seg_t", "ent_s", "ent_t", "fcl", "bcl"):
        assert torch.allclose(step.losses[key], ref[key], atol=1e-6), key
    assert torch.equal(step.y_d, ref["y_d"]) and torch.equal(step.y_t, ref["y_t"])
    assert torch.allclose(step.rho_s, ref["rho_s"]) and torch.allclose(step.rho_t, ref["rho_t"])


def test_the_setup_can_tell_the_mutants_apart():
    """Guards the test data: swapped domains, static-label target prototypes, target-side calibration and a swapped
    EMA all give different numbers here, so the tests below would see each mistake."""
    x, mem = _inputs(), _memory()
    ref = _reference(x, mem, METHOD, WEIGHTS)
    y_s = x["label_s"]
    rho_s, pres_s = bida.class_prototypes(x["f_s"], y_s, K)
    rho_t_static, pres_t_static = bida.class_prototypes(x["f_t"], x["static_t"], K)
    rho_t, pres_t = bida.class_prototypes(x["f_t"], ref["y_t"], K)
    swapped_fcl = WEIGHTS.fcl * bida.contrastive_loss(x["f_s"], y_s, rho_t, pres_t, WEIGHTS.tau)
    assert not torch.allclose(swapped_fcl, ref["fcl"], atol=1e-4)
    static_bcl = WEIGHTS.bcl * bida.contrastive_loss(x["f_s"], y_s, rho_t_static, pres_t_static, WEIGHTS.tau)
    assert not torch.allclose(static_bcl, ref["bcl"], atol=1e-4)
    uncalibrated = bida.dynamic_pseudo_labels(x["f_t"], rho_s, pres_s, -1.0)
    target_side = bida.dynamic_pseudo_labels(
        x["f_t"] - (mem.mu_tgt - mem.mu_src).mean(0)[None, :, None, None], rho_s, pres_s, -1.0
    )
    assert (uncalibrated != ref["y_d"]).float().mean() > 0.1 and (target_side != ref["y_d"]).float().mean() > 0.1
    assert not torch.allclose(ref["mu_src"], ref["mu_tgt"], atol=1e-3)


def test_fcl_uses_target_pixels_and_source_prototypes_bcl_the_reverse():
    x = _inputs()
    ref = _reference(x, _memory(), METHOD, WEIGHTS)
    step = _step(x, _memory())
    assert torch.allclose(step.losses["fcl"], ref["fcl"], atol=1e-6)
    assert torch.allclose(step.losses["bcl"], ref["bcl"], atol=1e-6)


def test_target_prototypes_come_from_hybrid_labels():
    x = _inputs()
    ref = _reference(x, _memory(), METHOD, WEIGHTS)
    step = _step(x, _memory())
    assert (step.y_t != x["static_t"]).any()  # the dynamic labels really extend the static ones here
    assert torch.allclose(step.rho_t, ref["rho_t"], atol=1e-6)
    assert torch.allclose(step.losses["bcl"], ref["bcl"], atol=1e-6)


def test_calibration_shifts_the_source_prototypes():
    x = _inputs()
    ref = _reference(x, _memory(), METHOD, WEIGHTS)
    step = _step(x, _memory())
    assert torch.equal(step.y_d, ref["y_d"])


def test_ema_memory_follows_each_domain():
    x, mem = _inputs(), _memory()
    ref = _reference(x, _memory(), METHOD, WEIGHTS)
    _step(x, mem)
    assert torch.allclose(mem.mu_src, ref["mu_src"], atol=1e-6)
    assert torch.allclose(mem.mu_tgt, ref["mu_tgt"], atol=1e-6)


def test_table3_switches_drop_their_terms_and_labels():
    x = _inputs()
    base = dataclasses.replace(METHOD, use_fcl=False, use_bcl=False, dynamic_labels="off")
    step = _step(x, _memory(), base)
    assert set(step.losses) == {"seg_s", "seg_t", "ent_s", "ent_t"}
    assert step.y_d is None and torch.equal(step.y_t, x["static_t"])
    raw = dataclasses.replace(METHOD, dynamic_labels="uncalibrated")
    rho_s, pres_s = bida.class_prototypes(x["f_s"], x["label_s"], K)
    assert torch.equal(_step(x, _memory(), raw).y_d, bida.dynamic_pseudo_labels(x["f_t"], rho_s, pres_s, -1.0))


# ------------------------------------------------------------------------------------------------ fidelity switches
def test_entropy_switch_changes_the_term_and_its_gradient():
    x = _inputs()
    logits = x["logit_t"].clone().requires_grad_(True)
    paper = bida.entropy_loss(logits, "paper")
    (g_paper,) = torch.autograd.grad(paper, logits)
    authors = bida.entropy_loss(logits, "authors")
    (g_authors,) = torch.autograd.grad(authors, logits)
    q = torch.softmax(torch.softmax(x["logit_t"], 1), 1)
    assert torch.allclose(authors, -(q * q.log()).sum(1).mean(), atol=1e-6)  # softmax applied twice
    assert authors > paper  # nearly uniform: close to log K
    assert g_paper.norm() > 20 * g_authors.norm()  # the flat term the authors' weights were tuned against
    step = _step(x, _memory(), weights=dataclasses.replace(WEIGHTS, entropy="authors"))
    assert torch.allclose(step.losses["ent_t"], WEIGHTS.ent_target * bida.entropy_loss(x["logit_t"], "authors"))


def test_contrastive_mean_switch_reaches_both_terms():
    x = _inputs()
    pixel, balanced = (
        _step(x, _memory()),
        _step(x, _memory(), weights=dataclasses.replace(WEIGHTS, contrastive_mean="class")),
    )
    rho_s, pres_s = bida.class_prototypes(x["f_s"], x["label_s"], K)
    rho_t, pres_t = bida.class_prototypes(x["f_t"], balanced.y_t, K)
    fcl = bida.contrastive_loss(x["f_t"], balanced.y_t, rho_s, pres_s, WEIGHTS.tau, mean="class")
    bcl = bida.contrastive_loss(x["f_s"], x["label_s"], rho_t, pres_t, WEIGHTS.tau, mean="class")
    assert torch.allclose(balanced.losses["fcl"], WEIGHTS.fcl * fcl, atol=1e-6)
    assert torch.allclose(balanced.losses["bcl"], WEIGHTS.bcl * bcl, atol=1e-6)
    for key in ("fcl", "bcl"):
        assert not torch.allclose(balanced.losses[key], pixel.losses[key], atol=1e-4), key
    assert torch.equal(balanced.losses["seg_t"], pixel.losses["seg_t"])  # nothing else moves


def test_dynamic_score_switch_thresholds_softmax_instead_of_cosine():
    protos = torch.zeros(K, 3)
    protos[0] = torch.tensor([1.0, 0.0, 0.0])
    protos[1] = torch.tensor([0.9, 0.43589, 0.0])  # cosine 0.9 to class 0
    present = torch.zeros(K, dtype=torch.bool)
    present[:2] = True
    far = torch.tensor([0.7, 0.0, 0.71414])  # cosine 0.70 to class 0, 0.63 to class 1: softmax(cos / 0.1) 0.66
    lone = torch.tensor([0.7, -0.5, 0.51])  # cosine 0.70 to class 0, 0.41 to class 1: softmax 0.95
    near = torch.tensor([1.0, 0.0, 0.0])  # cosine 1.0 to class 0 and 0.9 to class 1: softmax 0.73
    feats = torch.stack([far, lone, near])[:, :, None, None]
    cos = bida.dynamic_pseudo_labels(feats, protos, present, 0.8, score="cosine")
    soft = bida.dynamic_pseudo_labels(feats, protos, present, 0.8, score="softmax", tau=0.1)
    assert cos.flatten().tolist() == [IGNORE_INDEX, IGNORE_INDEX, 0]  # only the near pixel is above cosine 0.8
    assert soft.flatten().tolist() == [IGNORE_INDEX, 0, IGNORE_INDEX]  # only the unambiguous one above softmax 0.8
    x = _inputs()
    method = dataclasses.replace(METHOD, dynamic_score="softmax", dynamic_threshold=0.5)
    step = _step(x, _memory(), method)
    rho_s, pres_s = bida.class_prototypes(x["f_s"], x["label_s"], K)
    rho_cal = rho_s + (_memory().mu_tgt - _memory().mu_src)
    expected = bida.dynamic_pseudo_labels(x["f_t"], rho_cal, pres_s, 0.5, score="softmax", tau=WEIGHTS.tau)
    assert torch.equal(step.y_d, expected)


def test_pair_prototypes_pool_each_pair_separately():
    x = _inputs()
    rho, pres = bida.pair_prototypes(x["f_s"], x["label_s"], K)
    for i in range(N):  # the loop is the reference: each image pooled on its own
        r, p = bida.class_prototypes(x["f_s"][i : i + 1], x["label_s"][i : i + 1], K)
        assert torch.allclose(rho[i], r, atol=1e-6) and torch.equal(pres[i], p)
    method = dataclasses.replace(METHOD, prototypes="pair", dynamic_labels="off")
    step = _step(x, _memory(), method)
    y = x["static_t"]
    counts = [((y[i] != IGNORE_INDEX) & pres[i][y[i].clamp(max=K - 1)]).sum() for i in range(N)]
    per_image = [
        bida.contrastive_loss(x["f_t"][i : i + 1], y[i : i + 1], rho[i], pres[i], WEIGHTS.tau) for i in range(N)
    ]
    expected = sum(loss * n for loss, n in zip(per_image, counts, strict=True)) / sum(counts)
    assert torch.allclose(step.losses["fcl"], WEIGHTS.fcl * expected, atol=1e-6)
    batch = _step(x, _memory(), dataclasses.replace(method, prototypes="batch"))
    assert not torch.allclose(step.losses["fcl"], batch.losses["fcl"], atol=1e-4)


def test_align_corners_switch_changes_the_upsampled_logits():
    logits = torch.randn(1, K, 5, 7)
    labels = torch.randint(0, K, (1, 33, 49))
    a = bida.segmentation_loss(logits, labels, align_corners=True)
    b = bida.segmentation_loss(logits, labels, align_corners=False)
    up = torch.nn.functional.interpolate(logits, size=(33, 49), mode="bilinear", align_corners=True)
    assert torch.allclose(a, torch.nn.functional.cross_entropy(up, labels))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("seed", [0, 3])
def test_step_is_finite_with_absent_classes(seed):
    x = _inputs(seed)
    x["static_t"][:] = IGNORE_INDEX  # no static label at all
    step = _step(x, _memory(), dataclasses.replace(METHOD, dynamic_labels="off"))
    assert all(torch.isfinite(v) for v in step.losses.values())
