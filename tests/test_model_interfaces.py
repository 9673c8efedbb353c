"""Detectors on the interfaces real models have: outputs that hold the logits
(dict/ModelOutput, tuple, a `logits=` callable), keyword-argument inputs (a
tokenised batch) from a mapping or a DataLoader, heads run on every token with
one picked per sample, and two averaged heads — on toy models and on models
built from Hugging Face transformers' classes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradood
from gradood import detectors as D

import zoo

FORWARD_ONLY = [D.MSP, D.MaxLogit, D.Energy, D.GradNorm, D.ExGrad, D.RG]
FITTED = [D.ReAct, D.KLMatching, D.RGAdditive]
EVERY_FORWARD = FORWARD_ONLY + FITTED


class Net(nn.Module):
    """features → logits; `kind` chooses what forward returns."""

    def __init__(self, kind: str = "tensor"):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x=None, scale=1.0, pixel_values=None):
        x = pixel_values if x is None else x
        features = self.body(x * scale)
        logits = self.head(features)
        if self.kind == "dict":
            return {"hidden": features, "logits": logits}
        if self.kind == "tuple":
            return logits, features
        if self.kind == "object":
            return type("Out", (), {"scores": logits})()
        return logits


def _scores(make, model, inputs, fit_data=None, **kwargs):
    detector = make(model, **kwargs)
    detector.fit(inputs if fit_data is None else fit_data)
    return detector.score(inputs)


@pytest.mark.parametrize("make", EVERY_FORWARD + [D.ODIN, D.GRODIN, D.FullGradNorm], ids=lambda m: m.__name__)
@pytest.mark.parametrize("kind", ["dict", "tuple", "object"])
def test_outputs_holding_the_logits_score_as_the_plain_model(make, kind):
    plain, wrapped = Net("tensor"), Net(kind)
    wrapped.load_state_dict(plain.state_dict())
    x = torch.randn(5, 6)
    kwargs = {"logits": lambda out: out.scores} if kind == "object" else {}
    torch.testing.assert_close(_scores(make, wrapped, x, **kwargs), _scores(make, plain, x))


@pytest.mark.parametrize("make", EVERY_FORWARD + [D.ODIN, D.GRODIN, D.FullGradNorm, D.LowDimGrad],
                         ids=lambda m: m.__name__)
def test_mapping_inputs_are_keyword_arguments(make):
    model = Net()
    x = torch.randn(6, 6)
    kwargs = {"dim": 3} if make is D.LowDimGrad else {}
    expected = _scores(make, model, x * 2, **kwargs)
    torch.testing.assert_close(_scores(make, model, {"x": x, "scale": 2.0}, **kwargs), expected)


def test_a_dataloader_of_mappings_keeps_labels_out_of_the_model():
    model = Net()
    x, labels = torch.randn(12, 6), torch.arange(12) % 4
    loader = [{"x": x[i : i + 4], "labels": labels[i : i + 4]} for i in range(0, 12, 4)]  # as a collated DataLoader
    react = D.ReAct(model).fit(loader)
    assert react.clip == D.ReAct(model).fit(x).clip
    lowdim = D.LowDimGrad(model, subspace="class").fit(loader)  # the class subspace reads the labels entry
    reference = D.LowDimGrad(model, subspace="class").fit((x, labels))
    torch.testing.assert_close(lowdim.score({"x": x}), reference.score(x))
    result = gradood.evaluate({"msp": D.MSP(model)}, loader, {"noise": [{"x": torch.randn(4, 6) * 3}]}, bootstrap=0,
                              progress=False)
    assert result.scores["msp"]["id"].shape == (12,)


def test_interface_errors_name_what_to_pass():
    x = torch.randn(3, 6)
    with pytest.raises(ValueError, match="logits="):
        D.MSP(Net("object")).score(x)
    with pytest.raises(ValueError, match="same non-empty batch"):
        D.MSP(Net()).score({"x": x, "pixel_values": torch.randn(2, 6)})
    with pytest.raises(TypeError, match="logits must be a callable"):
        D.MSP(Net(), logits="scores")
    with pytest.raises(ValueError, match="logits= callable|logits must be"):
        D.MSP(Net("dict"), logits=lambda out: out["hidden"][:, :1, None]).score(x)
    with pytest.raises(ValueError, match="token ids cannot be perturbed"):
        D.ODIN(Net()).score({"x": x.long()})
    with pytest.raises(ValueError, match="perturb="):
        D.ODIN(Net()).score({"x": x, "pixel_values": x})


class TokenHeadNet(nn.Module):
    """A head run on every token; the logits are the last non-padding token's (GPT-2's pooling)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.score = nn.Linear(8, 3, bias=False)

    def forward(self, input_ids, attention_mask):
        hidden = torch.tanh(self.mix(self.embed(input_ids)).cumsum(1))  # causal: position t sees tokens ≤ t
        logits = self.score(hidden)
        last = attention_mask.sum(1) - 1
        return logits[torch.arange(input_ids.shape[0]), last]


