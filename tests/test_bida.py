"""dass_train.bida against direct, loop-based transcriptions of the paper's equations (small random tensors)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dass_train import bida

N, C, H, W, K = 2, 8, 5, 5, 6
IGN = 255


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def random_labels(gen: torch.Generator, absent: tuple[int, ...] = (), p_ignore: float = 0.2) -> torch.Tensor:
    """[N,H,W] labels in [0,K) without the classes in `absent`, with some 255."""
    allowed = torch.tensor([c for c in range(K) if c not in absent])
    labels = allowed[torch.randint(len(allowed), (N, H, W), generator=gen)]
    labels[torch.rand(N, H, W, generator=gen) < p_ignore] = IGN
    return labels


# ------------------------------------------------------------------------------------------- loop-based references
def ref_prototypes(f: torch.Tensor, y: torch.Tensor, k: int) -> tuple[torch.Tensor, list[bool]]:
    """Eq. 1: rho(c) = sum_p f(p) y(p,c) / sum_p y(p,c)."""
    protos, present = torch.zeros(k, f.shape[1], dtype=torch.float64), []
    for c in range(k):
        total, count = torch.zeros(f.shape[1], dtype=torch.float64), 0
        for n in range(f.shape[0]):
            for i in range(f.shape[2]):
                for j in range(f.shape[3]):
                    if int(y[n, i, j]) == c:
                        total += f[n, :, i, j].double()
                        count += 1
        present.append(count > 0)
        if count:
            protos[c] = total / count
    return protos, present


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a @ b) / (max(float(a.norm()), 1e-12) * max(float(b.norm()), 1e-12)))


def ref_contrastive(f, y, protos, present, tau, absent_as_minus_one: bool = False) -> float:
    """Eq. 2/3, averaged over pixels labelled with a present class; softmax over present classes only.

    absent_as_minus_one=True reproduces the authors' variant (absent class kept in the softmax with similarity -1).
    """
    losses = []
    for n in range(f.shape[0]):
        for i in range(f.shape[2]):
            for j in range(f.shape[3]):
                c = int(y[n, i, j])
                if c >= len(present) or not present[c]:
                    continue
                denom = 0.0
                for c2 in range(len(present)):
                    if present[c2]:
                        denom += math.exp(cos(f[n, :, i, j], protos[c2]) / tau)
                    elif absent_as_minus_one:
                        denom += math.exp(-1.0 / tau)
                losses.append(-math.log(math.exp(cos(f[n, :, i, j], protos[c]) / tau) / denom))
    return sum(losses) / len(losses) if losses else 0.0


def ref_contrastive_class_mean(f, y, protos, present, tau) -> float:
    """``mean="class"``: Eq. 2/3 averaged over each class's pixels, then over the classes that have any."""
    per_class = []
    for c in range(len(present)):
        if present[c] and (y == c).any():
            keep = torch.where(y == c, y, torch.full_like(y, IGN))
            per_class.append(ref_contrastive(f, keep, protos, present, tau))
    return sum(per_class) / len(per_class) if per_class else 0.0


# ------------------------------------------------------------------------------------------------------ downsample
def test_downsample_labels_nearest_keeps_ignore(gen):
    labels = torch.randint(0, 4, (2, 16, 24), generator=gen)
    labels[:, ::3] = IGN
    small = bida.downsample_labels(labels, (5, 7))
    assert small.shape == (2, 5, 7) and small.dtype == torch.int64
    for i in range(5):
        for j in range(7):
            assert torch.equal(small[:, i, j], labels[:, math.floor(i * 16 / 5), math.floor(j * 24 / 7)])
    assert set(small.unique().tolist()) <= {0, 1, 2, 3, IGN}
    assert torch.equal(bida.downsample_labels(labels, (16, 24)), labels)


