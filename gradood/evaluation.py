"""Evaluation of detectors: scores on ID and OOD data, metrics per OOD set and
their mean, bootstrap spread, throughput; Markdown/JSON reports and optional
PNG plots (matplotlib).

Conventions (docs/conventions.md): scores are ID-high; AUROC is symmetric; `fpr95` is the
papers' FPR at 95% TPR with ID positive and `fpr95_ood_positive` the
OpenOOD/pytorch-ood variant, under its own name.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence, Union

import numpy as np
import torch

from gradood import metrics
from gradood.detectors._base import Data, Detector, iterate_inputs

try:  # a progress bar where tqdm is installed (it is a dependency of gradood)
    from tqdm.auto import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

#: Metric columns of every row, in order.
METRICS = ("auroc", "fpr95", "fpr95_ood_positive", "aupr_in", "aupr_out", "detection_error")


@dataclass
class Evaluation:
    """rows: one dict per (detector, OOD set) and per detector the "mean" over
    OOD sets; scores: per detector, per data set name ("id" and each OOD set),
    the float64 scores; throughput: samples/s per detector."""

    rows: List[dict]
    scores: Dict[str, Dict[str, np.ndarray]]
    throughput: Dict[str, float]
    ood_names: List[str] = field(default_factory=list)

    def table(self, ood_set: str) -> List[dict]:
        return [row for row in self.rows if row["ood_set"] == ood_set]

    def to_markdown(self) -> str:
        """One table per OOD set and one of the means (AUROC ± bootstrap std, FPR95 ± std)."""
        lines = []
        for ood_set in self.ood_names + ["mean"]:
            title = "Mean over OOD sets" if ood_set == "mean" else f"OOD set: {ood_set}"
            lines += [
                f"### {title}",
                "",
                "| detector | AUROC ↑ | FPR95 (ID+) ↓ | FPR95 (OOD+) ↓ | AUPR-in ↑ | AUPR-out ↑ | samples/s |",
                "|---|---|---|---|---|---|---|",
            ]
            for row in self.table(ood_set):
                auroc = f"{row['auroc']:.4f}"
                fpr = f"{row['fpr95']:.4f}"
                if "auroc_std" in row:
                    auroc += f" ± {row['auroc_std']:.4f}"
                    fpr += f" ± {row['fpr95_std']:.4f}"
                lines.append(
                    f"| {row['detector']} | {auroc} | {fpr} | {row['fpr95_ood_positive']:.4f} | "
                    f"{row['aupr_in']:.4f} | {row['aupr_out']:.4f} | {self.throughput[row['detector']]:,.0f} |"
                )
            lines.append("")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"rows": self.rows, "throughput": self.throughput, "ood_sets": self.ood_names}, indent=2)

    def save(self, folder: str, plots: bool = True) -> List[str]:
        """Writes report.md, results.json and, with matplotlib installed and plots
        on, one score-histogram PNG per detector and one ROC PNG per OOD set.
        Returns the paths written."""
        os.makedirs(folder, exist_ok=True)
        written = []
        for name, text in (("report.md", self.to_markdown()), ("results.json", self.to_json())):
            path = os.path.join(folder, name)
            with open(path, "w") as handle:
                handle.write(text)
            written.append(path)
        if plots:
            written += _plots(self, folder)
        return written


def _plots(evaluation: Evaluation, folder: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for detector, by_set in evaluation.scores.items():
        figure, axes = plt.subplots(figsize=(6, 3.5))
        everything = np.concatenate([values[np.isfinite(values)] for values in by_set.values()])
        bins: Any = np.linspace(everything.min(), everything.max(), 50) if everything.size else 50
        for name, values in by_set.items():
            axes.hist(values[np.isfinite(values)], bins=bins, alpha=0.5, density=True, label=name)
        axes.set_title(f"{detector} scores (higher = more in-distribution)")
        axes.legend(fontsize=7)
        written.append(_save(plt, figure, os.path.join(folder, f"hist_{_file_name(detector)}.png")))
    for ood_set in evaluation.ood_names:
        figure, axes = plt.subplots(figsize=(4.5, 4.5))
        for index, (detector, by_set) in enumerate(evaluation.scores.items()):
            fpr, tpr = _roc(by_set["id"], by_set[ood_set])
            axes.plot(fpr, tpr, label=detector, linestyle=("-", "--", ":")[index // 10 % 3])
        axes.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        axes.set_xlabel("FPR (OOD accepted)")
        axes.set_ylabel("TPR (ID accepted)")
        axes.set_title(f"ROC, OOD set {ood_set}")
        axes.legend(fontsize=6)
        written.append(_save(plt, figure, os.path.join(folder, f"roc_{_file_name(ood_set)}.png")))
    return written


def _save(plt, figure, path: str) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _file_name(name: str) -> str:
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in name)


def _roc(id_scores: np.ndarray, ood_scores: np.ndarray):
    thresholds = np.unique(np.concatenate([id_scores, ood_scores]))[::-1]
    tpr, fpr = metrics._rates_at(id_scores, ood_scores, thresholds)
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr])


def score_data(detector: Detector, data: Data, description: str = "", progress: bool = True) -> np.ndarray:
    """The detector's scores of every batch of `data`, as one float64 array."""
    batches = iterate_inputs(data)
    if progress and tqdm is not None and not isinstance(data, torch.Tensor):
        batches = tqdm(batches, desc=description, leave=False, total=_length(data))
    pieces = [detector.score(batch).detach().double().cpu().numpy() for batch in batches]
    if not pieces:
        raise ValueError(f"evaluate: {description or 'the data'} holds no batch")
    return np.concatenate(pieces)


