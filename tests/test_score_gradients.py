"""The score operators' backward formulas (gradood/_autograd.py): gradients equal
autograd through the pure-PyTorch reference and pass torch.autograd.gradcheck in
float64; compiled (fullgraph) modules whose parameters require grad train on them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradood
from gradood import reference, scores

torch.manual_seed(0)

CASES = [
    ("msp", {}), ("msp", {"temperature": 3.0}), ("max_logit", {}), ("energy", {}), ("energy", {"temperature": 0.5}),
    ("gradnorm", {}), ("gradnorm", {"temperature": 2.0, "include_bias": True}), ("exgrad", {"temperature": 1.5}),
    ("grodin_last_layer", {}), ("grodin_last_layer", {"include_bias": False}), ("rg", {"clip": 0.7}),
    ("rg_additive", {"clip": 0.7, "alpha": 0.3}), ("uv", {"u": "msp", "v": "l2"}),
    ("uv", {"u": "exgrad", "v": "clipped_l1", "clip": 0.5}), ("uv", {"u": "max_logit", "v": "l1"}),
]
LOGITS_ONLY = {"msp", "max_logit", "energy"}


def _inputs(dtype=torch.float64, batch=5, classes=7, dim=9):
    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(batch, classes, generator=generator, dtype=dtype) * 2).requires_grad_()
    features = torch.randn(batch, dim, generator=generator, dtype=dtype).requires_grad_()  # signed: every kink side
    return logits, features


def _call(module, name, logits, features, kwargs):
    function = getattr(module, name)
    return function(logits, **kwargs) if name in LOGITS_ONLY else function(logits, features, **kwargs)


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_gradients_equal_autograd_through_the_reference(name, kwargs):
    logits, features = _inputs()
    weights = torch.randn(logits.shape[0], dtype=torch.float64)
    ours = torch.autograd.grad((_call(scores, name, logits, features, kwargs) * weights).sum(),
                               [logits] if name in LOGITS_ONLY else [logits, features])
    theirs = torch.autograd.grad((_call(reference, name, logits, features, kwargs) * weights).sum(),
                                 [logits] if name in LOGITS_ONLY else [logits, features], allow_unused=True)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, torch.zeros_like(got) if expected is None else expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{k}" for n, k in CASES])
def test_gradcheck(name, kwargs):
    logits, features = _inputs(batch=3, classes=5, dim=4)
    if name in LOGITS_ONLY:
        assert torch.autograd.gradcheck(lambda f: _call(scores, name, f, None, kwargs), (logits,))
    else:
        assert torch.autograd.gradcheck(lambda f, v: _call(scores, name, f, v, kwargs), (logits, features))


@pytest.mark.parametrize("loss,p", [("kl_uniform", 1), ("ce_pred", 2), ("expected_ce", 1), ("energy", 1)])
def test_lastlayer_grad_norm_gradcheck(loss, p):
    logits, features = _inputs(batch=3, classes=5, dim=4)
    for include_bias in (False, True):
        assert torch.autograd.gradcheck(
            lambda f, v: scores.lastlayer_grad_norm(f, v, loss, p, temperature=1.7, include_bias=include_bias),
            (logits, features))


def test_lastlayer_terms_gradcheck_every_column():
    logits, features = _inputs(batch=3, classes=5, dim=4)
    assert torch.autograd.gradcheck(lambda f, v: gradood.lastlayer_terms(f, v, temperature=1.3, clip=0.6).terms,
                                    (logits, features))
    assert torch.autograd.gradcheck(lambda f: gradood.lastlayer_terms(f, temperature=0.8).terms, (logits,))


def test_react_gradcheck_and_reference():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4, 6, generator=generator, dtype=torch.float64).requires_grad_()
    weight = torch.randn(3, 6, generator=generator, dtype=torch.float64).requires_grad_()
    bias = torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w, b: scores.react(v, w, b, 0.4), (features, weight, bias))
    assert torch.autograd.gradcheck(lambda v, w: scores.react(v, w, None, 0.4), (features, weight))
    ours = torch.autograd.grad(scores.react(features, weight, bias, 0.4).sum(), [features, weight, bias])
    theirs = torch.autograd.grad(reference.react(features, weight, bias, 0.4).sum(), [features, weight, bias])
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_come_back_in_the_input_dtype(dtype):
    logits, features = _inputs(dtype=dtype)
    grads = torch.autograd.grad(scores.rg(logits, features).sum(), [logits, features])
    assert [g.dtype for g in grads] == [dtype, dtype]
    expected = torch.autograd.grad(reference.rg(logits.double(), features.double()).sum(), [logits, features])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want.double(), rtol=tolerance, atol=tolerance)


class _EnergyRegularised(nn.Module):
    """A model trained on its own scores: cross-entropy plus an energy and an RG term."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(6, 8), nn.Linear(8, 4)

    def forward(self, x):
        features = torch.relu(self.body(x))
        logits = self.head(features)
        return logits, scores.energy(logits) + 0.1 * scores.rg(logits, features) + scores.react(
            features, self.head.weight, self.head.bias, 0.5)


def test_compiled_fullgraph_training_step_matches_eager():
    torch.manual_seed(0)
    model = _EnergyRegularised()
    x = torch.randn(16, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager_grads = torch.autograd.grad(model(x)[1].sum(), list(model.parameters()))
    compiled_grads = torch.autograd.grad(compiled(x)[1].sum(), list(model.parameters()))
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected)
    assert any(float(g.abs().sum()) > 0 for g in eager_grads)


def test_forward_mode_and_functorch_transforms_are_refused_not_silently_wrong():
    """jvp/jacfwd would drop the tangent (zeros) and grad/jacrev cannot run the backward:
    both are a clear error; vmap alone works."""
    logits = torch.randn(3, 5, dtype=torch.float64)
    for transform in (lambda f: torch.func.jvp(f, (logits,), (torch.ones_like(logits),)),
                      lambda f: torch.func.jacfwd(f)(logits), lambda f: torch.func.grad(lambda x: f(x).sum())(logits),
                      lambda f: torch.func.jacrev(f)(logits)):
        with pytest.raises(RuntimeError, match="do not run under torch.func"):
            transform(scores.energy)
    import torch.autograd.forward_ad as forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(logits, torch.ones_like(logits))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            scores.msp(dual)
        assert torch.allclose(scores.msp(logits), reference.msp(logits))  # plain tensors inside the level are fine
    batched = torch.func.vmap(lambda row: scores.energy(row[None]))(logits)
    torch.testing.assert_close(batched.squeeze(1), reference.energy(logits))


@pytest.mark.parametrize("classes", [7, 33, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_logit_gradient_is_one_hot_at_the_first_argmax_on_every_path(classes, dtype):
    """The documented rule everywhere: ties do not split, a NaN row's gradient sits on its
    first NaN (where torch.argmax points), at every CPU level and row length."""
    logits = torch.randn(4, classes, dtype=dtype)
    logits[0, 2] = logits[0, 5] = logits[0].max() + 1.0  # a tie
    logits[1] = 3.0  # a constant row
    logits[2, 4] = float("nan")
    logits.requires_grad_()
    expected = torch.nn.functional.one_hot(logits.detach().argmax(1), classes).to(dtype)
    for function in (scores.max_logit, lambda f: scores.uv(f, torch.ones(4, 3, dtype=dtype), u="max_logit", v="l1") / 3):
        (got,) = torch.autograd.grad(function(logits).sum(), [logits])
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
