"""The documentation's claims that code can check: the tutorial runs, the generated
supported-layers table is the registry, and the repository stands alone."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch
from torch import nn

import gradood
from gradood.persample import _rules, supported_layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_blocks(page: str) -> list:
    text = open(os.path.join(ROOT, "docs", page)).read()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_the_getting_started_tutorial_runs():
    from gradood.testing import import_torchvision

    import_torchvision()  # this test machine's torchvision lacks its compiled ops (gradood.testing)
    block = _python_blocks("getting-started.md")[0]
    assert 'weights="DEFAULT"' in block and "224, 224" in block
    # Random weights (no download) and small images keep it fast; the code is the page's.
    code = block.replace('weights="DEFAULT"', "weights=None").replace("224, 224", "64, 64")
    code = code.replace("torch.randn(256,", "torch.randn(32,").replace("torch.randn(128,", "torch.randn(32,")
    printed = []
    exec(compile(code, "getting-started.md", "exec"), {"print": lambda *a: printed.append(a)})
    assert len(printed) == 3
    energy, gradnorm = printed[0]
    assert energy.shape == gradnorm.shape == (8,)
    assert printed[1][0].dtype == torch.bool and printed[2][0].shape == (8,)


def test_supported_layers_is_the_registry():
    rows = {row.layer: row for row in supported_layers()}
    assert "torch.nn.modules.linear.Linear" in rows and "torch.nn.modules.conv.Conv2d" in rows
    assert rows["torch.nn.modules.activation.MultiheadAttention"].norms == "composite"
    for module in (nn.Linear(3, 2), nn.Conv2d(3, 4, 3), nn.LayerNorm(4), nn.Embedding(5, 3), nn.MultiheadAttention(4, 2)):
        name = _rules.qualified_name(type(module))
        assert name in rows, name
        assert _rules.rule_for(module) is not None
    assert len(rows) == len(_rules._RULES) + len(_rules._COMPOSITE_RULES)


def test_the_version_is_single_sourced():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert 'version = { attr = "gradood._version.__version__" }' in text
    assert re.fullmatch(r"\d+\.\d+\.\d+", gradood.__version__)
    assert f"## [{gradood.__version__}]" in open(os.path.join(ROOT, "CHANGELOG.md")).read()


def test_nothing_refers_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    pattern = re.compile(r"\.\./shared|shared/SPEC|SPEC\.md|papers/[a-z_]+\.txt")
    offenders = []
    for name in files:
        if name.endswith((".png", ".json", ".pt", ".whl")) or name == "tests/test_docs.py":
            continue
        path = os.path.join(ROOT, name)
        if not os.path.isfile(path):
            continue
        text = open(path, errors="replace").read()
        offenders += [f"{name}: {match.group(0)}" for match in pattern.finditer(text)]
    assert not offenders, offenders
