"""Markdown tables of benchmark JSON files from test_lastlayer_scores.py and
test_react.py: medians per implementation and ratios to gradood. With several files, a later file's
measurement of a (case, implementation) replaces an earlier one's.

    python benchmarks/summarize.py bench.json [more.json ...]
"""

from __future__ import annotations

import collections
import json
import sys


def main(paths: list) -> None:
    benchmarks = [bench for path in paths for bench in json.load(open(path))["benchmarks"]]
    rows = collections.OrderedDict()
    for bench in benchmarks:
        median = bench["stats"]["median"]
        extra = bench.get("extra_info", {})
        implementation = bench["params"]["implementation"]
        if implementation == "autograd_loop":
            median = extra["extrapolated_median_s"]
        row = rows.setdefault(bench["group"], {"bytes": extra.get("bytes_read", 0)})
        row[implementation] = median
    react = collections.OrderedDict((group, row) for group, row in rows.items() if group.startswith("react-"))
    lastlayer = collections.OrderedDict((group, row) for group, row in rows.items() if group not in react)
    if lastlayer:
        _lastlayer_table(lastlayer)
    if react:
        _react_table(react)


def _cell(row: dict, name: str) -> str:
    if name not in row:
        return "—"
    return f"{row[name] * 1e6:,.1f} ({row[name] / row['gradood']:,.2f}×)"


def _lastlayer_table(rows: dict) -> None:
    print(
        "| case | gradood µs | GB/s | copy GB/s | eager µs (×) | compiled µs (×) "
        "| autograd loop µs, extrapolated (×) | tiny kernel µs |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for group, row in rows.items():
        ours = row["gradood"]
        bandwidth = row["bytes"] / ours / 1e9
        copy = 2 * row["bytes"] / row["copy"] / 1e9 if "copy" in row else float("nan")
        tiny = f"{row['tiny_kernel'] * 1e6:,.1f}" if "tiny_kernel" in row else "—"
        print(
            f"| {group} | {ours * 1e6:,.1f} | {bandwidth:,.1f} | {copy:,.1f} | {_cell(row, 'reference')} | "
            f"{_cell(row, 'reference_compiled')} | {_cell(row, 'autograd_loop')} | {tiny} |"
        )


def _react_table(rows: dict) -> None:
    print("\n| case | gradood µs | eager µs (×) | compiled µs (×) | GEMM alone µs (×) |")
    print("|---|---|---|---|---|")
    for group, row in rows.items():
        print(
            f"| {group} | {row['gradood'] * 1e6:,.1f} | {_cell(row, 'reference')} | "
            f"{_cell(row, 'reference_compiled')} | {_cell(row, 'gemm_only')} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
