"""Low-dimensional gradient projection G_low = g M − c [B, K], every implementation in one run:

    gradood        gradood.persample_gradients + GradientSubspace.project (one forward, one
                   backward, per-layer per-sample gradients of bounded chunks, one product each)
    vmap_matmul    torch.func vmap(grad) materialising the [B, |θ|] per-sample gradients,
                   flattened, times M (the official code's route)
    jvp            K forward-mode JVPs along the directions (torch.func.jvp, vmapped over
                   JVP_CHUNK directions at a time): the official code's other route; on the
                   ResNet cases timed on JVP_SUBSET directions, the median extrapolated to K
                   in extra_info["extrapolated_median_s"]
    training_step  one plain forward + backward with parameter gradients (the reference cost)

extra_info["samples_per_s"] holds the throughput; on CUDA, extra_info["peak_extra_cuda_bytes"]
the peak memory the run allocates beyond the model, inputs and directions.

    cd benchmarks && python -m pytest test_lowdim.py --benchmark-json=lowdim.json

Cases: CPU — the demo's DigitsCNN (8×8 inputs, all its parameters), B=256, K=200; ResNet-18
(CIFAR variant) restricted to the last stage + head, B=32, K=200 (M: 8.4M×200 float32 = 6.7 GB).
CUDA — ResNet-18 (CIFAR variant, 32×32), B=128, K=200, |θ| restricted to the last
stage + head ("layers.6"–"layers.7", "fc") and unrestricted (M: 11.2M×200 float32 = 9 GB).
"""

from __future__ import annotations

import pytest
import torch

import gradood
from gradood.demo import DigitsCNN
from gradood.gradient_subspace import GradientSubspace
from models import ResNet18Cifar

IMPLEMENTATIONS = ["gradood", "vmap_matmul", "jvp", "training_step"]
K = 200
JVP_CHUNK = 8
JVP_SUBSET = 16


def _last_stage(name: str) -> bool:
    return name.startswith(("layers.6.", "layers.7.", "fc."))


CASES = {
    "digits_cnn-cpu": ("cpu", DigitsCNN, (1, 8, 8), 256, None),
    "resnet18_last_stage-cpu": ("cpu", ResNet18Cifar, (3, 32, 32), 32, _last_stage),
}
if torch.cuda.is_available():
    CASES["resnet18_last_stage-cuda"] = ("cuda", ResNet18Cifar, (3, 32, 32), 128, _last_stage)
    CASES["resnet18_full-cuda"] = ("cuda", ResNet18Cifar, (3, 32, 32), 128, None)


def _subspace(model, select, device):
    generator = torch.Generator().manual_seed(0)
    named = {n: p for n, p in model.named_parameters() if select is None or select(n)}
    mean = {n: torch.zeros(p.numel(), device=device) for n, p in named.items()}
    inv_std = {n: torch.ones(p.numel(), device=device) for n, p in named.items()}
    directions = {n: torch.randn(K, p.numel(), generator=generator).div_(p.numel() ** 0.5).to(device) for n, p in named.items()}
    return GradientSubspace(mean, inv_std, directions, {n: tuple(p.shape) for n, p in named.items()})


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_projection(benchmark, case, implementation):
    device, model_class, shape, batch, select = CASES[case]
    torch.manual_seed(0)
    model = model_class().to(device).eval()
    inputs = torch.randn(batch, *shape, device=device)
    subspace = _subspace(model, select, device)
    names = list(subspace.scaled_directions)
    benchmark.group = f"lowdim-{case}-B{batch}-K{K}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    params = {n: p.detach() for n, p in model.named_parameters()}
    frozen = {**{n: p for n, p in params.items() if n not in names}, **{n: b.detach() for n, b in model.named_buffers()}}

    def loss(selected, x):
        return torch.logsumexp(torch.func.functional_call(model, {**frozen, **selected}, (x,)), dim=1)

    selected = {n: params[n] for n in names}
    if implementation == "gradood":
        selection = None if select is None else names

        def run():
            subspace.project(gradood.persample_gradients(model, inputs, "logsumexp", params=selection))
            sync()

    elif implementation == "vmap_matmul":
        per_sample = torch.func.vmap(torch.func.grad(lambda p, x: loss(p, x[None]).sum()), in_dims=(None, 0))
        flat_m = torch.cat([subspace.scaled_directions[n] for n in names], 1)  # [K, |θ|]

        def run():
            grads = per_sample(selected, inputs)
            torch.cat([grads[n].reshape(batch, -1) for n in names], 1) @ flat_m.T
            sync()

    elif implementation == "jvp":
        tangents = {n: subspace.scaled_directions[n].reshape(K, *params[n].shape) for n in names}

        def along(tangent):
            return torch.func.jvp(lambda p: loss(p, inputs), (selected,), (tangent,))[1]

        chunked = torch.func.vmap(along)

        directions = K if model_class is DigitsCNN else JVP_SUBSET

        def run():
            outputs = [chunked({n: t[start : start + JVP_CHUNK] for n, t in tangents.items()})
                       for start in range(0, directions, JVP_CHUNK)]
            torch.cat(outputs).T
            sync()

    else:

        def run():
            model.zero_grad(set_to_none=True)
            torch.logsumexp(model(inputs), dim=1).sum().backward()
            sync()

    run()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    benchmark.pedantic(run, rounds=5, iterations=1)
    if device == "cuda":  # beyond the model, inputs and directions
        benchmark.extra_info["peak_extra_cuda_bytes"] = torch.cuda.max_memory_allocated() - baseline
    if benchmark.stats is None:  # --benchmark-disable: the run was a smoke test
        return
    median = benchmark.stats.stats.median
    if implementation == "jvp" and directions < K:
        median *= K / directions
        benchmark.extra_info["extrapolated_median_s"] = median
    benchmark.extra_info["samples_per_s"] = batch / median
    benchmark.extra_info["parameters"] = sum(params[n].numel() for n in names)
    model.zero_grad(set_to_none=True)
