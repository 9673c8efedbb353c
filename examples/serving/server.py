"""An HTTP inference server answering class, probability, OOD score and an is_ood
flag, with dynamic batching of concurrent requests (Starlette + uvicorn).

    PYTHONPATH=. python examples/serving/server.py --model benchmarks.models:ResNet18Cifar \\
        --input-shape 3,32,32 --detector rg --port 8000

POST /predict  {"inputs": [sample, ...]}  (each sample a nested list of the input shape)
  200 {"predictions": [{"class": 3, "probability": 0.91, "ood_score": 12.3, "is_ood": false}, ...]}
  413 batch larger than --max-batch;  422 malformed JSON, wrong shape, non-numbers,
  NaN/Inf values or an empty batch; every error is {"error": "<what and why>"}.
GET /health -> {"status": "ok"}

The model and its OOD head run as one gradood.OODHead forward pass per batch
(no second pass, no hooks). The threshold for is_ood is calibrated at start-up
to keep 95% of a calibration set of ID inputs (--calibration, a .pt tensor;
without it, random inputs stand in, which is only meaningful for timing).
Requests that arrive within --max-wait-ms of each other are batched together,
up to --max-batch samples.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
from typing import List, Optional, Tuple

import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import gradood
from gradood.cli import _load_model

DETECTORS = {
    "none": None,
    "msp": lambda m: gradood.detectors.MSP(m),
    "energy": lambda m: gradood.detectors.Energy(m),
    "gradnorm": lambda m: gradood.detectors.GradNorm(m),
    "rg": lambda m: gradood.detectors.RG(m, percentile=90),
}


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Batcher:
    """Collects concurrent requests into one forward pass (at most max_batch samples,
    waiting at most max_wait seconds after the first request of a batch)."""

    def __init__(self, run_batch, max_batch: int, max_wait: float):
        self.run_batch, self.max_batch, self.max_wait = run_batch, max_batch, max_wait
        self.queue: asyncio.Queue = asyncio.Queue()

    async def submit(self, inputs: torch.Tensor):
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((inputs, future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending: List[Tuple[torch.Tensor, asyncio.Future]] = [await self.queue.get()]
            count = pending[0][0].shape[0]
            deadline = loop.time() + self.max_wait
            while count < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
                if count + item[0].shape[0] > self.max_batch:
                    await self._run(pending, loop)
                    pending, count = [item], item[0].shape[0]
                    continue
                pending.append(item)
                count += item[0].shape[0]
            await self._run(pending, loop)

    async def _run(self, pending, loop) -> None:
        batch = torch.cat([inputs for inputs, _ in pending])
        try:
            outputs = await loop.run_in_executor(None, self.run_batch, batch)
        except Exception as error:  # a failed batch fails its requests, never the server
            for _, future in pending:
                if not future.done():
                    future.set_exception(error)
            return
        start = 0
        for inputs, future in pending:
            stop = start + inputs.shape[0]
            if not future.done():
                future.set_result([output[start:stop] for output in outputs])
            start = stop


def parse_inputs(body: bytes, input_shape: Tuple[int, ...], max_batch: int) -> torch.Tensor:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(422, f"the body must be JSON: {error}")
    if not isinstance(payload, dict) or "inputs" not in payload or not isinstance(payload["inputs"], list):
        raise BadRequest(422, 'the body must be {"inputs": [sample, ...]}')
    if len(payload["inputs"]) == 0:
        raise BadRequest(422, "inputs is an empty batch")
    if len(payload["inputs"]) > max_batch:
        raise BadRequest(413, f"at most {max_batch} samples per request, got {len(payload['inputs'])}")
    try:
        inputs = torch.tensor(payload["inputs"], dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as error:
        raise BadRequest(422, f"inputs must be nested lists of numbers of shape {list(input_shape)}: {error}")
    if tuple(inputs.shape[1:]) != input_shape:
        raise BadRequest(422, f"each sample must have shape {list(input_shape)}, got {list(inputs.shape[1:])}")
    non_finite = int((~torch.isfinite(inputs)).sum())
    if non_finite:
        raise BadRequest(422, f"inputs contain {non_finite} NaN or infinite values")
    return inputs


def build_app(model: torch.nn.Module, input_shape: Tuple[int, ...], detector: str, max_batch: int,
              max_wait_ms: float, calibration: Optional[torch.Tensor] = None) -> Starlette:
    model = model.eval()
    calibration = calibration if calibration is not None else torch.randn(256, *input_shape)
    head, threshold = None, math.nan
    if DETECTORS[detector] is not None:
        ood = DETECTORS[detector](model).fit(calibration)
        head = gradood.OODHead(model, ood, example_inputs=calibration[:2]).eval()
        threshold = ood.calibrate(ood.score(calibration), tpr=0.95)

    @torch.no_grad()
    def run_batch(batch: torch.Tensor):
        if head is None:
            return (model(batch),)
        return head(batch)

    batcher = Batcher(run_batch, max_batch, max_wait_ms / 1000.0)

    async def predict(request: Request) -> JSONResponse:
        try:
            inputs = parse_inputs(await request.body(), input_shape, max_batch)
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        try:
            outputs = await batcher.submit(inputs)
        except Exception as error:  # pragma: no cover - reported, never a crash
            return JSONResponse({"error": f"inference failed: {error}"}, status_code=500)
        probability, label = torch.softmax(outputs[0], dim=1).max(dim=1)
        predictions = []
        for i in range(inputs.shape[0]):
            prediction = {"class": int(label[i]), "probability": float(probability[i]), "ood_score": None, "is_ood": None}
            if head is not None:
                score = float(outputs[1][i])
                prediction["ood_score"], prediction["is_ood"] = score, bool(score < threshold)
            predictions.append(prediction)
        return JSONResponse({"predictions": predictions})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "detector": detector, "threshold": None if head is None else threshold})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)], lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="'package.module:factory' or a torchvision name")
    parser.add_argument("--input-shape", default="3,32,32")
    parser.add_argument("--detector", default="rg", choices=sorted(DETECTORS))
    parser.add_argument("--calibration", help="a .pt file holding an ID input tensor for fit and threshold")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    shape = tuple(int(size) for size in arguments.input_shape.split(","))
    calibration = torch.load(arguments.calibration) if arguments.calibration else None
    app = build_app(_load_model(arguments.model), shape, arguments.detector, arguments.max_batch,
                    arguments.max_wait_ms, calibration)
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
