#!/usr/bin/env bash
# Idempotent set-up: the Fashion-MNIST Debian package, a .venv with torch and this project (with
# its test tools), torchattacks without its dependencies. A second run skips what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
say() { printf '[setup] %s\n' "$*"; }

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    say "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq || say "apt-get update failed; trying the install anyway"
    $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
else
    say "Fashion-MNIST present"
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

if ! .venv/bin/python -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.1")))' 2>/dev/null; then
    say "installing torch 2.14.1 / torchvision 0.29.1 (a few minutes)"
    $PIP install -q torch==2.14.1 torchvision==0.29.1
else
    say "torch present"
fi

stamp=.venv/.sors-installed
want=$(cat pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "installing the project and its test tools"
    $PIP install -q -e '.[test]'
    # torchattacks 3.5.1 pins requests~=2.25.1, which would downgrade requests/urllib3 under MLflow
    # and Ray; it is only a reference for tests and benchmarks, so it goes in without dependencies.
    $PIP install -q --no-deps torchattacks==3.5.1
    echo "$want" > "$stamp"
else
    say "project present"
fi
say "ready: .venv/bin/sors --help"
