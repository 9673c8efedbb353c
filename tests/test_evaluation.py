"""gradood.evaluate, gradood.tune, the demo and the command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradood
from gradood import detectors as D
from gradood import metrics


def _model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    generator = torch.Generator().manual_seed(1)
    id_data = [torch.randn(20, 4, generator=generator) for _ in range(3)]  # DataLoader-like
    ood = {"far": torch.randn(30, 4, generator=generator) * 4, "near": torch.randn(25, 4, generator=generator) * 1.5}
    return model, id_data, ood


def test_evaluate_tabulates_every_metric_per_set_and_mean():
    model, id_data, ood = _model_and_data()
    detectors = {"MSP": D.MSP(model), "Energy": D.Energy(model)}
    result = gradood.evaluate(detectors, id_data, ood, bootstrap=20, progress=False)
    assert [(row["detector"], row["ood_set"]) for row in result.rows] == [
        (name, ood_set) for name in detectors for ood_set in ("far", "near", "mean")
    ]
    id_scores = detectors["Energy"].score(torch.cat(id_data)).numpy()
    far_scores = detectors["Energy"].score(ood["far"]).numpy()
    row = result.rows[3]
    assert row["auroc"] == metrics.auroc(id_scores, far_scores)
    assert row["fpr95"] == metrics.fpr_at_95_tpr(id_scores, far_scores)
    assert row["fpr95_ood_positive"] == metrics.fpr_at_95_tpr_ood_positive(id_scores, far_scores)
    assert row["auroc_std"] == metrics.bootstrap(metrics.auroc, id_scores, far_scores, n=20).std
    mean = result.rows[5]
    assert mean["auroc"] == pytest.approx((result.rows[3]["auroc"] + result.rows[4]["auroc"]) / 2)
    assert result.throughput["MSP"] > 0
    np.testing.assert_array_equal(result.scores["Energy"]["far"], far_scores)


def test_evaluation_reports(tmp_path):
    model, id_data, ood = _model_and_data()
    result = gradood.evaluate([D.MSP(model), D.GradNorm(model)], id_data, ood, bootstrap=0, progress=False)
    markdown = result.to_markdown()
    assert "### OOD set: far" in markdown and "### Mean over OOD sets" in markdown and "| GradNorm |" in markdown
    assert json.loads(result.to_json())["ood_sets"] == ["far", "near"]
    written = result.save(str(tmp_path), plots=True)
    names = {os.path.basename(path) for path in written}
    assert {"report.md", "results.json"} <= names
    pytest.importorskip("matplotlib")
    assert {"hist_MSP.png", "hist_GradNorm.png", "roc_far.png", "roc_near.png"} <= names


def test_evaluate_refuses_nan_scores():
    model, id_data, ood = _model_and_data()
    with pytest.raises(ValueError, match="NaN"):
        gradood.evaluate([D.MSP(model)], [torch.full((2, 4), float("nan"))], ood, bootstrap=0, progress=False)


def test_tune_searches_the_grid_by_auroc():
    model, id_data, ood = _model_and_data()
    result = gradood.tune(lambda temperature: D.Energy(model, temperature=temperature), {"temperature": [0.5, 1.0, 5.0]},
                          id_data, ood["near"])
    assert [row["temperature"] for row in result.table] == [0.5, 1.0, 5.0]
    id_scores = torch.cat(id_data)
    for row in result.table:
        detector = D.Energy(model, temperature=row["temperature"])
        assert row["auroc"] == metrics.auroc(detector.score(id_scores), detector.score(ood["near"]))
    assert result.best["auroc"] == max(row["auroc"] for row in result.table)


def test_tune_default_grids():
    import functools

    from gradood.tuning import PERCENTILE_GRID, PERTURBATION_GRID, default_grid

    model, id_data, ood = _model_and_data()
    assert default_grid(functools.partial(D.ODIN, model)) is PERTURBATION_GRID
    assert len(PERTURBATION_GRID["epsilon"]) == 21 and PERTURBATION_GRID["epsilon"][-1] == 0.004
    result = gradood.tune(functools.partial(D.ReAct, model), None, id_data, ood["far"])
    assert [row["percentile"] for row in result.table] == PERCENTILE_GRID["percentile"]
    with pytest.raises(ValueError, match="no default grid"):
        default_grid(D.MSP)


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from gradood import demo

    result = demo.run(out=str(tmp_path / "report"), epochs=3, plots=False, bootstrap=0, progress=False)
    assert set(result.ood_names) == {"near-ood-digits", "faces", "textures", "photographs"}
    assert len(result.scores) == 40 and "GradOrth (ε_th = 0.97)" in result.scores and "NNGuide (k=100)" in result.scores and "GradUncertainty" in result.scores and "SHE" in result.scores and "LowDimGrad (PCA K=200, KNN k=5)" in result.scores and "DICE (p90)" in result.scores
    assert "LowDimGrad probe BATS (λ=1)" in result.scores and "LowDimGrad Mahalanobis" in result.scores
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith("# gradood demo") and "ID test accuracy" in report


def test_demo_training_is_deterministic():
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from gradood import demo

    splits, _ = demo.load_data(seed=0)
    first, second = demo.train(splits, epochs=1), demo.train(splits, epochs=1)
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_cli_bench_and_help():
    here = os.path.dirname(__file__)
    env = {**os.environ, "PYTHONPATH": here + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run(
        [sys.executable, "-m", "gradood", "bench", "--model", "helpers:tiny_classifier", "--batch", "8",
         "--input-shape", "3,4", "--repeat", "2"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "GradNorm" in result.stdout and "GRODIN" in result.stdout
    assert re.search(r"^LowDimGrad +[0-9.]+ ", result.stdout, re.MULTILINE), result.stdout
    usage = subprocess.run([sys.executable, "-m", "gradood"], capture_output=True, text=True, timeout=120)
    assert "demo" in usage.stdout and "bench" in usage.stdout


def test_every_detector_equals_the_reference_formulas_on_the_demo_model():
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    from gradood import demo, reference

    splits, ood = demo.load_data(seed=0)
    model = demo.train(splits, epochs=2)
    detectors = demo.build_detectors(model, splits["train"])
    inputs = torch.cat([splits["test"][:16], ood["faces"][:16]])
    with torch.no_grad():
        features = model.hidden(model.features(inputs))
        logits = model.fc(features)
    weight, bias = model.fc.weight, model.fc.bias
    formulas = {
        "MSP": reference.msp(logits),
        "MaxLogit": reference.max_logit(logits),
        "Energy": reference.energy(logits),
        "GradNorm": reference.gradnorm(logits, features),
        "ExGrad": reference.exgrad(logits, features),
        "UV energy·L1": reference.uv(logits, features),
        "RG (k = p90)": reference.rg(logits, features, detectors["RG (k = p90)"].clip),
        "RGAdditive (k = p90, a=0.6)": reference.rg_additive(
            logits, features, detectors["RGAdditive (k = p90, a=0.6)"].clip, detectors["RGAdditive (k = p90, a=0.6)"].alpha
        ),
        "ReAct (p90)": reference.react(features, weight.detach(), bias.detach(), detectors["ReAct (p90)"].clip),
        "KLMatching": reference.kl_matching(logits, detectors["KLMatching"].templates.to(logits.dtype)),
        "Entropy": (torch.softmax(logits, 1) * torch.log_softmax(logits, 1)).sum(1),
    }
    for name, expected in formulas.items():
        torch.testing.assert_close(detectors[name].score(inputs), expected, rtol=1e-5, atol=1e-5, msg=name)


_TRAIN_AT_LEVEL = """
import sys, torch
from gradood import demo
splits, _ = demo.load_data(seed=0)
model = demo.train(splits, epochs=2)
torch.save(torch.cat([p.detach().flatten() for p in model.parameters()]), sys.argv[1])
"""


def test_demo_training_does_not_depend_on_the_instruction_set(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("skimage")
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if not all(f" {flag}" in flags for flag in ("avx2", "avx512f", "avx512bw", "avx512vl")):
        pytest.skip("needs a CPU with AVX2 and AVX-512 to compare the two")
    weights = {}
    for level, onednn in (("avx2", "AVX2"), ("avx512", "AVX512_CORE")):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": level, "MKL_ENABLE_INSTRUCTIONS": level.upper(),
               "ONEDNN_MAX_CPU_ISA": onednn}
        path = str(tmp_path / f"{level}.pt")
        result = subprocess.run([sys.executable, "-c", _TRAIN_AT_LEVEL, path], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        weights[level] = torch.load(path)
    assert weights["avx2"].dtype == torch.float64
    # float64 training: the two instruction sets' rounding stays ~1e-13, far below float32's 1e-7.
    torch.testing.assert_close(weights["avx2"], weights["avx512"], rtol=1e-9, atol=1e-12)
