"""The paired summary of measure_overhead.sh: per detector, the median throughput
and p50/p99 latency over the rounds, and the overhead against "none" measured
within each round (1 − throughput / throughput of "none" in the same round), as
the median and the range over the rounds.

    python examples/serving/summarize_overhead.py results.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from statistics import median


def main(path: str) -> None:
    runs = [json.loads(line) for line in open(path) if line.strip()]
    by_round = defaultdict(dict)
    by_detector = defaultdict(list)
    for run in runs:
        by_round[run["round"]][run["detector"]] = run["load"]
        by_detector[run["detector"]].append(run["load"])
    print("| detector | rounds | median requests/s | median p50 ms | median p99 ms | errors | overhead vs none: median (min, max) |")
    print("|---|---|---|---|---|---|---|")
    for detector, loads in by_detector.items():
        overheads = [1 - loads_of[detector]["throughput_rps"] / loads_of["none"]["throughput_rps"]
                     for loads_of in by_round.values() if "none" in loads_of and detector in loads_of]
        overhead = "—" if detector == "none" or not overheads else (
            f"{median(overheads):+.1%} ({min(overheads):+.1%}, {max(overheads):+.1%})")
        print(f"| {detector} | {len(loads)} | {median(l['throughput_rps'] for l in loads):.1f} | "
              f"{median(l['p50_ms'] for l in loads):.1f} | {median(l['p99_ms'] for l in loads):.1f} | "
              f"{sum(l['errors'] for l in loads)} | {overhead} |")


if __name__ == "__main__":
    main(sys.argv[1])
