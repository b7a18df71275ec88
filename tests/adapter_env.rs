//! `WGPU_ADAPTER_NAME` naming no adapter is a typed error that says how to get one (wgpu's own
//! helper panics there). One test in its own binary: it sets the environment of the process.

use wgpu_attention::{Error, Gpu};

#[test]
fn unknown_adapter_name_is_a_typed_error() {
    #[allow(unsafe_code)]
    // SAFETY: this binary runs this one test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("WGPU_ADAPTER_NAME", "no-such-adapter-anywhere");
    }
    match Gpu::new() {
        Err(e @ Error::NoAdapter { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("no-such-adapter-anywhere"), "{msg}");
            assert!(msg.contains("mesa-vulkan-drivers"), "{msg}");
        }
        Err(other) => panic!("expected NoAdapter, got {other:?}"),
        Ok(gpu) => panic!(
            "an adapter matched a name that names none: {}",
            gpu.describe()
        ),
    }
}
