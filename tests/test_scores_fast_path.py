"""The plain-CPU fast path of gradood.scores (csrc/python_fast_path.cpp): the same
numbers as the dispatched operator wherever it runs, and the checked, dispatched path
(its errors, modes, transforms and autograd) wherever it must not."""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gradood import _ops, scores
from gradood._C import _plain_cpu_score

TERMS = {name: index for index, name in enumerate(_ops.TERM_NAMES)}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _dispatched(logits, features, spec):
    with torch.no_grad():
        return torch.ops.gradood.lastlayer_score(logits, features, *spec)


def _spec(logit_term, feature_term=None, scale=1.0, with_bias=False, combine=0, alpha=0.0, temperature=1.0,
          clip=math.inf):
    return (TERMS[logit_term], scale, -1 if feature_term is None else TERMS[feature_term], with_bias, combine,
            alpha, temperature, clip)


SPECS = [
    _spec("max_logit"),
    _spec("energy", temperature=1000.0),
    _spec("max_softmax", temperature=2.0),
    _spec("uniform_deviation_l1", "feature_l1", scale=0.5, with_bias=True),
    _spec("gini", "feature_l1", scale=-2.0),
    _spec("onehot_deviation_l2", "feature_l2", scale=-1.0, with_bias=True),
    _spec("energy", "feature_clipped_l1", clip=1.0),
    _spec("energy", "feature_clipped_l1", combine=1, alpha=0.3, clip=0.5),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (1, 1000), (3, 10), (40, 517)])  # 40 × 517 > the amax threshold
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s[0]}-{s[2]}-{s[5]}")
def test_same_numbers_as_the_dispatched_operator(dtype, shape, spec):
    generator = torch.Generator().manual_seed(sum(shape))
    logits = (torch.randn(*shape, generator=generator) * 5).to(dtype)
    logits[0, 0] = float("nan")  # a NaN row stays NaN, the others are unaffected
    features = torch.randn(shape[0], 33, generator=generator).relu().to(dtype) if spec[2] >= 0 else None
    fast = _plain_cpu_score(logits, features, *spec)
    assert fast is not None, "plain CPU tensors must take the fast path"
    expected = _dispatched(logits, features, spec)
    if spec[0] == TERMS["max_logit"] and spec[2] < 0:
        expected = logits.amax(1).to(expected.dtype)
    torch.testing.assert_close(fast, expected, rtol=0, atol=0, equal_nan=True)
    assert fast.dtype == expected.dtype and fast.shape == (shape[0],)


def test_non_contiguous_inputs_match():
    logits = torch.randn(64, 30).t()  # [30, 64], column-major
    features = torch.randn(40, 30).t().relu()
    spec = _spec("energy", "feature_clipped_l1", clip=1.0)
    torch.testing.assert_close(_plain_cpu_score(logits, features, *spec),
                               _dispatched(logits.contiguous(), features.contiguous(), spec), rtol=0, atol=0)


def test_public_scores_match_the_reference_on_the_fast_path():
    from gradood import reference

    logits = torch.randn(5, 12, dtype=torch.float64)
    features = torch.randn(5, 7, dtype=torch.float64).relu()
    torch.testing.assert_close(scores.msp(logits, 3.0), reference.msp(logits, 3.0))
    torch.testing.assert_close(scores.energy(logits, 2), reference.energy(logits, 2))
    torch.testing.assert_close(scores.max_logit(logits), reference.max_logit(logits))
    torch.testing.assert_close(scores.rg(logits, features, clip=0.7), reference.rg(logits, features, clip=0.7))


def _refused(*args):
    return _plain_cpu_score(*args) is None


