"""Compares score_batch's output with expected.txt (labels equal, numbers to 1e-5).

    python examples/cpp/compare.py expected.txt actual.txt
"""

import sys


def rows(path):
    return [line.split() for line in open(path) if line.strip() and not line.startswith("#")]


expected, actual = rows(sys.argv[1]), rows(sys.argv[2])
assert len(expected) == len(actual) > 0, f"{len(actual)} rows, expected {len(expected)}"
for want, got in zip(expected, actual):
    assert want[0] == got[0], f"class {got[0]}, expected {want[0]}"
    for a, b in zip(want[1:], got[1:]):
        assert abs(float(a) - float(b)) <= 1e-5 * max(1.0, abs(float(a))), f"{got} vs {want}"
print(f"C++ example matches Python on {len(expected)} samples")
