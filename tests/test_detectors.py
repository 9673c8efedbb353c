"""gradood.detectors on small classifiers: reference formulas, head discovery, the
model left untouched, batch invariance, fitting, thresholds, GRODIN and ODIN
against literal autograd implementations of the official procedures."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradood
from gradood import detectors as D
from gradood import reference


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 2, 16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1)
        return self.fc(torch.relu(self.fc1(x)))

    def features(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 4).flatten(1)
        return torch.relu(self.fc1(x))


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    model = _SmallCNN().to(dtype).eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    inputs = torch.randn(6, 3, 8, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)
    return model, inputs


def _logits_features(model, inputs):
    with torch.no_grad():
        features = model.features(inputs)
        return model.fc(features), features


FORWARD_ONLY = {
    "MSP": (lambda m: D.MSP(m, temperature=2.0), lambda f, v: reference.msp(f, 2.0)),
    "MaxLogit": (D.MaxLogit, lambda f, v: reference.max_logit(f)),
    "Energy": (lambda m: D.Energy(m, temperature=0.5), lambda f, v: reference.energy(f, 0.5)),
    "GradNorm": (D.GradNorm, lambda f, v: reference.gradnorm(f, v)),
    "ExGrad": (D.ExGrad, lambda f, v: reference.exgrad(f, v)),
    "UV": (lambda m: D.UV(m, u="msp", v="l2"), lambda f, v: reference.uv(f, v, u="msp", v="l2")),
    "RG": (lambda m: D.RG(m, clip=0.3), lambda f, v: reference.rg(f, v, clip=0.3)),
}


@pytest.mark.parametrize("name", FORWARD_ONLY)
def test_forward_only_detectors_equal_the_reference(name):
    model, inputs = _model()
    make, formula = FORWARD_ONLY[name]
    logits, features = _logits_features(model, inputs)
    detector = make(model)
    torch.testing.assert_close(detector.score(inputs), formula(logits, features), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(detector.score_features(logits, features), formula(logits, features), rtol=1e-12, atol=1e-12)
    assert detector.head_name == "fc"


def test_fitted_detectors_equal_the_reference():
    model, inputs = _model()
    id_data = [(inputs[:3], None), (inputs[3:], None)]  # a DataLoader-like iterable
    logits, features = _logits_features(model, inputs)
    react = D.ReAct(model, percentile=80).fit(id_data)
    assert react.clip == pytest.approx(np.percentile(features.numpy().ravel(), 80))
    torch.testing.assert_close(react.score(inputs), reference.react(features, model.fc.weight.detach(), model.fc.bias.detach(), react.clip))
    rg = D.RG(model, percentile=70).fit(inputs)
    assert rg.clip == pytest.approx(np.percentile(features.numpy().ravel(), 70))
    additive = D.RGAdditive(model, clip=0.5, a=0.6).fit(inputs)
    alpha = 0.6 * float(torch.logsumexp(logits, 1).std() / features.abs().clamp_max(0.5).sum(1).std())
    assert additive.alpha == pytest.approx(alpha, rel=1e-12)
    torch.testing.assert_close(additive.score(inputs), reference.rg_additive(logits, features, 0.5, alpha))


def test_kl_matching_templates_are_mean_softmax_per_predicted_class():
    model, inputs = _model()
    logits, _ = _logits_features(model, inputs)
    detector = D.KLMatching(model).fit(inputs)
    probs, predicted = torch.softmax(logits, 1), logits.argmax(1)
    for k in range(5):
        expected = probs[predicted == k].mean(0) if (predicted == k).any() else torch.full((5,), float("nan"), dtype=torch.float64)
        torch.testing.assert_close(detector.templates[k], expected, equal_nan=True)
    torch.testing.assert_close(detector.score(inputs), reference.kl_matching(logits, detector.templates))


def test_kl_matching_leaves_classes_without_a_template_out():
    """The review's case: identity model, class 2 never predicted on the fit data. A uniform
    template for it gave the uniform input [0, 0, 0] the highest ID-score (−0.0)."""
    model = nn.Identity()
    fit = torch.tensor([[6.0, 0, 0], [5.0, 0, 0], [0, 6.0, 0], [0, 5.0, 0]])
    detector = D.KLMatching(model).fit(fit)
    confident, uniform = detector.score(torch.tensor([[5.5, 0, 0], [0.0, 0, 0]]))
    assert confident > uniform
    assert torch.isnan(detector.templates[2]).all()
    predicted = D.KLMatching(model, mode="predicted").fit(fit)
    assert predicted.score(torch.tensor([[0.0, 0, 7.0]])).item() == float("-inf")


def test_kl_matching_of_half_precision_logits_is_float32():
    model = nn.Identity()
    fit = torch.randn(50, 10) * 3
    detector = D.KLMatching(model).fit(fit)
    half = detector.score(fit.to(torch.bfloat16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, detector.score(fit.to(torch.bfloat16).float()))


def _official_odin(model, inputs, temperature, epsilon, std):
    """The official ODIN procedure, sample by sample."""
    scores = []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1].clone().requires_grad_()
        outputs = model(x)
        label = outputs.argmax(1)
        F.cross_entropy(outputs / temperature, label).backward()
        gradient = (torch.ge(x.grad, 0).to(x.dtype) - 0.5) * 2
        if std is not None:
            gradient = gradient / torch.tensor(std, dtype=x.dtype).reshape(1, -1, 1, 1)
        perturbed = x.detach() - epsilon * gradient
        scores.append(torch.softmax(model(perturbed) / temperature, 1).amax(1))
    return torch.cat(scores).detach()


@pytest.mark.parametrize("eps_space,std", [("input", None), ("pixel", (0.2, 0.3, 0.25))])
def test_odin_equals_the_official_procedure(eps_space, std):
    model, inputs = _model()
    detector = D.ODIN(model, temperature=1000.0, epsilon=0.01, eps_space=eps_space, std=std)
    expected = _official_odin(copy.deepcopy(model), inputs, 1000.0, 0.01, std)
    torch.testing.assert_close(detector.score(inputs), expected, rtol=1e-12, atol=1e-15)
    assert all(p.grad is None for p in model.parameters())


def _official_grodin(model, inputs, temperature, epsilon, part, repredict):
    """Perturb as ODIN, re-predict on x̃ (or keep ŷ), full backward, L2 over all parameters."""
    model = copy.deepcopy(model)
    scores = []
    for i in range(inputs.shape[0]):
        x = inputs[i : i + 1].clone().requires_grad_()
        outputs = model(x)
        label = outputs.argmax(1)
        F.cross_entropy(outputs / temperature, label).backward()
        perturbed = (x - epsilon * torch.where(x.grad >= 0, 1.0, -1.0).to(x.dtype)).detach()
        model.zero_grad()
        outputs = model(perturbed)
        if repredict:
            label = outputs.argmax(1)
        F.cross_entropy(outputs / temperature, label).backward()
        norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
        model.zero_grad()
        if part == "G":
            norm = norm / torch.softmax(outputs.detach() / temperature, 1)[0, label]
        scores.append(-norm.reshape(1))
    return torch.cat(scores).detach()


@pytest.mark.parametrize("part", ["SG", "G"])
@pytest.mark.parametrize("repredict", [True, False])
@pytest.mark.parametrize("temperature,epsilon", [(1.0, 0.0), (10.0, 0.02)])
def test_grodin_equals_the_official_procedure(part, repredict, temperature, epsilon):
    model, inputs = _model()
    detector = D.GRODIN(model, temperature=temperature, epsilon=epsilon, part=part, repredict=repredict)
    expected = _official_grodin(model, inputs, temperature, epsilon, part, repredict)
    torch.testing.assert_close(detector.score(inputs), expected, rtol=1e-6, atol=1e-12)


def test_full_gradnorm_equals_the_per_sample_loop():
    model, inputs = _model()
    expected = []
    copied = copy.deepcopy(model)
    for i in range(inputs.shape[0]):
        copied.zero_grad()
        logits = copied(inputs[i : i + 1])
        (-np.log(5) - F.log_softmax(logits, 1)).mean().backward()
        expected.append(torch.sqrt(sum(p.grad.square().sum() for p in copied.parameters())))
    torch.testing.assert_close(D.FullGradNorm(model).score(inputs), torch.stack(expected), rtol=1e-6, atol=1e-12)


def _all_detectors(model, inputs):
    fitted = [D.ReAct(model), D.RGAdditive(model), D.KLMatching(model), D.RG(model, percentile=90), D.FDBD(model),
              D.LowDimGrad(model, dim=2, oversample=6, iterations=2, neighbours=2), D.ViM(model, dim=2),
              D.NNGuide(model, neighbours=2), D.GradOrth(model)]
    for detector in fitted:
        detector.fit(inputs)
    logits = D.MaxLogit(model).forward_features(inputs)[0]  # in eval mode, as detectors run it
    labels, classes = logits.argmax(1), logits.shape[1]
    labels[-classes:] = torch.arange(classes)  # every class has a prototype; the first rows are right
    fitted.append(D.GrOOD(model).fit([(inputs, labels)]))
    return [make(model) for make, _ in FORWARD_ONLY.values()] + fitted + [
        D.ODIN(model, epsilon=0.01), D.GRODIN(model, epsilon=0.01, part="G"), D.FullGradNorm(model),
        D.GradUncertainty(model), D.GradUncertainty(model, layers="head"),
    ]


def test_every_detector_is_batch_invariant():
    model, inputs = _model()
    for detector in _all_detectors(model, inputs):
        whole = detector.score(inputs)
        parts = torch.cat([detector.score(inputs[:2]), detector.score(inputs[2:])])
        torch.testing.assert_close(whole, parts, rtol=1e-10, atol=1e-12, msg=type(detector).__name__)


def test_the_model_is_left_untouched_even_in_train_mode():
    model, inputs = _model()
    model.train()
    model.fc1.eval()  # a mixed state must come back as it was
    state = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    for detector in _all_detectors(model, inputs):
        detector.score(inputs)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks for m in model.modules())
    for key, value in model.state_dict().items():  # BatchNorm statistics included
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_the_model_is_left_untouched_on_errors():
    model, inputs = _model()
    model.train()
    with pytest.raises(RuntimeError):
        D.GradNorm(model).score(torch.randn(2, 5, 8, 4, dtype=torch.float64))  # wrong channel count
    assert model.training and all(not m._forward_hooks for m in model.modules())


def test_head_discovery_by_name_and_1x1_conv_heads():
    class ConvHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(3, 8, 3, padding=1)
            self.classifier = nn.Conv2d(8, 4, 1)

        def forward(self, x):
            pooled = torch.relu(self.body(x)).mean((2, 3), keepdim=True)
            return self.classifier(pooled).flatten(1)

    model = ConvHead().double().eval()
    inputs = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    detector = D.GradNorm(model)
    pooled = torch.relu(model.body(inputs)).mean((2, 3))
    expected = reference.gradnorm(model(inputs).detach(), pooled.detach())
    torch.testing.assert_close(detector.score(inputs), expected)
    assert detector.head_name == "classifier"
    assert D.Energy(model, head="classifier").score(inputs).shape == (3,)
    with pytest.raises(ValueError, match="has no module named 'nope'"):
        D.Energy(model, head="nope")


def test_a_named_head_that_does_not_produce_the_logits_is_refused():
    class Scaled(nn.Module):  # logits = head(features) / 2: the closed forms would be off
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.fc(torch.relu(self.body(x))) / 2

    model, inputs = Scaled().eval(), torch.randn(5, 4)
    for head in ("fc", "body"):
        with pytest.raises(ValueError, match=rf"head '{head}' \(Linear\) does not produce the model's logits \(5, 3\)"):
            D.GradNorm(model, head=head).score(inputs)
    with pytest.raises(ValueError, match="pass head='<module name>'"):  # nor is it found
        D.GradNorm(model).score(inputs)


class _PooledConvLogits(nn.Module):
    """As SqueezeNet: logits = mean(relu(conv1x1(v))), so no layer's output is the logits."""

    def __init__(self):
        super().__init__()
        self.body, self.classifier = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return torch.relu(self.classifier(torch.relu(self.body(x)))).mean((2, 3))


