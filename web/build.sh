#!/usr/bin/env bash
# Builds the demo page's wasm module into web/pkg/ (ignored by git): the library and
# web/src/lib.rs for wasm32, then wasm-bindgen's JavaScript glue for an ES module page.
# Serve the page with: python3 -m http.server -d web 8000  (then open http://localhost:8000)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p wgpu-attention-web --lib --target wasm32-unknown-unknown --release
wasm-bindgen --target web --no-typescript --out-dir web/pkg \
  "${CARGO_TARGET_DIR:-target}/wasm32-unknown-unknown/release/wgpu_attention_web.wasm"
echo "web/pkg built; serve with: python3 -m http.server -d web 8000"
