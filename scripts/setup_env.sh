# Sourced by the entry scripts: create or reuse .venv and install the package with its dev extras.
# Reinstalls only when pyproject.toml changed since the last install.
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
stamp=.venv/.tokenizers_q-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || ! python -c "import tokenizers_q" 2>/dev/null; then
    python -m pip install --quiet --upgrade pip
    python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
fi
