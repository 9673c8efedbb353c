"""Where does LowDimGrad's projection spend its time? torch.profiler over one
G_low = g M − c of a batch (the benchmark's directions), the top operators by
self time: the per-sample gradient products (bmm, im2col), the projection GEMMs
(mm/addmm) and the forward/backward pass. The answer decides whether a fused
kernel (per-sample gradient tile kept on chip, multiplied by M in place) is
worth writing: only if bmm/im2col and the traffic around them are a large share.

    cd benchmarks && python profile_lowdim.py [--device cuda] [--batch 128] [--last-stage]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import gradood
from models import ResNet18Cifar
from test_lowdim import _last_stage, _subspace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--last-stage", action="store_true", help="restrict |θ| to the last stage and the head")
    parser.add_argument("--rows", type=int, default=15)
    arguments = parser.parse_args()

    torch.manual_seed(0)
    model = ResNet18Cifar().to(arguments.device).eval()
    select = _last_stage if arguments.last_stage else None
    subspace = _subspace(model, select, arguments.device)
    names = None if select is None else list(subspace.scaled_directions)
    inputs = torch.randn(arguments.batch, 3, 32, 32, device=arguments.device)

    def run():
        subspace.project(gradood.persample_gradients(model, inputs, "logsumexp", params=names))
        if arguments.device == "cuda":
            torch.cuda.synchronize()

    run()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if arguments.device == "cuda" else [])
    with profile(activities=activities) as profiler:
        run()
    key = "self_cuda_time_total" if arguments.device == "cuda" else "self_cpu_time_total"
    print(f"ResNet-18 CIFAR, B={arguments.batch}, K={subspace.dim}, |θ|={sum(b.shape[1] for b in subspace.scaled_directions.values())}, "
          f"device {arguments.device}")
    print(profiler.key_averages().table(sort_by=key, row_limit=arguments.rows))


if __name__ == "__main__":
    main()
