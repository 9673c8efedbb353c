"""The sum of tensors in order, typed as a tensor (the builtin `sum` starts from the int 0)."""

from __future__ import annotations

import functools
import operator
from typing import Iterable

import torch


def sum_tensors(parts: Iterable[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ..., left to right; at least one part."""
    return functools.reduce(operator.add, parts)
