"""ReAct's energy, logsumexp(W min(v, c) + b), every implementation of one case
in one run:

    gradood             gradood.scores.react (the react_energy operator: clip,
                        the GEMM library, the fused energy pass)
    reference           gradood.reference.react, eager (clamp, F.linear, logsumexp)
    reference_compiled  torch.compile(gradood.reference.react, dynamic=False)
    gemm_only           F.linear(v, W, b) alone: the GEMM every implementation pays,
                        the floor of any fusion

Run (GRADOOD_BENCH_SIZES=small for a quick subset):

    python -m pytest benchmarks/test_react.py --benchmark-json=react.json
    python benchmarks/summarize.py react.json
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F

from gradood import reference, scores

BATCHES = [1, 64, 1024, 8192]
CLASSES_FEATURES = [(10, 512), (1000, 2048), (21843, 2048)]
if os.environ.get("GRADOOD_BENCH_SIZES") == "small":
    BATCHES, CLASSES_FEATURES = [64, 1024], [(1000, 2048)]
DTYPES = [torch.float32, torch.bfloat16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLEMENTATIONS = ["gradood", "reference", "reference_compiled", "gemm_only"]
CLIP = 1.0

CASES = [
    pytest.param(
        (device, batch, num_classes, num_features, dtype),
        id=f"react-{device}-B{batch}-C{num_classes}-D{num_features}-{str(dtype).removeprefix('torch.')}",
    )
    for device, batch, (num_classes, num_features), dtype in itertools.product(
        DEVICES, BATCHES, CLASSES_FEATURES, DTYPES
    )
    # CPU at B=8192 with C=21843 takes seconds per call; its B=1024 row shows the trend.
    if not (device == "cpu" and batch == 8192 and num_classes == 21843)
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_react(benchmark, case, implementation):
    device, batch, num_classes, num_features, dtype = case
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, num_features, generator=generator).relu().to(device=device, dtype=dtype)
    weight = (torch.randn(num_classes, num_features, generator=generator) / num_features**0.5).to(device=device, dtype=dtype)
    bias = torch.randn(num_classes, generator=generator).to(device=device, dtype=dtype)
    benchmark.group = f"react-{device}-B{batch}-C{num_classes}-D{num_features}-{str(dtype).removeprefix('torch.')}"
    if implementation == "gemm_only":
        function = lambda v, w, b, clip: F.linear(v, w, b)  # noqa: E731
    elif implementation == "gradood":
        function = scores.react
    elif implementation == "reference":
        function = reference.react
    else:
        torch._dynamo.reset()  # a fresh compilation per case (see test_lastlayer_scores.py)
        function = torch.compile(reference.react, dynamic=False)

    def run():
        function(features, weight, bias, CLIP)
        if device == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (and compilation)
    benchmark(run)
