//! Every path under WebGPU's default limits (`LimitCaps::webgpu_defaults`: what a browser
//! grants a page that asks for nothing more): the plans fall back to the kernels that fit
//! (16 KiB of workgroup memory keeps the fused kernel out; 8 storage buffers per stage), and
//! what they run is exact. `web/tests/browser.rs` runs the same cases in Chromium.

mod common;

use common::{check, dims};
use wgpu_attention::{Attention, Causal, LimitCaps, Path};

#[test]
fn every_path_under_webgpu_default_limits() {
    let Some(gpu) = common::gpu() else { return };
    let web = gpu.with_caps(LimitCaps::webgpu_defaults());
    assert_eq!(web.limits().max_workgroup_storage, 16 << 10);
    assert_eq!(web.limits().max_storage_buffers_per_stage, 8);
    let prefill = dims(1, 4, 2, 70, 133, 40, 40);
    let decode = dims(1, 8, 2, 1, 1100, 64, 64);
    let causal = Attention::new().causal(Causal::BottomRight);
    // What Auto picks there: no fused kernel for prefill (it needs 26-28 KiB), the
    // decode-shaped kernel for decoding (it fits).
    assert_eq!(causal.plan(&web, prefill).unwrap().name(), "three-pass");
    assert_eq!(causal.plan(&web, decode).unwrap().name(), "decode");
    for (seed, (path, d)) in [
        (Path::Auto, prefill),
        (Path::Auto, decode),
        (Path::ThreePass, prefill),
        (Path::Decode, decode),
    ]
    .into_iter()
    .enumerate()
    {
        check(&web, path, d, &causal, 60 + seed as u64, 2.0);
    }
}