# ------------------------------------------------------------------------------------------------------------- Eq. 1
def test_class_prototypes_match_masked_average_pooling(gen):
    f = torch.randn(N, C, H, W, generator=gen)
    y = random_labels(gen, absent=(2, 4))
    y[0, 0, 0] = 17  # out of range counts as ignored
    protos, present = bida.class_prototypes(f, y, K)
    ref, ref_present = ref_prototypes(f, y, K)
    assert protos.shape == (K, C) and present.dtype == torch.bool
    assert present.tolist() == ref_present == [True, True, False, True, False, True]
    torch.testing.assert_close(protos.double(), ref, atol=1e-6, rtol=1e-5)
    assert torch.all(protos[~present] == 0)


def test_class_prototypes_gradient_reaches_labelled_pixels_only(gen):
    f = torch.randn(N, C, H, W, generator=gen, requires_grad=True)
    y = random_labels(gen)
    protos, _ = bida.class_prototypes(f, y, K)
    protos.sum().backward()
    labelled = (y != IGN)[:, None].expand_as(f)
    assert torch.all(f.grad[~labelled] == 0) and torch.all(f.grad[labelled] > 0)


def test_class_prototypes_reject_mismatched_resolution(gen):
    with pytest.raises(ValueError, match="downsample_labels"):
        bida.class_prototypes(torch.randn(N, C, H, W), torch.zeros(N, 2 * H, 2 * W, dtype=torch.long), K)


def test_class_prototypes_all_ignore():
    protos, present = bida.class_prototypes(torch.randn(N, C, H, W), torch.full((N, H, W), IGN), K)
    assert not present.any() and torch.all(protos == 0)


# ------------------------------------------------------------------------------------------------------- Eq. 2 and 3
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_contrastive_loss_matches_equation(gen, tau):
    f = torch.randn(N, C, H, W, generator=gen)
    # prototypes from the other domain: class 1 absent there, class 3 absent here (present on one side only)
    other_f = torch.randn(N, C, H, W, generator=gen)
    protos, present = bida.class_prototypes(other_f, random_labels(gen, absent=(1,)), K)
    y = random_labels(gen, absent=(3,))
    assert (y == 1).any() and not present[1] and present[3]
    loss = bida.contrastive_loss(f, y, protos, present, tau)
    expected = ref_contrastive(f, y, protos, present.tolist(), tau)
    assert loss.dim() == 0
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    if tau == 1.0:  # leaving absent classes out is not the authors' similarity -1 (tiny difference at tau=0.1)
        buggy = ref_contrastive(f, y, protos, present.tolist(), tau, absent_as_minus_one=True)
        assert abs(buggy - expected) > 1e-3


