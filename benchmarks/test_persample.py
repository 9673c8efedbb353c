"""Full-network per-sample gradient norms, every implementation in one run, time and
peak memory:

    gradood         gradood.persample_grad_norms (one forward, one backward)
    training_step   one plain forward + backward with parameter gradients (the reference cost)
    training_step_fp32
                    the same on CUDA with TF32 off (cuDNN allows TF32 convolutions by default,
                    while gradood's norm kernels compute in full float32): the like-for-like floor
    vmap_grad       torch.func vmap(grad) over the batch, then the norms; in chunks of samples
                    when the whole batch runs out of memory (extra_info["vmap_chunk"])
    loop            one backward per sample; timed on LOOP_SUBSET samples, the median
                    extrapolated to B in extra_info["extrapolated_median_s"]
    opacus_ghost    Opacus's GradSampleModuleFastGradientClipping (ghost clipping), norms only
    backpack_l2     BackPACK's BatchL2Grad, summed over parameters

    cd benchmarks && python -m pytest test_persample.py --benchmark-json=persample.json
    python summarize.py persample.json

Cases, float32, CE at the predicted label:
- resnet18_cifar-{batch,group}: ResNet-18 (CIFAR variant, models.py) at 32×32, B=32 on the CPU,
  256 on CUDA, with eval-mode BatchNorm and with GroupNorm(32) (Opacus refuses BatchNorm).
- mnist_mlp-B{1,8,128} and mnist_cnn-B{1,8,128} (models.py): the small models, where per-sample
  gradients are cheap to materialise and fixed overheads count, at 28×28 on every device.
- resnet50-{batch,group} and vit_b_16: torchvision's models at 224×224, B=64, on CUDA only (the
  issue's GPU sizes; torchvision has no CPU wheel on the CI machines). ViT-B/16's class token and
  position embedding go through functional_params="broadcast".
Every implementation's peak memory above the model and batch (gradood.testing.peak_memory_bytes:
the CUDA allocator's counter, or the CPU profiler's timeline) is in extra_info["peak_mib"],
measured in one untimed call. The peers run where they can (opacus and backpack-for-pytorch
installed, the model supported); where they fail the case is skipped with their error as the
reason, and where they run, extra_info["max_rel_err_vs_gradood"] holds their disagreement with
gradood's norms. Opacus captures activations in train mode only: it gets a train-mode copy, which
computes the same function for the GroupNorm variants. Both fail on in-place ReLU: they get a copy
without.
"""

from __future__ import annotations

import contextlib
import copy
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import gradood
from gradood.testing import peak_memory_bytes
from models import ResNet18Cifar, mnist_cnn, mnist_mlp, norm_layer

IMPLEMENTATIONS = ["gradood", "training_step", "training_step_fp32", "vmap_grad", "loop", "opacus_ghost", "backpack_l2"]
LOOP_SUBSET = 4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = ["resnet18_cifar-batch", "resnet18_cifar-group", "resnet50-batch", "resnet50-group", "vit_b_16"] + [
    f"{arch}-B{batch}" for arch in ("mnist_mlp", "mnist_cnn") for batch in (1, 8, 128)
]


def _case(name: str, device: str):
    """(model in eval mode, inputs, keyword arguments of gradood) for a case on a device."""
    arch, _, norm = name.partition("-")
    if arch in ("mnist_mlp", "mnist_cnn"):
        build = mnist_mlp if arch == "mnist_mlp" else mnist_cnn
        return build().eval(), torch.randn(int(norm[1:]), 1, 28, 28), {}
    if arch == "resnet18_cifar":
        batch = 32 if device == "cpu" else 256
        return ResNet18Cifar(norm=norm).eval(), torch.randn(batch, 3, 32, 32), {}
    if device != "cuda":
        pytest.skip(f"{arch} at 224x224, B=64 is a GPU case")
    models = pytest.importorskip("torchvision.models")
    if arch == "resnet50":
        return models.resnet50(norm_layer=partial(norm_layer, norm)).eval(), torch.randn(64, 3, 224, 224), {}
    return models.vit_b_16().eval(), torch.randn(64, 3, 224, 224), {"functional_params": "broadcast"}