def test_logit_scores_work_on_a_model_without_a_linear_head():
    torch.manual_seed(0)
    model, inputs = _PooledConvLogits().double().eval(), torch.randn(5, 3, 6, 6, dtype=torch.float64)
    logits = model(inputs).detach()
    expected = {D.MSP: reference.msp(logits), D.MaxLogit: reference.max_logit(logits), D.Energy: reference.energy(logits)}
    for make, want in expected.items():
        detector = make(model)
        torch.testing.assert_close(detector.score(inputs), want)
        torch.testing.assert_close(detector.score(inputs), want)  # the second call skips the head search
        assert detector.head_name is None
    assert D.KLMatching(model).fit([inputs]).score(inputs).shape == (5,)
    assert torch.isfinite(D.ODIN(model, epsilon=0.001).score(inputs)).all()
    for make in (D.GradNorm, D.RG):
        with pytest.raises(ValueError, match="produces the logits directly; pass head='<module name>'"):
            make(model).score(inputs)
    with pytest.raises(ValueError, match="OODHead: no nn.Linear or 1×1 nn.Conv2d of _PooledConvLogits produces its logits"):
        gradood.OODHead(model, D.MSP(model), example_inputs=inputs)


def test_a_model_without_a_linear_head_gets_an_error_saying_what_to_pass():
    class NoHead(nn.Module):
        def forward(self, x):
            return x.flatten(1)

    with pytest.raises(ValueError, match="pass head='<module name>'"):
        D.GradNorm(NoHead()).score(torch.randn(2, 3))
    torch.testing.assert_close(D.MSP(NoHead()).score(torch.ones(2, 3)), torch.full((2,), 1 / 3))  # needs no head


