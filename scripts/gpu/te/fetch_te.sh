#!/usr/bin/env bash
# Here (no GPU): fetch what Transformer Engine 2.20.2 needs on the GPU machine into DIR (keep DIR git-ignored and
# carry it): DIR/whl/ the small wheels, DIR/core/ the 276.5 MB core wheel, plus this folder's scripts and the torch
# extension's source package (from PyPI). Then either split DIR/core/*.whl into 58 MiB pieces (split -b 58m) for consecutive calls
# (piece.sh), or make a one-call slim copy: python3 slim_wheel.py DIR/core/<wheel> DIR/slim/<same name>.
set -euo pipefail
dir=${1:?usage: fetch_te.sh DIR}; here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir/whl" "$dir/core"
get() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$1" "$2"; }
for w in transformer-engine==2.20.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
         typing-inspection==0.4.5 typing-extensions==4.16.0 nvdlfw-inspect==0.2.2; do get "$dir/whl" "$w"; done
get "$dir/core" transformer-engine-cu13==2.20.2
# the torch extension's source package (pip cannot download an sdist whose metadata needs torch to build)
sdist=transformer_engine_torch-2.20.2.tar.gz
curl -sSLo "$dir/$sdist" \
  "https://files.pythonhosted.org/packages/3d/fb/c9ce298a38c22ed1059923a01cac7e1f4e4f7281d39a8679c8118febe079/$sdist"
echo "4c40ced8a6261649e689076f198d4feaf02277b1ba18931a66eccdaceb33c43e  $dir/$sdist" | sha256sum -c -
cp "$here"/bring_up_te.sh "$here"/piece.sh "$here"/smoke.py "$dir/"
ls -la "$dir" "$dir/whl" "$dir/core"
