"""Parameters that no module rule sees: the ops that use them, watched one by one.

A parameter is *direct* when its module has no rule (a ViT's class token and
position embedding, a LayerScale's gamma, a relative-position bias table, a
norm+activation module's affine weights), when it is used outside its module's
forward (torchvision's Swin calls F.linear with a child's weight; a tied
weight), or when its layer runs on something all samples share (a position MLP
on a fixed table). For the pass each direct parameter is replaced by a proxy
leaf and a TorchFunctionMode watches every op:

- an op whose tensor arguments are proxies, tensors derived from them and
  constants is a *derivation* (`table[index]`, `gamma[:, None, None]`,
  `cat((q_bias, zeros, v_bias))`, `logit_scale.clamp(max=4.6).exp()`); its
  outputs are derived tensors, functions of the parameters alone;
- an op that takes a derived tensor D and a batch tensor is a *meeting*. Sample
  i's gradient w.r.t. D is the VJP of that one op for sample i alone (the batch
  tensors sliced to sample i, batch dimension kept with size 1), taken for all
  samples at once with torch.func.vmap; additive ops (add, sub, a linear layer's
  bias) need no replay: the cotangent is the output gradient summed to D's
  shape. F.linear with a direct weight becomes a linear piece for the linear
  rule (Swin's qkv), which never forms a per-sample weight gradient when that is
  the weight's only use.
- Each parameter's per-sample gradient is the VJP of its derivation batched over
  the samples (autograd.grad with is_grads_batched), summed over its meetings
  (gradood/persample/_direct_grads.py).

The batch dimension of every tensor of every meeting comes from the layout
probe: the model runs on batches of 2 and 3 samples under ProbeTracker, which
records each op on a parameter-derived tensor; the dimension that is 2 and then
3 is the batch. These ops must be the same at both sizes and in the pass
(data-independent), or the pass stops with an error. Exactness also needs each
meeting's output row i to depend on sample i only, which the engine's
single-sample check of the probe batch verifies.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.weak import WeakIdKeyDictionary

from gradood.persample._hooks import on_gradient
from gradood.persample._op_rules import norm_cotangents

_ADDITIVE = {"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"}
_MULTIPLICATIVE = {"mul", "mul_", "__mul__", "__rmul__", "__imul__"}
_NEGATED_SECOND = {"sub", "sub_", "__sub__", "__isub__"}  # a − b: b's cotangent is −grad
_IN_PLACE_EXTRA = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__idiv__"}


class LayoutChanged(RuntimeError):
    """The pass saw the model use its parameters otherwise than the cached layout's
    probe did (a flag changed since, a branch the probe samples did not take)."""


def func_name(func) -> str:
    return getattr(func, "__name__", repr(func))


def _in_place(func) -> bool:
    name = func_name(func)
    return (name.endswith("_") and not name.startswith("__")) or name in _IN_PLACE_EXTRA


def _tensors(value) -> List[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


class Source(NamedTuple):
    """A direct parameter: its full name, its owner module (and the module's name) and own name."""

    name: str
    module_name: str
    module: nn.Module
    short_name: str
    parameter: nn.Parameter


# -- the probe ---------------------------------------------------------------------------


class OpRecord(NamedTuple):
    """One op on a parameter-derived tensor, as the probe saw it. kinds[k] of each
    flattened argument: "param" (a watched parameter itself), "derived", "batch",
    "const", or None (not a tensor)."""

    name: str
    kinds: Tuple[Optional[str], ...]
    shapes: Tuple[Optional[torch.Size], ...]
    sources: Tuple[frozenset, ...]  # per argument, the parameters it derives from
    output_shapes: Tuple[torch.Size, ...]
    stack: Tuple[str, ...]  # the modules active at the op


class ProbeTracker(TorchFunctionMode):
    """The probe's mode: follows batch tensors (from the inputs) and tensors derived
    from the watched parameters through every op, records each op that takes a
    derived tensor, and reports on_use(parameter name, active modules, via) for it,
    `via` being the layers whose outputs the derived arguments came through (a
    layer run on a table shared by the batch returns a derived tensor: its later
    uses are the layer's output's, not its parameters' outside its forward).
    layer_output(tensor, layer) marks a layer's output on the layer's exit."""

    def __init__(
        self,
        watched: Dict[int, str],
        inputs: Sequence[torch.Tensor],
        stack: List[str],
        on_use: Callable[[str, Tuple[str, ...], frozenset], None],
    ):
        super().__init__()
        self.watched, self.stack, self.on_use = watched, stack, on_use
        self.derived = WeakIdKeyDictionary()  # tensor -> (parameter names, layers it came out of)
        self.batch = WeakIdKeyDictionary()
        for tensor in inputs:
            self.batch[tensor] = True
        self.records: List[OpRecord] = []

    def layer_output(self, output, layer: str) -> None:
        for tensor in _tensors(output):
            if tensor in self.derived:
                sources, via = self.derived[tensor]
                self.derived[tensor] = (sources, via | {layer})

    def _describe(self, leaf) -> Tuple[Optional[str], frozenset, frozenset]:
        if not isinstance(leaf, torch.Tensor):
            return None, frozenset(), frozenset()
        name = self.watched.get(id(leaf))
        if name is not None:
            return "param", frozenset((name,)), frozenset()
        found = self.derived.get(leaf)
        if found is not None:
            return ("derived", *found)
        return ("batch" if leaf in self.batch else "const"), frozenset(), frozenset()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, _ = tree_flatten((args, kwargs))
        described = [self._describe(leaf) for leaf in leaves]
        result = func(*args, **kwargs)
        outputs = _tensors(result)
        if not outputs:  # metadata reads (size, dim, dtype) are not uses
            return result
        kinds = tuple(kind for kind, _, _ in described)
        meeting = "batch" in kinds
        if "param" in kinds or "derived" in kinds:
            sources = frozenset().union(*(s for _, s, _ in described))
            via = frozenset().union(*(v for _, _, v in described))
            stack = tuple(self.stack)
            for name in sorted(sources):
                self.on_use(name, stack, via)
            self.records.append(
                OpRecord(
                    func_name(func),
                    kinds,
                    tuple(getattr(leaf, "shape", None) for leaf in leaves),
                    tuple(s for _, s, _ in described),
                    tuple(output.shape for output in outputs),
                    stack,
                )
            )
            for output in outputs:
                if meeting:
                    self.batch[output] = True
                else:
                    self.derived[output] = (sources, via)
        elif meeting:
            for output in outputs:
                self.batch[output] = True
        return result


def folded_factor(first: Optional[torch.Size], second: Optional[torch.Size], sizes: Tuple[int, int]) -> int:
    """k when dimension 0 is sizes[0]·k then sizes[1]·k (k ≥ 2), all others equal: the
    batch folded with k rows per sample (timm's Swin windows, [B·windows, N, C]),
    taken sample-major (the single-sample check verifies the order); 1 otherwise."""
    if first is None or second is None or len(first) != len(second) or not first or first[1:] != second[1:]:
        return 1
    k, rest = divmod(first[0], sizes[0])
    return k if k >= 2 and rest == 0 and second[0] == sizes[1] * k else 1


def _scaling_dim(first: Optional[torch.Size], second: Optional[torch.Size], sizes: Tuple[int, int]) -> Optional[int]:
    """The one dimension that is sizes[0] then sizes[1], all others equal; None otherwise."""
    if first is None or second is None or len(first) != len(second):
        return None
    scaling = [d for d in range(len(first)) if (first[d], second[d]) == tuple(sizes)]
    fixed = all(first[d] == second[d] for d in range(len(first)) if d not in scaling)
    return scaling[0] if len(scaling) == 1 and fixed else None


class Step(NamedTuple):
    """What the pass does at one op on a direct-parameter-derived tensor."""

    name: str
    meeting: bool
    kinds: Tuple[Optional[str], ...]  # "param"/"derived" only for direct sources
    dims: Tuple[Optional[int], ...]  # each argument's batch dimension, or None
    output_dim: Optional[int]
    sources: Tuple[frozenset, ...]  # per argument, the direct parameters it derives from
    stack: Tuple[str, ...]
    folds: Tuple[int, ...] = ()  # per argument, k > 1 where dimension 0 holds k rows per sample (then dims[i] = 0)
    output_fold: int = 1


def plan_steps(
    where: str, probes: Sequence[List[OpRecord]], direct: Set[str], sizes: Tuple[int, int]
) -> Tuple[List[Step], Dict[str, Tuple[str, Tuple[str, ...]]]]:
    """The pass's steps from the two probes' records, for the ops that touch a
    direct parameter, and the problems found: parameter name -> (why its per-sample
    gradient cannot be separated this way, the modules active at the op)."""
    first, second = ([r for r in records if any(s & direct for s in r.sources)] for records in probes)
    if len(first) != len(second) or any(a.name != b.name or a.kinds != b.kinds for a, b in zip(first, second)):
        message = (
            f"{where}: the ops on parameters used outside a layer rule differ between the probe batches of "
            f"{sizes[0]} and {sizes[1]} samples (the forward depends on the data or the batch size), so their "
            "per-sample gradients cannot be planned; pass fallback='torch.func' to replay their modules per sample, or "
            "exclude them with `params`"
        )
        return [], {name: (message, ()) for name in sorted(direct)}
    steps: List[Step] = []
    problems: Dict[str, Tuple[str, tuple]] = {}
    for a, b in zip(first, second):
        owned = tuple(s & direct for s in a.sources)
        kinds = tuple("const" if k in ("param", "derived") and not owned[i] else k for i, k in enumerate(a.kinds))
        meeting = "batch" in kinds
        dims = tuple(_scaling_dim(sa, sb, sizes) for sa, sb in zip(a.shapes, b.shapes))
        folds = tuple(folded_factor(sa, sb, sizes) if d is None else 1 for sa, sb, d in zip(a.shapes, b.shapes, dims))
        dims = tuple(0 if k > 1 else d for d, k in zip(dims, folds))
        output_dim = _scaling_dim(a.output_shapes[0], b.output_shapes[0], sizes) if meeting else None
        output_fold = (
            folded_factor(a.output_shapes[0], b.output_shapes[0], sizes) if meeting and output_dim is None else 1
        )
        if output_fold > 1:
            output_dim = 0
        if meeting:
            problem = None
            if len(a.output_shapes) != 1:
                problem = "returns several tensors"
            elif output_dim is None:
                problem = f"has no batch dimension in its output (shape {tuple(a.output_shapes[0])})"
            elif any(k == "batch" and d is None for k, d in zip(kinds, dims)):
                problem = (
                    "takes a tensor whose batch dimension could not be found (a batch folded into another dimension?)"
                )
            elif any(k == "derived" and f > 1 for k, f in zip(kinds, folds)):
                problem = "takes a parameter-derived tensor folded with the batch"
            if problem:
                names = sorted(frozenset().union(*owned))
                module = (a.stack[-1] if a.stack else "") or "the model"
                message = (
                    f"{where}: {a.name} (in {module}) combines the parameters {names} with the batch, but it {problem}, "
                    "so their per-sample gradients cannot be separated; pass fallback='torch.func' to replay the module "
                    "around it per sample, or exclude the parameters with `params`"
                )
                for name in names:
                    problems.setdefault(name, (message, a.stack))
        steps.append(Step(a.name, meeting, kinds, dims, output_dim, owned, a.stack, folds, output_fold))
    return steps, problems


# -- the pass ----------------------------------------------------------------------------


def _keep_batch(grad: torch.Tensor, dim: Optional[int], fold: int = 1) -> torch.Tensor:
    """[B, *shape with 1 at dim]: each sample's slice with its batch dimension kept
    (for a folded batch, [B, k, ...]: the sample's k rows in its place)."""
    if fold > 1:
        return grad.reshape(grad.shape[0] // fold, fold, *grad.shape[1:])
    return grad.movedim(_batch(dim), 0).unsqueeze(_batch(dim) + 1)


def _batch(dim: Optional[int]) -> int:
    """A batch dimension the plan found (the ops reaching here have one)."""
    if dim is None:
        raise RuntimeError("gradood (internal): an op on the batch has no batch dimension in the plan")
    return dim


def reduce_to(per_sample: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sums per-sample cotangents [B, *out] of a broadcast operand down to [B, *shape]."""
    extra = per_sample.dim() - 1 - len(shape)
    if extra > 0:
        per_sample = per_sample.sum(tuple(range(1, 1 + extra)))
    dims = tuple(1 + d for d, size in enumerate(shape) if size == 1 and per_sample.shape[1 + d] != 1)
    return per_sample.sum(dims, keepdim=True) if dims else per_sample


Cotangents = List[Tuple[torch.Tensor, torch.Tensor, frozenset]]  # (operand, per-sample cotangent, its parameters)
#: How a meeting's cotangents are found, reported per parameter (the costliest of its meetings).
METHODS = ("op-add", "op-mul", "op-norm", "op-vjp")


def _linear_operands(name: str, args: tuple, kwargs: dict) -> Optional[Tuple[int, int, Optional[int]]]:
    """For F.linear(input, weight, bias) however its arguments are passed (timm's EVA passes
    weight= and bias= by keyword), the positions of input, weight and bias among the
    flattened leaves ((args, kwargs), kwargs in call order); None for another op."""
    if name != "linear":
        return None
    names = ("input", "weight", "bias")
    if len(args) > 3 or any(key not in names for key in kwargs):
        return None
    entries = list(zip(names, args)) + list(kwargs.items())  # each a leaf of the flattened call, None too
    if any(value is not None and not isinstance(value, torch.Tensor) for _, value in entries):
        return None
    position = {key: index for index, (key, value) in enumerate(entries) if value is not None}
    if "input" not in position or "weight" not in position:
        return None
    return position["input"], position["weight"], position.get("bias")


class PassTracker(TorchFunctionMode):
    """The pass's mode: follows derived tensors through the planned steps; at each
    meeting, hooks the output so that its gradient gives per-sample cotangents of
    the derived operands, handed to `sink(operand, [B, *operand.shape], sources)`;
    F.linear with a direct weight goes to `linear_piece(name, step, x, output,
    batch dim) -> output`."""

    def __init__(
        self,
        where: str,
        steps: List[Step],
        proxies: Dict[int, str],
        sink: Callable[[torch.Tensor, torch.Tensor, frozenset, str], None],
        linear_piece: Callable[[str, int, torch.Tensor, torch.Tensor, int, int], torch.Tensor],
        embedding_piece: Optional[Callable[..., Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]]] = None,
    ):
        super().__init__()
        self.where, self.steps, self.proxies = where, steps, proxies
        self.sink, self.linear_piece, self.embedding_piece = sink, linear_piece, embedding_piece
        self.derived = WeakIdKeyDictionary()
        self.position = 0
        self.backward_started = False

    def _touches(self, leaves) -> bool:
        return any(
            isinstance(leaf, torch.Tensor) and (id(leaf) in self.proxies or leaf in self.derived) for leaf in leaves
        )

    def finish(self) -> None:
        if self.position != len(self.steps):
            raise LayoutChanged(
                f"{self.where}: the forward ran {self.position} of the {len(self.steps)} ops on "
                "parameters the layout probe saw: it depends on the data"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves, spec = tree_flatten((args, kwargs))
        if not self._touches(leaves):
            return func(*args, **kwargs)
        if self.position >= len(self.steps) or self.steps[self.position].name != func_name(func):
            result = func(*args, **kwargs)
            if not _tensors(result):  # a metadata read
                return result
            raise LayoutChanged(
                f"{self.where}: the forward's ops on parameters differ from the layout probe's at op {self.position} "
                f"({func_name(func)}): it depends on the data"
            )
        step = self.steps[self.position]
        self.position += 1
        if not step.meeting:
            result = func(*args, **kwargs)
            for output in _tensors(result):
                self.derived[output] = True
            return result
        where = _linear_operands(step.name, args, kwargs)
        if where is not None and step.kinds[where[0]] == "batch" and step.kinds[where[1]] == "param":
            return self._linear(leaves, step, where)
        if step.name == "embedding" and step.kinds[:2] == ("batch", "param") and self.embedding_piece is not None:
            output = self._embedding(func, args, kwargs, step)
            if output is not None:
                return output
        return self._meeting(func, args, kwargs, leaves, spec, step)

    def _embedding(self, func, args, kwargs, step: Step) -> Optional[torch.Tensor]:
        """F.embedding(ids, W, ...) with a direct W used only there (an nn.Embedding subclass
        that scales its output, as the scaled word embeddings of Gemma, BART or BioGPT): a
        piece for the embedding rule, so no per-sample table is formed. None where the call
        renormalises W (max_norm) or W has other uses: the generic meeting."""
        options = dict(zip(("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"), args[2:]))
        options.update(kwargs)
        if len(args) < 2 or options.get("max_norm") is not None:
            return None
        ids, weight = args[0], args[1]
        padding_idx = options.get("padding_idx")
        if padding_idx is not None and padding_idx < 0:
            padding_idx += weight.shape[0]
        (name,) = step.sources[1]
        if self.embedding_piece is None:  # checked by the caller
            return None
        record = self.embedding_piece(
            name,
            self.position - 1,
            _batch(step.dims[0]),
            step.folds[0],
            padding_idx,
            bool(options.get("scale_grad_by_freq", False)),
        )
        return None if record is None else record(ids, func(*args, **kwargs))

    def _linear(self, leaves, step: Step, where: Tuple[int, int, Optional[int]]) -> torch.Tensor:
        """F.linear(x, W, b) with a direct W: a linear piece, then b added as its own meeting."""
        at_x, at_weight, at_bias = where
        x, weight = leaves[at_x], leaves[at_weight]
        (name,) = step.sources[at_weight]
        output = self.linear_piece(
            name, self.position - 1, x, F.linear(x, weight), _batch(step.dims[at_x]), step.folds[at_x]
        )
        if at_bias is None or leaves[at_bias] is None:
            return output
        bias = leaves[at_bias]
        result = output + bias
        if step.kinds[at_bias] in ("param", "derived"):
            result = self._hook(
                result,
                lambda grad: [
                    (
                        bias,
                        reduce_to(_keep_batch(grad, step.output_dim, step.output_fold), bias.shape),
                        step.sources[at_bias],
                    )
                ],
                "op-add",
            )
        return result

    def _meeting(self, func, args, kwargs, leaves, spec, step: Step) -> torch.Tensor:
        # An in-place op overwrites its batch operand: keep the values it had for the VJP.
        before = (
            {i: leaf.detach().clone() for i, leaf in enumerate(leaves) if step.kinds[i] == "batch"}
            if _in_place(func)
            else {}
        )
        result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor):
            raise RuntimeError(f"{self.where}: {step.name} on direct parameters must return one tensor")
        norm = norm_cotangents(step.name, args, kwargs, leaves, step)
        if norm is not None:  # a norm op with a direct weight/bias: its own rule (gradood/persample/_op_rules.py)
            return self._hook(result, norm, "op-norm")
        operands = [i for i, kind in enumerate(step.kinds) if kind in ("param", "derived")]
        if (
            step.name in _ADDITIVE
            and not kwargs
            and len(operands) == 1
            and operands[0] < 2
            and len(leaves) == 2
            and step.dims[operands[0]] is None
            and leaves[operands[0]].dim() <= result.dim()
        ):
            index = operands[0]
            operand = leaves[index]
            negate = (step.name in _NEGATED_SECOND and index == 1) or (step.name == "__rsub__" and index == 0)
            sign = -1.0 if negate else 1.0
            return self._hook(
                result,
                lambda grad: [
                    (
                        operand,
                        sign * reduce_to(_keep_batch(grad, step.output_dim, step.output_fold), operand.shape),
                        step.sources[index],
                    )
                ],
                "op-add",
            )
        if (
            step.name in _MULTIPLICATIVE
            and not kwargs
            and len(operands) == 1
            and len(leaves) == 2
            and step.dims[operands[0]] is None
            and leaves[operands[0]].dim() <= result.dim()
        ):
            index = operands[0]
            operand, other = leaves[index], leaves[1 - index]
            if (
                step.kinds[1 - index] == "batch"
                and other.dim() == result.dim()
                and step.dims[1 - index] == step.output_dim
                and step.folds[1 - index] == step.output_fold
                and other.shape == result.shape
            ):
                # x ⊙ D: sample i's cotangent of D is g_i ⊙ x_i summed to D's shape (x saved as the op saves it)
                saved_other = before.get(1 - index, other.detach())
                return self._hook(
                    result,
                    lambda grad: [
                        (
                            operand,
                            reduce_to(
                                _keep_batch(grad * saved_other, step.output_dim, step.output_fold), operand.shape
                            ),
                            step.sources[index],
                        )
                    ],
                    "op-mul",
                )
        saved = [
            before.get(i, leaf.detach()) if isinstance(leaf, torch.Tensor) and step.kinds[i] == "batch" else leaf
            for i, leaf in enumerate(leaves)
        ]
        for i in operands:
            saved[i] = leaves[i]
        return self._hook(result, lambda grad: replay_vjp(func, saved, spec, step, grad), "op-vjp")

    def _hook(
        self, result: torch.Tensor, cotangents: Callable[[torch.Tensor], Cotangents], method: str
    ) -> torch.Tensor:
        """Hooks the meeting's output; returns the tensor the forward continues from."""
        if not result.requires_grad:
            return result

        def on_grad(grad):
            if self.backward_started:  # not a backward of the model's own, inside its forward
                for operand, per_sample, sources in cotangents(grad):
                    self.sink(operand, per_sample, sources, method)

        return on_gradient(result, on_grad)  # a copy where it is a view (_hooks.py)


def replay_vjp(func, leaves: list, spec, step: Step, grad: torch.Tensor) -> Cotangents:
    """Per-sample cotangents of the derived operands of one meeting: torch.func.vmap
    over the samples of the op's VJP, with every batch tensor (and every derived
    operand that holds the batch, like a class token expanded to [B, 1, D]) sliced
    to one sample, batch dimension kept with size 1 (a folded batch: the sample's k
    rows). The cotangent of an operand holding the batch is placed at its sample's
    slice of a zero tensor of its shape."""
    sliced = [
        i
        for i, kind in enumerate(step.kinds)
        if kind == "batch" or (kind in ("param", "derived") and step.dims[i] is not None)
    ]
    operands = [i for i, kind in enumerate(step.kinds) if kind in ("param", "derived")]
    folds = step.folds or (1,) * len(step.kinds)
    clone = _in_place(func)

    def restore(value: torch.Tensor, i: int) -> torch.Tensor:  # one sample's slice as a batch of one (or of k rows)
        return value if folds[i] > 1 else value.unsqueeze(_batch(step.dims[i]))

    def one_sample(sample_values, fixed_operands, sample_grad):
        def run(*operand_values):
            values = list(leaves)
            for i, value in zip(sliced, sample_values):
                value = restore(value, i)
                values[i] = value.clone() if clone and step.kinds[i] == "batch" else value
            for i, value in zip(operands, operand_values):
                values[i] = value
            call_args, call_kwargs = tree_unflatten(values, spec)
            return func(*call_args, **call_kwargs)

        lookup = dict(zip(sliced, sample_values))
        primals = [restore(lookup[i], i) if i in lookup else fixed_operands[operands.index(i)] for i in operands]
        _, vjp = torch.func.vjp(run, *primals)
        return vjp(sample_grad if step.output_fold > 1 else sample_grad.unsqueeze(step.output_dim))

    def unfold(tensor: torch.Tensor, fold: int) -> torch.Tensor:
        return tensor.reshape(tensor.shape[0] // fold, fold, *tensor.shape[1:]) if fold > 1 else tensor

    sample_values = [unfold(leaves[i].detach(), folds[i]) for i in sliced]
    fixed = [leaves[i].detach() for i in operands]
    in_dims = ([0 if folds[i] > 1 else step.dims[i] for i in sliced], None, step.output_dim)
    per_sample = torch.func.vmap(one_sample, in_dims=in_dims)(sample_values, fixed, unfold(grad, step.output_fold))
    out: Cotangents = []
    for i, value in zip(operands, per_sample):
        operand = leaves[i]
        dim = step.dims[i]
        if dim is not None:  # sample s's cotangent at slice s of the operand
            full = value.new_zeros(value.shape[0], *operand.shape)
            samples = torch.arange(value.shape[0], device=value.device)
            full.movedim(dim + 1, 1)[samples, samples] = value.movedim(dim + 1, 1)[:, 0]
            value = full
        out.append((operand, value, step.sources[i]))
    return out