def test_contrastive_loss_class_mean_matches_its_reference(gen):
    f = torch.randn(N, C, H, W, generator=gen)
    protos, present = bida.class_prototypes(torch.randn(N, C, H, W, generator=gen), random_labels(gen, absent=(1,)), K)
    y = random_labels(gen, absent=(3,))
    y[:, : H // 2] = 0  # one class owns most pixels, as road does in the paper regime's static labels
    loss = bida.contrastive_loss(f, y, protos, present, 0.5, mean="class")
    expected = ref_contrastive_class_mean(f, y, protos, present.tolist(), 0.5)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    pixel = bida.contrastive_loss(f, y, protos, present, 0.5)
    assert abs(float(pixel) - expected) > 1e-3  # the two means differ when the classes are unbalanced


def test_contrastive_loss_class_mean_ignores_class_size(gen):
    """Repeating every pixel of one class (the image twice as road-heavy) leaves the class mean as it was."""
    f = torch.randn(1, C, 2, 6, generator=gen)
    y = torch.tensor([[[0, 0, 1, 2, IGN, 3], [0, 1, 2, 2, 3, 0]]])
    protos, present = torch.randn(K, C, generator=gen), torch.ones(K, dtype=torch.bool)
    road = (y[0] == 0).nonzero()
    extra_f = f[0][:, road[:, 0], road[:, 1]][None, :, None]  # [1,C,1,R]: class 0's pixels again
    f2 = torch.cat([f.reshape(1, C, 1, -1), extra_f], dim=3)
    y2 = torch.cat([y.reshape(1, 1, -1), torch.zeros(1, 1, len(road), dtype=torch.long)], dim=2)
    for mean, same in (("class", True), ("pixel", False)):
        a = bida.contrastive_loss(f, y, protos, present, 0.1, mean=mean)
        b = bida.contrastive_loss(f2, y2, protos, present, 0.1, mean=mean)
        assert torch.allclose(a, b, atol=1e-6) is same, mean


def test_contrastive_loss_rejects_an_unknown_mean(gen):
    with pytest.raises(ValueError, match="mean"):
        bida.contrastive_loss(
            torch.randn(N, C, H, W),
            random_labels(gen),
            torch.randn(K, C),
            torch.ones(K, dtype=torch.bool),
            mean="median",
        )


def test_contrastive_loss_no_valid_pixel_is_zero_with_gradient(gen):
    protos, present = bida.class_prototypes(torch.randn(N, C, H, W, generator=gen), random_labels(gen, absent=(0,)), K)
    for y in (torch.full((N, H, W), IGN), torch.zeros(N, H, W, dtype=torch.long)):  # all ignore / only absent class 0
        f = torch.randn(N, C, H, W, generator=gen, requires_grad=True)
        p = protos.clone().requires_grad_(True)
        for mean in ("pixel", "class"):
            f.grad = p.grad = None
            loss = bida.contrastive_loss(f, y, p, present, 0.1, mean=mean)
            assert loss.item() == 0.0 and torch.isfinite(loss.detach())
            loss.backward()
            assert torch.all(f.grad == 0) and torch.all(p.grad == 0)


def test_contrastive_loss_no_present_class_is_finite(gen):
    f = torch.randn(N, C, H, W, generator=gen, requires_grad=True)
    loss = bida.contrastive_loss(f, random_labels(gen), torch.zeros(K, C), torch.zeros(K, dtype=torch.bool), 0.1)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(f.grad).all()


def test_contrastive_loss_gradcheck(gen):
    f = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[[0, 1], [IGN, 3]]])
    present = torch.tensor([True, True, False, True])
    for mean in ("pixel", "class"):
        check = lambda f_, p_, m=mean: bida.contrastive_loss(f_, y, p_, present, 0.5, mean=m)  # noqa: E731
        assert torch.autograd.gradcheck(check, (f, p))


def test_contrastive_loss_prototype_gradient_flows_through_class_prototypes(gen):
    fs = torch.randn(N, C, H, W, generator=gen, requires_grad=True)
    ft = torch.randn(N, C, H, W, generator=gen, requires_grad=True)
    protos, present = bida.class_prototypes(fs, random_labels(gen), K)
    bida.contrastive_loss(ft, random_labels(gen), protos, present, 0.1).backward()
    assert fs.grad.abs().sum() > 0 and ft.grad.abs().sum() > 0
    fs.grad = ft.grad = None
    bida.contrastive_loss(ft, random_labels(gen), protos.detach(), present, 0.1).backward()
    assert fs.grad is None and ft.grad.abs().sum() > 0


