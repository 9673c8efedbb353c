"""NNGuide's and GrOOD's scores from penultimate features, every implementation in one run:

    gradood          gradood.detectors.NNGuide / GrOOD: score_features (exact blocked top-k; GrOOD's
                     gradient in closed form from a float64 GEMM of the prototype distances)
    openood          OpenOOD's postprocessors as written: NNGuide in numpy with faiss's exact
                     IndexFlatIP; GrOOD's `use_direct_grad` path (the norms of the B × (C + 1) × D
                     differences) with faiss's IndexIVFFlat (nprobe 4), as OpenOOD builds it
    openood_autograd GrOOD's default path: one autograd backward per sample (B = 64 only)
    eager            NNGuide as a float32 torch composition (normalise, GEMM, topk, logsumexp)

    cd benchmarks && python -m pytest test_nnguide_grood.py --benchmark-json=nnguide_grood.json

faiss (`pip install faiss-cpu`) is only needed for the openood rows (skipped without it). Cases:
ImageNet-sized features (D = 2048, C = 1000), float32; NNGuide's bank 12,800 rows (1% of ImageNet's
training set, the paper's), k = 100; GrOOD's bank 20,000 gradients, k = 1. Each row records its
largest error against a float64 evaluation of the formula (`max_abs_err_vs_float64`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.detectors import GrOOD, NNGuide
from gradood.detectors.grood import prototype_gradients

DIMS, CLASSES = 2048, 1000
NNGUIDE_CASES = {"B1024": 1024, "B64": 64}
NNGUIDE_BANK, NNGUIDE_K = 12_800, 100
GROOD_CASES = {"B256": 256, "B64": 64}
GROOD_BANK = 20_000


def _faiss():
    try:
        import faiss
    except ImportError:
        pytest.skip("faiss is not installed (pip install faiss-cpu)")
    return faiss


def _setup(batch, fit_rows):
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Identity(), nn.Linear(DIMS, CLASSES)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.randn(CLASSES, DIMS, generator=generator) / DIMS**0.5)
    classes_of = torch.arange(fit_rows) % CLASSES  # features near each class's weight row
    fit = (model[1].weight.detach()[classes_of] * 20 + torch.randn(fit_rows, DIMS, generator=generator)).relu()
    with torch.no_grad():
        labels = model(fit).argmax(1)
    features = torch.randn(batch, DIMS, generator=generator).relu()
    return model, fit, labels, features


@pytest.mark.parametrize("implementation", ["gradood", "eager", "openood"])
@pytest.mark.parametrize("case", list(NNGUIDE_CASES))
def test_nnguide_score(benchmark, case, implementation):
    model, fit, _, features = _setup(NNGUIDE_CASES[case], NNGUIDE_BANK)
    logits = model(features).detach()
    detector = NNGuide(model, neighbours=NNGUIDE_K).fit(fit.split(1000))
    bank = detector.bank
    expected = detector.score_features(logits.double(), features.double())  # float64 bank products
    if implementation == "gradood":

        def run():
            return detector.score_features(logits, features)

    elif implementation == "eager":

        def run():
            queries = F.normalize(features, dim=1)
            guidance = (queries @ bank.T).topk(NNGUIDE_K, dim=1).values.mean(1)
            return torch.logsumexp(logits, 1) * guidance

    else:
        faiss = _faiss()
        from scipy.special import logsumexp

        index = faiss.IndexFlatIP(DIMS)
        index.add(bank.numpy())
        numpy_logits, numpy_features = logits.numpy(), features.numpy()

        def run():
            normalised = numpy_features / np.linalg.norm(numpy_features, axis=-1, keepdims=True) + 1e-10
            distances, _ = index.search(normalised, NNGUIDE_K)
            return torch.from_numpy(distances.mean(1) * logsumexp(numpy_logits, axis=-1))

    benchmark.group = f"nnguide-score-{case}-N{NNGUIDE_BANK}-k{NNGUIDE_K}"
    benchmark.extra_info["max_abs_err_vs_float64"] = float((run().double() - expected).abs().max())
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=2)


def _openood_direct_gradients(features, prototypes, noise):
    """OpenOOD's `_compute_grad_directly` on precomputed features (float32)."""
    everything = torch.cat([prototypes, noise[None]])
    vectors = features[:, None, :] - everything[None]  # [B, C + 1, D]
    ncc = -torch.norm(vectors, dim=2)
    return ncc.softmax(-1)[:, -1:] * F.normalize(vectors[:, -1, :])


def _openood_autograd_gradients(features, prototypes, noise, predicted):
    """OpenOOD's default `_compute_grad`: the loss over the batch, one autograd.grad per sample."""
    mu_o = noise.clone().requires_grad_()
    everything = torch.cat([prototypes, mu_o[None]])
    ncc = -torch.norm(features[:, None, :] - everything[None], dim=2)
    losses = F.cross_entropy(ncc, predicted, reduction="none")
    return torch.cat([torch.autograd.grad(loss, mu_o, retain_graph=True)[0][None] for loss in losses])


@pytest.mark.parametrize("implementation", ["gradood", "openood", "openood_autograd"])
@pytest.mark.parametrize("case", list(GROOD_CASES))
def test_grood_score(benchmark, case, implementation):
    batch = GROOD_CASES[case]
    if implementation == "openood_autograd" and batch > 64:
        pytest.skip("one backward per sample: B = 64 only")
    model, fit, labels, features = _setup(batch, GROOD_BANK)
    logits = model(features).detach()
    detector = GrOOD(model).fit([(fit[i : i + 1000], labels[i : i + 1000]) for i in range(0, GROOD_BANK, 1000)])
    g64 = prototype_gradients(features.double(), detector.prototypes, detector.ood_prototype)
    expected = -torch.cdist(g64, detector.bank.double()).square().min(1).values
    if implementation == "gradood":

        def run():
            return detector.score_features(logits, features)

    else:
        faiss = _faiss()
        prototypes, noise = detector.prototypes.float(), detector.ood_prototype.float()
        bank = detector.bank.numpy()
        samples = len(bank)
        train = min(600, int(samples * 0.8))  # OpenOOD: nlist = 4 sqrt(train samples), nprobe = 4
        quantizer = faiss.IndexFlatL2(DIMS)
        index = faiss.IndexIVFFlat(quantizer, DIMS, int(4 * math.sqrt(train)), faiss.METRIC_L2)
        index.train(bank)
        index.add(bank)
        index.nprobe = 4
        predicted = logits.argmax(1)

        def run():
            if implementation == "openood":
                with torch.no_grad():
                    grads = _openood_direct_gradients(features, prototypes, noise)
            else:
                grads = _openood_autograd_gradients(features, prototypes, noise, predicted)
            distances, _ = index.search(grads.numpy(), 1)
            return torch.from_numpy(-distances[:, -1])

    benchmark.group = f"grood-score-{case}-N{GROOD_BANK}-k1"
    benchmark.extra_info["max_abs_err_vs_float64"] = float((run().double() - expected).abs().max())
    benchmark.extra_info["max_abs_score_float64"] = float(expected.abs().max())
    slow = implementation == "openood_autograd"  # ~50 s a call
    benchmark.pedantic(run, rounds=2 if slow else 10, iterations=1, warmup_rounds=0 if slow else 1)
