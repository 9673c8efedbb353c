"""The per-sample engine's layout probe (gradood/persample/_layout.py): models
whose layers do not see one sample per row, or whose parameters reach the loss
outside their module's forward, give the loop's norms (sequence-first layers,
parameters handled op by op, the torch.func fallback) or a clear error — never a
wrong number. Before the probe, each model below gave wrong norms silently or
failed with an unrelated error; before the op-by-op handling
(gradood/persample/_direct.py) most needed fallback='torch.func'."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.persample import persample_grad_norms, persample_gradients
from test_persample import _loop_norms
from test_persample_gradients import _check_operator, _loop_grads


class _ChildWeightInParent(nn.Module):
    """As torchvision's Swin attention: the parent calls F.linear with its child
    Linear's weight and never calls the child; it may have a parameter of its own."""

    def __init__(self, own_parameter):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.scale = nn.Parameter(torch.rand(6) + 0.5) if own_parameter else None

    def forward(self, x):
        out = torch.tanh(F.linear(x, self.proj.weight, self.proj.bias))
        return out if self.scale is None else out * self.scale


class _Swinlike(nn.Module):
    def __init__(self, own_parameter=True):
        super().__init__()
        self.stem, self.attn, self.head = nn.Linear(5, 6), _ChildWeightInParent(own_parameter), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.attn(self.stem(x)))


class _Tied(nn.Module):
    """A Linear called as a layer and its weight used again by the parent."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        hidden = torch.relu(self.a(x))
        return self.b(F.linear(hidden, self.a.weight))


class _SharedTable(nn.Module):
    """A Linear applied to a buffer all samples share (as Swin V2's relative position MLP)."""

    def __init__(self, rows):
        super().__init__()
        self.table, self.head = nn.Linear(2, 6), nn.Linear(6, 3)
        self.register_buffer("coords", torch.randn(rows, 2))

    def forward(self, x):
        return self.head(x + self.table(self.coords).mean(0))


class _SequenceFirst(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False: [T, B, E]
    everywhere inside, so the Linear and LayerNorm layers see the batch in dim 1."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):  # [B, T]
        return self.head(self.encoder(self.embed(ids.t())).mean(0))


class _FoldedBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 4]; the Linear sees [B·T, 4]
        return self.head(self.a(x.reshape(-1, 4)).reshape(x.shape).mean(1))


class _BatchLast(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.head = nn.BatchNorm1d(4), nn.Linear(4, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1), self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):  # [B, T, 4]; BatchNorm1d (eval: per channel, no mixing) sees [T, 4, B]
        return self.head(self.norm(x.permute(1, 2, 0)).permute(2, 0, 1).mean(1))


class _ReadsChildMetadata(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        width, dtype = self.a.weight.shape[0], self.a.weight.dtype
        assert self.a.weight.size(1) == x.shape[1] and self.a.weight.dim() == 2
        return self.head(self.a(x).to(dtype)[:, :width])


def _double(model, inputs):
    torch.manual_seed(0)
    return model.double().eval(), inputs.double() if inputs.is_floating_point() else inputs


@pytest.mark.parametrize("own_parameter", [True, False])
@pytest.mark.parametrize("fallback", [None, "torch.func"])  # the fallback is not needed, so not used
def test_a_child_weight_used_by_its_parent_is_exact_op_by_op(own_parameter, fallback):
    model, inputs = _double(_Swinlike(own_parameter), torch.randn(4, 5))
    result = persample_grad_norms(model, inputs, per_layer=True, fallback=fallback)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    assert "attn.proj" not in result.layer_names  # it used to be here, as "unused", with zero norms
    methods = dict(zip(result.layer_names, result.methods))
    assert methods["attn.proj.weight"] == "direct" and "torch.func" not in methods.values()  # the linear rule's
    gradients = persample_gradients(model, inputs, loss="logsumexp", fallback=fallback)
    _check_operator(gradients, _loop_grads(model, inputs))


def test_a_tied_weight():
    model, inputs = _double(_Tied(), torch.randn(4, 6))
    result = persample_grad_norms(model, inputs)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    _check_operator(persample_gradients(model, inputs, loss="logsumexp"), _loop_grads(model, inputs))


@pytest.mark.parametrize("rows", [3, 4])  # 4 = the batch size, where the shapes alone cannot tell
def test_a_layer_applied_to_a_shared_table(rows):
    model, inputs = _double(_SharedTable(rows), torch.randn(4, 6))
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    assert dict(zip(result.layer_names, result.methods))["table.weight"] == "op-add"  # x + table(coords).mean(0)
    _check_operator(persample_gradients(model, inputs, loss="logsumexp"), _loop_grads(model, inputs))


@pytest.mark.parametrize("length", [4, 5])  # 4 = the batch size
def test_sequence_first_layers_match_the_loop(length):
    model, inputs = _double(_SequenceFirst(), torch.randint(0, 11, (4, length)))
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    assert "torch.func" not in result.methods
    _check_operator(persample_gradients(model, inputs, loss="logsumexp"), _loop_grads(model, inputs))


class _FoldedWrongOrder(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):  # [B, T, 4]; the Linear sees [T·B, 4], position-major
        rows = self.a(x.transpose(0, 1).reshape(-1, 4))
        return self.head(rows.reshape(x.shape[1], x.shape[0], 4).mean(0))


def test_a_folded_batch_is_unfolded_sample_major():
    model, inputs = _double(_FoldedBatch(), torch.randn(4, 5, 4))
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    assert dict(zip(result.layer_names, result.methods))["a"] == "materialise"  # the Linear rule, on [B, 5, 4]
    _check_operator(persample_gradients(model, inputs, loss="logsumexp"), _loop_grads(model, inputs))


def test_a_batch_folded_in_another_order_is_an_error():
    model, inputs = _double(_FoldedWrongOrder(), torch.randn(4, 5, 4))
    with pytest.raises(ValueError, match="single-sample check failed.*a "):
        persample_grad_norms(model, inputs)


def test_a_batch_last_norm_layer_is_exact_op_by_op():
    model, inputs = _double(_BatchLast(), torch.randn(4, 5, 4))
    result = persample_grad_norms(model, inputs)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)


def test_metadata_reads_of_a_child_weight_are_not_uses():
    model, inputs = _double(_ReadsChildMetadata(), torch.randn(4, 4))
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)


