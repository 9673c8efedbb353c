"""gradood.persample_grad_norms on every torchvision classification model, checked
against a float64 per-sample loop (random weights, 10 classes, B=2).

    python benchmarks/persample_zoo.py [--device cpu|cuda] [--max-params 120e6] [name ...]

Per model: the options it needed (none; functional_params="broadcast" for a
ViT's class token and position embedding; fallback="torch.func" for modules
without a rule), the first and second call's time in float32 (the first also
runs the layout probe), and the largest relative error against the loop in
float64 and float32. The loss is "logsumexp": with random weights some deep
models' softmax saturates, and the predicted-label cross-entropy's gradient is
then exactly zero. Needs torchvision.
"""

from __future__ import annotations

import argparse
import time

import torch

import gradood
from gradood.testing import import_torchvision

models = import_torchvision().models  # plain import where torchvision matches torch (a test-machine workaround)

OPTIONS = ({}, {"functional_params": "broadcast"}, {"fallback": "torch.func", "functional_params": "broadcast"})


def build(name: str):
    kwargs, size = {"num_classes": 10}, 64
    if name.startswith(("swin", "maxvit")):
        size = 224
    if name.startswith("vit"):
        size = kwargs["image_size"] = 28 if name == "vit_h_14" else 32
    if name.startswith(("inception", "googlenet")):
        kwargs.update(aux_logits=False, init_weights=False)
        size = 80 if name.startswith("inception") else size
    return models.get_model(name, **kwargs).eval(), size


def loop_norms(model, inputs):
    norms = []
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        torch.logsumexp(model(inputs[i : i + 1]), 1).sum().backward()
        norms.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None).sqrt())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


def check(name: str, device: str, max_params: float) -> str:
    model, size = build(name)
    count = sum(p.numel() for p in model.parameters())
    if count > max_params:
        return f"| {name} | {count / 1e6:.1f}M | skipped (over --max-params) | | | | |"
    model = model.to(device)
    inputs = torch.randn(2, 3, size, size, device=device)
    errors = []
    for options in OPTIONS:
        try:
            start = time.perf_counter()
            result = gradood.persample_grad_norms(model, inputs, loss="logsumexp", **options)
            first = time.perf_counter() - start
            start = time.perf_counter()
            gradood.persample_grad_norms(model, inputs, loss="logsumexp", **options)
            again = time.perf_counter() - start
            break
        except ValueError as error:
            errors.append(str(error).splitlines()[0][:120])
    else:
        return f"| {name} | {count / 1e6:.1f}M | error: {errors[-1]} | | | | |"
    model64, inputs64 = model.double(), inputs.double()
    expected = loop_norms(model64, inputs64)
    norms64 = gradood.persample_grad_norms(model64, inputs64, loss="logsumexp", **options).norms
    error64 = ((norms64 - expected).abs() / expected).max().item()
    error32 = ((result.norms.double() - expected).abs() / expected).max().item()
    used = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
    return f"| {name} | {count / 1e6:.1f}M | {used} | {first:.2f} | {again:.2f} | {error64:.1e} | {error32:.1e} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-params", type=float, default=120e6)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = args.names or sorted(models.list_models(module=models))
    print("| model | parameters | options | first call (s) | second call (s) | rel. error float64 | rel. error float32 |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        print(check(name, args.device, args.max_params), flush=True)


if __name__ == "__main__":
    main()
