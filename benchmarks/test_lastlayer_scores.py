"""Last-layer scores, every implementation of one case in one run:

    gradood             gradood.scores.<score> (one fused kernel)
    reference           gradood.reference.<score>, eager
    reference_compiled  torch.compile(gradood.reference.<score>, dynamic=False)
    autograd_loop       GradNorm as the official and OpenOOD code compute it: one
                        backward() per sample through the last nn.Linear, reading
                        its weight gradient (last layer only: the most favourable
                        version of that loop). Timed on the first LOOP_SUBSET
                        samples; the median is extrapolated linearly to B and
                        stored in extra_info["extrapolated_median_s"].
    copy                torch's device copy of logits and features (read + write of
                        the bytes the score reads once): the bandwidth yardstick.
    tiny_kernel         (B=1 only) an in-place add on a one-element tensor: the
                        launch-latency yardstick.
    torch_oneliner      (logits-only scores) the one-line torch expression a user
                        would write: logits.amax(1), torch.logsumexp(logits, 1),
                        logits.softmax(1).amax(1)
    pytorch_ood         (logits-only scores) pytorch-ood's MaxSoftmax / EnergyBased /
                        MaxLogit .score, where pytorch-ood is installed

The CPU kernels run at the instruction-set level GRADOOD_CPU_CAPABILITY forces (else
ATen's, which ATEN_CPU_CAPABILITY forces); benchmarks/run_levels.sh runs this file at
every level the CPU has, torch's kernels at the same level, and records lscpu.

Run (all sizes; GRADOOD_BENCH_SIZES=small for a quick subset):

    python -m pytest benchmarks/test_lastlayer_scores.py --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json

(summarize.py takes several JSON files, later ones replacing earlier rows, so
one implementation can be re-measured with -k.)
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood import reference, scores

BATCHES = [1, 64, 1024, 8192]
CLASSES_FEATURES = [(10, 512), (1000, 2048), (21843, 2048)]
if os.environ.get("GRADOOD_BENCH_SIZES") == "small":
    BATCHES, CLASSES_FEATURES = [1, 1024], [(10, 512), (1000, 2048)]
DTYPES = [torch.float32, torch.bfloat16]
SCORES = ["gradnorm", "rg", "msp", "energy", "max_logit"]
LOGITS_ONLY = {"msp", "energy", "max_logit"}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
IMPLEMENTATIONS = ["gradood", "reference", "reference_compiled", "autograd_loop", "copy", "tiny_kernel",
                   "torch_oneliner", "pytorch_ood"]
ONELINERS = {
    "max_logit": lambda logits: logits.amax(1),
    "energy": lambda logits: torch.logsumexp(logits, 1),
    "msp": lambda logits: logits.softmax(1).amax(1),
}
if os.environ.get("GRADOOD_BENCH_DTYPES") == "float32":
    DTYPES = [torch.float32]


def _pytorch_ood(score: str):
    from gradood.testing import import_torchvision

    import_torchvision()  # pytorch-ood imports torchvision (see gradood/testing.py)
    detector = pytest.importorskip("pytorch_ood.detector")
    return {"msp": detector.MaxSoftmax.score, "energy": detector.EnergyBased.score,
            "max_logit": detector.MaxLogit.score}[score]
LOOP_SUBSET = 32

CASES = [
    pytest.param(
        (score, device, batch, num_classes, num_features, dtype),
        id=f"{score}-{device}-B{batch}-C{num_classes}-D{num_features}-{str(dtype).removeprefix('torch.')}",
    )
    for score, device, batch, (num_classes, num_features), dtype in itertools.product(
        SCORES, DEVICES, BATCHES, CLASSES_FEATURES, DTYPES
    )
]


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autograd_loop(layer: nn.Linear, features: torch.Tensor) -> torch.Tensor:
    """GradNorm by per-sample backward (official code: targets all ones, T=1, L1 of the weight gradient)."""
    norms = []
    for row in features:
        layer.zero_grad(set_to_none=True)
        logits = layer(row[None])
        loss = torch.sum(-F.log_softmax(logits, dim=-1)) / logits.shape[1]
        loss.backward()
        norms.append(layer.weight.grad.abs().sum())
    return torch.stack(norms)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_lastlayer_score(benchmark, case, implementation):
    score, device, batch, num_classes, num_features, dtype = case
    if implementation == "autograd_loop" and score != "gradnorm":
        pytest.skip("the per-sample loop is GradNorm's procedure; RG has no gradient to loop over")
    if implementation == "tiny_kernel" and batch != 1:
        pytest.skip("the launch-latency yardstick is measured at B=1")
    if implementation in ("torch_oneliner", "pytorch_ood") and score not in LOGITS_ONLY:
        pytest.skip("a one-line torch expression and pytorch-ood's scores exist for the logits-only scores")
    generator = torch.Generator().manual_seed(0)
    layer = nn.Linear(num_features, num_classes).to(device=device, dtype=dtype)
    features = torch.randn(batch, num_features, generator=generator).relu().to(device=device, dtype=dtype)
    with torch.no_grad():
        logits = layer(features)
    benchmark.group = f"{score}-{device}-B{batch}-C{num_classes}-D{num_features}-{str(dtype).removeprefix('torch.')}"
    benchmark.extra_info["bytes_read"] = logits.numel() * logits.element_size() + (
        0 if score in LOGITS_ONLY else features.numel() * features.element_size())
    benchmark.extra_info["cpu_capability"] = torch.ops.gradood.cpu_capability()
    benchmark.extra_info["aten_cpu_capability"] = torch.backends.cpu.get_cpu_capability()

    if implementation == "tiny_kernel":
        one = torch.zeros(1, device=device)

        def run():
            one.add_(1)
            _synchronize(device)

    elif implementation == "copy":
        logits_out, features_out = torch.empty_like(logits), torch.empty_like(features)

        def run():
            logits_out.copy_(logits)
            if score not in LOGITS_ONLY:
                features_out.copy_(features)
            _synchronize(device)

    elif implementation in ("torch_oneliner", "pytorch_ood"):
        function = ONELINERS[score] if implementation == "torch_oneliner" else _pytorch_ood(score)

        def run():
            function(logits)
            _synchronize(device)

    elif implementation == "autograd_loop":
        subset = features[:LOOP_SUBSET]
        benchmark.extra_info["loop_samples"] = subset.shape[0]

        def run():
            _autograd_loop(layer, subset)
            _synchronize(device)

    else:
        if implementation == "gradood":
            function = getattr(scores, score)
        elif implementation == "reference":
            function = getattr(reference, score)
        else:
            # A fresh compilation per case: one shared compiled function would hit
            # dynamo's recompile limit after a few shapes and silently run eagerly.
            torch._dynamo.reset()
            function = torch.compile(getattr(reference, score), dynamic=False)

        if score in LOGITS_ONLY:
            inputs = (logits,)
        else:
            inputs = (logits, features)

        def run():
            function(*inputs)
            _synchronize(device)

    run()  # warm-up (and compilation)
    benchmark(run)
    if implementation == "autograd_loop":
        benchmark.extra_info["extrapolated_median_s"] = benchmark.stats.stats.median * batch / subset.shape[0]
