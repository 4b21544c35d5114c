#!/usr/bin/env bash
# Installs what building keygate needs on a fresh Debian/Ubuntu machine: cmake (Pingora's
# zlib-ng build) and a C toolchain. Rust itself (cargo, rustc >= 1.89) must already be there.
set -euo pipefail

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3 python3-pip)

if ((${#missing[@]})); then
  echo "keygate bootstrap: installing ${missing[*]}" >&2
  if [[ $(id -u) -eq 0 ]]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  elif command -v sudo >/dev/null 2>&1; then
    sudo apt-get update -qq
    sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "keygate bootstrap: please run: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "keygate bootstrap: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