def _length(data) -> Union[int, None]:
    try:
        return len(data)
    except TypeError:
        return None


def _metrics(id_scores: np.ndarray, ood_scores: np.ndarray, bootstrap: int, seed: int) -> dict:
    row = {
        "auroc": metrics.auroc(id_scores, ood_scores),
        "fpr95": metrics.fpr_at_95_tpr(id_scores, ood_scores),
        "fpr95_ood_positive": metrics.fpr_at_95_tpr_ood_positive(id_scores, ood_scores),
        "aupr_in": metrics.aupr_in(id_scores, ood_scores),
        "aupr_out": metrics.aupr_out(id_scores, ood_scores),
        "detection_error": metrics.detection_error(id_scores, ood_scores),
    }
    if bootstrap:
        row["auroc_std"] = metrics.bootstrap(metrics.auroc, id_scores, ood_scores, n=bootstrap, seed=seed).std
        row["fpr95_std"] = metrics.bootstrap(metrics.fpr_at_95_tpr, id_scores, ood_scores, n=bootstrap, seed=seed).std
    return row


def evaluate(
    detectors: Union[Mapping[str, Detector], Sequence[Detector]],
    id_data: Data,
    ood_data: Mapping[str, Data],
    bootstrap: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> Evaluation:
    """Scores ID and every OOD set with every detector and tabulates the metrics.

    detectors: {name: detector} or a list (named by class). id_data and each OOD
    set: a tensor of inputs or an iterable of batches (a DataLoader). bootstrap:
    resamples for the std of AUROC and FPR95 (0 to skip). Throughput counts the
    samples scored per second of scoring (all sets) for each detector. NaN
    scores raise (metrics never drop them).
    """
    if not isinstance(detectors, Mapping):
        detectors = {type(detector).__name__: detector for detector in detectors}
    if not detectors:
        raise ValueError("evaluate: no detector given")
    if not ood_data:
        raise ValueError("evaluate: no OOD set given")
    rows, all_scores, throughput = [], {}, {}
    ood_names = list(ood_data)
    for name, detector in detectors.items():
        start = time.perf_counter()
        by_set = {"id": score_data(detector, id_data, f"{name} on id", progress)}
        for ood_name, data in ood_data.items():
            by_set[ood_name] = score_data(detector, data, f"{name} on {ood_name}", progress)
        elapsed = time.perf_counter() - start
        throughput[name] = sum(values.size for values in by_set.values()) / max(elapsed, 1e-12)
        all_scores[name] = by_set
        per_set = []
        for ood_name in ood_names:
            row = {"detector": name, "ood_set": ood_name, **_metrics(by_set["id"], by_set[ood_name], bootstrap, seed)}
            rows.append(row)
            per_set.append(row)
        mean: Dict[str, Any] = {"detector": name, "ood_set": "mean"}
        for key in per_set[0]:
            if key not in ("detector", "ood_set"):
                mean[key] = float(np.mean([row[key] for row in per_set]))
        rows.append(mean)
    return Evaluation(rows, all_scores, throughput, ood_names)
