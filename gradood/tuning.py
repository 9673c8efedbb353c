"""Hyperparameter search by AUROC on a validation split (ID-val vs OOD-val), as
the papers and OpenOOD tune ODIN, GRODIN, ReAct and RG."""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from gradood import metrics
from gradood.detectors import GRODIN, ODIN, RG, ReAct, RGAdditive
from gradood.detectors._base import Data, Detector
from gradood.evaluation import score_data

#: ε in 21 points over [0, 0.004], T in {1, 2, 5, ..., 1000} (GRODIN's grid; ODIN's too).
PERTURBATION_GRID: Dict[str, List[Any]] = {
    "temperature": [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
    "epsilon": [float(x) for x in np.round(np.linspace(0.0, 0.004, 21), 6)],
}
#: Percentiles of ID activations for the clipping threshold (ReAct's sweep).
PERCENTILE_GRID: Dict[str, List[Any]] = {"percentile": [65.0, 80.0, 85.0, 90.0, 95.0, 99.0]}

_DEFAULT_GRIDS = {
    ODIN: PERTURBATION_GRID,
    GRODIN: PERTURBATION_GRID,
    ReAct: PERCENTILE_GRID,
    RG: PERCENTILE_GRID,
    RGAdditive: PERCENTILE_GRID,
}


def default_grid(detector_factory: Callable[..., Detector]) -> Dict[str, List[Any]]:
    """The default grid of a detector class (or a functools.partial of one)."""
    target = detector_factory.func if isinstance(detector_factory, functools.partial) else detector_factory
    if target not in _DEFAULT_GRIDS:
        raise ValueError(
            f"tune: no default grid for {getattr(target, '__name__', target)!r}; pass grid={{name: values}}"
        )
    return _DEFAULT_GRIDS[target]


@dataclass
class TuneResult:
    """table: one dict per setting (its parameters and "auroc"), in grid order;
    best: the setting with the highest AUROC (first on ties) and its AUROC."""

    table: List[Dict[str, Any]]
    best: Dict[str, Any]


def tune(
    detector_factory: Callable[..., Detector],
    grid: Optional[Mapping[str, Sequence[Any]]],
    id_val: Data,
    ood_val: Data,
    fit_data: Optional[Data] = None,
    progress: bool = False,
) -> TuneResult:
    """Grid search: for every combination of `grid`, detector_factory(**setting)
    is built, fitted on `fit_data` (default id_val) where it has ID statistics,
    and scored on id_val and ood_val; the AUROC decides. grid=None takes the
    default grid of the detector class (functools.partial(ODIN, model) and the
    like): the ODIN/GRODIN (T, ε) grid (GRODIN's) or the percentile grid."""
    grid = default_grid(detector_factory) if grid is None else grid
    if not grid:
        raise ValueError("tune: the grid is empty")
    names = list(grid)
    table = []
    for values in itertools.product(*(grid[name] for name in names)):
        setting = dict(zip(names, values))
        detector = detector_factory(**setting)
        if detector.fitted or type(detector).fit is not Detector.fit:
            detector.fit(id_val if fit_data is None else fit_data)
        id_scores = score_data(detector, id_val, "id_val", progress)
        ood_scores = score_data(detector, ood_val, "ood_val", progress)
        table.append({**setting, "auroc": metrics.auroc(id_scores, ood_scores)})
    best = max(table, key=lambda row: row["auroc"])  # max keeps the first of equal rows
    return TuneResult(table, dict(best))
