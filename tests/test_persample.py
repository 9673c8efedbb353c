"""gradood.persample_grad_norms against a literal per-sample backward loop in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood.persample import persample_grad_norms, persample_gradients
from gradood.testing import peak_memory_bytes
from gradood.persample.losses import per_sample_loss

# torch's own note about the even 'same' kernel of _ResidualCNN (a copy it makes internally).
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _randomise_batch_norms(model: nn.Module, seed: int) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator, dtype=module.running_mean.dtype))
            module.running_var.copy_(torch.rand(module.num_features, generator=generator, dtype=module.running_var.dtype) + 0.5)
            if module.affine:
                module.weight.data.normal_(1.0, 0.2, generator=generator)
                module.bias.data.normal_(0.0, 0.2, generator=generator)
    return model


class _ResidualCNN(nn.Module):
    """ResNet-like: eval BatchNorm, ReLU(inplace), a residual add, a grouped dilated
    conv, a strided downsampling conv, reflect padding and an even 'same' kernel."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 16, 3, padding=1, groups=8, padding_mode="reflect")
        self.same_even = nn.Conv2d(16, 6, 4, padding="same")
        self.down = nn.Conv2d(6, 12, 3, stride=2, padding=1)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.stem(x)))
        x = self.relu(x + self.bn2(self.grouped(x)))
        x = self.relu(self.same_even(self.depthwise(x)))
        x = self.down(x).mean((2, 3))
        return self.head(x)


class _SequenceNet(nn.Module):
    """Embedding input (repeated ids, padding_idx), Conv1d with 'same' padding,
    GroupNorm, a depthwise dilated Conv1d, LayerNorm and Linear on 3-D input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 8, 3, padding="same")
        self.group_norm = nn.GroupNorm(2, 8)
        self.depthwise = nn.Conv1d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.layer_norm = nn.LayerNorm(8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids):
        x = self.embed(ids).transpose(1, 2)
        x = torch.relu(self.group_norm(self.conv(x)))
        x = self.depthwise(x).transpose(1, 2)  # [B, T, 8]
        x = torch.tanh(self.mix(self.layer_norm(x)))
        return self.head(x.mean(1))


class _MLP4D(nn.Module):
    """Linear layers applied to 4-D input [B, H, W, d], and RMSNorm where torch has it."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 7)
        self.norm = nn.RMSNorm(7) if hasattr(nn, "RMSNorm") else nn.LayerNorm(7)
        self.outer = nn.Linear(7, 3)

    def forward(self, x):
        return self.outer(torch.relu(self.norm(self.inner(x)))).mean((1, 2))


class _NormZoo(nn.Module):
    """Every normalisation layout: BatchNorm1d on [B, C] and [B, C, L], BatchNorm3d,
    BatchNorm without affine parameters, GroupNorm with one group, LayerNorm over
    two dims and without bias, RMSNorm over two dims."""

    def __init__(self):
        super().__init__()
        self.bn3d = nn.BatchNorm3d(2)
        self.bn1d_sequence = nn.BatchNorm1d(4)
        self.bn_plain = nn.BatchNorm1d(4, affine=False)
        self.group_norm = nn.GroupNorm(1, 4)
        self.layer_norm_2d = nn.LayerNorm((3, 4))
        self.layer_norm_no_bias = nn.LayerNorm(4, bias=False)
        self.rms_norm = nn.RMSNorm((3, 4)) if hasattr(nn, "RMSNorm") else nn.LayerNorm((3, 4))
        self.mix = nn.Linear(4, 4)
        self.bn1d_flat = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):  # x: [B, 2, 3, 2, 2]
        x = self.bn3d(x).tanh().reshape(x.shape[0], 4, 6)  # [B, 4, 6]
        x = self.bn_plain(self.bn1d_sequence(x)).tanh()
        x = self.group_norm(x).transpose(1, 2).reshape(x.shape[0], 2, 3, 4)  # [B, 2, 3, 4]
        x = self.layer_norm_no_bias(self.mix(self.layer_norm_2d(x)))
        x = self.rms_norm(x.tanh()).sum(1).reshape(x.shape[0], 12)
        return self.head(self.bn1d_flat(x).tanh())


