"""Every model family users bring, swept: one representative of every timm model
family and every Hugging Face transformers image- and text-classification
architecture that builds small, with random weights and small inputs.

    python benchmarks/zoo_sweep.py timm|hf-image|hf-text [--only NAME ...] [--max-params 60e6]
                                   [--json OUT.json] [--batch 2]

Per model:
- which forward-only detectors run with no wrapper (MSP, MaxLogit, Energy,
  GradNorm, ExGrad, RG, ReAct, KLMatching; fit and score on the same batch);
- gradood.persample_grad_norms with no options against a float64 per-sample
  autograd loop (a float32 one where an op has no float64 kernel: torch._grouped_mm) (loss "logsumexp": with random weights some models' softmax
  saturates and the predicted-label CE's gradient is then exactly zero), or,
  where it raises, with fallback="torch.func";
- the share of parameters on the op-by-op VJP path ("op-vjp": a per-op replay,
  materialising that parameter's per-sample gradient) and on the torch.func
  fallback (a module replay);
- the float32 time of the norms (second call, the layout cached) against a
  training step (forward, backward with .grad) at the same batch.

timm family representatives: the model with the fewest parameters among the first
ones listed for the family (counted on the meta device, 20 s per family), at 64×64 (or
96×96) where it takes that input, else at its own input size.
Hugging Face architectures: the architecture's config with layers, widths, heads,
vocabulary and image size shrunk where the config has those attributes; an
architecture that does not build small (or not from its default config) is
listed as such. Needs timm/transformers; timm needs torchvision (imported with
gradood.testing.import_torchvision, a test-machine workaround).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

import gradood
from gradood import model_io
from gradood import detectors as D
from gradood.persample._caches import empty_tensor_caches
from gradood.persample._workarounds import batch_norm_gradient_layout
from gradood.testing import import_torchvision

FORWARD_ONLY = (D.MSP, D.MaxLogit, D.Energy, D.GradNorm, D.ExGrad, D.RG, D.ReAct, D.KLMatching)
SLOW_VJP, SLOW_REPLAY = ("op-vjp",), ("torch.func",)


def loop_norms(model: nn.Module, inputs) -> torch.Tensor:
    """The float64 per-sample loop, with attention-bias caches emptied and PyTorch's
    batch_norm gradient-layout bug avoided (gradood/persample/_caches.py, _workarounds.py):
    without them plain autograd itself fails or is wrong on LeViT/EfficientFormer/EfficientViT."""
    norms = []
    for index in range(model_io.batch_size(inputs)):
        model.zero_grad(set_to_none=True)
        with empty_tensor_caches(model), batch_norm_gradient_layout(model):
            logits = model_io.logits_of("loop", model_io.call(model, model_io.select(inputs, torch.tensor([index]))))
            torch.logsumexp(logits, 1).sum().backward()
        norms.append(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None).sqrt())
    model.zero_grad(set_to_none=True)
    return torch.stack(norms)


def training_step_seconds(model: nn.Module, inputs, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model_io.logits_of("step", model_io.call(model, inputs))
        torch.nn.functional.cross_entropy(logits, logits.argmax(1)).backward()
        best = min(best, time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
    return best


def norms_seconds(model: nn.Module, inputs, options: dict, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        gradood.persample_grad_norms(model, inputs, **options)
        best = min(best, time.perf_counter() - start)
    return best


def as_float64(inputs):
    return model_io.map_tensors(inputs, lambda t: t.double() if t.is_floating_point() else t)


def sweep_one(name: str, model: nn.Module, inputs, max_params: float) -> Dict[str, Any]:
    row: Dict[str, Any] = {"model": name, "parameters": sum(p.numel() for p in model.parameters())}
    if row["parameters"] > max_params:
        row["status"] = "skipped (over --max-params)"
        return row
    model.eval()
    ran = []
    for make in FORWARD_ONLY:
        try:
            detector = make(model).fit(inputs)
            if torch.isfinite(detector.score(inputs)).all():
                ran.append(make.__name__)
        except Exception as error:  # noqa: BLE001  (a report, not a test)
            row.setdefault("detector_errors", {})[make.__name__] = f"{type(error).__name__}: {str(error)[:160]}"
    row["forward_only"] = f"{len(ran)}/{len(FORWARD_ONLY)}"
    options: Dict[str, Any] = {}
    try:
        result = gradood.persample_grad_norms(model, inputs, loss="logsumexp", per_layer=True)
    except Exception as error:  # noqa: BLE001
        row["no_option_error"] = f"{type(error).__name__}: {str(error)[:200]}"
        options = {"fallback": "torch.func"}
        try:
            result = gradood.persample_grad_norms(model, inputs, loss="logsumexp", per_layer=True, **options)
        except Exception as error2:  # noqa: BLE001
            row["status"] = f"error: {type(error2).__name__}: {str(error2)[:200]}"
            return row
    row["options"] = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "none"
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    by_method: Dict[str, int] = {}
    for params, method in zip(result.parameters, result.methods):
        for param in params:
            by_method[method] = by_method.get(method, 0) + sizes.get(param, 0)
    total = sum(sizes.values())
    row["share_op_vjp"] = sum(v for k, v in by_method.items() if k in SLOW_VJP) / total
    row["share_torch_func"] = sum(v for k, v in by_method.items() if k in SLOW_REPLAY) / total
    row["norms_s"] = norms_seconds(model, inputs, dict(loss="logsumexp", **options))
    row["step_s"] = training_step_seconds(model, inputs)
    model64 = model.double()
    inputs64 = as_float64(inputs)
    try:
        ours = gradood.persample_grad_norms(model64, inputs64, loss="logsumexp", **options).norms
        expected = loop_norms(model64, inputs64)
        row["rel_error_float64"] = float(((ours - expected).abs() / expected.clamp_min(1e-300)).max())
    except Exception as error:  # noqa: BLE001  (an op without float64 kernels: compared in float32)
        row["rel_error_float64"] = f"{type(error).__name__}: {str(error)[:160]}"
        model.float()
        ours = gradood.persample_grad_norms(model, inputs, loss="logsumexp", **options).norms
        expected = loop_norms(model, inputs)
        row["rel_error_float32"] = float(((ours - expected).abs() / expected.clamp_min(1e-30)).max())
    finally:
        model.float()
    row["status"] = "ok"
    return row


# -- timm -------------------------------------------------------------------------------


def timm_models(only: List[str], seconds: float = 20.0):
    import_torchvision()
    import timm

    for family in timm.list_modules():
        if only and family not in only:
            continue
        best: Optional[Tuple[str, int]] = None
        started = time.perf_counter()
        for name in timm.list_models(module=family):
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    count = sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=10).parameters())
            except Exception:  # noqa: BLE001
                continue
            if best is None or count < best[1]:
                best = (name, count)
            if time.perf_counter() - started > seconds:
                break
        if best is None:
            yield family, None, None, "no model builds"
            continue

        def build(name=best[0]):
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
            channels, *size = model.pretrained_cfg.get("input_size", (3, 224, 224))
            for side in (64, 96):  # small inputs where the model takes them (CNNs), else its own size
                try:
                    with torch.no_grad():
                        model(torch.zeros(1, channels, side, side))
                    return model, torch.randn(2, channels, side, side)
                except Exception:  # noqa: BLE001
                    continue
            return model, torch.randn(2, channels, *size)

        yield f"{family}: {best[0]}", build, best[1], None


# -- Hugging Face -----------------------------------------------------------------------

_SHRINK = dict(
    num_hidden_layers=2, num_layers=2, n_layer=2, n_layers=2, encoder_layers=2, decoder_layers=2,
    hidden_size=32, d_model=32, n_embd=32, dim=32, embed_dim=32, embedding_size=32,
    num_attention_heads=2, n_head=2, n_heads=2, num_heads=2, encoder_attention_heads=2, decoder_attention_heads=2,
    num_key_value_heads=2, intermediate_size=64, ffn_dim=64, hidden_dim=64, d_ff=64, encoder_ffn_dim=64,
    decoder_ffn_dim=64, vocab_size=128, max_position_embeddings=64, n_positions=64, head_dim=16,
    image_size=32, patch_size=8,
)


_LAYERS_ONLY = {key: value for key, value in _SHRINK.items() if "layer" in key}


def _shrunk(config, overrides: dict):
    for key, value in overrides.items():
        if hasattr(config, key) and isinstance(getattr(config, key), int) and not isinstance(getattr(config, key), bool):
            setattr(config, key, value)
    for key in ("depths", "num_layers_per_stage"):
        if isinstance(getattr(config, key, None), (list, tuple)):
            setattr(config, key, [1] * len(getattr(config, key)))
    return config


def hf_models(kind: str, only: List[str]):
    try:
        import_torchvision()
    except ImportError:
        pass
    import transformers
    from transformers.models.auto import modeling_auto

    mapping = (modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES if kind == "hf-image"
               else modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES)
    for model_type, class_name in sorted(mapping.items()):
        if only and model_type not in only:
            continue
        class_names = class_name if isinstance(class_name, (list, tuple)) else (class_name,)
        model_class = getattr(transformers, class_names[0], None)
        if model_class is None:
            yield model_type, None, None, "class not importable"
            continue
        try:
            config_class = transformers.AutoConfig.for_model(model_type).__class__
        except Exception as error:  # noqa: BLE001
            yield model_type, None, None, f"no config: {error}"
            continue

        def build(model_class=model_class, config_class=config_class):
            last: Optional[Exception] = None
            for overrides in (_SHRINK, _LAYERS_ONLY, {}):  # the smallest configuration that builds and runs
                try:
                    config = _shrunk(config_class(), overrides)
                    config.num_labels = 3
                    if getattr(config, "pad_token_id", None) is None:
                        config.pad_token_id = 0
                    with torch.device("meta"):
                        count = sum(p.numel() for p in model_class(config).parameters())
                    if count > 200e6:
                        raise ValueError(f"{count / 1e6:.0f}M parameters from its config")
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        model = model_class(config).eval()
                    inputs = _hf_inputs(kind, config)
                    with torch.no_grad():
                        model_io.call(model, inputs)
                    return model, inputs
                except Exception as error:  # noqa: BLE001
                    last = error
            raise RuntimeError(f"does not build small: {type(last).__name__}: {str(last)[:160]}")

        yield model_type, build, None, None


def _hf_inputs(kind: str, config) -> dict:
    generator = torch.Generator().manual_seed(0)
    if kind == "hf-image":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size, generator=generator)}
    vocab = getattr(config, "vocab_size", 100) or 100
    ids = torch.randint(2, min(vocab, 100), (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    ids[0, -3:] = config.pad_token_id
    mask[0, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| model | params | forward-only detectors | options | rel. error float64 | norms / step (float32) | "
             "share op-vjp | share torch.func | status |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        error = row.get("rel_error_float64", "")
        error = f"{error:.1e}" if isinstance(error, float) else str(error)[:60]
        if "rel_error_float32" in row:  # no float64 kernel for one of its ops
            error = f"{row['rel_error_float32']:.1e} (float32: no float64 kernel)"
        ratio = f"{row['norms_s'] / row['step_s']:.2f}" if "norms_s" in row else ""
        share = lambda key: f"{row[key]:.1%}" if key in row else ""  # noqa: E731
        params = f"{row['parameters'] / 1e6:.1f}M" if "parameters" in row else ""
        lines.append(f"| {row['model']} | {params} | {row.get('forward_only', '')} | {row.get('options', '')} | {error} | "
                     f"{ratio} | {share('share_op_vjp')} | {share('share_torch_func')} | {row.get('status', '')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("zoo", choices=("timm", "hf-image", "hf-text"))
    parser.add_argument("--only", nargs="*", default=[])
    parser.add_argument("--max-params", type=float, default=60e6)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    source = timm_models(args.only) if args.zoo == "timm" else hf_models(args.zoo, args.only)
    rows = []
    for name, build, count, problem in source:
        if problem is not None:
            rows.append({"model": name, "status": problem})
        elif count is not None and count > args.max_params:
            rows.append({"model": name, "parameters": count, "status": "skipped (over --max-params)"})
        else:
            try:
                with warnings.catch_warnings(), contextlib.redirect_stderr(None):
                    warnings.simplefilter("ignore")
                    model, inputs = build()
                rows.append(sweep_one(name, model, inputs, args.max_params))
            except Exception as error:  # noqa: BLE001
                rows.append({"model": name, "status": f"does not build/run: {type(error).__name__}: {str(error)[:160]}"})
        print(json.dumps(rows[-1], default=str), flush=True)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(rows, handle, indent=1, default=str)
    print(table(rows))


if __name__ == "__main__":
    main()
