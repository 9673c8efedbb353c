"""MkDocs hooks: the pages' generated parts, from the code and the committed benchmark data.

- `{{supported_layers}}` (engine.md): the per-sample engine's rule registry,
  gradood.persample.supported_layers().
- `{{demo_results}}` (evaluation.md): the demo's table per instruction-set level, from the
  committed results.json of `gradood demo` runs (benchmarks/results/*/demo-<level>/).
- `{{persample_results}}` (performance.md): the per-sample engine's time and peak memory
  against a training step, from benchmarks/results/*/persample.json.
- `{{benchmark_results}}` (performance.md): a table per machine and instruction-set level,
  and a plot of the speed-ups, from benchmarks/results/*/levels-*.json (written by
  benchmarks/run_levels.sh; benchmarks/summarize.py renders the tables).
"""

from __future__ import annotations

import glob
import importlib.util
import io
import json
import os

from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
_PEERS = ("reference", "reference_compiled", "torch_oneliner", "pytorch_ood")
_PEER_NAMES = {"reference": "eager", "reference_compiled": "torch.compile", "torch_oneliner": "one-line torch",
               "pytorch_ood": "pytorch-ood"}
_plots: dict = {}


def _summarize():
    spec = importlib.util.spec_from_file_location("summarize", os.path.join(ROOT, "benchmarks", "summarize.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _supported_layers() -> str:
    from gradood.persample import supported_layers

    lines = ["| layer class | norms | per-sample gradients (LowDimGrad) | rule |", "|---|---|---|---|"]
    for row in supported_layers():
        lines.append(f"| `{row.layer}` | {row.norms} | {'yes' if row.gradients else 'no'} | `{row.rule}` |")
    return "\n".join(lines)


def _machine_line(text: str) -> str:
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    isa = [flag for flag in ("sse4_2", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl") if flag in flags]
    return (f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, "
            f"flags include {' '.join(isa) or 'none of sse4_2/avx2/avx512'}; measured {fields.get('date', '?').strip()}")


def _speedups(summarize, benchmarks: list) -> dict:
    """{case: ratio of the fastest peer's median to gradood's} for the last-layer cases."""
    out = {}
    for group, row in summarize.rows_by_kind(benchmarks)["lastlayer"].items():
        peers = [row[name] for name in _PEERS if name in row]
        if peers and "gradood" in row:
            out[group.removesuffix("-float32").replace("-cpu", "")] = min(peers) / row["gradood"]
    return out


def _keep(figure, path: str) -> str:
    """Renders a matplotlib figure to PNG for on_files to add under `path`."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    _plots[path] = buffer.getvalue()
    return path


def _plot(name: str, by_level: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({case for ratios in by_level.values() for case in ratios})
    figure, axis = plt.subplots(figsize=(10, 0.28 * len(cases) * max(1, len(by_level)) + 1.5))
    height = 0.8 / max(1, len(by_level))
    for index, (level, ratios) in enumerate(sorted(by_level.items())):
        positions = [i + index * height for i in range(len(cases))]
        axis.barh(positions, [ratios.get(case, 0) for case in cases], height=height, label=level)
    axis.set_yticks([i + 0.4 - height / 2 for i in range(len(cases))], cases, fontsize=7)
    axis.axvline(1.0, color="black", linewidth=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("fastest peer's median / gradood's (> 1: gradood faster)")
    axis.legend()
    return _keep(figure, f"generated/{name}-speedups.png")


def _benchmark_results() -> str:
    summarize = _summarize()
    parts = []
    for folder in sorted(glob.glob(os.path.join(RESULTS, "*")), reverse=True):
        files = sorted(glob.glob(os.path.join(folder, "levels-*.json")))
        if not files:
            continue
        name = os.path.basename(folder)
        by_level, tables = {}, []
        machine = ""
        for path in files:
            data = json.load(open(path))
            machine = machine or data.get("machine", "")
            level = os.path.basename(path).removeprefix("levels-").removesuffix(".json").upper()
            by_level[level] = _speedups(summarize, data["benchmarks"])
            tables.append(f"#### {level}\n\n" + summarize.markdown(data["benchmarks"]))
        plot = _plot(name, by_level)
        parts.append(f"### {name}\n\n{_machine_line(machine)}.\n\n"
                     f"![gradood against the fastest of {', '.join(_PEER_NAMES.values())}]({plot})\n\n"
                     + "\n\n".join(tables))
    if not parts:
        raise RuntimeError("docs: no benchmarks/results/*/levels-*.json to build the performance page from")
    return "\n\n".join(parts)


def _demo_results() -> str:
    """The demo's mean table per instruction-set level, from the committed results.json of
    `gradood demo` runs (benchmarks/results/<run>/demo-<level>/), and whether they agree."""
    parts = []
    for folder in sorted(glob.glob(os.path.join(RESULTS, "*")), reverse=True):
        runs = {}
        for path in sorted(glob.glob(os.path.join(folder, "demo-*", "results.json"))):
            level = os.path.basename(os.path.dirname(path)).removeprefix("demo-").upper()
            data = json.load(open(path))
            header = open(os.path.join(os.path.dirname(path), "report.md")).read().split("###", 1)[0]
            runs[level] = ({row["detector"]: row for row in data["rows"] if row["ood_set"] == "mean"}, header)
        if not runs:
            continue
        levels = sorted(runs)
        detectors = list(next(iter(runs.values()))[0])
        metrics = ("auroc", "fpr95", "fpr95_ood_positive")
        same = all(runs[a][0][d][m] == runs[b][0][d][m] for a in levels for b in levels for d in detectors
                   for m in metrics)
        lines = [f"Run `{os.path.basename(folder)}`; each level with torch, MKL, oneDNN and gradood forced to it. "
                 + ("The tables agree to every printed digit at " if same else "The tables **differ** between ")
                 + " and ".join(levels) + ".", ""]
        for level in levels:
            machine = [line for line in runs[level][1].splitlines() if line.startswith(("Machine:", "Model:"))]
            lines.append(f"- {level}: " + " ".join(machine))
        lines += ["", "| detector | " + " | ".join(f"AUROC ± std ({lv}) | FPR95, ID+ ({lv})" for lv in levels) + " |",
                  "|---|" + "---|---|" * len(levels)]
        for name in detectors:
            cells = []
            for level in levels:
                row = runs[level][0][name]
                cells.append(f"{row['auroc']:.4f} ± {row.get('auroc_std', float('nan')):.4f} | {row['fpr95']:.4f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if not parts:
        raise RuntimeError("docs: no benchmarks/results/*/demo-*/results.json for the demo table")
    return "\n\n".join(parts)


def _persample_plot(name: str, rows: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [case for case, row in rows.items() if {"gradood", "training_step"} <= set(row)]
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 0.6 * len(cases) + 1.8))
    for axis, (key, label) in zip((time_axis, memory_axis), (("", "time"), (" peak", "peak memory"))):
        values = {impl: [rows[c].get(impl + key, float("nan")) / rows[c]["training_step" + key] for c in cases]
                  for impl in ("gradood", "vmap_grad") if all(impl + key in rows[c] for c in cases)}
        for index, (impl, ratios) in enumerate(values.items()):
            axis.barh([i + 0.4 * index for i in range(len(cases))], ratios, height=0.4, label=impl)
        axis.axvline(1.0, color="black", linewidth=0.8)
        axis.set_yticks([i + 0.2 for i in range(len(cases))], cases, fontsize=7)
        axis.set_xlabel(f"{label} / a training step's")
        axis.legend(fontsize=7)
    return _keep(figure, f"generated/{name}-persample.png")


def _persample_results() -> str:
    """The per-sample engine against a training step and vmap(grad): time and peak memory,
    from benchmarks/results/*/persample.json (summarize.py --condense of test_persample.py)."""
    summarize = _summarize()
    parts = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "*", "persample.json")), reverse=True):
        data = json.load(open(path))
        name = os.path.basename(os.path.dirname(path))
        rows = summarize.rows_by_kind(data["benchmarks"])["persample"]
        plot = _persample_plot(name, rows)
        parts.append(f"### {name}\n\n{_machine_line(data.get('machine', ''))}.\n\n"
                     f"![time and peak memory against a training step]({plot})\n\n"
                     + "\n".join(summarize._persample_table(rows)))
    if not parts:
        raise RuntimeError("docs: no benchmarks/results/*/persample.json for the per-sample engine's numbers")
    return "\n\n".join(parts)


_GENERATORS = {
    "{{persample_results}}": _persample_results,
    "{{supported_layers}}": _supported_layers,
    "{{benchmark_results}}": _benchmark_results,
    "{{demo_results}}": _demo_results,
}


def on_page_markdown(markdown, page, config, files):
    for placeholder, generate in _GENERATORS.items():
        if placeholder in markdown:
            markdown = markdown.replace(placeholder, generate())
    return markdown


def on_files(files, config):
    # The plots are made while the performance page renders; register their paths now.
    _benchmark_results()
    _persample_results()
    for path, content in _plots.items():
        files.append(File.generated(config, path, content=content))
    return files
