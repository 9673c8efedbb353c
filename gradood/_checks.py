"""Input validation shared by every public entry point.

Each check raises with a message naming the function, the argument, what was
expected and what was received. Checks read only shapes, dtypes, devices and
Python numbers: they never synchronise with the device.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch

#: Dtypes the compiled kernels accept (they accumulate in float32 or float64).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(tensor: torch.Tensor) -> tuple:
    return tuple(tensor.shape)


def check_matrix(where: str, name: str, tensor: object, what: str) -> None:
    """A non-empty floating-point 2-D tensor [B, n] with B >= 1 and n >= 1."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor {what}, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{where}: {name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() != 2:
        raise ValueError(f"{where}: {name} must be a 2-D tensor {what}, got shape {_shape(tensor)}")
    if tensor.shape[0] == 0:
        raise ValueError(f"{where}: {name} is an empty batch (shape {_shape(tensor)}); pass at least one sample")
    if tensor.shape[1] == 0:
        raise ValueError(f"{where}: {name} must have at least one column {what}, got shape {_shape(tensor)}")


def check_logits(where: str, logits: object) -> None:
    check_matrix(where, "logits", logits, "[B, C]")


def check_features(where: str, features: object, logits: torch.Tensor) -> None:
    """Features [B, D] matching the logits' batch size, dtype and device."""
    check_matrix(where, "features", features, "[B, D]")
    assert isinstance(features, torch.Tensor)
    if features.shape[0] != logits.shape[0]:
        raise ValueError(
            f"{where}: features must have the batch size of logits ({logits.shape[0]}), got shape {_shape(features)}"
        )
    check_same_dtype_device(where, "features", features, logits)


def check_same_dtype_device(
    where: str, name: str, tensor: torch.Tensor, like: torch.Tensor, like_name: str = "logits"
) -> None:
    if tensor.dtype != like.dtype:
        raise TypeError(f"{where}: {name} must have the dtype of {like_name} ({like.dtype}), got {tensor.dtype}")
    if tensor.device != like.device:
        raise ValueError(f"{where}: {name} must be on the device of {like_name} ({like.device}), got {tensor.device}")


def check_kernel_dtype(where: str, name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in KERNEL_DTYPES:
        expected = ", ".join(str(dtype).replace("torch.", "") for dtype in KERNEL_DTYPES)
        raise TypeError(f"{where}: {name} must be one of {expected}, got {tensor.dtype}")


def check_positive(where: str, name: str, value: object, allow_inf: bool = False) -> float:
    """A real number > 0 (finite unless allow_inf); returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or number <= 0 or (math.isinf(number) and not allow_inf):
        bound = "> 0" if allow_inf else "finite and > 0"
        raise ValueError(f"{where}: {name} must be {bound}, got {value!r}")
    return number


def check_counts(where: str, **values: object) -> None:
    """Each value None or an integer ≥ 1 (neighbours, max_samples, dim, ...)."""
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{where}: {name} must be an integer ≥ 1, got {value!r}")


def check_temperature(where: str, temperature: object) -> float:
    return check_positive(where, "temperature", temperature)


def check_real(where: str, name: str, value: object) -> float:
    """A finite real number; returned as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {name} must be a finite real number, got {value!r}")
    return float(value)


def check_class_indices(where: str, name: str, values: torch.Tensor, classes: Optional[int] = None) -> None:
    """Refuse floating-point labels that are not finite whole numbers (.long() would truncate them,
    and turns ±inf into an arbitrary integer), and, given `classes`, labels outside [0, classes)."""
    if values.is_floating_point() and not bool((torch.isfinite(values) & (values == values.round())).all()):
        raise ValueError(f"{where}: {name} must be class indices, got non-integer or non-finite values")
    if classes is not None and values.numel() and not bool(((values >= 0) & (values < classes)).all()):
        low, high = (float(x) if values.is_floating_point() else int(x) for x in (values.min(), values.max()))
        raise ValueError(f"{where}: {name} must lie in [0, {classes}) (the model's classes), got {low}..{high}")


def check_choice(where: str, name: str, value: object, choices: Iterable[str]) -> str:
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"{where}: {name} must be one of {', '.join(map(repr, options))}, got {value!r}")
    assert isinstance(value, str)
    return value


def check_optional_clip(where: str, clip: Optional[float], needed: bool) -> Optional[float]:
    if clip is None:
        if needed:
            raise ValueError(f"{where}: clip is required for v='clipped_l1'")
        return None
    return check_positive(where, "clip", clip, allow_inf=True)
