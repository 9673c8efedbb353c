"""The CPU row kernels at every instruction-set level this CPU has (DEFAULT, and on
x86-64 PORTABLE, AVX2 and AVX512), each forced with GRADOOD_CPU_CAPABILITY in its own
process: the score, accuracy and gradient tests pass at each, so the baseline levels are
tested on an AVX-512 machine too, and PORTABLE (DEFAULT without its SSE2 paths: the code
a non-x86 CPU runs) on x86-64."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import gradood

LEVELS = ["portable", "default", "avx2", "avx512"]
_HERE = os.path.dirname(os.path.abspath(__file__))


def _run(code: str, level: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, GRADOOD_CPU_CAPABILITY=level)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _available(level: str) -> bool:
    return _run("import gradood, torch; torch.ops.gradood.cpu_capability()", level).returncode == 0


def test_the_level_in_use_is_reported():
    assert gradood.cpu_capability() in ("DEFAULT", "AVX2", "AVX512")  # PORTABLE only when forced
    assert torch.ops.gradood.cpu_capability() == gradood.cpu_capability()


@pytest.mark.parametrize("level", LEVELS)
def test_a_forced_level_is_used(level):
    if not _available(level):
        pytest.skip(f"this CPU has no {level}")
    result = _run("import gradood; print(gradood.cpu_capability())", level)
    assert result.stdout.strip() == level.upper()


def test_an_unknown_or_missing_level_is_a_clear_error():
    result = _run("import gradood, torch; gradood.scores.energy(torch.randn(2, 3))", "sse9")
    assert result.returncode != 0 and "GRADOOD_CPU_CAPABILITY must be portable, default, avx2 or avx512" in result.stderr
    missing = next((level for level in LEVELS if not _available(level)), None)
    if missing is not None:
        result = _run("import gradood, torch; gradood.scores.energy(torch.randn(2, 3))", missing)
        assert "asks for instructions this CPU does not have" in result.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_scores_are_exact_at_every_level(level):
    if not _available(level):
        pytest.skip(f"this CPU has no {level}")
    files = [os.path.join(_HERE, name) for name in ("test_scores.py", "test_scores_fast_path.py", "test_score_accuracy.py", "test_score_gradients.py",
                                            "test_persample_ops.py", "test_pruned_linear.py", "test_ash.py", "test_dice.py")]
    # torch's own kernels at the same level (portable: DEFAULT), so that the operators choosing
    # by ATen's level (the conv norms' GEMM at DEFAULT) run each of their paths too.
    env = dict(os.environ, GRADOOD_CPU_CAPABILITY=level, ATEN_CPU_CAPABILITY="default" if level == "portable" else level)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                            env=env, capture_output=True, text=True, timeout=900, cwd=_HERE)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