def test_calibrate_and_is_ood():
    model, inputs = _model()
    detector = D.Energy(model)
    with pytest.raises(RuntimeError, match="call calibrate"):
        detector.is_ood(inputs)
    id_scores = detector.score(inputs)
    threshold = detector.calibrate(id_scores, tpr=0.5)
    assert threshold == float(torch.sort(id_scores, descending=True).values[2])
    assert detector.is_ood(inputs).tolist() == (id_scores < threshold).tolist()


def test_state_dict_round_trip():
    model, inputs = _model()
    fitted = D.RGAdditive(model, percentile=80).fit(inputs)
    fitted.calibrate(fitted.score(inputs))
    fresh = D.RGAdditive(model, percentile=80).load_state_dict(fitted.state_dict())
    torch.testing.assert_close(fresh.score(inputs), fitted.score(inputs))
    assert fresh.threshold == fitted.threshold
    with pytest.raises(ValueError, match="expected keys"):
        D.RGAdditive(model).load_state_dict({"clip": 1.0})


@pytest.mark.parametrize("make,fitted_with,loaded_with", [
    (D.RGAdditive, dict(percentile=80), dict(percentile=80, a=0.3)),  # alpha = a·α_s was fitted with a = 0.6
    (D.RGAdditive, dict(percentile=80), dict()),
    (D.ReAct, dict(percentile=90), dict(percentile=50)),
    (D.RG, dict(percentile=90), dict(percentile=95)),
])
def test_a_state_fitted_under_another_configuration_is_refused(make, fitted_with, loaded_with):
    """The state used to load into a detector configured otherwise and score as half of each."""
    model, inputs = _model()
    state = make(model, **fitted_with).fit(inputs).state_dict()
    with pytest.raises(ValueError, match="the state was saved with .*; construct it with"):
        make(model, **loaded_with).load_state_dict(state)


