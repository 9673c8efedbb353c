"""Full-network per-sample gradient norms, every implementation in one run:

    gradood         gradood.persample_grad_norms (one forward, one backward)
    training_step   one plain forward + backward with parameter gradients (the reference cost)
    vmap_grad       torch.func vmap(grad) over the batch, then the norms
    loop            one backward per sample; timed on LOOP_SUBSET samples, the median
                    extrapolated to B in extra_info["extrapolated_median_s"]

    python -m pytest benchmarks/test_persample.py --benchmark-json=persample.json

CPU case: ResNet-18 (CIFAR variant) at 32×32, B=32, float32, eval-mode BatchNorm.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradood
from models import ResNet18Cifar

IMPLEMENTATIONS = ["gradood", "training_step", "vmap_grad", "loop"]
LOOP_SUBSET = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 32, "cuda": 256}


def _ce_pred(logits):
    return F.cross_entropy(logits, logits.argmax(1), reduction="none")


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("device", DEVICES)
def test_resnet18_cifar(benchmark, device, implementation):
    torch.manual_seed(0)
    model = ResNet18Cifar().to(device).eval()
    batch = BATCH[device]
    inputs = torch.randn(batch, 3, 32, 32, device=device)
    benchmark.group = f"resnet18-cifar-{device}-B{batch}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if implementation == "gradood":

        def run():
            gradood.persample_grad_norms(model, inputs)
            sync()

    elif implementation == "training_step":

        def run():
            model.zero_grad(set_to_none=True)
            _ce_pred(model(inputs)).mean().backward()
            sync()

    elif implementation == "vmap_grad":
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = {k: v.detach() for k, v in model.named_buffers()}

        def sample_loss(p, x):
            return _ce_pred(torch.func.functional_call(model, (p, buffers), (x[None],))).sum()

        per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))

        def run():
            grads = per_sample_grad(params, inputs)
            torch.stack([g.reshape(batch, -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
            sync()

    else:
        subset = inputs[:LOOP_SUBSET]

        def run():
            for i in range(subset.shape[0]):
                model.zero_grad(set_to_none=True)
                _ce_pred(model(subset[i : i + 1])).sum().backward()
                torch.stack([p.grad.square().sum() for p in model.parameters()]).sum().sqrt()
            sync()

    run()
    benchmark.pedantic(run, rounds=5, iterations=1)
    if implementation == "loop":
        benchmark.extra_info["extrapolated_median_s"] = benchmark.stats.stats.median * batch / LOOP_SUBSET
    model.zero_grad(set_to_none=True)
