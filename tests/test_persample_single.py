"""A batch of one sample: persample_grad_norms takes one plain autograd backward, which
must give what the batched engine gives for that sample, with the same refusals."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import zoo
from gradood.persample import engine, persample_grad_norms
from test_persample import MODELS, _float64, _loop_norms
from test_persample_zoo_layers import _double

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def _first(inputs):
    if isinstance(inputs, dict):
        return {key: value[:1] for key, value in inputs.items()}
    return inputs[:1]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("loss", ["ce_pred", "kl_uniform", "logsumexp"])
def test_one_sample_equals_its_row_of_the_batch_and_the_loop(name, loss):
    model, inputs = _float64(name)
    batch = persample_grad_norms(model, inputs, loss=loss, per_layer=True)
    single = persample_grad_norms(model, inputs[:1], loss=loss, per_layer=True)
    assert set(single.methods) <= {"autograd", "unused"} and "autograd" in single.methods
    assert single.layer_names == batch.layer_names and single.parameters == batch.parameters
    torch.testing.assert_close(single.per_layer, batch.per_layer[:1], rtol=1e-10, atol=1e-300)
    torch.testing.assert_close(single.norms, batch.norms[:1], rtol=1e-10, atol=0)
    torch.testing.assert_close(single.norms, _loop_norms(model, inputs[:1], loss=loss), rtol=1e-12, atol=0)
    torch.testing.assert_close(single.logits, model(inputs[:1]).detach(), rtol=0, atol=0)
    assert persample_grad_norms(model, inputs[:1], loss=loss).per_layer is None


def test_one_sample_with_targets_temperature_and_a_parameter_selection():
    model, inputs = _float64("residual_cnn")
    targets = torch.tensor([3])
    keep = lambda name, p: not name.startswith("stem")  # noqa: E731
    single = persample_grad_norms(model, inputs[:1], loss="ce", targets=targets, temperature=2.5, params=keep)
    batch = persample_grad_norms(model, inputs[:2], loss="ce", targets=torch.tensor([3, 0]), temperature=2.5, params=keep)
    torch.testing.assert_close(single.norms, batch.norms[:1], rtol=1e-10, atol=0)
    assert "stem" not in single.layer_names
    with pytest.raises(ValueError, match=r"loss='ce' needs targets of shape \[1\]"):
        persample_grad_norms(model, inputs[:1], loss="ce", targets=torch.tensor([3, 0]))


@pytest.mark.parametrize("build,batch", [(zoo.hf_bert, zoo.text_batch), (zoo.hf_vit, zoo.image_batch)])
def test_hugging_face_models_at_one_sample(build, batch):
    torch.manual_seed(0)
    model, inputs = _double(build(), batch(3))
    whole = persample_grad_norms(model, inputs, loss="logsumexp", per_layer=True)
    single = persample_grad_norms(model, _first(inputs), loss="logsumexp", per_layer=True)
    assert single.layer_names == whole.layer_names
    torch.testing.assert_close(single.per_layer, whole.per_layer[:1], rtol=1e-9, atol=1e-300)


def test_a_tied_weight_counts_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.embed(ids)).mean(1))

    torch.manual_seed(1)
    model = Tied().double().eval()
    ids = torch.randint(0, 7, (3, 5))
    single = persample_grad_norms(model, ids[:1], per_layer=True)
    torch.testing.assert_close(single.norms, _loop_norms(model, ids[:1]), rtol=1e-12, atol=0)
    torch.testing.assert_close(single.norms, persample_grad_norms(model, ids).norms[:1], rtol=1e-10, atol=0)
    assert single.per_layer.shape[1] == len(single.layer_names) == 1


def test_the_model_is_left_untouched_at_one_sample():
    model, inputs = _float64("residual_cnn")
    model.stem.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    persample_grad_norms(model, inputs[:1])
    assert all(p.grad is None for p in model.parameters())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())
    assert not model.training

    def broken(logits):
        raise RuntimeError("loss exploded")

    with pytest.raises(RuntimeError, match="loss exploded"):
        persample_grad_norms(model, inputs[:1], loss=broken)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_one_sample_is_refused_where_a_batch_is():
    model, inputs = _float64("residual_cnn")
    model.train()
    with pytest.raises(ValueError, match=r"bn1 \(BatchNorm2d\) normalises with batch statistics"):
        persample_grad_norms(model, inputs[:1])
    dropout = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"1 \(Dropout\) is in train mode"):
        persample_grad_norms(dropout, torch.randn(1, 4))
    with pytest.raises(ValueError, match="loss must be one of"):
        persample_grad_norms(model.eval(), inputs[:1], loss="hinge")
    with pytest.raises(ValueError, match="the loss must be per sample"):
        persample_grad_norms(model, inputs[:1], loss=lambda logits: logits.sum(1).repeat(2))


def test_a_loss_independent_of_the_parameters_gives_zero():
    model, inputs = _float64("mlp_4d")
    result = persample_grad_norms(model, inputs[:1], loss=lambda logits: logits.detach().sum(1), per_layer=True)
    assert torch.equal(result.norms, torch.zeros(1, dtype=torch.float64))
    assert set(result.methods) == {"unused"}


def test_half_precision_models_keep_the_engine_at_one_sample():
    model, inputs = MODELS["mlp_4d"]
    model = copy.deepcopy(model).to(torch.bfloat16).eval()
    result = persample_grad_norms(model, inputs[:1].to(torch.bfloat16), per_layer=True)
    assert "autograd" not in result.methods
    assert engine._single_sample_norms(
        model, inputs[:1].to(torch.bfloat16), "ce_pred", 1.0, None, None, None, None, None, None
    ) is None


def test_a_sparse_embedding_gradient_at_one_sample():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 3)).double().eval()
    ids = torch.randint(0, 10, (2, 3))
    single = persample_grad_norms(model, ids[:1]).norms
    torch.testing.assert_close(single, persample_grad_norms(model, ids).norms[:1], rtol=1e-12, atol=0)
    torch.testing.assert_close(single, _loop_norms(model, ids[:1]), rtol=1e-12, atol=0)