def test_a_token_head_takes_the_features_of_the_pooled_token():
    model = TokenHeadNet()
    batch = zoo.text_batch(4, 6, vocab=20)
    detector = D.GradNorm(model)
    scores = detector.score(batch)
    assert detector._head.kind == "token"
    with torch.no_grad():
        hidden = torch.tanh(model.mix(model.embed(batch["input_ids"])).cumsum(1))
        picked = hidden[torch.arange(4), batch["attention_mask"].sum(1) - 1]
        expected = gradood.scores.gradnorm(model.score(picked), picked)
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(D.GradNorm(model, head="score").score(batch), expected)


def test_an_ambiguous_pooled_token_is_an_error():
    model = TokenHeadNet()
    with torch.no_grad():
        model.score.weight.zero_()  # every token gives the logits (zeros), from different features
    with pytest.raises(ValueError, match="ambiguous"):
        D.GradNorm(model).score(zoo.text_batch(2, 5, vocab=20))


class TwoHeadNet(nn.Module):
    """(head(v₁) + head_dist(v₂)) / 2, as a distilled DeiT in eval mode."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 10)
        self.head = nn.Linear(5, 4)
        self.head_dist = nn.Linear(5, 4)

    def forward(self, x):
        hidden = torch.relu(self.body(x))
        return (self.head(hidden[:, :5]) + self.head_dist(hidden[:, 5:])) / 2


def test_two_averaged_heads_give_the_joint_last_layer_gradient():
    model = TwoHeadNet().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    detector = D.GradNorm(model)
    scores = detector.score(x)
    assert detector._head.kind == "mean" and detector.head_name == ("head", "head_dist")
    expected = []
    for row in x:  # ‖∇_{W₁,W₂} KL(u ‖ softmax f)‖₁ by autograd, both heads' weights jointly
        logits = model(row[None])[0]
        loss = (-torch.log_softmax(logits, 0)).mean() - torch.log(torch.tensor(4.0, dtype=torch.float64))
        grads = torch.autograd.grad(loss, [model.head.weight, model.head_dist.weight])
        expected.append(sum(g.abs().sum() for g in grads))
    torch.testing.assert_close(scores, torch.stack(expected))
    assert D.GradNorm(model, head=("head", "head_dist")).score(x).allclose(scores)


def test_ood_head_on_a_mean_and_a_token_head_returns_the_detectors_scores():
    for model, inputs in ((TwoHeadNet(), torch.randn(5, 6)), (TokenHeadNet(), zoo.text_batch(4, 6, vocab=20))):
        detector = D.RG(model)
        expected = detector.score(inputs)
        head = gradood.OODHead(model, detector)
        logits, scores = head(inputs)
        torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, detector.forward_features(inputs)[0], rtol=1e-5, atol=1e-6)


HF_MODELS = {
    "vit": (zoo.hf_vit, zoo.image_batch),
    "deit-distilled": (zoo.hf_deit_distilled, zoo.image_batch),
    "convnext": (zoo.hf_convnext, zoo.image_batch),
    "bert": (zoo.hf_bert, zoo.text_batch),
    "distilbert": (zoo.hf_distilbert, zoo.text_batch),
    "gpt2": (zoo.hf_gpt2, zoo.text_batch),
}


@pytest.mark.parametrize("name", HF_MODELS)
def test_every_forward_only_detector_runs_on_hugging_face_models(name):
    build, batch = HF_MODELS[name]
    model, inputs = build(), batch()
    with torch.no_grad():
        logits = model(**inputs).logits
    for make in EVERY_FORWARD:
        detector = make(model).fit(inputs)
        scores = detector.score(inputs)
        assert scores.shape == (4,) and torch.isfinite(scores).all(), make.__name__
        torch.testing.assert_close(detector.forward_features(inputs)[0], logits)
    if name == "gpt2":
        assert detector._head.kind == "token"
    if name == "deit-distilled":
        assert detector._head.kind == "mean"
    head = gradood.OODHead(model, D.Energy(model), example_inputs=inputs)
    torch.testing.assert_close(head(inputs)[1], torch.logsumexp(logits, 1), rtol=1e-5, atol=1e-5)


def _timm_models():
    from test_persample_zoo_layers import TIMM_MODELS

    return {name: TIMM_MODELS[name] for name in ("bit", "vit", "convnext")}


@pytest.mark.parametrize("name", ["hf-vit", "hf-bert", "hf-gpt2", "timm-bit", "timm-vit", "timm-convnext"])
def test_full_network_detectors_run_without_options_on_hugging_face_and_timm_models(name):
    if name.startswith("hf-"):
        build, batch = HF_MODELS[name[3:]]
        model, inputs = build(), batch()
    else:
        build, size, _ = _timm_models()[name[5:]]
        model, inputs = build().eval(), torch.randn(4, 3, size, size)
    grodin = D.GRODIN(model).score(inputs)
    full = D.FullGradNorm(model).score(inputs)
    expected = gradood.persample_grad_norms(model, inputs, loss="ce_pred").norms
    torch.testing.assert_close(grodin, -expected)
    assert torch.isfinite(full).all() and (full > 0).all()
    lowdim = D.LowDimGrad(model, dim=2, iterations=2, neighbours=2).fit(inputs)
    assert torch.isfinite(lowdim.score(inputs)).all()
