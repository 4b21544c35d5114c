#!/usr/bin/env bash
# Quick start 1: build keygate and run it on the embedded demo (mock backend, demo keys, a
# two-target upstream pool, the admin listener with the console).
# Extra arguments go to `keygate demo`, e.g. --listen 127.0.0.1:8081.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec cargo run --release --bin keygate -- demo "$@"
