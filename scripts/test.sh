#!/usr/bin/env bash
# Quick start 2: run the whole test suite (unit, end-to-end, CLI, embedding, client SDKs, doc
# tests). Installs what is missing first: cmake and a C toolchain (for Pingora), curl, and the
# openai and anthropic Python SDKs used by tests/sdk.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
if ! python3 -c "import openai, anthropic" >/dev/null 2>&1; then
  echo "keygate test: installing the openai and anthropic Python SDKs" >&2
  python3 -m pip install -q --disable-pip-version-check openai anthropic \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages openai anthropic
fi
export KEYGATE_REQUIRE_SDK=1
cargo test --locked "$@"
