#!/usr/bin/env bash
# The wheels bench/gpu.sh needs on a GPU machine that has torch, transformers, OpenCV,
# scikit-image, scikit-learn and peft but not the rest of maskmint's stack (Python 3.12,
# x86-64), into .whl/ (ignored by git; carried beside the working tree).
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
for wheel in diffusers webdataset braceexpand pydantic pydantic-core annotated-types typing-inspection \
    optimum-quanto ninja; do
  version=$(python3 -c "import importlib.metadata as m; print(m.version('$wheel'))" 2>/dev/null || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$wheel${version:+==$version}"
done
ls -la .whl
