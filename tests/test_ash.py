"""ASH and SCALE (gradood.detectors.ASH, .SCALE) against literal re-implementations of the
papers' code (prune with torch.topk, reshape or scale, the head again, log-sum-exp) in float64,
and against pytorch-ood's ASH where it imports."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zoo
from helpers import pytorch_ood_detectors
from gradood.detectors import ASH, SCALE
from gradood.detectors.ash import ash_energy, kept_mask
from gradood.detectors.scale import scale_energy


def _literal(features: torch.Tensor, head: nn.Linear, variant: str, percentile: float) -> torch.Tensor:
    """The paper's ash_p / ash_b / ash_s on [B, D, 1, 1] maps, then the head and the energy."""
    x = features.double().clone()[:, :, None, None]
    b, c, h, w = x.shape
    s1 = x.sum(dim=[1, 2, 3])
    n = x.shape[1:].numel()
    k = n - int(round(n * percentile / 100.0))
    t = x.view((b, c * h * w))
    v, i = torch.topk(t, k, dim=1)
    if variant == "scale":  # SCALE: the unpruned features times exp(s1 / s2)
        original = x.clone()
        t.zero_().scatter_(dim=1, index=i, src=v)
        x = original * torch.exp(s1 / x.sum(dim=[1, 2, 3]))[:, None, None, None]
    elif variant == "b":
        t.zero_().scatter_(dim=1, index=i, src=(s1 / k)[:, None].expand(v.shape))
    else:
        t.zero_().scatter_(dim=1, index=i, src=v)
        if variant == "s":
            x = x * torch.exp(s1 / x.sum(dim=[1, 2, 3]))[:, None, None, None]
    logits = nn.functional.linear(x.flatten(1), head.weight.double(), None if head.bias is None else head.bias.double())
    return torch.logsumexp(logits, dim=1)


class _Net(nn.Module):
    def __init__(self, width=64, classes=7):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, width), nn.ReLU())
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc(self.body(x))


