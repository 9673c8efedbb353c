"""Do the peers compute per-sample gradient norms correctly? Opacus (ghost clipping) and
BackPACK (BatchL2Grad) against a per-sample backward loop, all in float64, on models
that exercise what they claim or do not claim to support. Prints a Markdown table:
the largest relative error over the batch, or the peer's failure.

    cd benchmarks && python persample_peers.py      (needs opacus and backpack-for-pytorch)
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import gradood
from models import ResNet18Cifar
from test_persample import _backpack_runner, _opacus_runner


def _loop(model, inputs):
    model = copy.deepcopy(model)
    norms = []
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(inputs[i : i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        norms.append(torch.stack([p.grad.square().sum() for p in model.parameters() if p.grad is not None]).sum().sqrt())
    return torch.stack(norms)


def _models():
    torch.manual_seed(0)
    grouped = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 6 * 6, 5),
    )
    layer_norm = nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    return {
        "ResNet-18 CIFAR, eval BatchNorm": (ResNet18Cifar(), torch.randn(4, 3, 32, 32)),
        "ResNet-18 CIFAR, GroupNorm": (ResNet18Cifar(norm="group"), torch.randn(4, 3, 32, 32)),
        "grouped + depthwise conv": (grouped, torch.randn(4, 4, 6, 6)),
        "MLP with LayerNorm": (layer_norm, torch.randn(4, 10)),
    }


def main() -> None:
    peers = {"gradood": None, "Opacus ghost clipping": _opacus_runner, "BackPACK BatchL2Grad": _backpack_runner}
    print("| model | " + " | ".join(peers) + " |")
    print("|---" * (len(peers) + 1) + "|")
    for name, (model, inputs) in _models().items():
        model, inputs = model.double().eval(), inputs.double()
        expected = _loop(model, inputs)
        cells = []
        for peer in peers.values():
            try:
                norms = gradood.persample_grad_norms(model, inputs).norms if peer is None else peer(model, inputs)()
                error = float(((norms.detach() - expected).abs() / expected).max())
                cells.append(f"{error:.1e}" + (" **wrong**" if error > 1e-6 else ""))
            except Exception as failure:  # the peer's failure is the result
                cells.append(f"fails: {type(failure).__name__}: {str(failure).splitlines()[0][:90]}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
