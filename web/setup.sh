#!/usr/bin/env bash
# Installs what the browser build and tests need, where it is missing: the wasm32 target,
# wasm-bindgen-cli of exactly the wasm-bindgen version in Cargo.lock, and Chromium with its
# WebDriver (Debian's packages `chromium` and `chromium-driver`; elsewhere install Chromium
# and chromedriver yourself and put them on PATH, or set CHROMEDRIVER). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi

want=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{ print $2 }' || true)
runner=$(wasm-bindgen-test-runner --version 2>/dev/null | awk '{ print $2 }' || true)
if [ "$have" != "$want" ] || [ "$runner" != "$want" ]; then
  # A debug build: it compiles in about half the time, and the runner's speed does not matter.
  # With the CLI's own lock file where the registry has every crate it names, else resolved
  # afresh (a registry mirror may lack a version the lock file pins).
  cargo install --debug --force --locked wasm-bindgen-cli --version "$want" \
    || cargo install --debug --force wasm-bindgen-cli --version "$want"
fi

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  bash scripts/apt-install.sh "web/setup: no chromium or chromedriver" chromium chromium-driver
fi
echo "web/setup: wasm32 target, wasm-bindgen $want, $(chromium --version 2>/dev/null | head -1)"
