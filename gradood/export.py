"""ONNX export of an OODHead: `to_onnx(head, example_inputs, path)`.

torch.onnx.export's dynamo exporter (torch.export, then translation to ONNX) with a custom
translation table: each gradood operator in the head's graph is written in standard ONNX
operators with onnxscript, so the file runs in ONNX Runtime, TensorRT or Triton's ONNX backend
without gradood. The dynamo exporter is the one this torch supports and documents; its table
receives the operators' scalar arguments (score term, temperature, clip) as Python values, so each
exported graph holds only the operations its score needs.

The translations keep the kernels' numerics (gradood/_ops.py `lastlayer_terms`):
    m = max_j f_j, s = Σ_{j≠ŷ} exp((f_j − m)/T)  (the argmax left out, ŷ its first index)
    energy = m + T · log1p(s)    (log1p by Goldberg's log(u) · s / (u − 1), u = 1 + s: ONNX has
                                   no Log1p, and log(1 + s) drops s below float32's epsilon)
    p_ŷ = 1 / (1 + s),  1 − p_ŷ = s / (1 + s)   (not 1 − p_ŷ: no cancellation on confident rows)
and the kernels' special rows: a NaN logit makes the row's logit terms NaN; +inf maxima share the
probability (energy and max logit +inf); a row of −inf is uniform (energy and max logit −inf).
Sums run in the logits' precision (float32 for float32 and half logits), as ONNX Runtime's
reductions do: the file gives the eager scores to float32 round-off (tests/test_onnx.py).

Requires the `onnx` extra: `pip install "gradood[onnx]"` (onnx, onnxscript; onnxruntime to run
the file)."""

from __future__ import annotations

import math
import os
from typing import Any, Union

import torch

from gradood._ops import TERM_NAMES
from gradood.model_io import Inputs
from gradood.ood_head import OODHead

_TERM = {name: index for index, name in enumerate(TERM_NAMES)}


def to_onnx(head: OODHead, example_inputs: Inputs, path: Union[str, os.PathLike], dynamic_batch: bool = True) -> Any:
    """Export `head` (an OODHead) to the ONNX file `path` and return torch's ONNXProgram. The
    batch dimension is dynamic unless dynamic_batch=False; the inputs' other dimensions are those
    of example_inputs (a tensor, or a mapping of keyword tensors for a model that takes them)."""
    if not isinstance(head, OODHead):
        raise TypeError(f"gradood.export.to_onnx: head must be a gradood.OODHead, got {type(head).__name__}")
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError("gradood.export.to_onnx needs onnx and onnxscript: pip install 'gradood[onnx]'") from error
    head.eval()
    mapping = isinstance(example_inputs, dict)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = {"inputs": {key: {0: batch} for key in example_inputs} if mapping else {0: batch}}
    # a mapping goes in as the keyword `inputs` (a trailing dict in args would be read as keywords)
    program = torch.onnx.export(
        head,
        () if mapping else (example_inputs,),
        kwargs={"inputs": example_inputs} if mapping else None,
        dynamo=True,
        custom_translation_table=onnx_translations(),
        dynamic_shapes=dynamic_shapes,
        output_names=["logits", "score"],
    )
    if program is None:  # pragma: no cover - dynamo=True always returns a program
        raise RuntimeError("gradood.export.to_onnx: torch.onnx.export returned no program")
    program.save(os.fspath(path))
    return program


