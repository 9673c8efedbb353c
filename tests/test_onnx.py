"""ONNX export (gradood.export): every detector OODHead takes, exported once with a dynamic batch,
gives the eager head's logits and scores in ONNX Runtime at batch sizes 1 and 7; the translations
of gradood's operators equal the kernels on every score form, temperature and dtype, including
the kernels' special rows (NaN, +inf and -inf logits, ties, logits of ±1e4, C = 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradood
from gradood import export
from gradood._ops import NUM_LOGIT_TERMS, TERM_NAMES
from test_ood_head import FACTORIES, _head

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("name", FACTORIES)
def test_every_exported_head_equals_eager_at_batch_1_and_7(name, tmp_path):
    model, inputs, detector, head = _head(name)
    export.to_onnx(head, inputs, tmp_path / "head.onnx")
    session = _session(tmp_path / "head.onnx")
    for batch in (1, 7):
        logits, score = session.run(None, {"inputs": inputs[:batch].numpy()})
        expected_logits, expected_score = head(inputs[:batch])
        np.testing.assert_allclose(logits, expected_logits.detach().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(score, expected_score.detach().numpy(), rtol=2e-5, atol=1e-6)


SPECS = [  # (logit term, scale, feature term or -1, with_bias, combine, alpha, temperature, clip)
    *[(term, 1.0, -1, False, 0, 0.0, temperature, math.inf) for term in range(NUM_LOGIT_TERMS)
      for temperature in (1.0, 0.5, 1000.0)],
    *[(1, 1.0, feature, bias, 0, 0.0, 1.0, 0.7) for feature in (6, 7, 8) for bias in (False, True)
      if not (bias and feature == 8)],  # with_bias takes the L1 and L2 terms only
    (3, 0.5, 6, False, 0, 0.0, 2.0, math.inf),  # GradNorm's form
    (4, -2.0, 6, True, 0, 0.0, 1.0, math.inf),  # ExGrad with the bias
    (1, 1.0, 8, False, 1, 0.6, 1.0, 1.3),  # additive RG
]


class _AllScores(nn.Module):
    def forward(self, logits, features):
        return torch.stack(
            [torch.ops.gradood.lastlayer_score(logits, features if spec[2] >= 0 else None, *spec) for spec in SPECS], 1
        )


def _special_rows(classes, dtype):
    generator = torch.Generator().manual_seed(0)
    rows = [3 * torch.randn(classes, generator=generator, dtype=dtype) for _ in range(3)]
    special = {
        "nan": [math.nan], "+inf": [math.inf], "-inf": [-math.inf], "two +inf": [math.inf, math.inf],
        "big": [1e4, -1e4], "tie": [5.0, 5.0],
    }
    for values in special.values():
        row = torch.randn(classes, generator=generator, dtype=dtype)
        row[: min(len(values), classes)] = torch.tensor(values[:classes], dtype=dtype)
        rows.append(row)
    rows.append(torch.full((classes,), -math.inf, dtype=dtype))  # a row of -inf: uniform
    rows.append(torch.full((classes,), 0.25, dtype=dtype))  # uniform
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("classes", [1, 5, 1000])
def test_translations_equal_the_kernels_on_special_rows(dtype, classes, tmp_path):
    logits = _special_rows(classes, dtype)
    features = torch.randn(logits.shape[0], 9, dtype=dtype, generator=torch.Generator().manual_seed(1))
    features[2, 3] = -4.0
    module = _AllScores()
    program = torch.onnx.export(module, (logits[:2], features[:2]), dynamo=True,
                                custom_translation_table=export.onnx_translations(),
                                dynamic_shapes=({0: torch.export.Dim("batch")}, {0: torch.export.Dim("batch")}))
    program.save(str(tmp_path / "scores.onnx"))
    session = _session(tmp_path / "scores.onnx")
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, {names[0]: logits.numpy(), names[1]: features.numpy()})[0]
    expected = module(logits, features).numpy()
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for column, spec in enumerate(SPECS):
        np.testing.assert_allclose(got[:, column], expected[:, column], rtol=tolerance, atol=tolerance,
                                   err_msg=f"{TERM_NAMES[spec[0]]}, spec {spec}")


def test_react_translation_and_mapping_inputs(tmp_path):
    """ReAct's operator (clip and no clip, no bias) and a model taking keyword inputs."""
    torch.manual_seed(0)

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = nn.Linear(4, 6), nn.Linear(6, 3, bias=False)

        def forward(self, pixel_values):
            return self.fc(torch.relu(self.body(pixel_values)))

    model = Keywords().eval()
    inputs = {"pixel_values": torch.randn(5, 4)}
    detector = gradood.detectors.ReAct(model, percentile=50).fit(inputs)
    head = gradood.OODHead(model, detector, example_inputs=inputs)
    export.to_onnx(head, inputs, tmp_path / "react.onnx")
    session = _session(tmp_path / "react.onnx")
    name = session.get_inputs()[0].name
    for batch in (1, 5):
        _, score = session.run(None, {name: inputs["pixel_values"][:batch].numpy()})
        np.testing.assert_allclose(score, head({"pixel_values": inputs["pixel_values"][:batch]})[1].numpy(),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="head must be a gradood.OODHead"):
        export.to_onnx(model, inputs, tmp_path / "x.onnx")
