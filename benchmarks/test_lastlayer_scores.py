"""Last-layer scores: the gradood op vs. the eager reference vs. the reference
under torch.compile, in one run.

    python -m pytest benchmarks/test_lastlayer_scores.py --benchmark-group-by=param:case --benchmark-columns=median,iqr,rounds

Each case is one (score, device, B, C, D, dtype); compare medians within a group.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gradood import reference, scores

SIZES = [(64, 10, 512), (1024, 10, 512), (64, 1000, 2048), (1024, 1000, 2048)]
DTYPES = [torch.float32, torch.bfloat16]
SCORES = ["gradnorm", "rg"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    pytest.param((score, device, size, dtype), id=f"{score}-{device}-B{size[0]}-C{size[1]}-D{size[2]}-{str(dtype)[6:]}")
    for score, device, size, dtype in itertools.product(SCORES, DEVICES, SIZES, DTYPES)
]
IMPLEMENTATIONS = ["gradood", "reference", "reference_compiled"]

_compiled = {}


def _implementation(name: str, score: str):
    if name == "gradood":
        return getattr(scores, score)
    if name == "reference":
        return getattr(reference, score)
    if score not in _compiled:
        _compiled[score] = torch.compile(getattr(reference, score), dynamic=False)
    return _compiled[score]


def _synchronized(function, device):
    if device != "cuda":
        return function

    def run(*args):
        result = function(*args)
        torch.cuda.synchronize()
        return result

    return run


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_lastlayer_score(benchmark, case, implementation):
    score, device, (batch, num_classes, num_features), dtype = case
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(batch, num_classes, generator=generator) * 3).to(dtype).to(device)
    features = torch.randn(batch, num_features, generator=generator).relu().to(dtype).to(device)
    function = _synchronized(_implementation(implementation, score), device)
    function(logits, features)  # warm-up (and compilation)
    benchmark.group = f"{score}-{device}-B{batch}-C{num_classes}-D{num_features}-{str(dtype)[6:]}"
    benchmark(function, logits, features)