@pytest.mark.parametrize("fallback", [None, "torch.func"])
def test_old_style_weight_norm_is_exact_op_by_op(fallback):
    with pytest.warns(FutureWarning):
        first = nn.utils.weight_norm(nn.Linear(6, 6))
    model, inputs = _double(nn.Sequential(first, nn.ReLU(), nn.Linear(6, 3)), torch.randn(4, 6))
    result = persample_grad_norms(model, inputs, fallback=fallback, per_layer=True)
    norms = []
    for i in range(inputs.shape[0]):  # the loop, without the deepcopy weight_norm does not support
        model.zero_grad(set_to_none=True)
        logits = model(inputs[i : i + 1])
        F.cross_entropy(logits, logits.argmax(1)).backward()
        norms.append(sum(p.grad.square().sum() for p in model.parameters()).sqrt())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(result.norms, torch.stack(norms), rtol=1e-10, atol=0)
    assert set(result.layer_names) == {"2", "0.weight_g", "0.weight_v", "0.bias"}


def test_the_probe_runs_once_per_model_and_input_shape_and_leaves_no_trace():
    model, inputs = _double(_SequenceFirst(), torch.randint(0, 11, (4, 5)))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    persample_grad_norms(model, inputs)
    assert calls == [2, 3, 3, 1, 1, 1, 4]  # two probe batches, the single-sample check (3 and 3 × 1), the pass
    persample_grad_norms(model, inputs[:3])
    assert calls == [2, 3, 3, 1, 1, 1, 4, 3]
    persample_grad_norms(model, torch.randint(0, 11, (4, 7)))  # another trailing shape
    assert calls[8:] == [2, 3, 3, 1, 1, 1, 4]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 1  # the test's
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_a_model_failing_on_the_probe_batch_is_reported_and_left_clean():
    class OnlyFour(nn.Sequential):
        def forward(self, x):
            if x.shape[0] != 4:
                raise RuntimeError("this model takes batches of 4")
            return super().forward(x)

    model, inputs = _double(OnlyFour(nn.Linear(3, 3), nn.Linear(3, 2)), torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="probe batches of 2 and 3 samples.*this model takes batches of 4"):
        persample_grad_norms(model, inputs)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


class _Recurrent(nn.Module):
    """nn.LSTM (several outputs, a fused kernel vmap cannot batch), batch-first or not."""

    def __init__(self, batch_first: bool, bidirectional: bool):
        super().__init__()
        self.rnn = nn.LSTM(4, 5, batch_first=batch_first, bidirectional=bidirectional)
        self.head = nn.Linear(5 * (1 + bidirectional), 3)

    def forward(self, x):
        if not self.rnn.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.rnn(x)
        return self.head((out if self.rnn.batch_first else out.transpose(0, 1)).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_an_lstm_is_replayed_by_its_parent_one_sample_at_a_time(batch_first, bidirectional):
    """The LSTM returns a tuple, so the replay goes to the module around it, and vmap
    cannot batch its kernel, so the replay loops over the samples: exact, and the
    error without the fallback says which option to pass."""
    torch.manual_seed(0)
    model = _Recurrent(batch_first, bidirectional).double().eval()
    inputs = torch.randn(3, 6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rnn.*fallback='torch.func'"):
        persample_grad_norms(model, inputs)
    result = persample_grad_norms(model, inputs, fallback="torch.func", per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=1e-12)
    assert "torch.func" in result.methods
    _check_operator(persample_gradients(model, inputs, loss="logsumexp", fallback="torch.func"), _loop_grads(model, inputs))


class _ViewOutputModifiedInPlace(nn.Module):
    """As RoCBERT's embeddings: a Linear on a 3-D input (its output a view of the matmul,
    the weight being frozen in the pass) whose output is then modified in place."""

    def __init__(self, update: str):
        super().__init__()
        self.embed, self.types = nn.Embedding(10, 4), nn.Embedding(2, 6)
        self.map, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.update = update
        self.register_buffer("type_ids", torch.zeros(1, 5, dtype=torch.long))

    def forward(self, ids):
        hidden = self.map(self.embed(ids))
        if self.update == "constant":
            hidden += 1.0
        else:
            hidden += self.types(self.type_ids.expand(ids.shape[0], -1))
        return self.head(torch.tanh(hidden).mean(1))


@pytest.mark.parametrize("update", ["constant", "layer"])
def test_a_layer_output_that_is_a_view_and_modified_in_place_keeps_its_gradient(update):
    """The tensor hook on such a view was dropped by the in-place op: the layer got a zero
    gradient (the single-sample check then refused the model)."""
    torch.manual_seed(0)
    model = _ViewOutputModifiedInPlace(update).double()
    ids = torch.randint(0, 10, (3, 5))
    result = persample_grad_norms(model, ids, loss="logsumexp", per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, ids, loss="logsumexp"), rtol=1e-10, atol=1e-12)
    assert float(result.per_layer[:, result.layer_names.index("map")].min()) > 0
    _check_operator(persample_gradients(model, ids, loss="logsumexp"), _loop_grads(model, ids))
