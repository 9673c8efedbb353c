"""gradood.OODHead: (logits, score) in one forward, equal to the detectors in eager
mode, TorchScript, torch.export, torch.compile(fullgraph=True) and AOTInductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradood
from gradood import detectors as D


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.classifier = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(F.relu(self.bn(self.conv(x))).mean((2, 3)))


def _setup():
    torch.manual_seed(0)
    model = _Net().eval()
    inputs = torch.randn(7, 3, 6, 6)
    return model, inputs


FACTORIES = {
    "MSP": lambda m, x: D.MSP(m, temperature=2.0),
    "MaxLogit": lambda m, x: D.MaxLogit(m),
    "Energy": lambda m, x: D.Energy(m),
    "GradNorm": lambda m, x: D.GradNorm(m, scale="official"),
    "ExGrad": lambda m, x: D.ExGrad(m),
    "UV": lambda m, x: D.UV(m, u="gradnorm", v="clipped_l1", clip=0.3),
    "RG": lambda m, x: D.RG(m, clip=0.4),
    "RGAdditive": lambda m, x: D.RGAdditive(m, percentile=80).fit(x),
    "ReAct": lambda m, x: D.ReAct(m).fit(x),
    "KLMatching": lambda m, x: D.KLMatching(m, mode="predicted").fit(x),
    "ViM": lambda m, x: D.ViM(m, dim=3).fit(torch.randn(40, 3, 6, 6, generator=torch.Generator().manual_seed(5))),
    "GradOrth": lambda m, x: D.GradOrth(m, threshold=0.9, temperature=2.0).fit(x),
}


def _head(name):
    model, inputs = _setup()
    detector = FACTORIES[name](model, inputs)
    return model, inputs, detector, gradood.OODHead(model, detector, example_inputs=inputs)


@pytest.mark.parametrize("name", FACTORIES)
def test_eager_head_equals_model_and_detector(name):
    model, inputs, detector, head = _head(name)
    logits, score = head(inputs)
    torch.testing.assert_close(logits, model(inputs))
    torch.testing.assert_close(score, detector.score(inputs))


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript(name):
    _, inputs, _, head = _head(name)
    scripted = torch.jit.script(head)
    for expected, actual in zip(head(inputs), scripted(inputs)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", FACTORIES)
def test_torch_export(name):
    _, inputs, _, head = _head(name)
    exported = torch.export.export(head, (inputs,))
    for expected, actual in zip(head(inputs), exported.module()(inputs)):
        torch.testing.assert_close(actual, expected)


@pytest.mark.parametrize("name", ["GradNorm", "ReAct"])
def test_torch_compile_fullgraph(name):
    torch._dynamo.reset()
    _, inputs, _, head = _head(name)
    compiled = torch.compile(head, fullgraph=True)
    for expected, actual in zip(head(inputs), compiled(inputs)):
        torch.testing.assert_close(actual, expected)


def test_aot_inductor_package(tmp_path):
    if not hasattr(torch._inductor, "aoti_compile_and_package"):
        pytest.skip("this torch has no AOTInductor packaging")
    _, inputs, _, head = _head("RG")
    exported = torch.export.export(head, (inputs,))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "rg_head.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    for expected, actual in zip(head(inputs), loaded(inputs)):
        torch.testing.assert_close(actual, expected)


def test_the_callers_model_is_untouched():
    model, inputs, _, head = _head("Energy")
    assert isinstance(model.classifier[2], nn.Linear)
    assert isinstance(head.body.classifier[2], nn.Identity)
    assert all(not m._forward_hooks for m in model.modules())


def test_detectors_needing_more_than_one_pass_are_refused():
    model, inputs = _setup()
    with pytest.raises(ValueError, match="is not exported: OODHead takes the detectors whose score is one forward pass"):
        gradood.OODHead(model, D.GRODIN(model), example_inputs=inputs)
    with pytest.raises(ValueError, match="pass example_inputs"):
        gradood.OODHead(model, D.Energy(model))
    with pytest.raises(RuntimeError, match=r"call fit\(id_data\) first"):
        gradood.OODHead(model, D.ReAct(model), example_inputs=inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", FACTORIES)
def test_cuda_head_matches_cpu(name):
    _, inputs, _, head = _head(name)
    cuda_head = head.cuda()
    for expected, actual in zip(_head(name)[3](inputs), cuda_head(inputs.cuda())):
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_a_model_that_is_its_head_gets_an_identity_body():
    """A linear probe on given features: OODHead used to build and then fail every forward."""
    torch.manual_seed(0)
    probe, features = nn.Linear(6, 4).eval(), torch.randn(5, 6)
    for detector in (D.GradNorm(probe), D.Energy(probe), D.RG(probe)):
        head = gradood.OODHead(probe, detector, example_inputs=features)
        logits, scores = head(features)
        torch.testing.assert_close(logits, probe(features))
        torch.testing.assert_close(scores, detector.score(features))
