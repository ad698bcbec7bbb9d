#!/usr/bin/env bash
# Build KenLM's lmplz and build_binary from the kenlm source distribution into VENV/bin.
set -euo pipefail
venv=${1:-.venv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Only kenlm itself from source: `--no-binary :all:` would also build its build requirements (setuptools,
# cmake) from source, for many minutes, wherever the venv's own setuptools cannot read its metadata.
"$venv/bin/python" -m pip download -q --no-deps --no-binary kenlm kenlm -d "$work"
src=$(ls "$work"/kenlm-*.tar.gz | head -1)
tar -xzf "$src" -C "$work"
dir=$(find "$work" -maxdepth 1 -type d -name 'kenlm-*' | head -1)
cmake -S "$dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DKENLM_MAX_ORDER=6 >"$work/cmake.log" 2>&1 \
  || { tail -20 "$work/cmake.log"; echo "cmake failed for KenLM (is Boost installed?)"; exit 1; }
cmake --build "$work/build" --target lmplz build_binary -j "$(nproc)" >"$work/build.log" 2>&1 \
  || { tail -20 "$work/build.log"; echo "building lmplz failed"; exit 1; }
cp "$work/build/bin/lmplz" "$work/build/bin/build_binary" "$venv/bin/"
echo "built lmplz and build_binary into $venv/bin"
