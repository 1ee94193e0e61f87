#!/usr/bin/env bash
# The test suite exactly as CI runs it, for a checkout whose .venv was set up by the README's install command:
# adds the optional test oracles to .venv (once), checks the import layers, then runs pytest.
#   bash ci/test.sh            # everything
#   bash ci/test.sh -k parity  # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  echo "ci/test.sh: no $VENV here; run the README's install command first" >&2
  exit 2
fi
PIP="$VENV/bin/pip"

# Optional oracles some tests compare against; a test whose oracle is missing skips and says why.
have() { "$VENV/bin/python" -c "import $1" >/dev/null 2>&1; }
have bitsandbytes || "$PIP" install -q bitsandbytes || echo "ci: bitsandbytes not installed; quantization tests will skip"
have lmms_eval || "$PIP" install -q --no-deps 'lmms-eval==0.7.3' 'loguru>=0.7' \
  || echo "ci: lmms-eval not installed; its adapter tests will skip"
have trl || "$PIP" install -q 'trl==1.16.0' || echo "ci: trl not installed; the DPO oracle tests will skip"
# the original LLaVA code (the llava-torch wheel) without its pinned torch: only its pure-Python parts are used;
# some tests import it from the wheel file itself, so the wheel stays in /tmp/llava_whl
WHL=/tmp/llava_whl/llava_torch-1.2.2.post1-py3-none-any.whl
if [ ! -f "$WHL" ]; then
  mkdir -p /tmp/llava_whl
  "$PIP" download -q --no-deps llava-torch==1.2.2.post1 -d /tmp/llava_whl \
    || echo "ci: llava-torch (original LLaVA oracle) not available; its parity tests will skip"
fi
if [ -f "$WHL" ] && ! have llava; then
  "$PIP" install -q --no-deps "$WHL"
fi
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "ci: chromium not installed; the web UI browser test will skip"
  else
    echo "ci: chromium not installed (needs root + apt-get); the web UI browser test will skip"
  fi
fi

# The layers of ARCHITECTURE.md (contracts in pyproject.toml): a violation fails the build.
"$VENV/bin/lint-imports"

set +e
"$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "ci: pytest collected no tests, which is a failure" >&2
  exit 1
fi
exit "$rc"
