"""The single-sample check of the per-sample engine (gradood/persample/_verify.py):
models whose batch rows are not their samples' own computations give an error,
never a wrong number. Each model below gave wrong norms silently before it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.persample import persample_grad_norms, persample_gradients
from test_persample import _loop_norms


class _MixesSamples(nn.Module):
    """Subtracts the batch mean: every sample's output depends on the others."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.a(x))
        return self.head(hidden - hidden.mean(0, keepdim=True))


class _Reorders(nn.Module):
    """Sorts the batch, applies a layer, and un-sorts (as before sequence packing)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        order = x[:, 0].argsort()
        hidden = torch.tanh(self.a(x[order]))
        return self.head(hidden[order.argsort()])


def _replacing_hook_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].register_forward_hook(lambda module, args, output: output * output)  # replaces the layer's output
    return model


@pytest.mark.parametrize("build", [_MixesSamples, _Reorders, _replacing_hook_model], ids=["mixes", "reorders", "hook"])
def test_models_whose_rows_are_not_their_samples_are_errors(build):
    torch.manual_seed(0)
    model = build().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, inputs)
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_gradients(model, inputs)


def test_the_check_can_be_skipped_and_then_the_norms_are_the_batch_pass():
    torch.manual_seed(0)
    model = _MixesSamples().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    norms = persample_grad_norms(model, inputs, verify=False).norms
    assert not torch.allclose(norms, _loop_norms(model, inputs))  # what the check protects from


def test_a_passing_check_runs_once_per_model_and_signature():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    for _ in range(2):
        persample_grad_norms(model, torch.randn(6, 4, dtype=torch.float64))
    assert calls == [2, 3, 3, 1, 1, 1, 6, 6]


class _TransposedAfterBatchNorm(nn.Module):
    """A BatchNorm2d whose output reaches the loss through flatten(2).transpose(1, 2),
    so its output gradient arrives strided channels-last (timm's EfficientFormer)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Linear(6, 3)
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)

    def forward(self, x):
        tokens = self.norm(self.conv(x)).flatten(2).transpose(1, 2)  # [B, N, C]
        return self.head(torch.tanh(tokens).mean(1))


def test_batch_norm_with_a_channels_last_output_gradient_is_exact():
    """torch's CPU batch_norm backward is wrong at batch size 1 for a contiguous input
    with a strided channels-last output gradient; the engine hands it a contiguous one."""
    from gradood.persample._workarounds import batch_norm_gradient_layout

    torch.manual_seed(0)
    model = _TransposedAfterBatchNorm().double().eval()
    inputs = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    expected = []
    for index in range(4):  # the loop, with the bias gradient checked against its closed form Σ g
        model.zero_grad(set_to_none=True)
        grads = {}
        def keep(module, args, output):
            output.register_hook(lambda grad: grads.update(g=grad))

        model.norm.register_forward_hook(keep)
        with batch_norm_gradient_layout(model):
            logits = model(inputs[index : index + 1])
            torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        model.norm._forward_hooks.clear()
        torch.testing.assert_close(model.norm.bias.grad, grads["g"].sum((0, 2, 3)))
        expected.append(sum(p.grad.square().sum() for p in model.parameters()).sqrt())
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, torch.stack(expected), rtol=1e-10, atol=0)
    torch.testing.assert_close(persample_grad_norms(model, inputs[:1]).norms, expected[0][None], rtol=1e-10, atol=0)


def test_a_first_call_on_one_sample_does_not_spare_a_larger_batch_the_check():
    """One sample cannot show mixing; the layout is checked again when a call has more."""
    torch.manual_seed(0)
    model = _MixesSamples().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    persample_grad_norms(model, inputs[:1])  # exact for a batch of one
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, inputs)


def test_a_hook_added_after_the_first_call_is_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs))
    handle = model[0].register_forward_hook(lambda module, args, output: output * output)
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, inputs)
    handle.remove()  # back to the first layout
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs))


class _CentredLogits(nn.Module):
    """Logits centred over the batch: a sample alone has all-zero logits."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        logits = self.head(torch.tanh(self.a(x)))
        return logits - logits.mean(0, keepdim=True)


class _TableClassBias(nn.Module):
    """A class bias from an MLP on a [1, 2, 3] table, averaged over the table's rows:
    no sample mixing, but a broadcast of the table would split each sample's gradient
    over every copy; with one output gradient for all samples that split cancels."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 2, 3))
        self.mlp, self.head = nn.Linear(3, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(x)) + self.mlp(self.table).mean((0, 1))


