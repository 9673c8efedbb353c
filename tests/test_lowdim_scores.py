"""LowDimGrad's base scores on G_low against literal implementations in float64 on a
small CNN: the probe against a plain PyTorch training loop with the same seed, each
probe score against its formula on the probe's outputs (ODIN's step by autograd),
Mahalanobis against an explicit-inverse numpy version, ReAct/BATS against
hand-written clamps; batch invariance, with_score sharing the fit, ensembles,
state round trips and the errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood import mahalanobis
from gradood.detectors import LowDimGrad
from gradood.detectors import lowdim_probe, lowdim_scores
from test_lowdim_grad import _batches, _model_and_data

PROBE_SCORES = ["msp", "energy", "odin", "gradnorm", "react", "bats"]


def _hat(rows):
    """ĝ = G_low / (‖G_low‖ + 1e-10), written out."""
    return rows / (rows.norm(dim=1, keepdim=True) + 1e-10)


@pytest.fixture(scope="module")
def case():
    model, inputs, labels = _model_and_data(40)
    base = LowDimGrad(model, dim=4, clip_start=1, probe_epochs=3, probe_batch_size=16).fit(_batches(inputs, labels, 9))
    queries = torch.cat([inputs[:4] + 0.3, torch.randn(4, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))])
    return model, inputs, labels, base, queries


def _plain_probe(rows, targets, classes, lr, epochs, batch, seed):
    """The probe trained by a plain loop, written out."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    probe = nn.Sequential(nn.BatchNorm1d(rows.shape[1]), nn.Linear(rows.shape[1], classes)).double()
    optimiser = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    for _ in range(epochs):
        order = torch.randperm(rows.shape[0], generator=generator)
        for start in range(0, rows.shape[0], batch):
            index = order[start : start + batch]
            if index.numel() < 2:
                continue
            loss = F.cross_entropy(probe(rows[index]), targets[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return probe.eval()


def test_the_probe_is_the_plain_training_loop_with_the_same_seed(case):
    _, _, labels, base, _ = case
    detector = base.with_score("msp")
    plain = _plain_probe(_hat(base.id_low), labels, 3, 0.1, 3, 16, 0)
    state = detector.probe
    torch.testing.assert_close(state["weight"], plain[1].weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["bias"], plain[1].bias.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["norm_weight"], plain[0].weight.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["running_var"], plain[0].running_var, rtol=0, atol=1e-12)
    # the caller's random state is untouched
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    base.with_score("energy")
    assert torch.equal(torch.rand(3), expected)
    other = base.with_score("msp", probe_seed=1)
    assert not torch.equal(other.probe["weight"], state["weight"])
    raw = base.with_score("msp", normalise=False)  # the probe on G_low itself
    torch.testing.assert_close(raw.probe["weight"], _plain_probe(base.id_low, labels, 3, 0.1, 3, 16, 0)[1].weight.detach(),
                               rtol=0, atol=1e-12)


def _literal(score, detector, low):
    """Each base score's formula on the probe module's outputs, float64."""
    low = _hat(low) if detector.normalise else low
    probe = lowdim_probe.load_probe(detector.probe)
    norm, linear = probe[0], probe[1]
    t = detector.temperature
    if score == "msp":
        return torch.softmax(probe(low) / t, 1).amax(1)
    if score == "energy":
        return t * torch.logsumexp(probe(low) / t, 1)
    if score == "odin":
        x = low.clone().requires_grad_(True)
        logits = probe(x)
        loss = F.cross_entropy(logits / t, logits.argmax(1), reduction="sum")
        (gradient,) = torch.autograd.grad(loss, x)
        perturbed = low - detector.epsilon * torch.where(gradient >= 0, 1.0, -1.0).double()
        return torch.softmax(probe(perturbed) / t, 1).amax(1)
    if score == "gradnorm":
        logits, h = probe(low), norm(low)
        return (torch.softmax(logits / t, 1) - 1 / logits.shape[1]).abs().sum(1) * h.abs().sum(1)
    if score == "react":
        x = low.clone()
        fit_rows = _hat(detector.id_low) if detector.normalise else detector.id_low
        c = np.percentile(fit_rows[:, detector.clip_start :].numpy().ravel(), detector.clip_percentile)
        x[:, detector.clip_start :] = torch.where(x[:, detector.clip_start :] > c, torch.tensor(c, dtype=x.dtype), x[:, detector.clip_start :])
        return t * torch.logsumexp(probe(x) / t, 1)
    if score == "bats":
        h = norm(low)
        lam, beta, gamma = detector.bats_lambda, norm.bias, norm.weight.abs()
        h = torch.where(h > beta + lam * gamma, beta + lam * gamma, h)
        h = torch.where(h < beta - lam * gamma, beta - lam * gamma, h)
        return t * torch.logsumexp(linear(h) / t, 1)
    raise AssertionError(score)


@pytest.mark.parametrize("normalise", [True, False])
@pytest.mark.parametrize("score", PROBE_SCORES)
def test_probe_scores_are_their_formulas_and_batch_invariant(case, score, normalise):
    _, _, _, base, queries = case
    settings = {"temperature": 3.0} if score in ("energy", "msp") else {}
    if score == "odin":
        settings = {"temperature": 50.0, "epsilon": 0.05 if normalise else 0.5}
    if score == "bats":
        settings = {"bats_lambda": 0.5}
    detector = base.with_score(score, normalise=normalise, **settings)
    low = detector.low_dimensional_gradients(queries)
    with torch.no_grad() if score != "odin" else torch.enable_grad():
        expected = _literal(score, detector, low).detach()
    ours = detector.score(queries)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    one_by_one = torch.cat([detector.score(queries[i : i + 1]) for i in range(queries.shape[0])])
    torch.testing.assert_close(one_by_one, ours, rtol=1e-10, atol=1e-12)


def test_odin_on_g_low_perturbs_it(case):
    _, _, _, base, queries = case
    plain = base.with_score("odin", epsilon=0.0).score(queries)
    stepped = base.with_score("odin", epsilon=0.05).score(queries)
    assert not torch.allclose(plain, stepped)
    low = base.low_dimensional_gradients(queries)
    torch.testing.assert_close(plain, base.with_score("msp", temperature=1000.0).base_score(low))


def test_react_and_bats_truncation_matter_only_where_values_exceed_the_bounds(case):
    _, _, _, base, queries = case
    react = base.with_score("react", clip_percentile=100.0, normalise=False)  # the clip is the ID maximum
    low = base.id_low[:5]  # ID rows: no coordinate exceeds the clip
    torch.testing.assert_close(react.base_score(low), lowdim_scores.energy(low, react.probe, 1.0))
    wide = base.with_score("bats", bats_lambda=1e6, normalise=False)
    torch.testing.assert_close(wide.base_score(low), lowdim_scores.energy(low, wide.probe, 1.0))
    tight = base.with_score("bats", bats_lambda=1e-9, normalise=False)  # h' = β: every row the same score
    values = tight.base_score(low)
    torch.testing.assert_close(values, values[:1].expand(5), rtol=0, atol=1e-9)


def _numpy_mahalanobis(bank, targets, queries):
    classes = sorted(set(targets.tolist()))
    means = np.stack([bank[targets == c].mean(0) for c in classes])
    centred = bank - means[np.searchsorted(classes, targets)]
    precision = np.linalg.inv(centred.T @ centred / bank.shape[0])
    d = [np.einsum("bi,ij,bj->b", queries - m, precision, queries - m) for m in means]
    return -np.min(np.stack(d, 1), axis=1)


def test_mahalanobis_on_g_low_is_the_explicit_inverse_version(case):
    _, _, labels, base, queries = case
    detector = base.with_score("mahalanobis")
    low = detector.low_dimensional_gradients(queries)
    expected = _numpy_mahalanobis(_hat(base.id_low).numpy(), labels.numpy(), _hat(low).numpy())
    np.testing.assert_allclose(detector.score(queries).numpy(), expected, rtol=1e-9)
    raw = base.with_score("mahalanobis", normalise=False)
    expected = _numpy_mahalanobis(base.id_low.numpy(), labels.numpy(), low.numpy())
    np.testing.assert_allclose(raw.score(queries).numpy(), expected, rtol=1e-9)
    one_by_one = torch.cat([detector.score(queries[i : i + 1]) for i in range(queries.shape[0])])
    torch.testing.assert_close(one_by_one, detector.score(queries), rtol=1e-10, atol=1e-12)


def test_mahalanobis_skips_absent_classes_and_refuses_a_singular_covariance():
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(30, 3, generator=generator, dtype=torch.float64)
    targets = torch.tensor([0, 2] * 15)
    gaussians = mahalanobis.fit_class_gaussians(rows, targets)
    assert gaussians.classes.tolist() == [0, 2]
    np.testing.assert_allclose(
        mahalanobis.mahalanobis_score(rows[:4], gaussians).numpy(),
        _numpy_mahalanobis(rows.numpy(), targets.numpy(), rows[:4].numpy()),
        rtol=1e-10,
    )
    with pytest.raises(ValueError, match="covariance .* is singular"):
        mahalanobis.fit_class_gaussians(torch.cat([rows[:, :2], rows[:, :1]], 1), targets)
    with pytest.raises(ValueError, match="NaN or Inf"):
        mahalanobis.fit_class_gaussians(torch.full((4, 2), float("nan")), torch.zeros(4))


def test_class_subspace_mahalanobis_drops_the_direction_the_class_means_share():
    """With subspace="class" the ID rows of G_low sum to zero (G is centred on the ID mean),
    so their covariance is singular by construction; float32 rounding leaves a tiny
    eigenvalue that an inverse would follow (batch-dependent scores). The fit takes the
    pseudo-inverse: each row scores the same alone and in a batch."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    inputs, labels = torch.randn(120, 6), torch.randint(0, 4, (120,))
    detector = LowDimGrad(model, score="mahalanobis", subspace="class")
    detector.fit([(inputs[i : i + 40], labels[i : i + 40]) for i in range(0, 120, 40)])
    queries = torch.randn(9, 6) * 2
    one_by_one = torch.cat([detector.score(queries[i : i + 1]) for i in range(9)])
    torch.testing.assert_close(one_by_one, detector.score(queries), rtol=1e-5, atol=1e-6)


def test_float32_rows_of_a_bottleneck_are_refused_or_taken_on_their_span():
    """Float32 rows of rank 8 in 64 dimensions: Cholesky of their float64 covariance
    succeeds on rounding noise. The default mode refuses it; the pseudo-inverse keeps the
    8 real directions (eps of float32, as scipy's pinvh) and matches the exact-span distance."""
    generator = torch.Generator().manual_seed(0)
    low = torch.randn(400, 8, generator=generator, dtype=torch.float64)
    rows = (low @ torch.randn(8, 64, generator=generator, dtype=torch.float64)).float()
    targets = torch.randint(0, 3, (400,), generator=generator)
    with pytest.raises(ValueError, match="rounding of torch.float32 rows"):
        mahalanobis.fit_class_gaussians(rows, targets)
    gaussians = mahalanobis.fit_class_gaussians(rows, targets, singular="pseudo-inverse")
    assert gaussians.whitening.shape[0] == 8
    x = rows.double().numpy()
    means = np.stack([x[targets.numpy() == c].mean(0) for c in range(3)])
    centred = x - means[targets.numpy()]
    precision = np.linalg.pinv(centred.T @ centred / x.shape[0], rcond=1e-6, hermitian=True)
    d = np.stack([np.einsum("bi,ij,bj->b", x[:5] - m, precision, x[:5] - m) for m in means], 1)
    np.testing.assert_allclose(mahalanobis.mahalanobis_score(rows[:5], gaussians).numpy(), -d.min(1), rtol=1e-6)
    with pytest.raises(ValueError, match="targets must be class indices"):
        mahalanobis.fit_class_gaussians(rows[:3].double(), torch.tensor([0.0, 0.4, 0.8]))


def test_with_score_shares_the_fit_and_makes_no_pass(case, monkeypatch):
    _, _, _, base, queries = case
    low = base.low_dimensional_gradients(queries)

    def no_pass(*args, **kwargs):
        raise AssertionError("with_score computed per-sample gradients")

    monkeypatch.setattr(base, "_gradients", no_pass)
    for score in ["knn", "mahalanobis", *PROBE_SCORES]:
        other = base.with_score(score)
        assert other.subspace is base.subspace and other.id_low is base.id_low
        assert other.base_score(low).shape == (queries.shape[0],)
    with pytest.raises(ValueError, match=r"\['dim'\] set the subspace"):
        base.with_score("msp", dim=3)
    with pytest.raises(ValueError, match="ensemble='react' needs ReAct's clip"):
        base.with_score("msp", ensemble="react")


@pytest.mark.parametrize("ensemble", ["energy", "msp", "react"])
def test_ensembles_add_a_forward_score_of_the_same_pass(ensemble):
    model, inputs, labels = _model_and_data(40)
    detector = LowDimGrad(model, dim=4, score="energy", ensemble=ensemble, a=0.3, probe_epochs=2).fit(
        _batches(inputs, labels, 9)
    )
    queries = inputs[:6] + 0.2
    parts = detector.score_parts(queries)
    forward = {"energy": "forward_energy", "msp": "forward_msp", "react": "react_energy"}[ensemble]
    assert set(parts) == {"energy", forward}
    with torch.no_grad():
        logits = model(queries)
    if ensemble == "energy":
        torch.testing.assert_close(parts[forward], torch.logsumexp(logits, 1))
    elif ensemble == "msp":
        torch.testing.assert_close(parts[forward], torch.softmax(logits, 1).amax(1))
    torch.testing.assert_close(detector.score(queries), parts["energy"] + 0.3 * parts[forward])


@pytest.mark.parametrize("score", ["mahalanobis", "odin", "react"])
def test_state_dict_round_trip(case, score):
    model, inputs, labels, base, queries = case
    detector = base.with_score(score)
    buffer = io.BytesIO()
    torch.save(detector.state_dict(), buffer)
    buffer.seek(0)
    restored = LowDimGrad(model, dim=4, score=score, clip_start=1, probe_epochs=3, probe_batch_size=16)
    restored.load_state_dict(torch.load(buffer))  # weights_only loading
    assert torch.equal(restored.score(queries), detector.score(queries))
    with pytest.raises(ValueError, match="score"):
        LowDimGrad(model, dim=4, score="knn", clip_start=1, probe_epochs=3, probe_batch_size=16).load_state_dict(
            detector.state_dict()
        )


def test_predicted_classes_train_the_probe_without_labels():
    model, inputs, _ = _model_and_data(30)
    detector = LowDimGrad(model, dim=4, score="msp", classes="predicted", probe_epochs=2).fit(inputs)
    with torch.no_grad():
        assert torch.equal(detector.id_targets, model(inputs).argmax(1))
    assert detector.score(inputs[:3]).shape == (3,)


def test_errors():
    model, inputs, labels = _model_and_data(30)
    with pytest.raises(RuntimeError, match="call fit"):
        LowDimGrad(model, dim=4, score="msp").score(inputs[:2])
    with pytest.raises(ValueError, match="clip_start=4 must be below dim=4"):
        LowDimGrad(model, dim=4, score="react", clip_start=4)
    with pytest.raises(ValueError, match="clip_start=3 must be below the subspace dimension K=3"):
        LowDimGrad(model, subspace="class", score="react", clip_start=3).fit(_batches(inputs, labels))
    for value in (0, 100.5, -1):
        with pytest.raises(ValueError, match=r"clip_percentile must lie in \(0, 100\]"):
            LowDimGrad(model, score="react", clip_percentile=value)
    for value in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="bats_lambda must be a finite number > 0"):
            LowDimGrad(model, score="bats", bats_lambda=value)
    with pytest.raises(ValueError, match="score must be one of"):
        LowDimGrad(model, score="vim")
    with pytest.raises(ValueError, match="ensemble must be one of"):
        LowDimGrad(model, ensemble="odin")
    with pytest.raises(ValueError, match="fit data give no labels: pass batches of \\(inputs, labels\\), or classes='predicted'"):
        LowDimGrad(model, dim=4, score="energy").fit(inputs)
    with pytest.raises(ValueError, match="fit data give no labels"):
        LowDimGrad(model, dim=4, score="mahalanobis").fit(inputs)
    with pytest.raises(ValueError, match=r"labels must be one per sample in \[0, 3\)"):
        LowDimGrad(model, dim=4, score="msp").fit(_batches(inputs, labels + 5))


def test_labels_that_are_not_class_indices_are_refused():
    model, inputs, labels = _model_and_data(30)
    with pytest.raises(ValueError, match="labels must be class indices"):
        LowDimGrad(model, dim=4, score="msp").fit(_batches(inputs, labels.double() + 0.5))
    with pytest.raises(ValueError, match="one per sample"):
        LowDimGrad(model, dim=4, score="msp").fit(_batches(inputs, torch.nn.functional.one_hot(labels, 3)))
    detector = LowDimGrad(model, dim=4, score="msp", probe_epochs=1).fit(_batches(inputs, labels.double()))
    assert torch.equal(detector.id_targets, labels)
