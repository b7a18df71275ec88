#!/usr/bin/env bash
# Runs the browser tests (web/tests/browser.rs) in headless Chromium on its software WebGPU
# adapter (SwiftShader). Needs the wasm32 target, wasm-bindgen-cli of the version in
# Cargo.lock, and Chromium with its driver; web/setup.sh installs all three.
set -euo pipefail
cd "$(dirname "$0")"
export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
export CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=wasm-bindgen-test-runner
# The runner's flags for Chromium are in web/webdriver.json (WebGPU on SwiftShader, headless).
export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-600}"
cargo test --target wasm32-unknown-unknown --release "$@"
