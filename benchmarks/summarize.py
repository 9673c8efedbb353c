"""Markdown table of a benchmark JSON from test_lastlayer_scores.py: medians per
implementation and ratios to gradood.

    python benchmarks/summarize.py bench.json
"""

from __future__ import annotations

import collections
import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = collections.OrderedDict()
    for bench in data["benchmarks"]:
        median = bench["stats"]["median"]
        extra = bench.get("extra_info", {})
        implementation = bench["params"]["implementation"]
        if implementation == "autograd_loop":
            median = extra["extrapolated_median_s"]
        row = rows.setdefault(bench["group"], {"bytes": extra.get("bytes_read", 0)})
        row[implementation] = median
    print("| case | gradood µs | GB/s | copy GB/s | eager µs (×) | compiled µs (×) | autograd loop µs, extrapolated (×) |")
    print("|---|---|---|---|---|---|---|")
    for group, row in rows.items():
        ours = row["gradood"]

        def cell(name: str) -> str:
            if name not in row:
                return "—"
            return f"{row[name] * 1e6:,.1f} ({row[name] / ours:,.1f}×)"

        bandwidth = row["bytes"] / ours / 1e9
        copy = 2 * row["bytes"] / row["copy"] / 1e9 if "copy" in row else float("nan")
        print(
            f"| {group} | {ours * 1e6:,.1f} | {bandwidth:,.1f} | {copy:,.1f} | {cell('reference')} | "
            f"{cell('reference_compiled')} | {cell('autograd_loop')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
