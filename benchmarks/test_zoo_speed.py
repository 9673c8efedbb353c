"""The per-sample engine on the zoo's headline models, against a training step and
torch.func's per-sample gradients of the whole network, in one run (CPU, float32,
CE at the predicted label, GRODIN's norms):

    bit_r50x1   timm resnetv2_50x1_bit (the GradNorm and RG papers' ImageNet model
                family): StdConv2d and GroupNormAct, 128×128, B=8
    bert_base   transformers BertForSequenceClassification at BERT-base's default
                configuration (110M parameters), T=128, B=8

    training_step   forward + backward with parameter gradients (the reference cost)
    gradood         gradood.persample_grad_norms, no options (layout cached: the probe and
                    the single-sample check run once, before timing)
    vmap_grad       torch.func.vmap(grad) over the batch: the whole network's per-sample
                    gradients materialised, then their norms

    cd benchmarks && python -m pytest test_zoo_speed.py --benchmark-json=zoo_speed.json
    python summarize.py zoo_speed.json

Needs timm (and torchvision, imported with gradood.testing.import_torchvision, a
test-machine workaround) and transformers; cases without them are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradood
from gradood import model_io
from gradood.testing import import_torchvision

CASES = ["bit_r50x1", "bert_base"]
IMPLEMENTATIONS = ["training_step", "gradood", "vmap_grad"]


def _case(name: str):
    torch.manual_seed(0)
    if name == "bit_r50x1":
        try:
            import_torchvision()
        except ImportError as error:
            pytest.skip(f"timm needs torchvision: {error}")
        timm = pytest.importorskip("timm")
        return timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=1000).eval(), torch.randn(8, 3, 128, 128)
    transformers = pytest.importorskip("transformers")
    model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2)).eval()
    ids = torch.randint(1000, 20000, (8, 128), generator=torch.Generator().manual_seed(0))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _ce_pred(logits):
    return F.cross_entropy(logits, logits.argmax(1), reduction="none")


def _vmap_grad(model, inputs):
    parameters = {name: p.detach() for name, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    keywords = model_io.is_mapping(inputs)

    def loss(params, sample):
        batch = model_io.map_tensors(sample, lambda t: t.unsqueeze(0))
        output = torch.func.functional_call(model, {**params, **buffers}, (), batch) if keywords else \
            torch.func.functional_call(model, {**params, **buffers}, (batch,))
        logits = model_io.logits_of("vmap", output)
        return _ce_pred(logits).sum()

    def norms():
        grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0), randomness="same")(parameters, inputs)
        return torch.stack([g.reshape(g.shape[0], -1).square().sum(1) for g in grads.values()]).sum(0).sqrt()

    return norms


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES)
def test_zoo_persample(benchmark, case, implementation):
    model, inputs = _case(case)
    benchmark.group = f"zoo-persample-{case}"
    benchmark.extra_info.update(case=case, implementation=implementation, threads=torch.get_num_threads())
    if implementation == "training_step":
        def run():
            logits = model_io.logits_of("step", model_io.call(model, inputs))
            F.cross_entropy(logits, logits.argmax(1)).backward()
            model.zero_grad(set_to_none=True)
    elif implementation == "gradood":
        result = gradood.persample_grad_norms(model, inputs, loss=_ce_pred, per_layer=True)  # probe + check, untimed
        slow = [n for n, m in zip(result.layer_names, result.methods) if m in ("op-vjp", "torch.func")]
        benchmark.extra_info.update(slow_path=len(slow), methods=sorted(set(result.methods)))

        def run():
            gradood.persample_grad_norms(model, inputs, loss=_ce_pred)
    else:
        norms = _vmap_grad(model, inputs)
        try:
            norms()
        except RuntimeError as error:  # out of memory, or an op without a batching rule
            pytest.skip(f"vmap(grad) fails here: {str(error)[:200]}")
        run = norms
    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
