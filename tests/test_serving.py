"""The serving example: predictions equal OODHead's, concurrent requests are
batched, and malformed requests get clear errors, never a crash or a hang."""

from __future__ import annotations

import http.client
import importlib.util
import json
import math
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

_SERVER = os.path.join(os.path.dirname(__file__), "..", "examples", "serving", "server.py")
_spec = importlib.util.spec_from_file_location("gradood_example_server", _SERVER)
server = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(server)

SHAPE = (2, 3, 3)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(18, 16), nn.ReLU(), nn.Linear(16, 5)).eval()


@pytest.fixture(scope="module")
def running():
    model = _model()
    calibration = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(1))
    app = server.build_app(model, SHAPE, "rg", max_batch=8, max_wait_ms=20.0, calibration=calibration)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    yield port, model, calibration
    instance.should_exit = True
    thread.join(timeout=10)


def _post(port, body, path="/predict"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("POST", path, body=body if isinstance(body, bytes) else json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = json.loads(response.read())
    connection.close()
    return response.status, payload


def test_predictions_equal_the_ood_head(running):
    port, model, calibration = running
    import gradood

    inputs = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(2))
    status, payload = _post(port, {"inputs": inputs.tolist()})
    assert status == 200
    detector = gradood.detectors.RG(model, percentile=90).fit(calibration)
    threshold = detector.calibrate(detector.score(calibration))
    logits, scores = gradood.OODHead(model, detector, example_inputs=inputs)(inputs)
    probability, label = torch.softmax(logits, 1).max(1)
    for i, prediction in enumerate(payload["predictions"]):
        assert prediction["class"] == int(label[i])
        assert prediction["probability"] == pytest.approx(float(probability[i]), rel=1e-5)
        assert prediction["ood_score"] == pytest.approx(float(scores[i]), rel=1e-5)
        assert prediction["is_ood"] == (float(scores[i]) < threshold)


def test_concurrent_requests_get_their_own_answers(running):
    port, _, _ = running
    samples = [torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(24)]
    singles = [_post(port, {"inputs": x.tolist()})[1]["predictions"][0] for x in samples]
    with ThreadPoolExecutor(max_workers=12) as pool:
        together = list(pool.map(lambda x: _post(port, {"inputs": x.tolist()})[1]["predictions"][0], samples))
    for alone, batched in zip(singles, together):
        assert alone["class"] == batched["class"]
        assert batched["ood_score"] == pytest.approx(alone["ood_score"], rel=1e-5)


@pytest.mark.parametrize("body,status,message", [
    (b"{not json", 422, "the body must be JSON"),
    ({"samples": []}, 422, 'the body must be {"inputs"'),
    ({"inputs": []}, 422, "empty batch"),
    ({"inputs": [[1.0, 2.0]]}, 422, "each sample must have shape [2, 3, 3]"),
    ({"inputs": [[["a"] * 3] * 3] * 2}, 422, "nested lists of numbers"),
    ({"inputs": [[[[0.0] * 3] * 3] * 2] * 9}, 413, "at most 8 samples per request"),
])
def test_malformed_requests_get_clear_errors(running, body, status, message):
    port, _, _ = running
    got_status, payload = _post(port, body)
    assert got_status == status and message in payload["error"]


def test_nan_pixels_are_refused(running):
    port, _, _ = running
    sample = [[[0.0] * 3] * 3] * 2
    body = json.dumps({"inputs": [sample]}).replace("0.0", "NaN", 1).encode()
    status, payload = _post(port, body)
    assert status == 422 and "1 NaN or infinite values" in payload["error"]
    assert _post(port, {"inputs": [sample]})[0] == 200  # the server is still up
    assert math.isfinite(_post(port, {"inputs": [sample]})[1]["predictions"][0]["ood_score"])