@pytest.mark.parametrize("build", [_CentredLogits, _TableClassBias], ids=["centred", "table-bias"])
def test_the_check_gives_each_probe_sample_its_own_output_gradient(build):
    torch.manual_seed(0)
    model = build().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    try:
        got = persample_grad_norms(model, inputs).norms
    except ValueError as error:
        assert "single-sample check failed" in str(error)
    else:
        torch.testing.assert_close(got, _loop_norms(model, inputs))


def test_identical_samples_do_not_count_as_checked():
    torch.manual_seed(0)
    model = _MixesSamples().double().eval()
    persample_grad_norms(model, torch.zeros(4, 4, dtype=torch.float64))  # all rows equal: nothing to see
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, torch.randn(5, 4, dtype=torch.float64))


def test_a_forward_replaced_after_the_first_call_is_checked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    persample_grad_norms(model, inputs)
    plain = model[1].forward
    model[1].forward = lambda x: plain(x - x.mean(0, keepdim=True))  # now mixes the samples
    with pytest.raises(ValueError, match="single-sample check failed"):
        persample_grad_norms(model, inputs)


# --- verify=k: k random samples of every call ------------------------------------------


class _DataDependent(nn.Module):
    """Mixes samples only in batches whose first feature exceeds 3 somewhere: the probe
    check on ordinary samples passes, a later batch with such a sample is wrong."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.a(x))
        if bool((x[:, 0] > 3).any()):
            hidden = hidden - hidden.mean(0, keepdim=True)
        return self.head(hidden)


def test_verify_k_catches_what_the_probe_check_cannot():
    torch.manual_seed(0)
    model = _DataDependent().double().eval()
    ordinary = torch.randn(6, 4, dtype=torch.float64)
    persample_grad_norms(model, ordinary)  # the probe check passes on these
    odd = ordinary.clone()
    odd[2, 0] = 5.0
    silent = persample_grad_norms(model, odd)  # the once-per-signature check has run: a wrong number
    assert not torch.allclose(silent.norms, _loop_norms(model, odd), rtol=1e-6)
    with pytest.raises(ValueError, match=r"per-call check \(verify=k\) failed.*sample"):
        persample_grad_norms(model, odd, verify=6)
    with pytest.raises(ValueError, match=r"per-call check \(verify=k\) failed"):
        persample_gradients(model, odd, verify=6)


def test_verify_k_passes_and_changes_nothing_on_an_exact_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.LayerNorm(7), nn.Linear(7, 4)).eval()
    inputs = torch.randn(9, 5)
    plain = persample_grad_norms(model, inputs, per_layer=True)
    checked = persample_grad_norms(model, inputs, per_layer=True, verify=3)
    torch.testing.assert_close(checked.norms, plain.norms, rtol=0, atol=0)
    targets = torch.randint(0, 4, (9,))
    persample_grad_norms(model, inputs, loss="ce", targets=targets, temperature=2.0, verify=9)
    persample_gradients(model, inputs, loss="logsumexp", verify=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "yes", None])
def test_verify_must_be_a_flag_or_a_sample_count(bad):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="verify must be True, False or a number of samples"):
        persample_grad_norms(model, torch.randn(2, 3), verify=bad)


def test_detectors_take_verify_k():
    from gradood.detectors import GRODIN, FullGradNorm

    torch.manual_seed(0)
    model = _DataDependent().eval()
    odd = torch.randn(5, 4)
    GRODIN(model).score(torch.randn(5, 4))  # probe check on ordinary inputs
    odd[1, 0] = 5.0
    for detector in (GRODIN(model, verify=5), FullGradNorm(model, verify=5)):
        with pytest.raises(ValueError, match="per-call check"):
            detector.score(odd)
    with pytest.raises(ValueError, match="GRODIN: verify must be"):
        GRODIN(model, verify=0)


# --- the real pass watches rule-handled parameters used outside their layer ---------------


class _FlagReuse(nn.Module):
    """Reuses a rule layer's weight outside its forward only once a flag is set (after
    the layout was probed and cached)."""

    def __init__(self, conv: bool):
        super().__init__()
        self.conv = conv
        self.a = nn.Conv2d(2, 2, 3, padding=1) if conv else nn.Linear(4, 4)
        self.head = nn.Linear(8 if conv else 4, 3)
        self.flag = False

    def forward(self, x):
        hidden = torch.tanh(self.a(x))
        if self.flag:
            extra = F.conv2d(hidden, self.a.weight, padding=1) if self.conv else F.linear(hidden, self.a.weight.T)
            hidden = hidden + extra
        return self.head(hidden.flatten(1))


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv"])
def test_a_flag_that_adds_a_use_outside_the_forward_is_seen_in_the_real_pass(conv):
    torch.manual_seed(0)
    model = _FlagReuse(conv).double().eval()
    inputs = torch.randn(5, 2, 2, 2, dtype=torch.float64) if conv else torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs))
    model.flag = True  # the cached layout's probe never saw this use (it was 8-36% off, silently)
    result = persample_grad_norms(model, inputs)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs))
    assert "op-vjp" in result.methods or "op-add" in result.methods  # probed again: followed op by op
    model.flag = False
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs))


def test_detached_and_no_grad_uses_outside_the_forward_are_not_gradient_uses():
    class Logs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
            self.log = False

        def forward(self, x):
            if self.log:
                self.norm = self.a.weight.detach().norm() + self.a.weight.data.sum()
                with torch.no_grad():
                    self.other = (self.a.weight * 2).sum()
                _ = self.a.weight.shape
            return self.head(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = Logs().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    persample_grad_norms(model, inputs)
    model.log = True
    result = persample_grad_norms(model, inputs)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs))


def test_a_use_outside_the_forward_that_depends_on_the_batch_is_an_error():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            hidden = torch.tanh(self.a(x))
            if bool((x[:, 0] > 3).any()):  # decided by the batch, not the sample
                hidden = hidden + F.linear(hidden, self.a.weight)
            return self.head(hidden)

    torch.manual_seed(0)
    model = Branch().double().eval()
    inputs = torch.randn(6, 4, dtype=torch.float64)
    persample_grad_norms(model, inputs)
    inputs[4, 0] = 5.0  # beyond the probe's samples
    with pytest.raises(ValueError, match="used outside its module's forward.*also after probing again"):
        persample_grad_norms(model, inputs)


class _ViewReuse(nn.Module):
    """After flip(): a view of the weight made outside any pass is used in the forward."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.view = None

    def flip(self):
        self.view = self.a.weight.t()

    def forward(self, x):
        hidden = torch.tanh(self.a(x))
        return self.head(hidden + hidden @ self.view if self.view is not None else hidden)


