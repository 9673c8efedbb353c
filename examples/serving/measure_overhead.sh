#!/usr/bin/env bash
# Throughput and latency of the example server without and with OOD scoring:
# for each detector, start the server on 127.0.0.1, run the bounded load test
# (SECONDS_PER_RUN seconds at CONCURRENCY), stop the server. Prints one JSON line
# per detector. Run from the repository root with gradood[serving] installed.
set -euo pipefail
port="${PORT:-8765}"
seconds="${SECONDS_PER_RUN:-30}"
concurrency="${CONCURRENCY:-32}"
model="${MODEL:-benchmarks.models:ResNet18Cifar}"
for detector in ${DETECTORS:-none rg gradnorm}; do
  PYTHONPATH=. python examples/serving/server.py --model "$model" --input-shape 3,32,32 \
    --detector "$detector" --port "$port" --max-batch 64 --max-wait-ms 5 &
  server=$!
  for _ in $(seq 1 120); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=1)" 2>/dev/null && break
    sleep 0.5
  done
  result=$(python examples/serving/load_test.py --port "$port" --seconds "$seconds" --concurrency "$concurrency")
  kill "$server"; wait "$server" 2>/dev/null || true
  echo "{\"detector\": \"$detector\", \"load\": $result}"
done
