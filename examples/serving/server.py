"""An HTTP inference server answering class, probability, OOD score and an is_ood
flag, with dynamic batching of concurrent requests (Starlette + uvicorn).

    PYTHONPATH=. python examples/serving/server.py --model benchmarks.models:ResNet18Cifar \\
        --input-shape 3,32,32 --detector rg --port 8000

POST /predict  {"inputs": [sample, ...]}  (each sample a nested list of the input shape)
  200 {"predictions": [{"class": 3, "probability": 0.91, "ood_score": 12.3, "is_ood": false}, ...]}
  413 batch larger than --max-batch, or a body larger than --max-body-bytes (by default
  what --max-batch samples of the input shape take as JSON, 32 bytes a number);
  422 malformed JSON (also nested too deeply), wrong shape, non-numbers (strings,
  booleans, null), numbers beyond float32 (a 401-digit integer), NaN/Inf values, an
  empty batch, or inputs the model's outputs overflow on; every
  error, 404/405/500 included, is {"error": "<what and why>"}.
GET /health -> {"status": "ok"}

Bodies are read in chunks and refused as soon as they are known to pass the limit (a
declared Content-Length over it is refused before reading; the rest is never read). Bodies over --offload-bytes are parsed in a separate process
(json and nested lists hold the interpreter lock for their whole parse), so a large
request does not stall the small ones: only bytes pass through the event loop.

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
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import List, Optional, Tuple

import numpy as np
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
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


_BYTES_PER_NUMBER = 32  # "-1.2345678901234567e-05, " and nesting, with room to spare


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(status, message)  # both in args: it crosses the parse process boundary
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


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


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number")


def decode_inputs(body: bytes, input_shape: Tuple[int, ...], max_batch: int) -> np.ndarray:
    """The request's samples as a float32 array [N, *input_shape], or BadRequest. Plain
    json and numpy (no torch), so that it runs in the parse process as well."""
    try:  # integers parse as floats: a 401-digit integer becomes inf and is refused below
        payload = json.loads(body, parse_int=float, parse_constant=lambda name: math.nan)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise BadRequest(422, f"the body must be JSON: {error}")
    except RecursionError:
        raise BadRequest(422, "the body must be JSON nested at most a few levels deep (inputs of the input shape)")
    if not isinstance(payload, dict) or "inputs" not in payload or not isinstance(payload["inputs"], list):
        raise BadRequest(422, 'the body must be {"inputs": [sample, ...]}')
    if len(payload["inputs"]) == 0:
        raise BadRequest(422, "inputs is an empty batch")
    if len(payload["inputs"]) > max_batch:
        raise BadRequest(413, f"at most {max_batch} samples per request, got {len(payload['inputs'])}")
    what = f"inputs must be nested lists of numbers of shape {list(input_shape)}"
    try:  # without a dtype first: strings, null and ragged lists do not become numbers
        inputs = np.asarray(payload["inputs"])
    except (TypeError, ValueError, OverflowError, RecursionError) as error:
        raise BadRequest(422, f"{what}: {error}")
    if inputs.dtype.kind != "f" or (b"true" in body or b"false" in body) and _holds_bool(payload["inputs"]):
        raise BadRequest(422, f"{what}; got {'booleans' if inputs.dtype.kind in 'bf' else 'non-numbers'} "
                              f"({'null' if inputs.dtype.kind == 'O' else inputs.dtype})")
    with np.errstate(over="ignore"):  # beyond float32's range: inf, refused below
        inputs = inputs.astype(np.float32)
    if tuple(inputs.shape[1:]) != input_shape:
        raise BadRequest(422, f"each sample must have shape {list(input_shape)}, got {list(inputs.shape[1:])}")
    non_finite = int((~np.isfinite(inputs)).sum())
    if non_finite:
        raise BadRequest(422, f"inputs contain {non_finite} NaN or infinite values (or numbers beyond float32)")
    return inputs


def _holds_bool(value) -> bool:
    """Whether a nested list holds a JSON true/false (numpy would read them as 1.0 and 0.0
    next to numbers). Only walked when the body contains the words."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def parse_inputs(body: bytes, input_shape: Tuple[int, ...], max_batch: int) -> torch.Tensor:
    return torch.from_numpy(decode_inputs(body, input_shape, max_batch))


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or BadRequest(413) as soon as it is known to pass `limit` bytes: from the
    declared Content-Length before reading anything, else when the chunks read pass it. The
    rest is not read: the answer goes out at once and the server closes the connection."""
    declared = request.headers.get("content-length")
    too_large = BadRequest(413, f"the body is larger than the limit of {limit} bytes (--max-body-bytes)")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest(400, "the client disconnected before the body was complete") from None
    return b"".join(chunks)


def _parse_process() -> Optional[ProcessPoolExecutor]:
    """One worker process for large bodies (fork: it inherits this module as loaded); None
    where fork is unavailable, and large bodies are then parsed in a thread."""
    if sys.platform == "win32" or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("fork"))


def build_app(model: torch.nn.Module, input_shape: Tuple[int, ...], detector: str, max_batch: int,
              max_wait_ms: float, calibration: Optional[torch.Tensor] = None, max_body_bytes: Optional[int] = None,
              offload_bytes: int = 1 << 18) -> Starlette:
    model = model.eval()
    numbers = max_batch * math.prod(input_shape)
    max_body_bytes = max_body_bytes or numbers * _BYTES_PER_NUMBER + 4096
    calibration = calibration if calibration is not None else torch.randn(256, *input_shape)
    head, threshold = None, math.nan
    if DETECTORS[detector] is not None:
        ood = DETECTORS[detector](model).fit(calibration)
        head = gradood.OODHead(model, ood, example_inputs=calibration[:2]).eval()
        threshold = ood.calibrate(ood.score(calibration), tpr=0.95)
    parse_pool = _parse_process()

    @torch.no_grad()
    def run_batch(batch: torch.Tensor):
        if head is None:
            return (model(batch),)
        return head(batch)

    async def parse(body: bytes) -> torch.Tensor:
        if len(body) <= offload_bytes:  # small: faster inline than a round trip
            return parse_inputs(body, input_shape, max_batch)
        loop = asyncio.get_running_loop()
        decoded = await loop.run_in_executor(parse_pool, decode_inputs, body, input_shape, max_batch)
        return torch.from_numpy(decoded)

    batcher = Batcher(run_batch, max_batch, max_wait_ms / 1000.0)

    async def predict(request: Request) -> JSONResponse:
        try:
            inputs = await parse(await read_body(request, max_body_bytes))
        except BadRequest as error:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        try:
            outputs = await batcher.submit(inputs)
        except Exception as error:  # pragma: no cover - reported, never a crash
            return JSONResponse({"error": f"inference failed: {error}"}, status_code=500)
        finite = torch.isfinite(outputs[0]).all(dim=1)
        if head is not None:
            finite &= torch.isfinite(outputs[1])
        if not bool(finite.all()):  # finite inputs the model overflows on: no class, no score to give
            bad = torch.nonzero(~finite).flatten().tolist()
            return JSONResponse({"error": f"the model's outputs are not finite for samples {bad[:10]}: their values "
                                          "are outside the range the model handles"}, status_code=422)
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
        if parse_pool is not None:
            parse_pool.shutdown(wait=False, cancel_futures=True)

    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    async def server_error(request: Request, error: Exception) -> JSONResponse:  # reported, never a plain-text 500
        return JSONResponse({"error": f"internal error: {type(error).__name__}: {error}"}, status_code=500)

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)], lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="'package.module:factory' or a torchvision name")
    parser.add_argument("--input-shape", default="3,32,32")
    parser.add_argument("--detector", default="rg", choices=sorted(DETECTORS))
    parser.add_argument("--calibration", help="a .pt file holding an ID input tensor for fit and threshold")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-body-bytes", type=int, help="default: --max-batch samples at 32 bytes a number")
    parser.add_argument("--offload-bytes", type=int, default=1 << 18, help="bodies larger are parsed in a process")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    arguments = parser.parse_args()
    torch.manual_seed(0)
    shape = tuple(int(size) for size in arguments.input_shape.split(","))
    calibration = torch.load(arguments.calibration) if arguments.calibration else None
    app = build_app(_load_model(arguments.model), shape, arguments.detector, arguments.max_batch,
                    arguments.max_wait_ms, calibration, arguments.max_body_bytes, arguments.offload_bytes)
    uvicorn.run(app, host=arguments.host, port=arguments.port, log_level="warning")


if __name__ == "__main__":
    main()