class _TinyViT(nn.Module):
    """Patch conv, class token, position embedding, LayerNorm, MultiheadAttention, 3-D Linear."""

    def __init__(self, batch_first: bool = True):
        super().__init__()
        self.batch_first = batch_first
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.norm1 = nn.LayerNorm(8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.norm2 = nn.LayerNorm(8)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, images):
        x = self.patch(images).flatten(2).transpose(1, 2)  # [B, 4, 8]
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        h = self.norm1(x)
        if self.batch_first:
            attended = self.attention(h, h, h, need_weights=False)[0]
        else:
            h = h.transpose(0, 1)
            attended = self.attention(h, h, h)[0].transpose(0, 1)
        x = x + attended
        x = x + self.mlp(self.norm2(x))
        return self.head(x[:, 0])


def _vit(batch_first: bool = True):
    torch.manual_seed(3)
    model = _TinyViT(batch_first).double().eval()
    return model, torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def _models():
    """The test models, their weights drawn from a fixed seed (not from whatever state the
    global generator is in when pytest imports this file)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20261122)
        return _build_models()


def _build_models():
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (5, 9), generator=generator)
    ids[:, :3] = torch.tensor([3, 3, 0])  # repeated ids and padding in every sample
    return {
        "residual_cnn": (_randomise_batch_norms(_ResidualCNN(), 1), torch.randn(4, 3, 8, 8, generator=generator)),
        "sequence": (_SequenceNet(), ids),
        "mlp_4d": (_MLP4D(), torch.randn(4, 2, 3, 5, generator=generator)),
        "norm_zoo": (_randomise_batch_norms(_NormZoo(), 2), torch.randn(4, 2, 3, 2, 2, generator=generator)),
    }


MODELS = _models()


def _loop_norms(model, inputs, loss="ce_pred", temperature=1.0, targets=None, names=None):
    """Ground truth: one backward per sample (batch of one), float64."""
    model = copy.deepcopy(model)
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad and (names is None or name in names)}
    norms = []
    for i in range(inputs.shape[0]):
        model.zero_grad(set_to_none=True)
        sample_targets = None if targets is None else targets[i : i + 1]
        per_sample_loss(model(inputs[i : i + 1]), loss, temperature, sample_targets).sum().backward()
        squared = sum(p.grad.square().sum() for p in parameters.values() if p.grad is not None)
        norms.append(torch.as_tensor(squared).sqrt())
    return torch.stack(norms)


def _float64(name):
    model, inputs = MODELS[name]
    model = copy.deepcopy(model).double().eval()
    return model, inputs if not inputs.is_floating_point() else inputs.double()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss,temperature", [("ce_pred", 1.0), ("ce_pred", 3.0), ("kl_uniform", 1.0), ("logsumexp", 1.0)])
def test_norms_match_the_per_sample_loop(name, loss, temperature):
    model, inputs = _float64(name)
    result = persample_grad_norms(model, inputs, loss=loss, temperature=temperature)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs, loss, temperature), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ce_with_targets_and_callable_losses(name):
    model, inputs = _float64(name)
    targets = torch.arange(inputs.shape[0]) % 3
    result = persample_grad_norms(model, inputs, loss="ce", targets=targets)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs, "ce", targets=targets), rtol=1e-6, atol=1e-12)

    def squared_max(logits):
        return logits.amax(1).square()

    result = persample_grad_norms(model, inputs, loss=squared_max)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs, squared_max), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_norms_match_torch_func_vmap_grad(name):
    model, inputs = _float64(name)
    parameters = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(params, sample):
        logits = torch.func.functional_call(model, (params, buffers), (sample.unsqueeze(0),))
        return per_sample_loss(logits, "ce_pred", 1.0, None).sum()

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(parameters, inputs)
    expected = torch.stack([g.reshape(inputs.shape[0], -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_layer_norms_sum_to_the_total(name):
    model, inputs = _float64(name)
    result = persample_grad_norms(model, inputs, per_layer=True)
    assert result.per_layer.shape == (inputs.shape[0], len(result.layer_names))
    torch.testing.assert_close(result.per_layer.sum(1).sqrt(), result.norms)
    assert set(result.methods) <= {"ghost", "materialise", "direct"}


def _max_relative_error(values, exact):
    return ((values.double() - exact) / exact).abs().max().item()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lower_precision_models_are_as_accurate_as_autograd(name, dtype):
    """A float32 or bfloat16 model: the norms are compared with the exact (float64) norms of
    that same model, i.e. its weights and inputs as rounded to `dtype`. PyTorch's own
    per-sample backward in `dtype` sets the bar: rounding in a deep chain of norm layers
    costs it a few percent in bfloat16, and we must not do worse than twice that (or a
    few units of `dtype`'s epsilon, when autograd happens to be very close)."""
    model, inputs = _float64(name)
    low = copy.deepcopy(model).to(dtype)
    low_inputs = inputs.to(dtype) if inputs.is_floating_point() else inputs
    exact = _loop_norms(copy.deepcopy(low).double(), low_inputs.double() if inputs.is_floating_point() else inputs)
    norms = persample_grad_norms(low, low_inputs).norms
    assert norms.dtype == torch.float32
    autograd_error = _max_relative_error(_loop_norms(low, low_inputs), exact)
    our_error = _max_relative_error(norms, exact)
    assert our_error <= max(2 * autograd_error, 4 * torch.finfo(dtype).eps), (our_error, autograd_error)


def test_logits_are_the_models_output():
    model, inputs = _float64("residual_cnn")
    torch.testing.assert_close(persample_grad_norms(model, inputs).logits, model(inputs).detach())


def test_parameter_selection_by_names_and_predicate():
    model, inputs = _float64("residual_cnn")
    names = ["head.weight", "down.bias", "bn2.weight"]
    by_name = persample_grad_norms(model, inputs, params=names)
    torch.testing.assert_close(by_name.norms, _loop_norms(model, inputs, names=names), rtol=1e-6, atol=1e-12)
    by_predicate = persample_grad_norms(model, inputs, params=lambda name, p: name in names)
    torch.testing.assert_close(by_predicate.norms, by_name.norms)


def test_frozen_parameters_are_excluded_with_params_trainable():
    model, inputs = _float64("sequence")
    model.embed.weight.requires_grad_(False)
    model.conv.requires_grad_(False)
    result = persample_grad_norms(model, inputs, params="trainable")
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    assert "embed" not in result.layer_names and "conv" not in result.layer_names
    assert not model.embed.weight.requires_grad and model.head.weight.requires_grad


def test_both_rules_agree_on_a_linear_layer(monkeypatch):
    """The ghost and materialise identities give the same norm (forced either way)."""
    from gradood.persample import _rules

    model, inputs = _float64("sequence")
    results = {}
    for forced in (True, False):
        monkeypatch.setattr(_rules, "prefers_ghost", lambda *args, forced=forced: forced)
        results[forced] = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(results[True].per_layer, results[False].per_layer, rtol=1e-10, atol=1e-14)
    assert "ghost" in results[True].methods and "materialise" in results[False].methods


def test_the_model_is_left_untouched():
    model, inputs = _float64("residual_cnn")
    model.stem.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    persample_grad_norms(model, inputs)
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())
    assert not model.training


