#!/usr/bin/env bash
# Builds an sdist and, from it, a wheel (python -m build --no-isolation: against the
# installed torch), installs the wheel into a fresh virtual environment with torch and
# runs a smoke test from outside the checkout: import, the version, one score, one
# detector, the `gradood --help` command. Part of tests/run.sh.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
python -m build --no-isolation --outdir "$work/dist" "$root" > "$work/build.log" 2>&1 || { tail -40 "$work/build.log"; exit 1; }
python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q "torch==$torch_version" numpy tqdm
"$work/venv/bin/python" -m pip install -q --no-deps "$work"/dist/gradood-*.whl
cd "$work"  # not the checkout: the installed package must stand alone
"$work/venv/bin/python" - <<'PY'
import torch
import gradood

assert gradood.__file__.find("site-packages") > 0, gradood.__file__
logits = torch.randn(4, 10, dtype=torch.float64)
torch.testing.assert_close(gradood.scores.energy(logits), torch.logsumexp(logits, 1))
model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)).eval()
scores = gradood.detectors.GradNorm(model).score(torch.randn(5, 12))
assert scores.shape == (5,) and torch.isfinite(scores).all()
print("wheel smoke test: gradood", gradood.__version__, "| CPU level", gradood.cpu_capability())
PY
"$work/venv/bin/gradood" --help > /dev/null
echo "check_wheel: ok (sdist and wheel built, wheel installed in a fresh venv, smoke test passed outside the checkout)"
