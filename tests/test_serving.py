"""The serving example: predictions equal OODHead's, concurrent requests are
batched, and malformed requests get clear errors, never a crash or a hang."""

from __future__ import annotations

import http.client
import importlib.util
import json
import math
import os
import socket
import sys
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
sys.modules[_spec.name] = server  # importable by name: its parse function crosses to the parse process
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
    port, instance, thread = _start(app)
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


def _start(app):
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
    return port, instance, thread


def _timed_post(port, body):
    start = time.perf_counter()
    try:
        status, payload = _post(port, body)
    except (ConnectionError, OSError) as error:  # the server may close a refused upload early
        status, payload = None, {"error": repr(error)}
    return status, payload, time.perf_counter() - start


@pytest.mark.parametrize("body,message", [
    (b'{"inputs": ' + b"[" * 4000 + b"]" * 4000 + b"}", "nested at most"),
    (b'{"inputs": ' + b"[" * 900 + b"1" + b"]" * 900 + b"}", "nested lists of numbers"),
    (json.dumps({"inputs": [[[[0.0] * 3] * 3] * 2]}).replace("0.0", "1" * 401, 1).encode(), "beyond float32"),
    (json.dumps({"inputs": [[[[0.0] * 3] * 3] * 2]}).replace("0.0", "1e39", 1).encode(), "beyond float32"),
    (json.dumps({"inputs": [[[[0.0] * 3] * 3] * 2]}).replace("0.0", "-Infinity", 1).encode(), "NaN or infinite"),
])
def test_hostile_bodies_get_a_json_4xx_within_a_second(running, body, message):
    port, _, _ = running
    status, payload, seconds = _timed_post(port, body)
    assert status == 422 and message in payload["error"], payload
    assert seconds < 1.0


def test_unknown_routes_and_methods_answer_json(running):
    port, _, _ = running
    assert _post(port, {"inputs": []}, path="/nowhere") == (404, {"error": "Not Found"})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    connection.request("GET", "/predict")
    response = connection.getresponse()
    assert response.status == 405 and "error" in json.loads(response.read())


def test_a_body_over_the_limit_is_refused_without_stalling_small_requests(running):
    port, _, _ = running
    sample = {"inputs": [[[[0.5] * 3] * 3] * 2]}
    baseline = sorted(_timed_post(port, sample)[2] for _ in range(10))[5]
    huge = b'{"inputs": [' + b"1.0," * (10 << 20) + b"1.0]}"  # 40 MB, malformed as well
    with ThreadPoolExecutor(max_workers=2) as pool:
        big = pool.submit(_timed_post, port, huge)
        small = []
        while not big.done():
            small.append(_timed_post(port, sample))
        status, payload, seconds = big.result()
    assert status in (413, None), payload
    if status == 413:
        assert "larger than the limit" in payload["error"] and seconds < 5.0
    assert all(result[0] == 200 for result in small)
    assert max(result[2] for result in small) < baseline + 0.1, (baseline, [r[2] for r in small])


def test_large_bodies_are_parsed_off_the_event_loop():
    """A valid 64-sample request of 3×64×64 inputs is ~15 MB of JSON, about a second of
    parsing under the interpreter lock: parsed in the worker process, concurrent small
    requests are not held up; the answer equals the in-process parse."""
    shape = (3, 64, 64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    app = server.build_app(model, shape, "energy", max_batch=64, max_wait_ms=1.0,
                           calibration=torch.randn(16, *shape))
    port, instance, thread = _start(app)
    try:
        generator = torch.Generator().manual_seed(3)
        large = {"inputs": torch.randn(64, *shape, generator=generator).tolist()}
        body = json.dumps(large).encode()
        small = {"inputs": torch.randn(1, *shape, generator=generator).tolist()}
        small_body = json.dumps(small).encode()
        assert len(small_body) < 1 << 18 < len(body)  # inline and offloaded
        baseline = sorted(_timed_post(port, small_body)[2] for _ in range(10))[5]
        with ThreadPoolExecutor(max_workers=2) as pool:
            big = pool.submit(_timed_post, port, body)
            during = []
            while not big.done():
                during.append(_timed_post(port, small_body))
            status, payload, _ = big.result()
        assert status == 200 and len(payload["predictions"]) == 64
        assert len(during) >= 3 and all(result[0] == 200 for result in during)
        assert max(result[2] for result in during) < baseline + 0.1, (baseline, [r[2] for r in during])
        inline = server.parse_inputs(body, shape, 64)
        expected = torch.softmax(model(inline), 1).max(1)
        for i, prediction in enumerate(payload["predictions"]):
            assert prediction["class"] == int(expected.indices[i])
    finally:
        instance.should_exit = True
        thread.join(timeout=10)


@pytest.mark.parametrize("replace,message", [
    ("true", "booleans"), ('"0.5"', "non-numbers"), ("null", "non-numbers"),
])
def test_non_numbers_are_refused_not_converted(running, replace, message):
    port, _, _ = running
    body = json.dumps({"inputs": [[[[0.0] * 3] * 3] * 2]}).replace("0.0", replace, 1).encode()
    status, payload = _post(port, body)
    assert status == 422 and message in payload["error"], payload


def test_inputs_the_model_overflows_on_get_a_clear_422(running):
    port, _, _ = running
    status, payload = _post(port, {"inputs": [[[[-3.4e38] * 3] * 3] * 2]})
    assert status == 422 and "not finite for samples [0]" in payload["error"], payload


def test_a_declared_oversize_body_is_refused_before_it_is_sent():
    """Content-Length over the limit and then nothing: the 413 comes at once, the server
    does not wait for a body it will not read."""
    model = _model()
    app = server.build_app(model, SHAPE, "energy", max_batch=8, max_wait_ms=1.0, calibration=torch.randn(16, *SHAPE))
    port, instance, thread = _start(app)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 10000000\r\n\r\n{")
            start = time.perf_counter()
            reply = connection.recv(4096)
            assert b" 413 " in reply.split(b"\r\n")[0] and time.perf_counter() - start < 1.0, reply[:200]
    finally:
        instance.should_exit = True
        thread.join(timeout=10)