def test_fit_is_required_where_statistics_are_needed():
    model, inputs = _model()
    for detector in (D.ReAct(model), D.RGAdditive(model), D.KLMatching(model)):
        with pytest.raises(RuntimeError, match=r"call fit\(id_data\) first"):
            detector.score(inputs)


def test_bad_hyperparameters_are_named():
    model, _ = _model()
    with pytest.raises(ValueError, match="eps_space='pixel' needs std"):
        D.ODIN(model, eps_space="pixel")
    with pytest.raises(ValueError, match="part must be one of 'SG', 'G'"):
        D.GRODIN(model, part="S")
    with pytest.raises(ValueError, match="epsilon must be a finite real number >= 0"):
        D.GRODIN(model, epsilon=-1.0)
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        D.ODIN(model, temperature=0.0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        D.MSP("resnet")


def test_plain_mlp_in_float32():
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 7))
    inputs = torch.randn(16, 10)
    for detector in _all_detectors(model, inputs):
        result = detector.score(inputs)
        assert result.shape == (16,) and torch.isfinite(result).all(), type(detector).__name__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_every_detector_on_cuda_matches_cpu():
    model, inputs = _model(torch.float32)
    cpu = _all_detectors(model, inputs)
    cuda_model = copy.deepcopy(model).cuda()
    gpu = _all_detectors(cuda_model, inputs.cuda())
    for on_cpu, on_gpu in zip(cpu, gpu):
        torch.testing.assert_close(on_gpu.score(inputs.cuda()).cpu(), on_cpu.score(inputs), rtol=1e-4, atol=1e-4,
                                   msg=type(on_cpu).__name__)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("arch", ["resnet18", "vit_b_16"])
