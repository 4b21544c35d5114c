#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian/Ubuntu machine: cmake and a C toolchain
# (Pingora), curl, the openai and anthropic Python SDKs (tests/sdk.rs), promtool
# (tests/ops.rs), redis-server with redis-cli (tests/shared_ledger.rs), Debian's postgresql
# (tests/usage_store_pg.rs and the store bench start throwaway clusters), schemathesis
# (tests/admin.rs) and Debian's headless chromium with its WebDriver, chromedriver
# (tests/console.rs). Idempotent: installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
if ! python3 -c "import openai, anthropic" >/dev/null 2>&1; then
  echo "keygate test: installing the openai and anthropic Python SDKs" >&2
  python3 -m pip install -q --disable-pip-version-check openai anthropic \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages openai anthropic
fi
if ! command -v schemathesis >/dev/null 2>&1; then
  echo "keygate test: installing schemathesis (the admin API's OpenAPI fuzzer)" >&2
  python3 -m pip install -q --disable-pip-version-check schemathesis \
    || python3 -m pip install -q --disable-pip-version-check --break-system-packages schemathesis
fi
packages=()
command -v promtool >/dev/null 2>&1 || packages+=(prometheus)
command -v redis-server >/dev/null 2>&1 || packages+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || packages+=(redis-tools)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || packages+=(postgresql)
[[ -x /usr/bin/chromium ]] || packages+=(chromium)
[[ -x /usr/bin/chromedriver ]] || packages+=(chromium-driver)
if ((${#packages[@]})); then
  echo "keygate test: installing ${packages[*]} (Debian packages)" >&2
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi
