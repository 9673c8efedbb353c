"""Per-sample norms and gradients on the layer classes of timm and Hugging Face
transformers, and on whole small models built from them, against a float64
per-sample autograd loop — with no options (no functional_params, no fallback)
and, for the layers with a rule, no parameter on a slow path."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradood import model_io
from gradood.persample import persample_grad_norms, persample_gradients
import zoo

SLOW = ("torch.func", "op-vjp", "reused")


def loop_norms(model: nn.Module, inputs, loss=lambda logits: torch.logsumexp(logits, 1)) -> torch.Tensor:
    """One backward per sample, all parameters, float64 (the ground truth)."""
    norms = []
    for index in range(model_io.batch_size(inputs)):
        sample = model_io.select(inputs, torch.tensor([index]))
        model.zero_grad(set_to_none=True)
        loss(model_io.logits_of("loop", model_io.call(model, sample))).sum().backward()
        norms.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None).sqrt())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


def loop_grads(model: nn.Module, inputs) -> dict:
    grads = {name: [] for name, _ in model.named_parameters()}
    for index in range(model_io.batch_size(inputs)):
        model.zero_grad(set_to_none=True)
        logits = model_io.logits_of("loop", model_io.call(model, model_io.select(inputs, torch.tensor([index]))))
        torch.logsumexp(logits, 1).sum().backward()
        for name, parameter in model.named_parameters():
            grads[name].append(torch.zeros_like(parameter) if parameter.grad is None else parameter.grad.clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(values) for name, values in grads.items()}


def check_projections(result, expected: dict, seed: int = 0) -> None:
    """The operator's projections and weighted sums against the per-sample gradients
    (random directions; the dense checks of test_persample_gradients suit tiny models only)."""
    generator = torch.Generator().manual_seed(seed)
    directions = {name: torch.randn(4, grads[0].numel(), generator=generator, dtype=torch.float64)
                  for name, grads in expected.items()}
    want = sum(grads.reshape(grads.shape[0], -1) @ directions[name].T for name, grads in expected.items())
    torch.testing.assert_close(result.project(directions), want, rtol=1e-9, atol=1e-12)
    weights = torch.randn(want.shape[0], 2, generator=generator, dtype=torch.float64)
    sums = result.weighted_sum(weights)
    for name, grads in expected.items():
        torch.testing.assert_close(sums[name], weights.T @ grads.reshape(grads.shape[0], -1), rtol=1e-9, atol=1e-12)


def _double(model: nn.Module, inputs):
    return model.double().eval(), model_io.map_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)


def assert_exact(model: nn.Module, inputs, slow_allowed=(), gradients: bool = True):
    model, inputs = _double(model, inputs)
    result = persample_grad_norms(model, inputs, loss="logsumexp", per_layer=True)
    torch.testing.assert_close(result.norms, loop_norms(model, inputs), rtol=1e-9, atol=1e-12)
    slow = [name for name, method in zip(result.layer_names, result.methods) if method in SLOW]
    assert all(any(part in name for part in slow_allowed) for name in slow), slow
    if gradients:
        check_projections(persample_gradients(model, inputs, loss="logsumexp"), loop_grads(model, inputs))
    return result


def _conv_model(conv: nn.Module, size: int = 7) -> nn.Module:
    with torch.no_grad():
        out = conv(torch.zeros(1, conv.in_channels, size, size))
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(out[0].numel(), 3))


STD_CONV_CASES = {
    "plain": dict(kernel_size=3),
    "stride-padding": dict(kernel_size=3, stride=2, padding=2),
    "groups-dilation": dict(kernel_size=3, groups=2, dilation=2),
    "depthwise-bias": dict(kernel_size=3, groups=4, bias=True),
    "1x1-eps": dict(kernel_size=1, eps=1e-2),
}


@pytest.mark.parametrize("case", STD_CONV_CASES)
@pytest.mark.parametrize("kind", ["StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame"])
def test_weight_standardised_convolutions_match_the_loop(kind, case):
    layers = zoo.timm_module().layers
    kwargs = dict(STD_CONV_CASES[case])
    if "Same" in kind:
        kwargs.pop("padding", None)
    if kind.startswith("Scaled"):
        kwargs.setdefault("bias", False)
    torch.manual_seed(0)
    conv = getattr(layers, kind)(4, 8, **kwargs)
    if kind.startswith("Scaled"):
        with torch.no_grad():
            conv.gain.uniform_(0.5, 1.5)
    result = assert_exact(_conv_model(conv), torch.randn(3, 4, 7, 7))
    assert result.methods[0] in ("ghost", "materialise")


def test_weight_standardised_convolutions_in_float32_are_close():
    layers = zoo.timm_module().layers
    torch.manual_seed(0)
    model = _conv_model(layers.StdConv2d(4, 6, 3)).eval()
    inputs = torch.randn(3, 4, 7, 7)
    norms = persample_grad_norms(model, inputs, loss="logsumexp").norms
    expected = loop_norms(_double(model, inputs)[0], inputs.double())
    torch.testing.assert_close(norms.double(), expected, rtol=1e-4, atol=0)


class _Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        Conv1D = zoo.transformers_module().pytorch_utils.Conv1D
        self.a, self.b, self.head = Conv1D(8, 5), Conv1D(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # [B, T, 5] and a 2-D use
        hidden = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(hidden.mean(1))))


def test_transformers_conv1d_matches_the_loop():
    torch.manual_seed(0)
    result = assert_exact(_Conv1DNet(), torch.randn(3, 4, 5))
    assert dict(zip(result.layer_names, result.methods))["a"] in ("ghost", "materialise")


def _norm_act_model(kind: str) -> nn.Module:
    layers = zoo.timm_module().layers
    norm = {
        "BatchNormAct2d": lambda: layers.BatchNormAct2d(4, act_layer=nn.SiLU),
        "GroupNormAct": lambda: layers.GroupNormAct(4, num_groups=2, act_layer=nn.GELU),
        "LayerNormAct2d": lambda: layers.LayerNormAct2d(4),
        "LayerNorm2d": lambda: layers.LayerNorm2d(4),
        "LayerScale2d": lambda: layers.LayerScale2d(4, init_values=0.5),
        "RmsNorm2d": lambda: layers.RmsNorm2d(4),
    }[kind]()
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    for parameter in norm.parameters():
        with torch.no_grad():
            parameter.add_(torch.rand_like(parameter) * 0.5)
    return nn.Sequential(nn.Conv2d(3, 4, 3), norm, nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


@pytest.mark.parametrize("kind", ["BatchNormAct2d", "GroupNormAct", "LayerNormAct2d", "LayerNorm2d", "LayerScale2d",
                                  "RmsNorm2d"])
def test_timm_norm_and_scale_layers_match_the_loop(kind):
    torch.manual_seed(0)
    assert_exact(_norm_act_model(kind), torch.randn(3, 3, 5, 5))


def test_an_embedding_on_ids_shared_by_the_batch_is_broadcast():
    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens, self.positions, self.head = nn.Embedding(10, 4), nn.Embedding(6, 4), nn.Linear(4, 3)
            self.register_buffer("ids", torch.arange(6)[None])  # [1, T], as BERT's position ids

        def forward(self, x):
            hidden = self.tokens(x) + self.positions(self.ids[:, : x.shape[1]])
            return self.head(torch.tanh(hidden).mean(1))

    result = assert_exact(Positions(), torch.randint(0, 10, (3, 5)))
    assert dict(zip(result.layer_names, result.methods))["positions"] == "direct"  # the Embedding rule


@pytest.mark.parametrize("calls", [1, 2])
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_an_embedding_scaling_gradients_by_frequency_divides_by_the_samples_own_counts(calls, padding_idx):
    """scale_grad_by_freq: a sample alone divides each id's gradient by its count in
    that sample (per call, for an embedding called twice); it used to be ignored."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 4, padding_idx=padding_idx, scale_grad_by_freq=True)
            self.head = nn.Linear(4, 3)

        def forward(self, ids):
            hidden = self.embed(ids)
            if calls == 2:
                hidden = hidden + self.embed(ids.flip(1)[:, :3]).mean(1, keepdim=True)
            return self.head(torch.tanh(hidden).mean(1))

    torch.manual_seed(0)
    ids = torch.tensor([[1, 1, 1, 2, 0, 3], [4, 4, 2, 2, 2, 2], [0, 1, 2, 3, 4, 1]])
    result = assert_exact(Tokens(), ids)
    assert dict(zip(result.layer_names, result.methods))["embed"] == "direct"


class _SharedTableMLP(nn.Module):
    """As timm's Swin V2 continuous position bias: an MLP on a [1, N, 2] table whose
    output is reshaped to [N, heads] and indexed, so expanding that table to the batch
    (as for BERT's position ids) would change what the model computes."""

    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.randn(1, 5, 2))
        self.register_buffer("index", torch.randint(0, 5, (6,)))
        self.mlp, self.head = nn.Linear(2, 2), nn.Linear(4, 3)

    def forward(self, x):
        bias = self.mlp(self.table).view(-1, 2)[self.index]
        return self.head(torch.tanh(x + bias.repeat(1, 2)).mean(1))


def test_a_layer_on_a_shared_table_reshaped_after_it_is_found_direct_after_the_check():
    torch.manual_seed(0)
    model = _SharedTableMLP()
    first = assert_exact(model, torch.randn(1, 6, 4))  # one sample: the broadcast layout passes the check
    second = assert_exact(model, torch.randn(5, 6, 4))  # five: it does not; the direct layout does
    assert "mlp" in first.layer_names and {"mlp.weight", "mlp.bias"} <= set(second.layer_names)  # op by op
    assert_exact(model, torch.randn(4, 6, 4))  # and is kept


class _ScaledEmbedding(nn.Embedding):
    """As the scaled word embeddings of Gemma, BART, BioGPT: the table's output times a constant."""

    def forward(self, ids):
        return super().forward(ids) * 3.0


@pytest.mark.parametrize("options", [{}, {"padding_idx": 0}, {"padding_idx": -1, "scale_grad_by_freq": True}])
def test_an_embedding_subclass_scaling_its_output_takes_the_embedding_rule(options):
    """Its table is direct (no rule for the subclass); its F.embedding call is the
    embedding rule's piece, so no per-sample table is formed (it was the op-by-op VJP)."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = _ScaledEmbedding(7, 4, **options), nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)).mean(1))

    torch.manual_seed(0)
    ids = torch.tensor([[1, 1, 2, 0, 3], [4, 4, 6, 2, 2], [0, 5, 2, 3, 1]])
    result = assert_exact(Tokens(), ids)
    assert dict(zip(result.layer_names, result.methods))["embed.weight"] == "direct"


def _timm_bit():
    timm = zoo.timm_module()
    conv = functools.partial(timm.layers.StdConv2d, eps=1e-8)
    norm = functools.partial(timm.layers.GroupNormAct, num_groups=4)
    return timm.models.resnetv2.ResNetV2(layers=[1, 1], channels=(16, 32), num_classes=4, stem_chs=8,
                                         conv_layer=conv, norm_layer=norm)


def _timm(name, **kwargs):
    return zoo.timm_module().create_model(name, pretrained=False, num_classes=4, **kwargs)


TIMM_MODELS = {
    "bit": (_timm_bit, 32, ()),
    "nfnet": (lambda: _timm("test_nfnet"), 32, ()),
    "vit": (lambda: _timm("test_vit", img_size=32), 32, ("cls_token",)),
    "deit-distilled": (lambda: _timm("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, embed_dim=32,
                                     depth=1, num_heads=2), 32, ("cls_token", "dist_token")),
    "convnext": (lambda: _timm("test_convnext"), 32, ()),
    "efficientnet": (lambda: _timm("efficientnet_b0", drop_rate=0.0, drop_path_rate=0.0), 32, ()),
}


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_models_match_the_loop_without_options(name):
    build, size, slow = TIMM_MODELS[name]
    torch.manual_seed(0)
    assert_exact(build(), torch.randn(2, 3, size, size), slow_allowed=slow, gradients=name in ("bit", "vit"))


HF_MODELS = {
    "bert": (zoo.hf_bert, zoo.text_batch, ()),
    "distilbert": (zoo.hf_distilbert, zoo.text_batch, ()),
    "gpt2": (zoo.hf_gpt2, zoo.text_batch, ()),
    "gemma": (zoo.hf_gemma, zoo.text_batch, ()),
    "vit": (zoo.hf_vit, zoo.image_batch, ("cls_token",)),
    "deit-distilled": (zoo.hf_deit_distilled, zoo.image_batch, ("cls_token", "distillation_token")),
    "convnext": (zoo.hf_convnext, zoo.image_batch, ()),
    "bit": (zoo.hf_bit, zoo.image_batch, ()),
    "bit-same-padding": (functools.partial(zoo.hf_bit, padding="SAME"), functools.partial(zoo.image_batch, size=33), ()),
}


@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_models_match_the_loop_without_options(name):
    build, batch, slow = HF_MODELS[name]
    torch.manual_seed(0)
    assert_exact(build(), batch(3), slow_allowed=slow, gradients=name in ("bert", "gpt2", "gemma", "bit-same-padding"))


def test_a_mixture_of_experts_is_an_error_naming_the_fallback_which_is_exact():
    """Experts take tokens of several samples in one grouped matmul: no rule separates them,
    so the error names fallback='torch.func', which replays the MoE block per sample (the
    single-sample check in float32: the grouped matmul has no float64 kernel)."""
    torch.manual_seed(0)
    model, batch = zoo.hf_qwen2_moe(), zoo.text_batch(3)
    with pytest.raises(ValueError, match=r"mlp\.experts.*fallback='torch.func'"):
        persample_grad_norms(model, batch, loss="logsumexp")
    result = persample_grad_norms(model, batch, loss="logsumexp", fallback="torch.func", per_layer=True)
    torch.testing.assert_close(result.norms, loop_norms(model, batch), rtol=1e-5, atol=1e-7)
    assert "torch.func" in result.methods


@pytest.mark.parametrize("call", ["positional", "keywords", "bias-first", "no-bias", "none-first"])
def test_f_linear_with_a_childs_weight_by_keyword_is_a_linear_piece(call):
    """timm's EVA attention: F.linear(x, weight=self.qkv.weight, bias=qkv_bias) with a bias
    built from q and v biases. The weight took the op-by-op VJP when passed by keyword."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.head = nn.Linear(4, 6, bias=False), nn.Linear(6, 3)
            self.q_bias, self.v_bias = nn.Parameter(torch.randn(2)), nn.Parameter(torch.randn(2))

        def forward(self, x):
            bias = torch.cat([self.q_bias, torch.zeros(2), self.v_bias])
            weight = self.qkv.weight
            if call == "positional":
                out = F.linear(x, weight, bias)
            elif call == "keywords":
                out = F.linear(x, weight=weight, bias=bias)
            elif call == "bias-first":
                out = F.linear(input=x, bias=bias, weight=weight)
            elif call == "no-bias":
                out = F.linear(x, weight=weight, bias=None)
            else:
                out = F.linear(x, bias=None, weight=weight) + bias
            return self.head(torch.tanh(out).mean(1))

    torch.manual_seed(0)
    result = assert_exact(Attention(), torch.randn(3, 5, 4))
    assert dict(zip(result.layer_names, result.methods))["qkv.weight"] not in SLOW
