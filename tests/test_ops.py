"""The operator library itself: registration, opcheck, torch.compile, torch.export,
TorchScript, and the import-time failure when it is not built."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import math

import pytest
import torch

import gradood
from gradood import scores
from conftest import HAS_CUDA
from helpers import ScoringClassifier

OPCHECK_CASES = [  # (B, C, D or None, dtype)
    (4, 10, 7, torch.float32),
    (3, 5, None, torch.float32),
    (2, 1, 1, torch.float64),
    (5, 33, 16, torch.float16),
    (5, 33, 16, torch.bfloat16),
    (0, 4, 3, torch.float32),
]


@pytest.mark.parametrize("batch,num_classes,num_features,dtype", OPCHECK_CASES)
def test_opcheck_lastlayer_terms(batch, num_classes, num_features, dtype, device):
    logits = torch.randn(batch, num_classes, device=device).to(dtype)
    features = None if num_features is None else torch.rand(batch, num_features, device=device).to(dtype)
    torch.library.opcheck(torch.ops.gradood.lastlayer_terms.default, (logits, features, 2.0, 0.5))


SCORE_SPECS = [  # (logit_term, logit_scale, feature_term, with_bias, combine, alpha)
    (1, 1.0, 8, False, 0, 0.0),  # RG
    (3, 0.5, 6, True, 0, 0.0),  # GradNorm with bias
    (5, -1.0, 7, True, 0, 0.0),  # GRODIN last layer
    (1, 1.0, 8, False, 1, 0.6),  # additive RG
    (2, 1.0, -1, False, 0, 0.0),  # MSP
]


@pytest.mark.parametrize("spec", SCORE_SPECS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_lastlayer_score(spec, dtype, device):
    logits = torch.randn(6, 9, device=device).to(dtype)
    features = None if spec[2] == -1 else torch.rand(6, 5, device=device).to(dtype)
    torch.library.opcheck(torch.ops.gradood.lastlayer_score.default, (logits, features, *spec, 1.5, 0.7))


def test_lastlayer_score_equals_the_composed_terms(device):
    logits, features = torch.randn(7, 9, device=device), torch.rand(7, 5, device=device)
    terms = torch.ops.gradood.lastlayer_terms(logits, features, 1.5, 0.7)[0]
    for logit_term, scale, feature_term, with_bias, combine, alpha in SCORE_SPECS:
        score = torch.ops.gradood.lastlayer_score(logits, features if feature_term != -1 else None, logit_term, scale,
                                                  feature_term, with_bias, combine, alpha, 1.5, 0.7)
        u = scale * terms[:, logit_term]
        if feature_term == -1:
            expected = u
        else:
            v = terms[:, feature_term]
            if with_bias:
                v = torch.sqrt(v * v + 1) if feature_term == 7 else v + 1
            expected = u + alpha * v if combine == 1 else u * v
        torch.testing.assert_close(score, expected)


@pytest.mark.parametrize("args,message", [
    ((6, 1.0, -1, False, 0, 0.0), "logit_term must be a logit column"),
    ((1, 1.0, 3, False, 0, 0.0), "feature_term must be -1 or a feature column"),
    ((1, 1.0, 8, True, 0, 0.0), "with_bias needs feature_term feature_l1 or feature_l2"),
    ((1, 1.0, 8, False, 2, 0.0), "combine must be 0"),
    ((1, 1.0, -1, False, 0, 0.0), "features given but feature_term is -1"),
])
def test_lastlayer_score_rejects_bad_specs(args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.gradood.lastlayer_score(torch.randn(2, 3), torch.rand(2, 4), *args, 1.0, 1.0)


def test_lastlayer_score_needs_features_for_a_feature_term():
    with pytest.raises(RuntimeError, match="a feature_term needs features"):
        torch.ops.gradood.lastlayer_score(torch.randn(2, 3), None, 1, 1.0, 8, False, 0, 0.0, 1.0, 1.0)


@pytest.mark.skipif(torch.version.cuda is not None, reason="a CUDA torch may or may not have been built with the kernels")
def test_cpu_torch_builds_have_no_cuda_kernels():
    assert not gradood._ops.HAS_CUDA_KERNELS


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_kernels_are_registered():
    assert gradood._ops.HAS_CUDA_KERNELS


def test_term_names_come_from_the_library():
    assert gradood.TERM_NAMES == (
        "max_logit", "energy", "max_softmax", "uniform_deviation_l1", "gini",
        "onehot_deviation_l2", "feature_l1", "feature_l2", "feature_clipped_l1",
    )
    result = gradood.lastlayer_terms(torch.randn(2, 3), torch.rand(2, 4))
    assert result.terms.shape == (2, len(gradood.TERM_NAMES))


def _classifier() -> ScoringClassifier:
    """A classifier returning (logits, RG score) from one forward pass."""
    return ScoringClassifier(lambda logits, features, head: scores.rg(logits, features, clip=1.0))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _classifier().eval()
    inputs = torch.randn(8, 12)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        eager_logits, eager_score = model(inputs)
        compiled_logits, compiled_score = compiled(inputs)
    torch.testing.assert_close(compiled_score, eager_score)
    torch.testing.assert_close(compiled_logits, eager_logits)


def test_torch_export_runs_and_matches_eager():
    model = _classifier().eval()
    inputs = torch.randn(6, 12)
    exported = torch.export.export(model, (inputs,))
    assert any("gradood.lastlayer_score" in str(node.target) for node in exported.graph.nodes)
    logits, score = exported.module()(inputs)
    torch.testing.assert_close(score, model(inputs)[1])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_calls_the_op():
    @torch.jit.script
    def energy_times_l1(logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        terms, argmax = torch.ops.gradood.lastlayer_terms(logits, features, 1.0, 1.0)
        return terms[:, 1] * terms[:, 6]

    logits, features = torch.randn(4, 6), torch.rand(4, 3)
    torch.testing.assert_close(energy_times_l1(logits, features), scores.uv(logits, features, u="energy", v="l1"))


def test_c_plus_plus_checks_guard_the_raw_op():
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        torch.ops.gradood.lastlayer_terms(torch.randn(2, 3), None, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="features must have the batch size of logits"):
        torch.ops.gradood.lastlayer_terms(torch.randn(2, 3), torch.randn(3, 3), 1.0, 1.0)
    with pytest.raises(RuntimeError, match="logits must be float16, bfloat16, float32 or float64"):
        torch.ops.gradood.lastlayer_terms(torch.ones(2, 3, dtype=torch.int32), None, 1.0, 1.0)


def test_import_without_the_extension_says_how_to_build(tmp_path):
    """A copy of the package without its compiled library must fail loudly."""
    package_dir = os.path.dirname(gradood.__file__)
    copy_dir = tmp_path / "gradood"
    copy_dir.mkdir()
    for name in os.listdir(package_dir):
        if name.endswith(".py"):
            (copy_dir / name).write_text(open(os.path.join(package_dir, name)).read())
    # Loaded by path, so neither the build tree nor an editable install can supply _C.
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        # An editable install's finder would map gradood._C back to the build tree.
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__name__", repr(f)).lower()]
        spec = importlib.util.spec_from_file_location(
            "gradood", {str(copy_dir / "__init__.py")!r}, submodule_search_locations=[{str(copy_dir)!r}])
        module = importlib.util.module_from_spec(spec)
        sys.modules["gradood"] = module
        try:
            spec.loader.exec_module(module)
        except ImportError as error:
            print("IMPORT-ERROR:", error)
        else:
            print("IMPORTED")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert "IMPORT-ERROR:" in result.stdout, result.stdout + result.stderr
    assert "pip install --no-build-isolation -e ." in result.stdout


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_cuda_kernel_runs_on_the_current_stream():
    logits, features = torch.randn(64, 1000, device="cuda"), torch.rand(64, 512, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        result = gradood.lastlayer_terms(logits, features)
    stream.synchronize()
    expected = gradood.lastlayer_terms(logits.cpu(), features.cpu())
    torch.testing.assert_close(result.terms.cpu(), expected.terms, rtol=1e-5, atol=1e-5)


def _mixed_calls(moved: int, target):
    """(name, call) of each operator with input number `moved` (0 or 1) moved to `target`
    (the meta device, or another dtype) and the others on the CPU."""
    def on(tensor, index):
        return tensor.to(target) if index == moved else tensor

    l, f = torch.randn(3, 4), torch.randn(3, 5)
    a, g = torch.randn(3, 2, 4), torch.randn(3, 2, 6)
    x, go = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 3, 3)
    n = torch.randn(2, 3, 4)
    w, b = torch.randn(4, 5), torch.randn(4)
    ops = torch.ops.gradood
    return [
        ("lastlayer_terms", lambda: ops.lastlayer_terms(on(l, 0), on(f, 1), 1.0, math.inf)),
        ("lastlayer_score", lambda: ops.lastlayer_score(on(l, 0), on(f, 1), 1, 1.0, 6, False, 0, 0.0, 1.0, math.inf)),
        ("outer_product_sq_norm", lambda: ops.outer_product_sq_norm(on(a, 0), on(g, 1), "ghost")),
        ("conv2d_weight_sq_norm", lambda: ops.conv2d_weight_sq_norm(on(x, 0), on(go, 1), [3, 3], [1, 1], [1, 1], 1,
                                                                    "ghost")),
        ("norm_affine_grads", lambda: ops.norm_affine_grads(on(n, 0), on(n, 1), on(n, 1), on(n, 1))),
        ("react_energy", lambda: ops.react_energy(on(f, 1), on(w, 0), b, 1.0)),
    ]


@pytest.mark.parametrize("moved", [0, 1])
@pytest.mark.parametrize("target", ["meta", torch.float64], ids=["meta-device", "other-dtype"])
def test_operators_refuse_inputs_on_mixed_devices_or_dtypes(moved, target):
    """A meta tensor beside CPU ones used to run the fake kernel and return uninitialised CPU memory."""
    for name, call in _mixed_calls(moved, target):
        pattern = "lastlayer_(terms|score)" if name == "lastlayer_score" else name  # the compiled check is shared
        with pytest.raises(RuntimeError, match=rf"{pattern}: .*(device|dtype)"):
            call()
