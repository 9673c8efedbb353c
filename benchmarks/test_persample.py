"""Full-network per-sample gradient norms, every implementation in one run:

    gradood         gradood.persample_grad_norms (one forward, one backward)
    training_step   one plain forward + backward with parameter gradients (the reference cost)
    vmap_grad       torch.func vmap(grad) over the batch, then the norms
    loop            one backward per sample; timed on LOOP_SUBSET samples, the median
                    extrapolated to B in extra_info["extrapolated_median_s"]
    opacus_ghost    Opacus's GradSampleModuleFastGradientClipping (ghost clipping), norms only
    backpack_l2     BackPACK's BatchL2Grad, summed over parameters

    cd benchmarks && python -m pytest test_persample.py --benchmark-json=persample.json

Cases: ResNet-18 (CIFAR variant) at 32×32, float32, B=32 on the CPU (256 on CUDA), with eval-mode
BatchNorm ("batch") and with GroupNorm(32) ("group"; Opacus refuses BatchNorm). The peers run
where they can (opacus and backpack-for-pytorch installed, the model supported); where they fail
the case is skipped with their error as the reason, and where they run, extra_info
["max_rel_err_vs_gradood"] holds their disagreement with gradood's norms. Opacus captures
activations in train mode only: it gets a train-mode copy, which computes the same function for
these models' GroupNorm variant. Both fail on in-place ReLU: they get a copy without.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradood
from models import ResNet18Cifar

IMPLEMENTATIONS = ["gradood", "training_step", "vmap_grad", "loop", "opacus_ghost", "backpack_l2"]
LOOP_SUBSET = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BATCH = {"cpu": 32, "cuda": 256}


def _ce_pred(logits):
    return F.cross_entropy(logits, logits.argmax(1), reduction="none")


def _without_inplace(model):
    """A copy whose ReLUs are not in place (both peers' backward hooks fail on them)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return model


def _opacus_runner(model, inputs):
    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    wrapped = GradSampleModuleFastGradientClipping(
        _without_inplace(model).train(), batch_first=True, loss_reduction="sum", use_ghost_clipping=True
    )

    def norms():
        wrapped.zero_grad(set_to_none=True)
        _ce_pred(wrapped(inputs)).sum().backward()
        return wrapped.get_norm_sample()

    return norms


def _backpack_runner(model, inputs):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    extended = extend(_without_inplace(model))
    loss_function = extend(torch.nn.CrossEntropyLoss(reduction="sum"))

    def norms():
        extended.zero_grad(set_to_none=True)
        logits = extended(inputs)
        with backpack(BatchL2Grad()):
            loss_function(logits, logits.argmax(1)).backward()
        missing = [name for name, p in extended.named_parameters() if not hasattr(p, "batch_l2")]
        if missing:
            raise NotImplementedError(f"BatchL2Grad computed nothing for {len(missing)} parameters, e.g. {missing[:3]}")
        return torch.stack([p.batch_l2 for p in extended.parameters()]).sum(0).sqrt()

    return norms


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("device", DEVICES)
def test_resnet18_cifar(benchmark, device, norm, implementation):
    torch.manual_seed(0)
    model = ResNet18Cifar(norm=norm).to(device).eval()
    batch = BATCH[device]
    inputs = torch.randn(batch, 3, 32, 32, device=device)
    benchmark.group = f"resnet18-cifar-{norm}norm-{device}-B{batch}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if implementation in ("opacus_ghost", "backpack_l2"):
        pytest.importorskip("opacus" if implementation == "opacus_ghost" else "backpack")
        try:
            peer = (_opacus_runner if implementation == "opacus_ghost" else _backpack_runner)(model, inputs)
            peer_norms = peer()
        except Exception as error:  # the peer's own failure is the result
            pytest.skip(f"{implementation} fails: {type(error).__name__}: {str(error)[:200]}")
        expected = gradood.persample_grad_norms(model, inputs).norms
        benchmark.extra_info["max_rel_err_vs_gradood"] = float(((peer_norms - expected).abs() / expected).max())

        def run():
            peer()
            sync()

    elif implementation == "gradood":

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
    if implementation == "loop" and benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["extrapolated_median_s"] = benchmark.stats.stats.median * batch / LOOP_SUBSET
    model.zero_grad(set_to_none=True)