def test_contrastive_loss_under_autocast_stays_fp32(gen):
    f = torch.randn(N, C, H, W, generator=gen)
    protos, present = bida.class_prototypes(torch.randn(N, C, H, W, generator=gen), random_labels(gen), K)
    y = random_labels(gen)
    plain = bida.contrastive_loss(f, y, protos, present, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = bida.contrastive_loss(f, y, protos, present, 0.1)
        amp_protos, _ = bida.class_prototypes(f, y, K)
    assert amp.dtype == torch.float32 and amp_protos.dtype == torch.float32
    assert float(amp) == pytest.approx(float(plain), rel=1e-6)
    # half-precision features are widened, not computed in half
    half = bida.contrastive_loss(f.bfloat16(), y, protos.bfloat16(), present, 0.1)
    assert half.dtype == torch.float32 and float(half) == pytest.approx(float(plain), rel=2e-2)


# --------------------------------------------------------------------------------------------------------- Eq. 4 - 7
def test_prototype_memory_ema_init_and_present_only(gen):
    mem = bida.PrototypeMemory(K, C, momentum=0.9)
    src1, tgt1 = torch.randn(K, C, generator=gen), torch.randn(K, C, generator=gen)
    sp1 = torch.tensor([True, True, False, True, False, False])
    tp1 = torch.tensor([True, False, True, True, False, False])
    mem.update(src1, sp1, tgt1, tp1)
    # first observation initialises, unseen classes stay zero
    for c in range(K):
        assert torch.equal(mem.mu_src[c], src1[c] if sp1[c] else torch.zeros(C))
        assert torch.equal(mem.mu_tgt[c], tgt1[c] if tp1[c] else torch.zeros(C))
    assert mem.seen_src.tolist() == sp1.tolist() and mem.seen_tgt.tolist() == tp1.tolist()
    # bias only where seen in both (classes 0 and 3)
    bias = mem.bias()
    for c in range(K):
        expected = tgt1[c] - src1[c] if (sp1[c] and tp1[c]) else torch.zeros(C)
        torch.testing.assert_close(bias[c], expected)

    src2, tgt2 = torch.randn(K, C, generator=gen), torch.randn(K, C, generator=gen)
    sp2 = torch.tensor([True, False, True, False, False, True])
    tp2 = torch.tensor([False, True, True, True, False, False])
    before_src, before_tgt = mem.mu_src.clone(), mem.mu_tgt.clone()
    mem.update(src2, sp2, tgt2, tp2)
    for mu, before, new, seen1, pres in (
        (mem.mu_src, before_src, src2, sp1, sp2),
        (mem.mu_tgt, before_tgt, tgt2, tp1, tp2),
    ):
        for c in range(K):
            if not pres[c]:
                expected = before[c]  # absent: unchanged
            elif seen1[c]:
                expected = 0.9 * before[c] + 0.1 * new[c]  # Eq. 4 / 5
            else:
                expected = new[c]  # first observation
            torch.testing.assert_close(mu[c], expected)
    assert mem.seen_src.tolist() == (sp1 | sp2).tolist()
    both = mem.seen_src & mem.seen_tgt
    assert both.tolist() == [True, True, True, True, False, False]
    assert torch.all(mem.bias()[~both] == 0)
    # Eq. 7
    rho = torch.randn(K, C, generator=gen)
    torch.testing.assert_close(mem.calibrate(rho), rho + mem.bias())


def test_prototype_memory_state_dict_and_device_moves(gen):
    mem = bida.PrototypeMemory(K, C)
    assert mem.momentum == 0.99
    mem.update(
        torch.randn(K, C, generator=gen),
        torch.ones(K, dtype=torch.bool),
        torch.randn(K, C, generator=gen),
        torch.ones(K, dtype=torch.bool),
    )
    state = mem.state_dict()
    assert set(state) == {"mu_src", "mu_tgt", "seen_src", "seen_tgt"}
    other = bida.PrototypeMemory(K, C)
    other.load_state_dict(state)
    torch.testing.assert_close(other.bias(), mem.bias())
    wide = other.to(torch.float64)
    assert wide.mu_src.dtype == torch.float64 and wide.seen_src.dtype == torch.bool
    # no gradient leaks into the memory
    rho = torch.randn(K, C, requires_grad=True)
    mem.update(rho, torch.ones(K, dtype=torch.bool), rho, torch.ones(K, dtype=torch.bool))
    assert not mem.mu_src.requires_grad


# --------------------------------------------------------------------------------------------------------- Eq. 8 - 10
def ref_dynamic(f, protos, present, threshold):
    out = torch.full((f.shape[0], f.shape[2], f.shape[3]), IGN, dtype=torch.long)
    for n in range(f.shape[0]):
        for i in range(f.shape[2]):
            for j in range(f.shape[3]):
                best, best_c = -math.inf, None
                for c in range(len(present)):
                    if present[c]:
                        s = cos(f[n, :, i, j], protos[c])
                        if s > best:
                            best, best_c = s, c
                if best_c is not None and best > threshold:
                    out[n, i, j] = best_c
    return out


@pytest.mark.parametrize("threshold", [-1.1, 0.0, 0.3, 0.9])
def test_dynamic_pseudo_labels_match_equation(gen, threshold):
    f = torch.randn(N, C, H, W, generator=gen)
    protos = torch.randn(K, C, generator=gen)
    # make absent class 2 the best match of one pixel: it must still not be chosen
    present = torch.tensor([True, True, False, True, True, False])
    f[0, :, 0, 0] = protos[2]
    labels = bida.dynamic_pseudo_labels(f, protos, present, threshold)
    assert labels.dtype == torch.int64 and labels.shape == (N, H, W)
    assert torch.equal(labels, ref_dynamic(f, protos, present.tolist(), threshold))
    assert not ((labels == 2) | (labels == 5)).any()
    if threshold < -1:
        assert (labels != IGN).all()


def test_dynamic_pseudo_labels_threshold_is_strict():
    protos = torch.eye(4, 4, dtype=torch.float64)
    f = torch.eye(4, 4, dtype=torch.float64)[[0, 1, 2, 3]].T.reshape(1, 4, 2, 2)  # pixel p equals prototype p
    present = torch.ones(4, dtype=torch.bool)
    assert (bida.dynamic_pseudo_labels(f, protos, present, 1.0) == IGN).all()  # similarity 1.0 is not > 1.0
    assert bida.dynamic_pseudo_labels(f, protos, present, 0.99).flatten().tolist() == [0, 1, 2, 3]
    assert (bida.dynamic_pseudo_labels(f, protos, torch.zeros(4, dtype=torch.bool), -2.0) == IGN).all()


def test_hybrid_pseudo_labels_priority(gen):
    dynamic = random_labels(gen, p_ignore=0.5)
    static = random_labels(gen, p_ignore=0.5)
    hybrid = bida.hybrid_pseudo_labels(dynamic, static)
    for idx in torch.cartesian_prod(*(torch.arange(s) for s in dynamic.shape)).tolist():
        d, s = int(dynamic[tuple(idx)]), int(static[tuple(idx)])
        assert int(hybrid[tuple(idx)]) == (d if d != IGN else s)  # dynamic first, then static, else ignore
    assert ((dynamic == IGN) & (static == IGN)).any() and (hybrid == IGN).any()


# ------------------------------------------------------------------------------------------------------------ Eq. 11
def test_entropy_loss_matches_formula_and_not_double_softmax(gen):
    logits = torch.randn(N, K, H, W, generator=gen) * 3
    total = 0.0
    for n in range(N):
        for i in range(H):
            for j in range(W):
                z = [math.exp(float(v)) for v in logits[n, :, i, j]]
                p = [v / sum(z) for v in z]
                total += -sum(q * math.log(q) for q in p)
    expected = total / (N * H * W)
    loss = bida.entropy_loss(logits)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    twice = F.softmax(F.softmax(logits, 1), 1)
    assert abs(float(-(twice * twice.log()).sum(1).mean()) - expected) > 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert bida.entropy_loss(logits).dtype == torch.float32


def test_segmentation_loss_upsamples_and_handles_all_ignore(gen):
    logits = torch.randn(N, K, 3, 4, generator=gen, requires_grad=True)
    labels = random_labels(gen)[:, :, :4].repeat(1, 2, 2)  # [N,10,8]
    up = F.interpolate(logits, size=(10, 8), mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=IGN)
    torch.testing.assert_close(bida.segmentation_loss(logits, labels), expected)
    same = torch.randn(N, K, 10, 8, generator=gen)
    torch.testing.assert_close(bida.segmentation_loss(same, labels), F.cross_entropy(same, labels, ignore_index=IGN))
    loss = bida.segmentation_loss(logits, torch.full((N, 10, 8), IGN))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------- static labels (CBST)
def test_class_balanced_thresholds_close_to_exact_quantiles():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, K, 125, 200, generator=gen) * 2.0  # 1e5 pixels
    logits[:, 5] = -50.0  # class 5 is never predicted
    probs = logits.softmax(1)
    cbst = bida.ClassBalancedThresholds(K, portion=0.1)
    for chunk in probs.split(1):  # streaming, one image at a time
        cbst.update(chunk)
    thr = cbst.thresholds()
    conf, cls = probs.max(1)
    assert cbst.counts().tolist() == [int((cls == c).sum()) for c in range(K)]
    for c in range(K - 1):
        exact = torch.quantile(conf[cls == c], 0.9)
        assert abs(float(thr[c]) - float(exact)) < 1e-3
        assert abs(float((conf[cls == c] >= thr[c]).double().mean()) - 0.1) < 2e-3
    assert float(thr[5]) == 1.0
    cbst.reset()
    assert cbst.counts().sum() == 0 and (cbst.thresholds() == 1.0).all()