@pytest.mark.parametrize("percentile", [0.0, 65.0, 90.0, 98.5])
@pytest.mark.parametrize("variant", ["s", "b", "p"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_ash_is_the_papers_procedure(variant, percentile, dtype):
    torch.manual_seed(0)
    model = _Net().to(dtype).eval()
    inputs = torch.randn(12, 10, dtype=dtype)
    features = model.body(inputs).detach()
    expected = _literal(features, model.fc, variant, percentile)
    detector = ASH(model, variant=variant, percentile=percentile)
    got = detector.score(inputs)
    assert got.dtype == dtype
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(detector.score_features(model(inputs).detach(), features), got)


def test_ties_at_the_threshold_keep_the_lowest_indices_so_scores_are_batch_invariant():
    """Post-ReLU rows with many zeros: the k kept entries include zeros, which ASH-B fills
    with s1 / k, so which zeros are kept changes the logits; torch.topk chooses arbitrarily."""
    features = torch.tensor([[0.0, 3.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    mask = kept_mask(features, 4)
    assert mask[0].tolist() == [True, True, True, False, True, False, False, False, False, False]
    weight, bias = torch.randn(3, 10, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    batch = torch.cat([features[:1], torch.rand(5, 10, dtype=torch.float64)])
    together = ash_energy(batch, weight, bias, "b", 60.0)
    alone = ash_energy(features[:1], weight, bias, "b", 60.0)
    assert together[0].item() == alone[0].item()


def test_degenerate_rows():
    weight, bias = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    zero = torch.zeros(1, 6, dtype=torch.float64)
    for variant in ("s", "b", "p"):  # nothing kept but zeros: the logits are the bias
        assert ash_energy(zero, weight, bias, variant, 50.0).item() == pytest.approx(torch.logsumexp(bias, 0).item())
    signed = torch.tensor([[1.0, -1.0, -2.0, -3.0, -4.0, -5.0]], dtype=torch.float64)  # kept 1 and -1: s2 = 0
    assert math.isnan(ash_energy(signed, weight, bias, "s", 66.0).item())  # s2 = 0 with non-zero kept entries
    nan_row = torch.rand(2, 6, dtype=torch.float64)
    nan_row[1, 2] = math.nan
    scores = ash_energy(nan_row, weight, bias, "p", 50.0)
    assert math.isfinite(scores[0].item()) and math.isnan(scores[1].item())
    # exp(s1 / s2) = e^100 at p = 99 with uniform features: no overflow inside (float32's limit
    # is e^88.7); a score beyond float32's range is inf only in float32 output
    head = torch.randn(3, 1000, dtype=torch.float64).abs()
    score = ash_energy(torch.ones(1, 1000, dtype=torch.float64), head, None, "s", 99.0)
    expected = math.exp(100.0) * float((head[:, :10].sum(1)).max()) + math.log(1 + 1e-300)
    assert score.item() == pytest.approx(expected, rel=1e-6)
    assert math.isinf(ash_energy(torch.ones(1, 1000), head.float(), None, "s", 99.0).item())


def test_errors():
    model = _Net()
    with pytest.raises(ValueError, match="variant must be one of"):
        ASH(model, variant="z")
    for percentile in (100, -1, math.nan, "90", True):
        with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
            ASH(model, percentile=percentile)
    with pytest.raises(ValueError, match="keeps none of the 3 features"):
        ash_energy(torch.rand(2, 3), torch.randn(4, 3), None, "s", 90.0)
    with pytest.raises(ValueError, match=r"weight must be \[C, D\] with D = 3"):
        ash_energy(torch.rand(2, 3), torch.randn(4, 5), None, "s", 50.0)
    with pytest.raises(ValueError, match=r"bias must be \[C\] with C = 4"):
        ash_energy(torch.rand(2, 3), torch.randn(4, 3), torch.randn(1), "s", 50.0)
    for percentile in (-1.0, math.nan, True):
        with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
            ash_energy(torch.rand(2, 3), torch.randn(4, 3), None, "s", percentile)
    np = pytest.importorskip("numpy")
    assert ASH(model, percentile=np.int64(90)).percentile == 90.0


def test_on_a_hugging_face_model():
    model = zoo.hf_vit(num_labels=3)
    for detector in (ASH(model, percentile=65), SCALE(model, percentile=65)):
        scores = detector.score(zoo.image_batch(4, generator_seed=9))
        assert scores.shape == (4,) and bool(torch.isfinite(scores).all())


def test_matches_pytorch_ood():
    detector_module = pytorch_ood_detectors()
    torch.manual_seed(1)
    model = _Net().double().eval()
    inputs = torch.randn(9, 10, dtype=torch.float64)
    for variant in ("s", "b", "p"):
        theirs = detector_module.ASH(
            backbone=lambda x: model.body(x)[:, :, None, None],
            head=lambda maps: model.fc(maps.flatten(1)),
            variant=f"ash-{variant}",
            percentile=0.9,
        )
        with torch.no_grad():
            expected = -theirs(inputs)  # pytorch-ood's scores are OOD-high
        torch.testing.assert_close(ASH(model, variant=variant, percentile=90).score(inputs), expected)


@pytest.mark.parametrize("percentile", [0.0, 85.0, 97.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_scale_is_the_papers_procedure(percentile, dtype):
    torch.manual_seed(2)
    model = _Net().to(dtype).eval()
    inputs = torch.randn(12, 10, dtype=dtype)
    features = model.body(inputs).detach()
    expected = _literal(features, model.fc, "scale", percentile)
    detector = SCALE(model, percentile=percentile)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(detector.score(inputs).double(), expected, rtol=tolerance, atol=tolerance)
    assert SCALE(model).percentile == 85.0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_scale_reads_the_head_product_from_the_logits(dtype, bias):
    """SCALE.score_features takes W v = f - b from the logits instead of a second GEMM: the same
    score as scale_energy's GEMM to round-off, against float64, on a 1000-class head."""
    generator = torch.Generator().manual_seed(3)
    head = nn.Linear(512, 1000, bias=bias).to(dtype)
    model = nn.Sequential(nn.Identity(), head).eval()
    features = torch.rand(70, 512, generator=generator, dtype=dtype) * torch.rand(70, 1, generator=generator, dtype=dtype)
    logits = head(features).detach()
    detector = SCALE(model)
    detector.score(features[:2])  # finds the head
    expected = _literal(features, head, "scale", 85.0)
    tolerance = 1e-12 if dtype == torch.float64 else 2e-6
    got = detector.score_features(logits, features)
    torch.testing.assert_close(got.double(), expected, rtol=tolerance, atol=tolerance)
    weight, offset = head.weight.detach(), None if head.bias is None else head.bias.detach()
    torch.testing.assert_close(got, scale_energy(features, weight, offset, 85.0), rtol=tolerance, atol=tolerance)


def test_scale_refuses_logits_that_are_not_the_heads_output():
    generator = torch.Generator().manual_seed(4)
    model = _Net(width=64, classes=7).eval()
    detector = SCALE(model)
    inputs = torch.randn(10, 10, generator=generator)
    detector.score(inputs)
    features = model.body(inputs).detach()
    logits = model.fc(features).detach()
    for wrong in (logits / 1.5, logits.flip(0), logits + 0.1):
        with pytest.raises(ValueError, match="the logits are not the head's output on these features"):
            detector.score_features(wrong, features)
    with pytest.raises(ValueError, match=r"logits must be \[B, C\] with C = 7"):
        detector.score_features(logits[:, :5], features)
    # the check takes the first finite sample: NaN rows before it score NaN, the rest as usual
    broken_features, broken_logits = features.clone(), logits.clone()
    broken_features[0, 3] = math.nan
    broken_logits[1, 2] = math.nan
    got = detector.score_features(broken_logits, broken_features)
    assert got[0].isnan() and got[1].isnan()
    torch.testing.assert_close(got[2:], detector.score_features(logits[2:], features[2:]))
    with pytest.raises(ValueError, match=r"sample \d+, class"):
        detector.score_features(torch.cat([broken_logits[:2], logits[2:] * 2]), broken_features)
    # rows spread over the batch are checked, not only the first: a later row's mismatch raises
    for wrong_tail in (torch.cat([logits[:1], logits[1:] / 2]), torch.cat([logits[:1], logits[1:].flip(0)])):
        with pytest.raises(ValueError, match="the logits are not the head's output"):
            detector.score_features(wrong_tail, features)


@pytest.mark.parametrize("bias_mean, percentile", [(30.0, 95.0), (100.0, 99.0), (10.0, 98.0)])
def test_scale_keeps_its_accuracy_where_the_bias_dominates(bias_mean, percentile):
    """f − b loses the bits of W v that a large bias covers, and the scale (up to 1e8 here)
    multiplies that loss: such rows take the GEMM (review: 8.6e-4 relative error at b = 100)."""
    generator = torch.Generator().manual_seed(6)
    head = nn.Linear(2048, 1000)
    with torch.no_grad():
        head.weight.copy_(torch.randn(1000, 2048, generator=generator) * 5e-4)
        head.bias.copy_(bias_mean + torch.randn(1000, generator=generator))
    model = nn.Sequential(nn.Identity(), head).eval()
    features = torch.rand(16, 2048, generator=generator)
    detector = SCALE(model, percentile=percentile)
    detector.score(features[:2])
    got = detector.score_features(head(features).detach(), features).double()
    expected = _literal(features, head, "scale", percentile).detach()
    assert torch.isfinite(expected).all()
    assert float(((got - expected).abs() / expected.abs()).max()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_scale_recomputes_the_product_for_half_logits(dtype):
    """Half-precision logits carry 2^-8 or 2^-11 relative rounding, which the scale would
    multiply: the head's GEMM runs in float32 on the features instead."""
    generator = torch.Generator().manual_seed(5)
    model = _Net(width=64, classes=7).to(dtype).eval()
    detector = SCALE(model)
    inputs = torch.randn(9, 10, generator=generator).to(dtype)
    detector.score(inputs)
    features = model.body(inputs).detach()
    garbage = torch.zeros(9, 7, dtype=dtype)  # never read
    weight, bias = model.fc.weight.detach(), model.fc.bias.detach()
    torch.testing.assert_close(detector.score_features(garbage, features), scale_energy(features, weight, bias, 85.0))


def test_scale_degenerate_rows():
    weight, bias = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    zero = torch.zeros(1, 6, dtype=torch.float64)
    assert scale_energy(zero, weight, bias, 50.0).item() == pytest.approx(torch.logsumexp(bias, 0).item())
    # kept entries all 0 but the row is not: s2 = 0 scales non-zero features, undefined
    signed = torch.tensor([[0.0, 0.0, -1.0, -2.0, -3.0, -4.0]], dtype=torch.float64)
    assert math.isnan(scale_energy(signed, weight, bias, 66.0).item())
    with pytest.raises(ValueError, match=r"percentile must be a number in \[0, 100\)"):
        SCALE(_Net(), percentile=100)


@pytest.mark.parametrize("batch", [5, 300])
@pytest.mark.parametrize("variant", ["s", "b", "scale"])
def test_the_score_of_features_that_require_a_gradient_is_differentiated_as_defined(variant, batch):
    """The CPU operators (top_features, pruned_linear) have no derivatives, and SCALE's product
    read from the logits would drop the features' part: features requiring a gradient take the
    ATen composition, whose gradient is the literal's."""
    generator = torch.Generator().manual_seed(batch)
    head = nn.Linear(64, 7).double()
    model = nn.Sequential(nn.Identity(), head).eval()
    detector = SCALE(model, percentile=90) if variant == "scale" else ASH(model, variant=variant, percentile=90)
    base = torch.rand(batch, 64, generator=generator, dtype=torch.float64)
    detector.score(base[:2])
    features = base.clone().requires_grad_(True)
    got = torch.autograd.grad(detector.score_features(head(features).detach(), features).sum(), features)[0]
    literal = base.clone().requires_grad_(True)
    expected = torch.autograd.grad(_literal(literal, head, variant, 90.0).sum(), literal)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