def onnx_translations() -> dict:
    """{gradood operator: its onnxscript translation}, for torch.onnx.export(dynamo=True,
    custom_translation_table=...) of your own modules that call gradood's operators
    (gradood.scores, gradood.lastlayer_terms' score forms, ReAct's operator)."""
    import numpy as np
    from onnxscript import ir, opset18

    op: Any = opset18  # the typed opset's signatures are stricter than the values it accepts

    def precision(value) -> np.dtype:
        """float64 for float64 values, float32 otherwise (the kernels' accumulator for half)."""
        return np.dtype(np.float64) if value.dtype == ir.DataType.DOUBLE else np.dtype(np.float32)

    def widen(value, dtype):
        return op.Cast(value, to=ir.DataType.DOUBLE if dtype == np.float64 else ir.DataType.FLOAT)

    def scalar(number: float, dtype):
        return op.Constant(value=ir.tensor(np.array(number, dtype=dtype)))

    def axis1():
        return op.Constant(value_ints=[1])

    def logit_terms(f, temperature: float, dtype) -> dict:
        """The logit terms of each row [B] (by name), in the kernels' numerics."""
        zero, one = scalar(0.0, dtype), scalar(1.0, dtype)
        inf, ninf, nan = scalar(math.inf, dtype), scalar(-math.inf, dtype), scalar(math.nan, dtype)
        top = op.ReduceMax(f, axis1(), keepdims=1)  # [B, 1]
        positive, negative = op.Equal(top, inf), op.Equal(top, ninf)
        special = op.Or(positive, negative)
        # +inf maxima share the probability; a row of -inf is uniform (the kernels' limits)
        adjusted = op.Where(positive, op.Where(op.Equal(f, inf), zero, ninf), op.Where(negative, zero, f))
        shift = op.Where(special, zero, top)
        exps = op.Exp(op.Div(op.Sub(adjusted, shift), scalar(temperature, dtype)))
        argmax = op.ArgMax(adjusted, axis=1, keepdims=1, select_last_index=0)  # [B, 1], the first index
        width = op.Gather(op.Shape(f), op.Constant(value_int=1))  # C, a scalar
        columns = op.Range(op.Constant(value_int=0), width, op.Constant(value_int=1))
        is_top = op.Equal(op.Unsqueeze(columns, op.Constant(value_ints=[0])), argmax)  # [B, C]
        others = op.ReduceSum(op.Where(is_top, zero, exps), axis1(), keepdims=1)  # s [B, 1]
        total = op.Add(one, others)
        p = op.Div(exps, total)
        p_top = op.Div(one, total)
        rest = op.Div(others, total)  # 1 − p_ŷ
        log1p = op.Where(op.Equal(total, one), others, op.Div(op.Mul(op.Log(total), others), op.Sub(total, one)))
        energy = op.Where(special, top, op.Add(top, op.Mul(scalar(temperature, dtype), log1p)))
        uniform = op.Div(one, op.Cast(width, to=ir.DataType.DOUBLE if dtype == np.float64 else ir.DataType.FLOAT))
        deviation = op.ReduceSum(op.Abs(op.Sub(p, uniform)), axis1(), keepdims=1)
        gini = op.Add(
            op.ReduceSum(op.Where(is_top, zero, op.Mul(p, op.Sub(one, p))), axis1(), keepdims=1), op.Mul(p_top, rest)
        )
        onehot = op.Sqrt(
            op.Add(op.ReduceSum(op.Where(is_top, zero, op.Mul(p, p)), axis1(), keepdims=1), op.Mul(rest, rest))
        )
        nan_row = op.Cast(
            op.ReduceMax(op.Cast(op.IsNaN(f), to=ir.DataType.FLOAT), axis1(), keepdims=1), to=ir.DataType.BOOL
        )
        terms = {
            "max_logit": top,
            "energy": energy,
            "max_softmax": p_top,
            "uniform_deviation_l1": deviation,
            "gini": gini,
            "onehot_deviation_l2": onehot,
        }
        return {name: op.Squeeze(op.Where(nan_row, nan, value), axis1()) for name, value in terms.items()}

    def feature_term(v, term: str, clip: float, with_bias: bool, dtype):
        one = scalar(1.0, dtype)
        if term == "feature_l2":
            squares = op.ReduceSum(op.Mul(v, v), axis1(), keepdims=0)
            return op.Sqrt(op.Add(squares, one) if with_bias else squares)
        magnitude = op.Abs(v)
        if term == "feature_clipped_l1":
            magnitude = op.Min(magnitude, scalar(clip, dtype))
        total = op.ReduceSum(magnitude, axis1(), keepdims=0)
        return op.Add(total, one) if with_bias else total

    def lastlayer_score(
        logits,
        features,
        logit_term: int,
        logit_scale: float,
        feature_term_index: int,
        with_bias: bool,
        combine: int,
        alpha: float,
        temperature: float,
        clip: float,
    ):
        dtype = precision(logits)
        u = op.Mul(
            logit_terms(widen(logits, dtype), temperature, dtype)[TERM_NAMES[logit_term]], scalar(logit_scale, dtype)
        )
        if feature_term_index < 0:
            return u
        v = feature_term(widen(features, dtype), TERM_NAMES[feature_term_index], clip, with_bias, dtype)
        return op.Add(u, op.Mul(v, scalar(alpha, dtype))) if combine == 1 else op.Mul(u, v)

    def react_energy(features, weight, bias, clip: float):
        dtype = precision(features)
        v = widen(features, dtype)
        if not math.isinf(clip):
            v = op.Min(v, scalar(clip, dtype))
        w = widen(weight, dtype)
        logits = op.Gemm(v, w, widen(bias, dtype), transB=1) if bias is not None else op.Gemm(v, w, transB=1)
        return logit_terms(logits, 1.0, dtype)["energy"]

    return {
        torch.ops.gradood.lastlayer_score.default: lastlayer_score,
        torch.ops.gradood.react_energy.default: react_energy,
    }
