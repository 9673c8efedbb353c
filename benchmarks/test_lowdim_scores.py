"""LowDimGrad's base scores on G_low, one run: the fit of each score's statistics from the
stored ID G_low (the probe's training, the Gaussians), and scoring a batch of G_low rows
with each base score against KNN. The projection G_low itself, shared by every base
score, is benchmarked in test_lowdim.py; what differs between base scores is only this.

    cd benchmarks && python -m pytest test_lowdim_scores.py --benchmark-json=lowdim_scores.json

Cases (float32, rows L2-normalised as LowDimGrad's default normalise=True):
    demo      the demo's sizes: N = 865 fit samples, C = 8 classes, K = 200, B = 256
    cifar     a CIFAR-10 training set's: N = 50,000, C = 10, K = 200, B = 256
On CUDA (when present) the cifar case runs there too.
"""

from __future__ import annotations

import pytest
import torch

from gradood import knn, mahalanobis
from gradood.detectors import lowdim_probe, lowdim_scores

K, BATCH = 200, 256
CASES = {"demo-cpu": ("cpu", 865, 8), "cifar-cpu": ("cpu", 50_000, 10)}
if torch.cuda.is_available():
    CASES["cifar-cuda"] = ("cuda", 50_000, 10)
SCORES = ["knn", "mahalanobis", "msp", "energy", "odin", "gradnorm", "react", "bats"]


def _data(device, samples, classes):
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, K, generator=generator)
    targets = torch.arange(samples) % classes
    rows = centres[targets] + 0.5 * torch.randn(samples, K, generator=generator)
    queries = torch.randn(BATCH, K, generator=generator)
    return knn.normalise_rows(rows).to(device), targets.to(device), knn.normalise_rows(queries).to(device)


def _sync(device):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


@pytest.mark.parametrize("statistic", ["probe", "gaussians"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fit(benchmark, case, statistic):
    device, samples, classes = CASES[case]
    rows, targets, _ = _data(device, samples, classes)
    sync = _sync(device)
    benchmark.group = f"lowdim-fit-{case}-N{samples}-K{K}-C{classes}"

    def run():
        if statistic == "probe":
            lowdim_probe.train_probe(rows, targets, classes)  # 10 epochs, batch 128
        else:
            mahalanobis.fit_class_gaussians(rows, targets)
        sync()

    benchmark.pedantic(run, rounds=3 if samples > 10_000 else 10, warmup_rounds=1)
    benchmark.extra_info["samples_per_s"] = samples / benchmark.stats.stats.median


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_score(benchmark, case, score):
    device, samples, classes = CASES[case]
    rows, targets, queries = _data(device, samples, classes)
    probe = lowdim_probe.train_probe(rows, targets, classes, epochs=1)
    gaussians = mahalanobis.fit_class_gaussians(rows, targets)
    clip = float(rows[:, 10:].flatten().float().quantile(0.9)) if rows[:, 10:].numel() < 1 << 24 else 0.05
    sync = _sync(device)
    benchmark.group = f"lowdim-score-{case}-N{samples}-K{K}-C{classes}-B{BATCH}"
    calls = {
        "knn": lambda: knn.knn_score(queries, rows, 5),
        "mahalanobis": lambda: mahalanobis.mahalanobis_score(queries, gaussians),
        "msp": lambda: lowdim_scores.msp(queries, probe),
        "energy": lambda: lowdim_scores.energy(queries, probe),
        "odin": lambda: lowdim_scores.odin(queries, probe, 1000.0, 0.0014),
        "gradnorm": lambda: lowdim_scores.gradnorm(queries, probe),
        "react": lambda: lowdim_scores.react(queries, probe, 10, clip),
        "bats": lambda: lowdim_scores.bats(queries, probe, 1.0),
    }

    def run():
        calls[score]()
        sync()

    benchmark(run)
    benchmark.extra_info["samples_per_s"] = BATCH / benchmark.stats.stats.median
