#!/usr/bin/env bash
# Configures and builds the libtorch (CMake) build of gradood and runs its C++
# test program. Uses the torch of the active Python environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${GRADOOD_CMAKE_BUILD_DIR:-$root/build/cmake}"
mkdir -p "$(dirname "$build")"
prefix="$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" -DCMAKE_BUILD_TYPE=Release >"$build.configure.log" 2>&1 \
  || { cat "$build.configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure
"$build/test_lastlayer_terms"
"$build/test_persample_norms"

# The installed CMake package and the C++ example that loads a scripted OODHead.
install_prefix="${build}-install"
cmake --install "$build" --prefix "$install_prefix" >/dev/null
example_build="${build}-example"
cmake -S "$root/examples/cpp" -B "$example_build" -G Ninja -DCMAKE_PREFIX_PATH="$install_prefix;$prefix" \
  -DCMAKE_BUILD_TYPE=Release >"$example_build.configure.log" 2>&1 || { cat "$example_build.configure.log"; exit 1; }
cmake --build "$example_build"
python "$root/examples/cpp/make_model.py" "$example_build/data"
"$example_build/score_batch" "$example_build/data/model.pt" "$example_build/data/inputs.pt" | tee "$example_build/data/actual.txt"
python "$root/examples/cpp/compare.py" "$example_build/data/expected.txt" "$example_build/data/actual.txt"
if [ -f "$example_build/data/model.pt2" ]; then  # the AOTInductor package, where torch makes one
  "$example_build/score_batch" "$example_build/data/model.pt2" "$example_build/data/inputs.pt" >"$example_build/data/actual_aoti.txt"
  python "$root/examples/cpp/compare.py" "$example_build/data/expected.txt" "$example_build/data/actual_aoti.txt"
fi