def test_the_model_is_restored_when_the_loss_raises():
    model, inputs = _float64("mlp_4d")

    def broken(logits):
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        persample_grad_norms(model, inputs, loss=broken)
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_batch_invariance():
    model, inputs = _float64("residual_cnn")
    whole = persample_grad_norms(model, inputs).norms
    halves = torch.cat([persample_grad_norms(model, inputs[:2]).norms, persample_grad_norms(model, inputs[2:]).norms])
    torch.testing.assert_close(whole, halves)


def test_inputs_that_require_grad_give_the_same_norms():
    model, inputs = _float64("residual_cnn")
    expected = persample_grad_norms(model, inputs).norms
    leaf = inputs.clone().requires_grad_()
    torch.testing.assert_close(persample_grad_norms(model, leaf).norms, expected, rtol=0, atol=0)
    assert leaf.grad is None


class _ModifiesAnInputInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        hidden = self.first(x) + 0
        out = self.second(hidden)
        hidden.add_(1.0)  # the input `second` was called with, changed after the call
        return self.head(out)


def test_an_input_modified_in_place_after_its_layer_ran_is_refused():
    with pytest.raises(RuntimeError, match="the input of second was modified in place"):
        persample_grad_norms(_ModifiesAnInputInPlace().eval(), torch.randn(3, 4))


class _BackwardInsideForward(nn.Module):
    """A forward that runs a backward of its own (an input-gradient feature) through
    a hooked layer's output before the loss exists: that gradient is not the loss's."""

    def __init__(self):
        super().__init__()
        self.first, self.second, self.head = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        hidden = self.first(x)
        out = torch.tanh(self.second(hidden))
        (feature,) = torch.autograd.grad(out.square().sum(), hidden, retain_graph=True)  # a constant downstream
        return self.head(out + feature)


