"""Writes model.pt (a scripted gradood.OODHead: a small CNN with RG scores),
model.pt2 (the same head packaged with AOTInductor, where torch has it),
inputs.pt (a TorchScript module holding a batch) and expected.txt (what
score_batch must print) into the folder given.

    python examples/cpp/make_model.py OUT_DIR
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from torch import nn

import gradood


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.features(x))


class Inputs(nn.Module):
    def __init__(self, inputs: torch.Tensor):
        super().__init__()
        self.inputs = inputs

    def forward(self) -> torch.Tensor:
        return self.inputs


def main(out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    model = SmallCNN().eval()
    inputs = torch.randn(6, 3, 8, 8)
    head = gradood.OODHead(model, gradood.detectors.RG(model, clip=0.5), example_inputs=inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's deprecation notice
        torch.jit.script(head).save(os.path.join(out_dir, "model.pt"))
        torch.jit.script(Inputs(inputs)).save(os.path.join(out_dir, "inputs.pt"))
    if hasattr(torch._inductor, "aoti_compile_and_package"):
        exported = torch.export.export(head, (inputs,))
        torch._inductor.aoti_compile_and_package(exported, package_path=os.path.join(out_dir, "model.pt2"))
    with torch.no_grad():
        logits, scores = head(inputs)
    probability, label = torch.softmax(logits, 1).max(1)
    with open(os.path.join(out_dir, "expected.txt"), "w") as handle:
        for i in range(inputs.shape[0]):
            handle.write(f"{label[i].item()} {probability[i].item():.9g} {scores[i].item():.9g}\n")


if __name__ == "__main__":
    main(sys.argv[1])
