"""The `gradood` command: `gradood demo` (the main job) and `gradood bench`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from typing import List, Optional

import torch


def _demo(arguments: argparse.Namespace) -> None:
    from gradood import demo

    demo.run(
        out=arguments.out,
        seed=arguments.seed,
        epochs=arguments.epochs,
        plots=not arguments.no_plots,
        bootstrap=arguments.bootstrap,
        progress=not arguments.no_progress,
    )


def _load_model(spec: str) -> torch.nn.Module:
    """'package.module:factory' (called with no arguments), or a torchvision model name."""
    if ":" in spec:
        module_name, factory = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), factory)()
    try:
        import torchvision
    except ImportError:
        raise SystemExit(
            f"gradood bench: {spec!r} looks like a torchvision name, but torchvision is not installed; "
            "pass 'package.module:factory'"
        ) from None
    return torchvision.models.get_model(spec, weights=None)


def _trailing_parameters(model: torch.nn.Module, budget: int) -> List[str]:
    """The last trainable parameters (in definition order) holding at most `budget` elements in all
    (at least one): LowDimGrad's directions take |θ|·K elements, so the bench bounds |θ|."""
    names: List[str] = []
    total = 0
    for name, parameter in reversed(list(model.named_parameters())):
        if parameter.requires_grad and (not names or total + parameter.numel() <= budget):
            names.append(name)
            total += parameter.numel()
    return names


def _bench(arguments: argparse.Namespace) -> None:
    from gradood import detectors as D

    model = _load_model(arguments.model).to(arguments.device).eval()
    shape = tuple(int(size) for size in arguments.input_shape.split(","))
    inputs = torch.randn(arguments.batch, *shape, device=arguments.device)
    candidates = {
        "MSP": D.MSP(model),
        "Energy": D.Energy(model),
        "GradNorm": D.GradNorm(model),
        "ExGrad": D.ExGrad(model),
        "RG": D.RG(model),
        "ReAct": D.ReAct(model),
        "RGAdditive": D.RGAdditive(model),
        "KLMatching": D.KLMatching(model),
        "ODIN": D.ODIN(model),
        "GRODIN": D.GRODIN(model),
        "FullGradNorm": D.FullGradNorm(model),
        "LowDimGrad": D.LowDimGrad(model, params=_trailing_parameters(model, 1 << 21), iterations=1),
    }
    fit_data = {"LowDimGrad": [torch.randn_like(inputs) for _ in range(-(-256 // arguments.batch))]}
    print(f"model {arguments.model}, batch {arguments.batch}, input {shape}, device {arguments.device}")
    print(f"{'detector':<14} {'ms/batch':>10} {'samples/s':>12}")
    for name, detector in candidates.items():
        try:
            detector.fit(fit_data.get(name, inputs))
            detector.score(inputs)  # warm-up
            if arguments.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(arguments.repeat):
                detector.score(inputs)
            if arguments.device == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - start) / arguments.repeat
            print(f"{name:<14} {elapsed * 1e3:>10.2f} {arguments.batch / elapsed:>12,.0f}")
        except (ValueError, RuntimeError) as error:  # e.g. a layer without a per-sample rule
            print(f"{name:<14} {'—':>10} {'—':>12}  ({error})")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="gradood", description="Gradient-based OOD scores for PyTorch classifiers.")
    commands = parser.add_subparsers(dest="command")
    demo = commands.add_parser("demo", help="train a small CNN on scikit-learn digits and evaluate every detector")
    demo.add_argument("--out", default="gradood-demo-report", help="report folder (markdown, JSON, PNG)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the std (0: none)")
    demo.add_argument("--no-plots", action="store_true")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(run=_demo)
    bench = commands.add_parser("bench", help="time every detector on synthetic input")
    bench.add_argument("--model", required=True, help="a torchvision model name or 'package.module:factory'")
    bench.add_argument("--batch", type=int, default=64)
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench.add_argument("--input-shape", default="3,224,224", help="per-sample input shape, comma-separated")
    bench.add_argument("--repeat", type=int, default=5)
    bench.set_defaults(run=_bench)
    arguments = parser.parse_args(argv)
    if arguments.command is None:
        parser.print_help()
        return 0
    arguments.run(arguments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