def test_a_backward_inside_the_forward_does_not_count_as_the_loss_gradient():
    torch.manual_seed(0)
    model = _BackwardInsideForward().double().eval()
    inputs = torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)


def _conv_stack() -> nn.Module:
    def block(c_in, c_out, stride=1):
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    layers = [*block(3, 32), *block(32, 32), *block(32, 64, 2), *block(64, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return _randomise_batch_norms(nn.Sequential(*layers, nn.Linear(64, 10)), 0).eval()


@pytest.mark.parametrize("name", ["conv_stack", "sequence"])
def test_peak_memory_stays_within_1_3x_of_a_training_step(name):
    """Each layer is reduced during the backward as soon as its output gradient
    exists, so the output gradients of all layers never exist at once, no copy of
    a layer's output is kept, and a CPU kernel's scratch stays within its layer's
    own input and output gradient. (It was 2.5x before: every output gradient at
    once, plus a copy of every hooked output.) Float32, deterministic sizes."""
    if name == "conv_stack":
        model, inputs = _conv_stack(), torch.randn(16, 3, 32, 32)
    else:
        model, inputs = _SequenceNet().eval(), torch.randint(0, 11, (16, 64))

    def training_step():
        model.zero_grad(set_to_none=True)
        logits = model(inputs)
        F.cross_entropy(logits, logits.argmax(1)).backward()

    step = peak_memory_bytes(training_step)
    model.zero_grad(set_to_none=True)
    ours = peak_memory_bytes(lambda: persample_grad_norms(model, inputs))
    assert step > 0
    assert ours <= 1.3 * step, (ours, step)


def test_train_mode_batch_norm_is_refused():
    model, inputs = _float64("residual_cnn")
    model.train()
    with pytest.raises(ValueError, match=r"bn1 \(BatchNorm2d\) normalises with batch statistics.*model.eval\(\)"):
        persample_grad_norms(model, inputs)


def test_train_mode_dropout_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"1 \(Dropout\) is in train mode"):
        persample_grad_norms(model, torch.randn(3, 4))


def test_parameters_of_modules_without_a_rule_are_exact_op_by_op():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2)).double().eval()
    inputs = torch.randn(3, 4, dtype=torch.float64)
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    assert dict(zip(result.layer_names, result.methods))["1.weight"] == "op-vjp"
    result = persample_grad_norms(model, inputs, params=lambda name, p: not name.startswith("1."))
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs, names=["0.weight", "0.bias", "2.weight", "2.bias"]))


def test_functionally_used_parameters_are_exact_op_by_op():
    class WithPositionEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.pos_embed = nn.Parameter(torch.randn(1, 3, 4))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head((x + self.pos_embed).mean(1))

    model, inputs = WithPositionEmbedding().double(), torch.randn(2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)


def test_an_unused_layer_in_a_bfloat16_model_counts_zero():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(4, 3)

        def forward(self, x):
            return self.used(x)

    model = WithSpare().to(torch.bfloat16)
    result = persample_grad_norms(model, torch.randn(2, 4, dtype=torch.bfloat16), per_layer=True)
    assert result.methods[1] == "unused" and torch.equal(result.per_layer[:, 1], torch.zeros(2))


