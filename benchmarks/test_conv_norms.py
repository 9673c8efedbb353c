"""The CPU kernel of gradood::conv2d_weight_sq_norm (method "materialise": per-sample
weight gradients as one grouped convolution backward) against the eager torch
composition it replaced (unfold + bmm + square-sum) and that composition under
torch.compile, in one run; float32, squared per-sample weight-gradient norms.

    cd benchmarks && python -m pytest test_conv_norms.py --benchmark-json=conv_norms.json
    bash run_levels.sh-style: GRADOOD_CPU_CAPABILITY=... ATEN_CPU_CAPABILITY=... ONEDNN_MAX_CPU_ISA=...

Cases (B, C_in, H, C_out, k): the MNIST CNN's two convolutions at B = 128 and a ResNet-style
3×3 64 → 64 convolution at 32×32, B = 32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradood  # noqa: F401  (registers torch.ops.gradood)

CASES = {
    "mnist_conv1-B128": (128, 1, 28, 16, 5),
    "mnist_conv2-B128": (128, 16, 12, 32, 5),
    "resnet_3x3-B32": (32, 64, 32, 64, 3),
}
IMPLEMENTATIONS = ["gradood", "eager_unfold_bmm", "compiled_unfold_bmm"]


def _unfold_bmm(x: torch.Tensor, g: torch.Tensor, k: int) -> torch.Tensor:
    patches = F.unfold(x, k)  # [B, C_in·k·k, T]
    return torch.bmm(g.flatten(2), patches.transpose(1, 2)).square().sum((1, 2))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", list(CASES))
def test_conv_weight_norms(benchmark, case, implementation):
    batch, c_in, size, c_out, k = CASES[case]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c_in, size, size, generator=generator)
    g = torch.randn(batch, c_out, size - k + 1, size - k + 1, generator=generator)
    expected = _unfold_bmm(x.double(), g.double(), k)
    if implementation == "gradood":

        def run():
            return torch.ops.gradood.conv2d_weight_sq_norm(x, g, [k, k], [1, 1], [1, 1], 1, "materialise")

    elif implementation == "eager_unfold_bmm":

        def run():
            return _unfold_bmm(x, g, k)

    else:
        compiled = torch.compile(_unfold_bmm, dynamic=False)
        try:
            compiled(x, g, k)
        except Exception as error:  # no compiler toolchain at this level: the failure is the result
            pytest.skip(f"torch.compile fails: {type(error).__name__}: {str(error)[:200]}")

        def run():
            return compiled(x, g, k)

    benchmark.group = f"persample-conv_norms-{case}"
    result = run()
    benchmark.extra_info["max_rel_err_vs_float64"] = float(((result.double() - expected).abs() / expected).max())
    assert benchmark.extra_info["max_rel_err_vs_float64"] < 1e-4
    benchmark.pedantic(run, rounds=15, iterations=1, warmup_rounds=2)
