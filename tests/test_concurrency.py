"""Concurrent use: the ops and OODHead from 8 threads give the serial results bit
for bit, and repeated calls do not grow memory."""

from __future__ import annotations

import resource
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

import gradood
from gradood import detectors as D
from gradood import scores


def _batches(count: int):
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(16, 100, generator=generator) * 3, torch.rand(16, 64, generator=generator)) for _ in range(count)]


def test_scores_from_eight_threads_are_bit_identical_to_serial():
    batches = _batches(64)
    serial = [scores.gradnorm(logits, features) for logits, features in batches]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda batch: scores.gradnorm(*batch), batches))
    for expected, actual in zip(serial, threaded):
        assert torch.equal(expected, actual)


def test_ood_head_from_eight_threads_is_bit_identical_to_serial():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    inputs = [torch.randn(8, 20) for _ in range(48)]
    head = gradood.OODHead(model, D.RG(model, clip=0.5), example_inputs=inputs[0])
    with torch.no_grad():
        serial = [head(x) for x in inputs]
        with ThreadPoolExecutor(max_workers=8) as pool:
            threaded = list(pool.map(head, inputs))
    for (logits, score), (logits_t, score_t) in zip(serial, threaded):
        assert torch.equal(logits, logits_t) and torch.equal(score, score_t)


def test_results_do_not_depend_on_the_thread_count():
    logits, features = _batches(1)[0]
    logits, features = logits.repeat(64, 1), features.repeat(64, 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = scores.rg(logits, features)
        torch.set_num_threads(max(2, threads))
        multi = scores.rg(logits, features)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, multi)


def _resident_kib() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() // 1024


def test_memory_does_not_grow_over_ten_thousand_calls():
    logits, features = _batches(1)[0]
    for _ in range(500):  # allocator warm-up
        scores.rg(logits, features)
    before = _resident_kib()
    for _ in range(10_000):
        scores.rg(logits, features)
        gradood.lastlayer_terms(logits, features)
    growth = _resident_kib() - before
    assert growth < 8 * 1024, f"resident memory grew by {growth} KiB over 10,000 calls"