def test_every_detector_runs_on_torchvision_models_on_cuda(arch):
    """torchvision's ResNet-18 and ViT-B/16 (random weights) on the GPU: every detector
    finds the head, fits and gives finite scores (ViT: class token and position
    embedding through functional_params='broadcast'; LowDimGrad on the last block and head)."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, arch)().cuda().eval()
    inputs = torch.randn(4, 3, 224, 224, device="cuda")
    fit_data = [torch.randn(8, 3, 224, 224, device="cuda")]
    vit = arch.startswith("vit")
    options = {"functional_params": "broadcast"} if vit else {}
    last = ("encoder.layers.encoder_layer_11.", "heads.") if vit else ("layer4.1.", "fc.")
    detectors = [make(model) for make, _ in FORWARD_ONLY.values()] + [
        D.ReAct(model), D.ASH(model), D.SCALE(model), D.DICE(model), D.RGAdditive(model), D.KLMatching(model), D.RG(model, percentile=90),
        D.LowDimGrad(model, dim=4, params=lambda name, parameter: name.startswith(last)),
        D.ODIN(model), D.GRODIN(model, epsilon=0.001, **options), D.FullGradNorm(model, **options),
        D.GradUncertainty(model, **options), D.GradUncertainty(model, layers="head"),
    ]
    for detector in detectors:
        detector.fit(fit_data)
        scores = detector.score(inputs)
        assert scores.shape == (4,) and bool(torch.isfinite(scores).all()), type(detector).__name__


def test_rg_with_a_percentile_refuses_to_score_before_fit():
    model, inputs = _model()
    detector = D.RG(model, percentile=90)
    with pytest.raises(RuntimeError, match="call fit"):
        detector.score(inputs)
    with pytest.raises(RuntimeError, match="call fit"):
        gradood.OODHead(model, detector, example_inputs=inputs)
    assert torch.isfinite(detector.fit(inputs).score(inputs)).all()


@pytest.mark.parametrize("make,kwargs,match", [
    (D.ODIN, {"epsilon": float("nan")}, "epsilon must be a finite"),
    (D.ODIN, {"epsilon": float("inf")}, "epsilon must be a finite"),
    (D.GRODIN, {"epsilon": float("nan")}, "epsilon must be a finite"),
    (D.ODIN, {"eps_space": "pixel", "std": 0.0}, "std must hold finite values > 0"),
    (D.ODIN, {"eps_space": "pixel", "std": (0.2, float("nan"), 0.3)}, "std must hold finite values > 0"),
    (D.RG, {"percentile": 150}, r"percentile must be a number in \[0, 100\]"),
    (D.RGAdditive, {"percentile": -1}, r"percentile must be a number in \[0, 100\]"),
])
def test_invalid_perturbation_and_percentile_arguments_are_refused_at_construction(make, kwargs, match):
    model, _ = _model()
    with pytest.raises(ValueError, match=match):
        make(model, **kwargs)


def test_a_std_of_the_wrong_length_is_named():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    detector = D.ODIN(model, eps_space="pixel", std=(0.2, 0.3))
    with pytest.raises(ValueError, match="std has 2 values but the input has 3 channels"):
        detector.score(torch.randn(2, 3, 6, 6))


class _CosineLinear(nn.Linear):
    """A cosine classifier: an nn.Linear subclass whose output is not weight·x + bias."""

    def forward(self, x):
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1)) * 10


class _HeadThenInPlace(nn.Module):
    def __init__(self, head: nn.Module, inplace: bool):
        super().__init__()
        self.body, self.fc, self.inplace = nn.Linear(4, 6), head, inplace

    def forward(self, x):
        out = self.fc(torch.relu(self.body(x)))
        if self.inplace:
            out /= 2  # the logits are the head's own output tensor, changed after the head ran
        return out


@pytest.mark.parametrize("case", ["inplace", "cosine", "hook"])
def test_a_head_whose_output_is_not_its_affine_map_of_its_input_is_refused(case):
    """Equality of the captured output with the logits is not enough: the output may
    have been divided in place after the head, produced by a subclass's own forward,
    or replaced by a forward hook. The closed forms would be silently wrong."""
    torch.manual_seed(0)
    head = _CosineLinear(6, 3, bias=False) if case == "cosine" else nn.Linear(6, 3)
    model, inputs = _HeadThenInPlace(head, case == "inplace").eval(), torch.randn(5, 4)
    if case == "hook":
        model.fc.register_forward_hook(lambda module, args, output: output * 3)
    for make in (D.GradNorm, D.RG, D.ExGrad):
        with pytest.raises(ValueError, match="pass head='<module name>'"):
            make(model).score(inputs)
        with pytest.raises(ValueError, match="was modified in place afterwards, is not its weight and bias applied"):
            make(model, head="fc").score(inputs)
    with pytest.raises(ValueError, match="produces the logits"):
        gradood.OODHead(model, D.GradNorm(model), example_inputs=inputs)
    assert D.MSP(model).score(inputs).shape == (5,)  # scores of the logits alone need no head


def test_a_1x1_conv_head_counts_only_on_a_1x1_map():
    class MapHead(nn.Module):  # logits = the 1×1 conv's [B, C, 2, 1] map flattened: no head(features) form
        def __init__(self):
            super().__init__()
            self.body, self.classifier = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.classifier(self.body(x)).reshape(x.shape[0], -1)

    model = MapHead().eval()
    with pytest.raises(ValueError, match="pass head='<module name>'"):
        D.GradNorm(model).score(torch.randn(2, 3, 2, 1))


class _TemperedClamped(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 6), nn.Linear(6, 3)
        self.temperature, self.limit = 1.0, None

    def forward(self, x):
        logits = self.fc(torch.relu(self.body(x))) / self.temperature
        return logits if self.limit is None else logits.clamp(-self.limit, self.limit)


@pytest.mark.parametrize("change", ["hook", "temperature", "clamp"])
def test_the_head_is_checked_on_every_call_not_only_when_found(change):
    """After a first call finds the head, a hook added to it, a temperature set after
    it, or a clamp that only some batches reach used to be scored as head(features)."""
    torch.manual_seed(0)
    model, inputs = _TemperedClamped().eval(), torch.randn(5, 4)
    if change == "clamp":
        model.limit = float(model(inputs).abs().max()) + 1  # the first batch stays inside it
    for make in (D.GradNorm, D.RG, D.ReAct):
        detector = make(model)
        if make is D.ReAct:
            detector.fit([inputs])
        detector.score(inputs)
        handle = None
        if change == "hook":
            handle = model.fc.register_forward_hook(lambda module, args, output: output * 3)
        elif change == "temperature":
            model.temperature = 0.25
        with pytest.raises(ValueError, match="did not produce the model's logits"):
            detector.score(inputs * 40 if change == "clamp" else inputs)
        if handle is not None:
            handle.remove()
        model.temperature = 1.0
        torch.testing.assert_close(detector.score(inputs), make(model).fit([inputs]).score(inputs)
                                   if make is D.ReAct else make(model).score(inputs))


@pytest.mark.parametrize("make", [D.ReAct, lambda m: D.RG(m, percentile=90), lambda m: D.RGAdditive(m, percentile=90)])
def test_a_percentile_clip_that_is_not_positive_is_refused_at_fit(make):
    """Sparse ReLU features (over 90% zeros): the 90th percentile is 0; fit used to accept
    it and every later score failed (ReAct) or scored with clip 0."""
    class Sparse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(20, 3)

        def forward(self, x):
            return self.fc(torch.relu(x) * (torch.arange(20) < 1))  # one non-zero feature in 20

    model = Sparse().eval()
    with pytest.raises(ValueError, match=r"fit: the 90(\.0)?th percentile of the ID features is 0.0 \(9\d\.\d% of them are ≤ 0"):
        make(model).fit(torch.randn(16, 20))


def test_kl_matching_on_saturated_softmax_templates_is_not_nan():
    """Fit samples with logit gaps over ~104 give template entries below float32's range
    (about 1e-53 in the float64 templates, or exactly 0): the logs are taken in float64,
    and 0 · log 0 = 0, so the scores are the float64 divergences, never NaN (the GEMM's
    0 · log 0 made every score NaN on timm DLA at random init) and never a spurious -inf."""
    model = nn.Linear(4, 3).eval()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[60.0, 0, 0, 0], [0, 60.0, 0, 0], [0, 0, 1.0, 0]]))
        model.bias.zero_()
    fit = torch.tensor([[3.0, 0, 0, 0], [0, 3.0, 0, 0], [2.5, 0, 0, 0], [0, 2.6, 0, 0]])
    queries = torch.cat([fit, torch.tensor([[0.0, 0, 1, 0], [0.1, 0.1, 0.1, 0], [0, 0, 0, 0]])])
    logits = model(queries).detach().double()
    for mode in ("min", "predicted"):
        detector = D.KLMatching(model, mode=mode).fit([fit])
        assert bool((detector.templates.float()[:2] == 0).any())  # below float32's range
        scores = detector.score(queries)
        assert not scores.isnan().any()
        assert mode == "predicted" or bool(torch.isfinite(scores[:-1]).all())  # predicted class 2: no template
        templates = detector.templates.double()
        probs = logits.softmax(1).float().double()  # the scores' float32 softmax
        divergences = torch.stack([torch.where(probs > 0, probs * (probs.log() - templates[k].log()),
                                               torch.zeros_like(probs)).sum(1) for k in range(2)], 1)
        if mode == "min":
            expected = -divergences.amin(1)
        else:
            predicted = logits.argmax(1)
            expected = torch.where(predicted < 2, -divergences.gather(1, predicted.clamp_max(1)[:, None]).squeeze(1),
                                   torch.tensor(-float("inf"), dtype=torch.float64))
        torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6)
        head_scores = gradood.OODHead(model, detector, example_inputs=queries)(queries)[1]
        torch.testing.assert_close(head_scores.double(), scores.double(), rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("make,saved_with,loaded_with", [
    (D.RG, dict(clip=0.2), dict(clip=5.0)),  # a constructor clip, not fitted
    (D.RGAdditive, dict(clip=0.2), dict(clip=5.0)),
    (D.ReAct, dict(clip=0.5), dict(clip=2.0)),
    (D.MSP, dict(temperature=1.0), dict(temperature=1000.0)),  # the calibrated threshold depends on it
    (D.KLMatching, dict(mode="min"), dict(mode="predicted")),
    (D.ASH, dict(percentile=90.0), dict(percentile=65.0)),
    (D.SCALE, dict(percentile=85.0), dict(percentile=65.0)),
    (D.DICE, dict(percentile=90.0), dict(percentile=70.0)),
    (D.ViM, dict(dim=2), dict(dim=3)),
    (D.FDBD, dict(normalizer="distance"), dict(normalizer="norm")),
])
def test_a_state_saved_under_other_settings_is_refused(make, saved_with, loaded_with):
    """Fitted statistics and the calibrated threshold depend on every setting: a state
    (here calibrated) loaded into a detector configured otherwise used to score, or flag
    is_ood, as neither configuration would."""
    model, inputs = _model()
    detector = make(model, **saved_with)
    if make in (D.RGAdditive, D.KLMatching, D.DICE, D.ViM, D.FDBD):
        detector.fit(inputs)
    detector.calibrate(detector.score(inputs))
    with pytest.raises(ValueError, match=r"the state was saved with (clip|temperature|mode|percentile|dim|normalizer)="):
        make(model, **loaded_with).load_state_dict(detector.state_dict())
    torch.testing.assert_close(make(model, **saved_with).load_state_dict(detector.state_dict()).score(inputs),
                               detector.score(inputs))


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1.003), (torch.bfloat16, 1.5)])
def test_a_wide_head_scaling_its_output_slightly_is_refused(dtype, scale):
    """An nn.Linear subclass returning super().forward(x) * s: a round-off bound that grows
    with the width let s = 1.003 (float32) or 1.5 (bfloat16) pass at D = 4096."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), Scaled(4096, 10)).to(dtype).eval()
    inputs = torch.randn(4, 8, dtype=dtype)
    with pytest.raises(ValueError, match="pass head='<module name>'"):
        D.GradNorm(model).score(inputs)
    plain = nn.Sequential(nn.Linear(8, 4096), nn.ReLU(), nn.Linear(4096, 10)).to(dtype).eval()
    assert D.GradNorm(plain).score(inputs).shape == (4,)  # the same width, affine: accepted


def test_a_head_called_with_keyword_arguments_is_found():
    """head(input=x): the capture hook reads the keyword as well (it found no head before)."""
    from gradood import scores as score_functions

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(input=torch.relu(self.body(input=x)))

    torch.manual_seed(0)
    model, x = Keywords().eval(), torch.randn(6, 4)
    features = torch.relu(model.body(x))
    expected = score_functions.gradnorm(model.head(features), features)
    torch.testing.assert_close(gradood.detectors.GradNorm(model).score(x), expected)
    rg = gradood.detectors.RG(model, percentile=90).fit(x)
    torch.testing.assert_close(gradood.OODHead(model, rg, example_inputs=x)(x)[1], rg.score(x))
