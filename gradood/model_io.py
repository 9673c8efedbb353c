"""How gradood talks to a user's model: what a batch of inputs may be and where
the logits are in what the model returns.

Inputs are a tensor (batch first), or a mapping of names to tensors (a tokenised
batch: ``input_ids``, ``attention_mask``, ...; a Hugging Face ``BatchEncoding``),
passed to the model as keyword arguments. Every tensor of a mapping holds the
batch in dimension 0; other values (None, numbers, flags) are passed through.

The logits are what the model returns when that is a tensor [B, C]; the
``logits`` entry of a mapping or a Hugging Face ``ModelOutput``; the first element
of a tuple or list; or whatever a user-given ``logits=`` callable maps the output
to. Anything else is an error that names ``logits=``.

Batches of a DataLoader are inputs, or ``(inputs, labels, ...)`` tuples, or
mappings whose ``labels`` (or ``label``) entry holds the labels and is not passed
to the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

#: A batch of model inputs: a tensor, or keyword arguments of the model.
Inputs = Union[torch.Tensor, Mapping]
#: Maps a model's output to its logits [B, C].
LogitsFn = Optional[Callable[[Any], torch.Tensor]]
#: Entries of a mapping batch that hold labels, not model inputs.
LABEL_KEYS = ("labels", "label")


class Call(NamedTuple):
    """A module's input and output in one forward pass, their version counters
    then (an in-place change since shows), and the module."""

    input: torch.Tensor
    output: torch.Tensor
    input_version: int
    output_version: int
    module: nn.Module

    @property
    def untouched(self) -> bool:
        return self.input._version == self.input_version and self.output._version == self.output_version


def is_mapping(inputs: object) -> bool:
    return isinstance(inputs, Mapping)


def tensors(inputs: Inputs) -> Dict[str, torch.Tensor]:
    """The tensor entries of the inputs ({"": inputs} for a tensor)."""
    if isinstance(inputs, torch.Tensor):
        return {"": inputs}
    return {key: value for key, value in inputs.items() if isinstance(value, torch.Tensor)}


def check_inputs(where: str, inputs: object) -> int:
    """Validates a batch of inputs and returns its batch size."""
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() == 0 or inputs.shape[0] == 0:
            raise ValueError(f"{where}: inputs must be a non-empty batch [B, ...], got shape {tuple(inputs.shape)}")
        return inputs.shape[0]
    if not is_mapping(inputs):
        raise TypeError(
            f"{where}: inputs must be a tensor or a mapping of keyword arguments to tensors (a tokenised batch), "
            f"got {type(inputs).__name__}"
        )
    found = tensors(inputs)  # type: ignore[arg-type]  # is_mapping checked it
    if not found:
        raise ValueError(f"{where}: the inputs mapping holds no tensor (keys {sorted(inputs)})")  # type: ignore[call-overload]
    sizes = {key: (tuple(value.shape)[0] if value.dim() else None) for key, value in found.items()}
    batch = next(iter(sizes.values()))
    if batch in (None, 0) or any(size != batch for size in sizes.values()):
        shapes = ", ".join(f"{key}: {tuple(value.shape)}" for key, value in found.items())
        raise ValueError(
            f"{where}: every tensor of the inputs must hold the same non-empty batch in dimension 0, got {shapes}"
        )
    return batch


def batch_size(inputs: Inputs) -> int:
    return next(iter(tensors(inputs).values())).shape[0]


def map_tensors(inputs: Inputs, function: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
    """The inputs with `function` applied to every tensor (the same kind of container)."""
    if isinstance(inputs, torch.Tensor):
        return function(inputs)
    if not isinstance(inputs, Mapping):
        raise TypeError(
            "inputs must be a tensor or a mapping of keyword arguments to tensors (a tokenised batch), "
            f"got {type(inputs).__name__}; score a DataLoader batch by batch, or use gradood.evaluate"
        )
    return {key: function(value) if isinstance(value, torch.Tensor) else value for key, value in inputs.items()}


def select(inputs: Inputs, index: torch.Tensor) -> Inputs:
    """Rows `index` of every tensor of the inputs."""
    return map_tensors(inputs, lambda tensor: tensor[index.to(tensor.device)])


def to_device(inputs: Inputs, device: Union[str, torch.device]) -> Inputs:
    return map_tensors(inputs, lambda tensor: tensor.to(device))


def detach(inputs: Inputs) -> Inputs:
    return map_tensors(inputs, torch.Tensor.detach)


def call(model: nn.Module, inputs: Inputs) -> Any:
    """model(inputs), or model(**inputs) for a mapping."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    return model(**inputs)


def signature(inputs: Inputs) -> tuple:
    """What a per-sample layout depends on: each tensor's trailing shape, dtype and
    device type, and the other entries' values (by type and repr)."""
    if isinstance(inputs, torch.Tensor):
        return (tuple(inputs.shape[1:]), inputs.dtype, inputs.device.type)
    return tuple(
        (key, tuple(value.shape[1:]), value.dtype, value.device.type)
        if isinstance(value, torch.Tensor)
        else (key, type(value).__name__, repr(value)[:64])
        for key, value in sorted(inputs.items())
    )


def logits_of(where: str, output: Any, logits: LogitsFn = None) -> torch.Tensor:
    """The logits in a model's output (see the module docstring); not yet checked for shape."""
    if logits is not None:
        found = logits(output)
        if not isinstance(found, torch.Tensor):
            raise TypeError(f"{where}: the logits= callable must return a tensor, got {type(found).__name__}")
        return found
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):  # a dict, or a transformers ModelOutput (an OrderedDict)
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        raise ValueError(
            f"{where}: the model returned a {type(output).__name__} without a 'logits' tensor (keys "
            f"{list(output.keys())}); pass logits=<callable mapping the output to logits [B, C]>"
        )
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(
        f"{where}: cannot find the logits in the model's output ({type(output).__name__}); pass "
        "logits=<callable mapping the output to logits [B, C]>"
    )


def checked_logits(where: str, output: Any, batch: int, logits: LogitsFn = None) -> torch.Tensor:
    """logits_of(...), checked to be a floating-point [batch, C] tensor."""
    found = logits_of(where, output, logits)
    if found.dim() != 2 or found.shape[0] != batch or not found.is_floating_point():
        raise ValueError(
            f"{where}: the model's logits must be a floating-point tensor [B, C] with B = {batch}, got "
            f"{tuple(found.shape)} ({found.dtype}); pass logits=<callable> if they are elsewhere in the output"
        )
    return found


def split_batch(batch: Any) -> Tuple[Inputs, Optional[torch.Tensor]]:
    """(inputs, labels or None) of one batch of a DataLoader: a tensor, an
    (inputs, labels, ...) tuple, or a mapping with an optional labels entry."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if is_mapping(batch):
        labels = next((batch[key] for key in LABEL_KEYS if isinstance(batch.get(key), torch.Tensor)), None)
        return {key: value for key, value in batch.items() if key not in LABEL_KEYS}, labels
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], labels
    raise TypeError(f"a batch must be a tensor, a mapping or an (inputs, labels) tuple, got {type(batch).__name__}")


def iterate(data: Any) -> Iterator[Tuple[Inputs, Optional[torch.Tensor]]]:
    """(inputs, labels or None) per batch of data: one batch (a tensor or a mapping
    of tensors), or an iterable of batches such as a DataLoader."""
    if isinstance(data, torch.Tensor) or is_mapping(data):
        yield split_batch(data)
        return
    for batch in data:
        yield split_batch(batch)