def test_class_balanced_thresholds_extremes():
    probs = torch.zeros(1, 3, 1, 4)
    probs[0, 0] = 1.0  # confidence exactly 1 goes to the last bin
    cbst = bida.ClassBalancedThresholds(3, portion=0.5, bins=100)
    cbst.update(probs)
    assert float(cbst.thresholds()[0]) == pytest.approx(0.995, abs=1e-6)
    assert cbst.thresholds()[1:].tolist() == [1.0, 1.0]


def ref_static(probs, thresholds, image_portion, excluded):
    n_img, k, h, w = probs.shape
    out = torch.full((n_img, h, w), IGN, dtype=torch.long)
    for n in range(n_img):
        confs = sorted((float(probs[n, :, i, j].max()) for i in range(h) for j in range(w)), reverse=True)
        top = max(1, math.ceil(round(image_portion * h * w, 6))) if image_portion > 0 else 0
        cut = confs[top - 1] if top else math.inf
        for i in range(h):
            for j in range(w):
                conf = float(probs[n, :, i, j].max())
                c = int(probs[n, :, i, j].argmax())
                if (conf >= float(thresholds[c]) or conf >= cut) and c not in excluded:
                    out[n, i, j] = c
    return out


@pytest.mark.parametrize("image_portion", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("excluded", [(), (1, 4)])
def test_static_pseudo_labels_match_rule(gen, image_portion, excluded):
    probs = (torch.randn(N, K, 10, 5, generator=gen) * 2).softmax(1)
    thresholds = torch.rand(K, generator=gen) * 0.5 + 0.4
    labels = bida.static_pseudo_labels(probs, thresholds, image_portion=image_portion, excluded_classes=excluded)
    assert torch.equal(labels, ref_static(probs, thresholds, image_portion, excluded))
    for c in excluded:
        assert not (labels == c).any()
    if image_portion:  # each image keeps at least its top share
        assert ((labels != IGN) | torch.isin(probs.argmax(1), torch.tensor(excluded))).flatten(1).sum(1).min() >= 5


def test_static_pseudo_labels_image_mask_adds_labels(gen):
    probs = (torch.randn(N, K, 10, 5, generator=gen) * 2).softmax(1)
    none = bida.static_pseudo_labels(probs, torch.ones(K), image_portion=0.0)
    some = bida.static_pseudo_labels(probs, torch.ones(K), image_portion=0.1)
    assert (none == IGN).all()
    assert ((some != IGN).flatten(1).sum(1) == 5).all()  # top 10% of 50 pixels, no ties in random data


# ---------------------------------------------------------------------------------------------------------- Table 4
def test_pseudo_label_stats():
    gt = torch.tensor([[0, 1, 2, IGN, 3, 3]])
    pred = torch.tensor([[0, 2, IGN, 1, 3, IGN]])
    # valid gt: 5; labelled among them: 0, 2 (wrong), 3 -> 3; correct: 2
    assert bida.pseudo_label_counts(pred, gt) == (3, 2, 5)
    density, accuracy = bida.pseudo_label_stats(pred, gt)
    assert density == pytest.approx(3 / 5) and accuracy == pytest.approx(2 / 3)
    density, accuracy = bida.pseudo_label_stats(torch.full_like(gt, IGN), gt)
    assert density == 0.0 and math.isnan(accuracy)


# ---------------------------------------------------------------------------------------------------- DDP (gloo)
def _ddp_worker(
    rank: int,
    world: int,
    init_file: str,
    fs: torch.Tensor,
    ys: torch.Tensor,
    ft: torch.Tensor,
    yt: torch.Tensor,
    out: str,
) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        part = slice(rank * fs.shape[0] // world, (rank + 1) * fs.shape[0] // world)
        f_src = fs[part].clone().requires_grad_(True)
        protos, present = bida.class_prototypes(f_src, ys[part], K, distributed=True)
        bida.contrastive_loss(ft[part], yt[part], protos, present, 0.1).backward()
        torch.save({"protos": protos.detach(), "present": present, "grad": f_src.grad}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_class_prototypes_distributed_match_global_batch(tmp_path):
    """Two gloo ranks, one image each: the same prototypes as one process on both images, and the gradient of the
    summed per-rank losses reaches each rank's features through the all-reduced prototypes."""
    import torch.multiprocessing as mp

    gen = torch.Generator().manual_seed(3)
    fs, ft = torch.randn(2, C, H, W, generator=gen), torch.randn(2, C, H, W, generator=gen)
    ys, yt = random_labels(gen, absent=(5,)), random_labels(gen)
    ys[0][ys[0] == 4] = IGN  # class 4 only on rank 1's image
    out = str(tmp_path / "result")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), fs, ys, ft, yt, out), nprocs=2, join=True)

    f_all = fs.clone().requires_grad_(True)
    protos, present = bida.class_prototypes(f_all, ys, K)
    sum(bida.contrastive_loss(ft[r : r + 1], yt[r : r + 1], protos, present, 0.1) for r in range(2)).backward()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        torch.testing.assert_close(got["protos"], protos)
        assert torch.equal(got["present"], present)
        torch.testing.assert_close(got["grad"], f_all.grad[rank : rank + 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_matches_cpu():
    """Same results on CUDA under fp16 autocast (fp16 features) as on CPU in fp32, and tensors stay on the GPU."""
    gen = torch.Generator().manual_seed(4)
    fs, ft = torch.randn(N, C, H, W, generator=gen), torch.randn(N, C, H, W, generator=gen)
    ys, yt = random_labels(gen), random_labels(gen, absent=(2,))
    logits = torch.randn(N, K, H, W, generator=gen)
    cpu_protos, cpu_present = bida.class_prototypes(fs, ys, K)
    cpu = (bida.contrastive_loss(ft, yt, cpu_protos, cpu_present), bida.entropy_loss(logits))
    with torch.autocast("cuda", dtype=torch.float16):
        gs, gt = fs.cuda().half(), ft.cuda().half()
        protos, present = bida.class_prototypes(gs, ys.cuda(), K)
        loss = bida.contrastive_loss(gt, yt.cuda(), protos, present)
        ent = bida.entropy_loss(logits.cuda().half())
        dyn = bida.dynamic_pseudo_labels(gt, protos, present, 0.2)
    assert protos.device.type == "cuda" and protos.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(protos.cpu(), cpu_protos, atol=2e-3, rtol=2e-3)
    assert loss.item() == pytest.approx(cpu[0].item(), rel=1e-2) and ent.item() == pytest.approx(
        cpu[1].item(), rel=1e-2
    )
    assert dyn.device.type == "cuda"
    cbst = bida.ClassBalancedThresholds(K, device="cuda")
    cbst.update(logits.cuda().softmax(1))
    assert bida.static_pseudo_labels(logits.cuda().softmax(1), cbst.thresholds()).device.type == "cuda"