class _HookReuse(nn.Module):
    """After flip(): the layer's own forward hook uses its weight again."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def flip(self):
        self.a.register_forward_hook(lambda module, args, output: output + F.linear(torch.tanh(output), module.weight))

    def forward(self, x):
        return self.head(torch.tanh(self.a(x)))


class _AssignReuse(nn.Module):
    """After flip(): the weight is copied into a buffer by assignment (`__setitem__` returns
    None, which the watch took for a metadata read: 20-40% off without an error)."""

    def __init__(self):
        super().__init__()
        self.a, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        self.copy = False

    def flip(self):
        self.copy = True

    def forward(self, x):
        hidden = self.a(x)
        if self.copy:
            buffer = torch.zeros(4, 4, dtype=x.dtype)
            buffer[:] = self.a.weight
            hidden = hidden + x @ buffer.T
        return self.head(hidden)


@pytest.mark.parametrize("build", [_ViewReuse, _HookReuse, _AssignReuse], ids=["view", "hook", "assignment"])
def test_uses_the_probe_cannot_follow_after_a_flip_are_errors(build):
    torch.manual_seed(0)
    model = build().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    persample_grad_norms(model, inputs)
    model.flip()  # silently 2-33% off before the watch saw views and hooks
    with pytest.raises(ValueError, match="used outside its module's forward"):
        persample_grad_norms(model, inputs)


class _FunctionalGroupNorm(nn.Module):
    """timm's GroupNormAct style: F.group_norm called with the module's own parameters."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.weight, self.bias, self.groups = nn.Parameter(torch.randn(channels)), nn.Parameter(torch.randn(channels)), groups

    def forward(self, x):
        return F.relu(F.group_norm(x, self.groups, self.weight, self.bias))


@pytest.mark.parametrize("norm", ["module", "functional"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_group_norm_of_a_strided_activation_is_exact(layout, norm):
    """native_group_norm, which gives the rule the forward's statistics, needs a contiguous
    input: a channels_last or sliced activation raised before it was made contiguous."""
    torch.manual_seed(0)
    make_norm = (lambda: nn.GroupNorm(4, 8)) if norm == "module" else (lambda: _FunctionalGroupNorm(8, 4))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), make_norm(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)).double().eval()
    inputs = torch.randn(4, 3, 6, 8, dtype=torch.float64)[..., 1:7]  # 6 × 6, strided
    if layout == "channels_last":
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs))