def _ce_pred(logits):
    return F.cross_entropy(logits, logits.argmax(1), reduction="none")


def _bottleneck_out_of_place(block, x):
    """torchvision's Bottleneck.forward with `out = out + identity` for its `out += identity`."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.relu(block.bn3(block.conv3(out)) + identity)


def _without_inplace(model):
    """A copy computing the same function with no in-place op (both peers' backward hooks
    fail on in-place ReLU and on torchvision's in-place residual add)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
        if type(module).__name__ == "Bottleneck" and hasattr(module, "conv3"):
            module.forward = types.MethodType(_bottleneck_out_of_place, module)
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


@contextlib.contextmanager
def _tf32(enabled: bool):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _vmap_norms(model, inputs):
    """torch.func per-sample gradients and their norms, over the whole batch or, when that
    runs out of memory, over the largest power-of-two chunk of samples that fits."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, x):
        return _ce_pred(torch.func.functional_call(model, (p, buffers), (x[None],))).sum()

    per_sample_grad = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))

    def norms_of(chunk):
        grads = per_sample_grad(params, chunk)
        return torch.stack([g.reshape(chunk.shape[0], -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()

    chunk = inputs.shape[0]
    while True:
        try:
            norms_of(inputs[:chunk])
            break
        except torch.OutOfMemoryError:
            if chunk == 1:
                raise
            chunk //= 2
            torch.cuda.empty_cache()
    return chunk, lambda: torch.cat([norms_of(part) for part in inputs.split(chunk)])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", DEVICES)
def test_persample_norms(benchmark, device, case, implementation):
    torch.manual_seed(0)
    model, inputs, options = _case(case, device)
    model, inputs = model.to(device), inputs.to(device)
    batch = inputs.shape[0]
    benchmark.group = f"persample-{case}-{device}-B{batch}"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if implementation in ("opacus_ghost", "backpack_l2"):
        pytest.importorskip("opacus" if implementation == "opacus_ghost" else "backpack")
        try:
            peer = (_opacus_runner if implementation == "opacus_ghost" else _backpack_runner)(model, inputs)
            peer_norms = peer()
        except Exception as error:  # the peer's own failure is the result
            pytest.skip(f"{implementation} fails: {type(error).__name__}: {str(error)[:200]}")
        expected = gradood.persample_grad_norms(model, inputs, **options).norms
        benchmark.extra_info["max_rel_err_vs_gradood"] = float(((peer_norms - expected).abs() / expected).max())

        def run():
            peer()
            sync()

    elif implementation == "gradood":

        def run():
            gradood.persample_grad_norms(model, inputs, **options)
            sync()

    elif implementation == "training_step_fp32":
        if device != "cuda":
            pytest.skip("TF32 is a CUDA setting")

        def run():
            with _tf32(False):
                model.zero_grad(set_to_none=True)
                _ce_pred(model(inputs)).mean().backward()
                sync()

    elif implementation == "training_step":

        def run():
            model.zero_grad(set_to_none=True)
            _ce_pred(model(inputs)).mean().backward()
            sync()

    elif implementation == "vmap_grad":
        try:
            chunk, vmap_norms = _vmap_norms(model, inputs)
        except Exception as error:  # e.g. an op without a batching rule: the failure is the result
            pytest.skip(f"vmap_grad fails: {type(error).__name__}: {str(error)[:200]}")
        benchmark.extra_info["vmap_chunk"] = chunk

        def run():
            vmap_norms()
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
    model.zero_grad(set_to_none=True)  # the step's and the loop's .grad count in their peak
    benchmark.extra_info["peak_mib"] = peak_memory_bytes(run, device) / 2**20
    benchmark.pedantic(run, rounds=5, iterations=1)
    if implementation == "loop" and benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["extrapolated_median_s"] = benchmark.stats.stats.median * batch / LOOP_SUBSET
    model.zero_grad(set_to_none=True)
