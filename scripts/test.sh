#!/usr/bin/env bash
# Quick start 2: run the whole test suite (unit, end-to-end, CLI, embedding, client SDKs, doc
# tests). Installs what is missing first: cmake and a C toolchain (for Pingora), curl, the
# openai and anthropic Python SDKs used by tests/sdk.rs, and promtool (tests/ops.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
if ! python3 -c "import openai, anthropic" >/dev/null 2>&1; then
  echo "keygate test: installing the openai and anthropic Python SDKs" >&2
  python3 -m pip install -q --disable-pip-version-check openai anthropic \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages openai anthropic
fi
if ! command -v promtool >/dev/null 2>&1; then
  echo "keygate test: installing promtool (Debian's prometheus package)" >&2
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
fi
export KEYGATE_REQUIRE_SDK=1
cargo test --locked "$@"
