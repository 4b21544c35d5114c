#!/usr/bin/env bash
# Quick start 2: install what is missing (scripts/setup-test.sh), then run the whole test suite:
#   KEYGATE_REQUIRE_SDK=1 KEYGATE_REQUIRE_REDIS=1 KEYGATE_REQUIRE_PG=1 cargo test --locked
# (unit, end-to-end, CLI, embedding, client SDKs, promtool, fuzz corpora, doc tests).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-test.sh
KEYGATE_REQUIRE_SDK=1 KEYGATE_REQUIRE_REDIS=1 KEYGATE_REQUIRE_PG=1 cargo test --locked "$@"