class _Reused(nn.Module):
    """One Linear, one Conv2d and one LayerNorm, each called twice (as ALBERT's shared layer)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.linear, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.LayerNorm(8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # [B, 2, 2, 2]
        x = torch.tanh(self.conv(torch.tanh(self.conv(x)))).flatten(1)
        x = self.norm(torch.tanh(self.linear(self.norm(x))))
        return self.head(torch.tanh(self.linear(x)))


def test_reused_modules_match_the_loop():
    torch.manual_seed(4)
    model, inputs = _Reused().double().eval(), torch.randn(5, 2, 2, 2, dtype=torch.float64)
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)
    methods = dict(zip(result.layer_names, result.methods))
    assert methods["conv"] == methods["norm"] == "reused" and methods["linear"] != "reused"  # concatenated positions
    assert all(not m._forward_hooks for m in model.modules())
    from gradood.persample import persample_gradients
    from test_persample_gradients import _check_operator, _loop_grads

    _check_operator(persample_gradients(model, inputs, loss="logsumexp"), _loop_grads(model, inputs))


def test_top_level_name():
    import gradood

    model, inputs = _float64("mlp_4d")
    torch.testing.assert_close(gradood.persample_grad_norms(model, inputs).norms, persample_grad_norms(model, inputs).norms)


@pytest.mark.parametrize("batch_first", [True, False])
def test_class_token_and_position_embedding_are_exact_without_options(batch_first):
    model, inputs = _vit(batch_first)
    result = persample_grad_norms(model, inputs, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    methods = dict(zip(result.layer_names, result.methods))
    assert methods["cls_token"] == "op-vjp" and methods["pos_embed"] == "op-add"  # a concatenation, an addition


@pytest.mark.parametrize("batch_first", [True, False])
def test_broadcast_functional_parameters_match_the_loop(batch_first):
    model, inputs = _vit(batch_first)
    parameters = list(model.named_parameters())
    result = persample_grad_norms(model, inputs, functional_params="broadcast", per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    assert result.layer_names[-2:] == ("cls_token", "pos_embed")
    assert list(model.named_parameters()) == parameters  # the same objects, in the same order
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


def test_functional_params_option_is_checked():
    model, inputs = _vit()
    with pytest.raises(ValueError, match="functional_params must be None or 'broadcast'"):
        persample_grad_norms(model, inputs, functional_params="yes")


@pytest.mark.parametrize("batch_first", [True, False])
def test_vit_like_model_matches_the_loop(batch_first):
    model, inputs = _vit(batch_first)
    names = [name for name, _ in model.named_parameters() if name not in ("cls_token", "pos_embed")]
    result = persample_grad_norms(model, inputs, params=names, per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs, names=names), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(result.logits, model(inputs).detach())
    assert "attention" in result.layer_names
    assert all(not m._forward_hooks for m in model.modules()) and "forward" not in model.attention.__dict__


class _CrossAttention(nn.Module):
    """Separate k/v dims, a key padding mask derived from the input, a causal bool
    mask, and attention weights requested per head (or not: the fused kernel)."""

    def __init__(self, need_weights: bool = True):
        super().__init__()
        self.need_weights = need_weights
        self.memory = nn.Linear(8, 6)
        self.attention = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x: [B, T, 8]
        memory = torch.tanh(self.memory(x))
        padding = x[..., 0] > 1.0  # per sample
        padding[:, 0] = False  # every query keeps a key
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        out, weights = self.attention(x.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1),
                                      key_padding_mask=padding, attn_mask=causal, average_attn_weights=False,
                                      need_weights=self.need_weights)
        if not self.need_weights:
            return self.head(out.mean(0))
        return self.head(out.mean(0)) + weights.sum((1, 2, 3))[:, None]


@pytest.mark.parametrize("need_weights", [True, False])
def test_cross_attention_with_masks_matches_the_loop(need_weights):
    model = _CrossAttention(need_weights).double().eval()
    inputs = torch.randn(4, 5, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    result = persample_grad_norms(model, inputs)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(result.logits, model(inputs).detach())


def test_attention_with_bias_kv_is_refused():
    attention = nn.MultiheadAttention(4, 2, add_bias_kv=True, batch_first=True)

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = attention

        def forward(self, x):
            return self.attention(x, x, x)[0].mean(1)

    with pytest.raises(ValueError, match="add_bias_kv or add_zero_attn is not supported"):
        persample_grad_norms(Wrapper().eval(), torch.randn(2, 3, 4), params=["attention.in_proj_weight"])
    assert "forward" not in attention.__dict__


def test_bad_arguments():
    model, inputs = _float64("mlp_4d")
    with pytest.raises(ValueError, match="loss must be one of"):
        persample_grad_norms(model, inputs, loss="hinge")
    with pytest.raises(ValueError, match="loss='ce' needs targets"):
        persample_grad_norms(model, inputs, loss="ce")
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        persample_grad_norms(model, inputs, temperature=0.0)
    with pytest.raises(ValueError, match="non-empty batch"):
        persample_grad_norms(model, inputs[:0])
    with pytest.raises(ValueError, match="params names unknown parameters"):
        persample_grad_norms(model, inputs, params=["nope.weight"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        persample_grad_norms(lambda x: x, inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_float32_matches_the_float64_loop(name):
    model, inputs = _float64(name)
    expected = _loop_norms(model, inputs)
    cuda_model = copy.deepcopy(model).float().cuda()
    cuda_inputs = (inputs.float() if inputs.is_floating_point() else inputs).cuda()
    norms = persample_grad_norms(cuda_model, cuda_inputs).norms
    torch.testing.assert_close(norms.double().cpu(), expected, rtol=1e-4, atol=1e-6)


def test_torch_func_fallback_is_not_used_where_ops_suffice():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.PReLU(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double().eval()
    inputs = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    result = persample_grad_norms(model, inputs, fallback="torch.func", per_layer=True)
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    assert result.methods[result.layer_names.index("1.weight")] == "op-vjp"
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_torch_func_fallback_covers_parameters_of_the_model_itself():
    """A ViT's class token and position embedding (the root module's own
    parameters) by replaying the root per sample: exact, whatever their use."""
    model, inputs = _vit()
    result = persample_grad_norms(model, inputs, fallback="torch.func")
    torch.testing.assert_close(result.norms, _loop_norms(model, inputs), rtol=1e-6, atol=1e-12)
    assert "forward" not in model.attention.__dict__


def test_torch_func_fallback_needs_a_module_taking_the_batch_as_one_tensor():
    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.head = nn.Linear(3, 2)

        def forward(self, x, y):  # scale meets a sum over the batch: no sample's own rows
            return self.head(torch.einsum("btc,c->tc", x, self.scale).mean(0) + y)

    inputs = {"x": torch.randn(2, 4, 3), "y": torch.randn(2, 3)}
    with pytest.raises(ValueError, match=r"combines the parameters \['scale'\] with the batch.*no module around it "
                                         "takes the batch as one tensor"):
        persample_grad_norms(Folded(), inputs, fallback="torch.func")
    with pytest.raises(ValueError, match="fallback must be None or 'torch.func'"):
        persample_grad_norms(Folded(), inputs, fallback="vmap")




def test_layers_called_with_keyword_arguments_match_the_loop():
    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.head = nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(input=self.norm(input=torch.tanh(self.a(input=x))))

    torch.manual_seed(0)
    model, inputs = Keywords().double().eval(), torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, _loop_norms(model, inputs), rtol=1e-10, atol=0)


def test_frozen_parameters_count_by_default():
    """Freezing a backbone for inference does not turn the full-network norm into a head-only one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double().eval()
    inputs = torch.randn(3, 4, dtype=torch.float64)
    expected = _loop_norms(model, inputs)
    model[0].requires_grad_(False)
    torch.testing.assert_close(persample_grad_norms(model, inputs).norms, expected, rtol=1e-10, atol=0)
    head_only = persample_grad_norms(model, inputs, params="trainable").norms
    torch.testing.assert_close(head_only, _loop_norms(model, inputs), rtol=1e-10, atol=0)  # the loop skips frozen ones
    assert not model[0].weight.requires_grad  # the flags as they were