def test_what_it_refuses_goes_to_the_checked_path():
    logits = torch.randn(4, 10)
    features = torch.randn(4, 6)
    ok = _spec("energy")
    assert not _refused(logits, None, *ok)
    # Not plain tensors: a subclass, a meta tensor, integer, 1-D, empty and wrong-shape inputs.
    assert _refused(torch.nn.Parameter(logits), None, *ok)
    assert _refused(logits.to("meta"), None, *ok)
    assert _refused(logits.long(), None, *ok)
    assert _refused(logits[0], None, *ok)
    assert _refused(logits[:0], None, *ok)
    assert _refused(logits[:, :0], None, *ok)
    assert _refused(logits, features.double(), *_spec("energy", "feature_l1"))
    assert _refused(logits, features[:3], *_spec("energy", "feature_l1"))
    assert _refused(logits, features, *ok)  # features without a feature term
    assert _refused(logits, None, *_spec("energy", "feature_l1"))  # a feature term without features
    # Scalars the checks must see: bool, NaN, zero, negative, infinite temperature, NaN clip.
    for temperature in (True, float("nan"), 0.0, -1.0, math.inf, "1"):
        assert _refused(logits, None, TERMS["energy"], 1.0, -1, False, 0, 0.0, temperature, math.inf)
    assert _refused(logits, None, TERMS["energy"], 1.0, -1, False, 0, 0.0, 1.0, float("nan"))
    assert _refused(logits, None, 99, 1.0, -1, False, 0, 0.0, 1.0, math.inf)
    assert _refused(logits, None, TERMS["energy"], 1.0, -1, False, 7, 0.0, 1.0, math.inf)
    # A gradient could flow.
    assert _refused(logits.requires_grad_(), None, *ok)
    with torch.no_grad():
        assert not _refused(logits, None, *ok)


def test_errors_are_the_checked_paths():
    with pytest.raises(ValueError, match="gradood.scores.energy: temperature must be finite and > 0"):
        scores.energy(torch.randn(2, 3), temperature=0.0)
    with pytest.raises(TypeError, match="gradood.scores.msp: temperature must be a real number, got bool"):
        scores.msp(torch.randn(2, 3), temperature=True)
    with pytest.raises(TypeError, match="gradood.scores.max_logit: logits must be a floating-point tensor"):
        scores.max_logit(torch.randn(2, 3).to(torch.complex64))
    with pytest.raises(ValueError, match="empty batch"):
        scores.energy(torch.randn(0, 3))


def test_autograd_still_flows():
    logits = torch.randn(3, 5, requires_grad=True)
    scores.energy(logits).sum().backward()
    torch.testing.assert_close(logits.grad, torch.softmax(logits.detach(), 1))


class _SeenFunctions(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


class _SeenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(func)
        return func(*args, **(kwargs or {}))


def test_modes_see_the_operator():
    logits = torch.randn(3, 5)
    for mode in (_SeenFunctions(), _SeenOps()):
        with mode:
            scores.msp(logits)
        assert any("lastlayer_score" in str(func) for func in mode.seen), type(mode).__name__


def test_fake_tensors_vmap_trace_and_autocast_take_the_dispatched_path():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.randn(3, 5))
        assert scores.energy(fake).shape == (3,)
    stacked = torch.randn(2, 3, 5)
    batched = torch.func.vmap(scores.energy)(stacked)
    assert torch.func.vmap(lambda x: torch.tensor(_refused(x, None, *_spec("energy"))))(stacked).all()
    torch.testing.assert_close(batched, torch.stack([torch.logsumexp(x, 1) for x in stacked]))
    traced = torch.jit.trace(lambda x: scores.msp(x), torch.randn(2, 4))
    assert "gradood::lastlayer_score" in str(traced.graph)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _refused(torch.randn(2, 4), None, *_spec("energy"))
        assert scores.energy(torch.randn(2, 4)).dtype == torch.float32


def test_func_grad_is_still_refused():
    with pytest.raises(RuntimeError, match="do not run under torch.func.grad"):
        torch.func.grad(lambda x: scores.energy(x).sum())(torch.randn(2, 3))
    closed_over = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="do not run under torch.func.grad"):
        torch.func.grad(lambda y: (scores.energy(closed_over) * y).sum())(torch.randn(2))


def test_inference_mode_tensors_take_the_fast_path():
    with torch.inference_mode():
        logits = torch.randn(3, 7)
        assert _plain_cpu_score(logits, None, *_spec("energy")) is not None
        torch.testing.assert_close(scores.energy(logits), torch.logsumexp(logits, 1))


def test_a_first_call_inside_inference_mode_leaves_the_fast_path_on():
    # A fresh process: the key set of a plain tensor is taken at the first call.
    import subprocess
    import sys

    code = (
        "import math, torch, gradood\n"
        "from gradood._C import _plain_cpu_score as fast\n"
        "x = torch.randn(2, 5)\n"
        "with torch.inference_mode():\n"
        "    assert fast(x, None, 1, 1.0, -1, False, 0, 0.0, 1.0, math.inf) is not None\n"
        "assert fast(x, None, 1, 1.0, -1, False, 0, 0.0, 1.0, math.inf) is not None\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
