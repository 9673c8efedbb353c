"""`python -m gradood`: score a random batch with a small classifier.

A runnable example until the `gradood demo` job exists: it builds a small
MLP classifier on Gaussian classes, scores an in-distribution batch and a
near-OOD batch (midpoints between classes) with several detectors, and
prints mean scores and AUROC per detector.
"""

from __future__ import annotations

import torch
from torch import nn

import gradood


def main() -> None:
    torch.manual_seed(0)
    num_features, num_classes, batch = 64, 10, 256
    backbone = nn.Sequential(nn.Linear(32, num_features), nn.ReLU())
    head = nn.Linear(num_features, num_classes)
    # Train briefly on a separable toy task so the classifier is confident in-distribution.
    centers = torch.randn(num_classes, 32) * 3
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(200):
        labels = torch.randint(0, num_classes, (batch,))
        inputs = centers[labels] + torch.randn(batch, 32)
        loss = nn.functional.cross_entropy(head(backbone(inputs)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    with torch.no_grad():
        id_inputs = centers[torch.randint(0, num_classes, (batch,))] + torch.randn(batch, 32)
        # Near-OOD: midpoints between two class centres, where no class was trained.
        pairs = torch.randint(0, num_classes, (2, batch))
        ood_inputs = (centers[pairs[0]] + centers[pairs[1]]) / 2 + torch.randn(batch, 32)
        id_features, ood_features = backbone(id_inputs), backbone(ood_inputs)
        id_logits, ood_logits = head(id_features), head(ood_features)

    detectors = {
        "MSP": lambda logits, features: gradood.scores.msp(logits),
        "Energy": lambda logits, features: gradood.scores.energy(logits),
        "GradNorm": gradood.scores.gradnorm,
        "ExGrad": gradood.scores.exgrad,
        "GRODIN last layer": gradood.scores.grodin_last_layer,
        "RG (clip=1)": gradood.scores.rg,
        "Energy x L1 (UV)": gradood.scores.uv,
    }
    print(f"gradood {gradood.__version__}: {batch} ID and {batch} near-OOD samples, C={num_classes}, D={num_features}")
    print(f"{'detector':<20} {'mean ID score':>14} {'mean OOD score':>15} {'AUROC':>7}")
    for name, score in detectors.items():
        id_scores, ood_scores = score(id_logits, id_features), score(ood_logits, ood_features)
        print(
            f"{name:<20} {id_scores.mean().item():>14.4f} {ood_scores.mean().item():>15.4f} "
            f"{gradood.metrics.auroc(id_scores, ood_scores):>7.4f}"
        )


if __name__ == "__main__":
    main()
