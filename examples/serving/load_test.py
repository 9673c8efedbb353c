"""A bounded load test of the example server, on 127.0.0.1 only: `concurrency`
client threads send single-image requests with keep-alive for `seconds`, then
stop. Prints JSON: requests, throughput (requests/s), p50/p99 latency (ms), errors.

    python examples/serving/load_test.py --port 8000 --seconds 30 --concurrency 32 --input-shape 3,32,32
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time

import numpy as np


def client(port: int, body: bytes, stop_at: float, latencies: list, errors: list) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        try:
            connection.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                errors.append(response.status)
                continue
        except (OSError, http.client.HTTPException) as error:
            errors.append(type(error).__name__)
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            continue
        latencies.append(time.perf_counter() - start)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--input-shape", default="3,32,32")
    arguments = parser.parse_args()
    shape = tuple(int(size) for size in arguments.input_shape.split(","))
    body = json.dumps({"inputs": np.random.default_rng(0).standard_normal((1, *shape)).round(4).tolist()}).encode()
    latencies: list = []
    errors: list = []
    started = time.perf_counter()
    stop_at = started + arguments.seconds
    threads = [threading.Thread(target=client, args=(arguments.port, body, stop_at, latencies, errors))
               for _ in range(arguments.concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    milliseconds = np.array(latencies) * 1e3
    print(json.dumps({
        "requests": len(latencies), "seconds": round(elapsed, 2), "concurrency": arguments.concurrency,
        "throughput_rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(milliseconds, 50)), 2) if latencies else None,
        "p99_ms": round(float(np.percentile(milliseconds, 99)), 2) if latencies else None,
        "errors": len(errors),
    }))


if __name__ == "__main__":
    main()