def test_ce_pred_on_confident_float32_samples_keeps_the_predicted_class_term():
    """In float32, p_ŷ − 1 of a sample with a logit gap over ~17 cancels to 0, so the
    predicted class's gradient vanished (norms 30-45% off at gaps of 25-36); the losses
    are computed in float64 now. The reference is the float64 model's loop."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.mul_(20)
        model[2].bias.copy_(torch.tensor([10.0, -10.0]))  # logit gaps 21-32
    inputs = torch.randn(5, 4)
    gaps = model(inputs).detach()
    assert bool(((gaps[:, 0] - gaps[:, 1]).abs() > 20).all())
    expected = _loop_norms(copy.deepcopy(model).double(), inputs.double(), "ce_pred")
    got = persample_grad_norms(model, inputs, loss="ce_pred").norms
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_parameters_the_forward_never_uses_have_zero_norms():
    # Selecting only a layer the forward does not call: the loss depends on none of the
    # selected parameters, so every per-sample gradient is zero (was autograd's raw error).
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 3)
            self.spare = nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = WithSpare().eval()
    inputs = torch.randn(5, 4)
    spare = lambda name, _: name.startswith("spare")  # noqa: E731
    for verify in (True, 2):
        result = persample_grad_norms(model, inputs, params=spare, verify=verify)
        assert torch.equal(result.norms, torch.zeros(5)) and result.methods == ("unused",)
    grads = persample_gradients(model, inputs, params=spare)
    directions = {name: torch.randn(3, torch.Size(shape).numel()) for name, shape in grads.shapes.items()}
    assert torch.equal(grads.project(directions), torch.zeros(5, 3))
