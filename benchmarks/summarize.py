"""Markdown tables of benchmark JSON files from test_lastlayer_scores.py,
test_react.py and test_persample.py: medians per implementation and ratios to gradood
(per-sample norms: also peak memory, and both against a training step). With several files, a later file's
measurement of a (case, implementation) replaces an earlier one's.

    python benchmarks/summarize.py bench.json [more.json ...]
    python benchmarks/summarize.py --condense small.json [--machine machine.txt] bench.json ...
"""

from __future__ import annotations

import collections
import json
import sys


def load(paths: list) -> list:
    """The benchmarks of pytest-benchmark JSON files, or of condensed ones (condense())."""
    return [bench for path in paths for bench in json.load(open(path))["benchmarks"]]


def condense(benchmarks: list, machine: str = "") -> dict:
    """What the tables need (group, implementation, median, extra_info), without the raw
    timings pytest-benchmark stores: small enough to commit beside RESULTS.md."""
    return {
        "machine": machine,
        "benchmarks": [
            {"group": b["group"], "params": {"implementation": (b.get("params") or {}).get("implementation", "gradood")},
             "stats": {"median": b["stats"]["median"]}, "extra_info": b.get("extra_info", {})}
            for b in benchmarks
        ],
    }


def rows_by_kind(benchmarks: list) -> dict:
    rows = collections.OrderedDict()
    for bench in benchmarks:
        median = bench["stats"]["median"]
        extra = bench.get("extra_info", {})
        implementation = (bench.get("params") or {}).get("implementation", "gradood")
        if "extrapolated_median_s" in extra:  # a per-sample loop timed on a subset
            median = extra["extrapolated_median_s"]
        row = rows.setdefault(bench["group"], {"bytes": extra.get("bytes_read", 0)})
        row[implementation] = median
        if "peak_mib" in extra:
            row[f"{implementation} peak"] = extra["peak_mib"]
    tables = {kind: collections.OrderedDict() for kind in ("lastlayer", "react", "persample")}
    for group, row in rows.items():
        kind = group.split("-")[0] if group.startswith(("react-", "persample-")) else "lastlayer"
        tables[kind][group] = row
    return tables


def levels(benchmarks: list) -> list:
    return sorted({(b.get("extra_info", {}).get("cpu_capability"), b.get("extra_info", {}).get("aten_cpu_capability"))
                   for b in benchmarks} - {(None, None)})


def markdown(benchmarks: list) -> str:
    lines = [f"Instruction-set level: gradood {ours}, torch {aten}\n" for ours, aten in levels(benchmarks)]
    printers = {"lastlayer": _lastlayer_table, "react": _react_table, "persample": _persample_table}
    for kind, table in rows_by_kind(benchmarks).items():
        if table:
            lines += printers[kind](table)
    return "\n".join(lines)


def main(argv: list) -> None:
    if argv[:1] == ["--condense"]:  # --condense OUT.json [--machine machine.txt] IN.json ...
        out, rest = argv[1], argv[2:]
        machine = ""
        if rest[:1] == ["--machine"]:
            machine, rest = open(rest[1]).read(), rest[2:]
        with open(out, "w") as handle:
            json.dump(condense(load(rest), machine), handle, indent=1)
        return
    print(markdown(load(argv)))


def _cell(row: dict, name: str) -> str:
    if name not in row:
        return "—"
    return f"{row[name] * 1e6:,.1f} ({row[name] / row['gradood']:,.2f}×)"


def _lastlayer_table(rows: dict) -> list:
    lines = []
    lines.append(
        "| case | gradood µs | GB/s | copy GB/s | eager µs (×) | compiled µs (×) "
        "| one-line torch µs (×) | pytorch-ood µs (×) | autograd loop µs, extrapolated (×) | tiny kernel µs |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for group, row in rows.items():
        ours = row["gradood"]
        bandwidth = row["bytes"] / ours / 1e9
        copy = 2 * row["bytes"] / row["copy"] / 1e9 if "copy" in row else float("nan")
        tiny = f"{row['tiny_kernel'] * 1e6:,.1f}" if "tiny_kernel" in row else "—"
        lines.append(
            f"| {group} | {ours * 1e6:,.1f} | {bandwidth:,.1f} | {copy:,.1f} | {_cell(row, 'reference')} | "
            f"{_cell(row, 'reference_compiled')} | {_cell(row, 'torch_oneliner')} | {_cell(row, 'pytorch_ood')} | "
            f"{_cell(row, 'autograd_loop')} | {tiny} |"
        )
    return lines


def _react_table(rows: dict) -> list:
    lines = []
    lines.append("\n| case | gradood µs | eager µs (×) | compiled µs (×) | GEMM alone µs (×) |")
    lines.append("|---|---|---|---|---|")
    for group, row in rows.items():
        lines.append(
            f"| {group} | {row['gradood'] * 1e6:,.1f} | {_cell(row, 'reference')} | "
            f"{_cell(row, 'reference_compiled')} | {_cell(row, 'gemm_only')} |"
        )
    return lines


def _persample_table(rows: dict) -> list:
    lines = []
    implementations = ["gradood", "training_step", "training_step_fp32", "vmap_grad", "loop", "opacus_ghost", "backpack_l2"]
    lines.append("\n| case | " + " | ".join(f"{name} ms (×)" for name in implementations)
          + " | gradood / step, time | gradood / step, peak memory |")
    lines.append("|---|" + "---|" * (len(implementations) + 2))
    for group, row in rows.items():
        cells = []
        for name in implementations:
            if name not in row:
                cells.append("—")
                continue
            ratio = f" ({row[name] / row['gradood']:,.2f}×)" if "gradood" in row and name != "gradood" else ""
            peak = f", {row[name + ' peak']:,.0f} MiB" if name + " peak" in row and name != "loop" else ""
            cells.append(f"{row[name] * 1e3:,.1f}{ratio}{peak}")
        time_ratio = row["gradood"] / row["training_step"] if {"gradood", "training_step"} <= set(row) else float("nan")
        peaks = ("gradood peak", "training_step peak")
        memory_ratio = row[peaks[0]] / row[peaks[1]] if set(peaks) <= set(row) else float("nan")
        lines.append(f"| {group} | " + " | ".join(cells) + f" | {time_ratio:.2f} | {memory_ratio:.2f} |")
    return lines


if __name__ == "__main__":
    main(sys.argv[1:])
