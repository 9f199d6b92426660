#!/usr/bin/env bash
# Create .venv and install sandstream with its development tools into it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp=.venv/.sandstream-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # uv resolves and installs the same packages in seconds rather than a minute;
  # plain pip when uv cannot be had. Both leave the packages compiled to
  # bytecode: where PYTHONDONTWRITEBYTECODE is set, each process would otherwise
  # compile every module it imports (the model SDKs: seconds) at every start.
  if .venv/bin/python -m pip install --quiet uv; then
    .venv/bin/uv pip install --quiet --compile-bytecode --python .venv/bin/python -e '.[dev]'
  else
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
  fi
  touch "$stamp"
fi
