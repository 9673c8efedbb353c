import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Deterministic property tests in CI; a wider search locally with HYPOTHESIS_PROFILE=dev.
settings.register_profile(
    "ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HAS_CUDA = torch.cuda.is_available()
# CUDA cases are always collected, and reported as skipped where no GPU is present.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seeded_global_generator():
    """Every test starts from the same global torch generator state, so a test draws the
    same weights (nn.Linear init, torch.randn without a generator) whether it runs alone,
    in a -k selection or in the full suite."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
