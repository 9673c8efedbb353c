"""Loads gradood._C, the compiled operator library (torch.ops.gradood.*).

There is no pure-Python fallback: without the extension, importing gradood
fails and says how to build it.
"""

import torch  # noqa: F401  (libtorch must be loaded before the extension)

BUILD_HINT = (
    "gradood's compiled operators (gradood._C) could not be loaded. Build them from the "
    "source checkout against the installed torch:\n"
    "    pip install --no-build-isolation -e .\n"
    "(build isolation must be off so the extension is compiled against the torch you run; "
    "rebuild after changing torch). If gradood was installed without -e, Python may be "
    "importing the unbuilt source tree in the current directory instead: run from elsewhere."
)

try:
    from gradood import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(f"{BUILD_HINT}\nUnderlying error: {error}") from error
