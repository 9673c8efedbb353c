"""Tools for tests and benchmarks.

Autograd oracles, the literal per-sample backward pass the closed forms replace:
each runs one `backward()` per sample through a real `nn.Linear`, as the
official GradNorm code does, and reads the gradient the layer receives. It
works on a float64 copy of the layer, so the caller's module is never touched
(no `.grad` written). Slow by design.

peak_memory_bytes: the peak memory of one call, on CPU or CUDA.

import_torchvision: torchvision's Python side on a machine whose torchvision
wheel was built for another torch (a test-machine workaround; see there).
"""

from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ORACLE_LOSSES", "autograd_lastlayer_grad_norm", "peak_memory_bytes", "import_torchvision"]

#: Per-sample losses of the oracle. "all_ones_ce" is the official GradNorm
#: code's loss, Σ_c -log softmax(f/T)_c (C times the KL-to-uniform gradient).
ORACLE_LOSSES = ("kl_uniform", "all_ones_ce", "ce_pred", "expected_ce", "energy")


def _loss(logits: torch.Tensor, loss: str, temperature: float, label: int) -> torch.Tensor:
    """The per-sample loss of a single row of logits [C]."""
    log_probs = F.log_softmax(logits / temperature, dim=0)
    if loss == "kl_uniform":  # KL(u ‖ p) = Σ_c u (log u - log p_c)
        num_classes = logits.shape[0]
        return (-math.log(num_classes) - log_probs).sum() / num_classes
    if loss == "all_ones_ce":
        return -log_probs.sum()
    if loss == "energy":
        return temperature * torch.logsumexp(logits / temperature, dim=0)
    # ce_pred and each label of expected_ce: CE(f/T, label)
    return -log_probs[label]


def _flat_grad(layer: nn.Linear, include_bias: bool) -> torch.Tensor:
    if layer.weight.grad is None or (include_bias and (layer.bias is None or layer.bias.grad is None)):
        raise RuntimeError("autograd_lastlayer_grad_norm: the head got no gradient")
    grads = [layer.weight.grad.reshape(-1)]
    if include_bias and layer.bias is not None and layer.bias.grad is not None:
        grads.append(layer.bias.grad.reshape(-1))
    return torch.cat(grads)


def autograd_lastlayer_grad_norm(
    layer: nn.Linear,
    features: torch.Tensor,
    loss: str,
    p: float,
    temperature: float = 1.0,
    include_bias: bool = False,
) -> torch.Tensor:
    """‖∇_{W(,b)} L(layer(v_i))‖_p for every row v_i of features [B, D], by autograd.

    loss: one of ORACLE_LOSSES. For "expected_ce" it is E_{y~p} of the norm of
    ∇ CE(f/T, y), one backward pass per label y, with p = softmax(f/T) of the
    sample. Computed in float64; returns float64 [B].
    """
    if loss not in ORACLE_LOSSES:
        raise ValueError(f"autograd_lastlayer_grad_norm: loss must be one of {ORACLE_LOSSES}, got {loss!r}")
    if include_bias and layer.bias is None:
        raise ValueError("autograd_lastlayer_grad_norm: include_bias=True needs a layer with a bias")
    layer = copy.deepcopy(layer).double()
    features = features.detach().double()
    norms = []
    for row in features:
        logits = layer(row).detach()
        predicted = int(logits.argmax())
        if loss == "expected_ce":
            label_probs = torch.softmax(logits / temperature, dim=0)
            labels = list(range(logits.shape[0]))
        else:
            label_probs = torch.ones(1, dtype=torch.float64)
            labels = [predicted]
        expected = torch.zeros((), dtype=torch.float64)
        for weight, label in zip(label_probs, labels):
            layer.zero_grad(set_to_none=True)
            _loss(layer(row), loss, temperature, label).backward()
            expected += weight * torch.linalg.vector_norm(_flat_grad(layer, include_bias), ord=p)
        norms.append(expected)
    return torch.stack(norms)


def peak_memory_bytes(function: Callable[[], object], device: str = "cpu") -> int:
    """Bytes allocated at the peak of `function()` beyond those allocated when it starts.

    CUDA: the caching allocator's counters (torch.cuda.max_memory_allocated).
    CPU: torch's profiler with profile_memory=True records every allocation and
    free made through PyTorch's CPU allocator during the call, with its size and
    time; the peak is the largest running sum of those sizes in time order (a
    free of memory allocated before the call lowers it). Deterministic for a
    deterministic function."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    )
    running = peak = 0
    for _, size in events:
        running += size
        peak = max(peak, running)
    return peak


def import_torchvision():
    """torchvision, imported with its compiled operators skipped if they do not load.

    A test-machine workaround: where the only torchvision wheel available was built
    for a different torch (here a CUDA build beside a CPU torch), `import torchvision`
    fails in torchvision._meta_registrations, which registers fake kernels for
    operators (nms, roi_align, ...) whose library did not load. With that module
    replaced by an empty one, the Python side — torchvision.models, torchvision.ops.misc,
    and so timm — imports and runs; only the compiled operators are missing. On a
    machine whose torchvision matches its torch this is a plain import. Raises
    ImportError when torchvision is not installed."""
    import sys
    import types

    try:
        import torchvision

        return torchvision
    except ModuleNotFoundError as error:
        if error.name == "torchvision":
            raise
        problem: Exception = error
    except (ImportError, RuntimeError) as error:  # RuntimeError: "operator torchvision::nms does not exist"
        problem = error
    if "torchvision" not in str(problem):
        raise problem
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    import torchvision

    return torchvision
