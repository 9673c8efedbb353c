#!/usr/bin/env bash
# Throughput and latency of the example server without and with OOD scoring,
# interleaved so that drift of a busy machine falls on every detector alike: one
# server per detector is started on 127.0.0.1 (idle servers use no CPU), then
# ROUNDS rounds each run the bounded load test (SECONDS_PER_RUN seconds at
# CONCURRENCY) against every server, in an order rotated from round to round.
# Prints one JSON line per run, then the paired summary of summarize_overhead.py.
# Run from the repository root with gradood[serving] installed.
set -euo pipefail
port="${PORT:-8765}"
seconds="${SECONDS_PER_RUN:-30}"
concurrency="${CONCURRENCY:-32}"
rounds="${ROUNDS:-1}"
# SERVER_CPUS / CLIENT_CPUS (taskset lists, e.g. 0 and 1) keep the servers and the load test apart.
server_pin=(); client_pin=()
[ -n "${SERVER_CPUS:-}" ] && server_pin=(taskset -c "$SERVER_CPUS")
[ -n "${CLIENT_CPUS:-}" ] && client_pin=(taskset -c "$CLIENT_CPUS")
# benchmarks/ first on the path: opacus installs a top-level package named "benchmarks".
model="${MODEL:-models:ResNet18Cifar}"
read -r -a detectors <<<"${DETECTORS:-none rg gradnorm}"
servers=()
trap 'kill "${servers[@]}" 2>/dev/null || true' EXIT
for i in "${!detectors[@]}"; do
  PYTHONPATH=benchmarks:. "${server_pin[@]}" python examples/serving/server.py --model "$model" --input-shape 3,32,32 \
    --detector "${detectors[$i]}" --port $((port + i)) --max-batch 64 --max-wait-ms 5 &
  servers+=($!)
done
for i in "${!detectors[@]}"; do
  for _ in $(seq 1 240); do
    python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$((port + i))/health', timeout=1)" \
      2>/dev/null && break
    sleep 0.5
  done
done
results="$(mktemp)"
count=${#detectors[@]}
for round in $(seq 1 "$rounds"); do
  for step in $(seq 0 $((count - 1))); do
    i=$(((step + round - 1) % count))
    load=$("${client_pin[@]}" python examples/serving/load_test.py --port $((port + i)) --seconds "$seconds" --concurrency "$concurrency")
    echo "{\"round\": $round, \"detector\": \"${detectors[$i]}\", \"load\": $load}" | tee -a "$results"
  done
done
python examples/serving/summarize_overhead.py "$results"
