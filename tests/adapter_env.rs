//! The environment variables `Gpu::new` reads: `WGPU_ADAPTER_NAME` naming no adapter is a typed
//! error that says how to get one (wgpu's own helper panics there); `WGPU_ATTENTION_DECODE_ROWS`
//! sets the decode tile rows, and a bad value is a typed error. One test in its own binary: it
//! sets the environment of the process.

use wgpu_attention::{Error, Gpu};

#[test]
fn environment_variables() {
    decode_rows();
    unknown_adapter_name_is_a_typed_error();
}

fn decode_rows() {
    let set = |value: &str| {
        #[allow(unsafe_code)]
        // SAFETY: this binary runs one test, so no other thread reads the environment.
        unsafe {
            std::env::set_var("WGPU_ATTENTION_DECODE_ROWS", value);
        }
    };
    set("12");
    match Gpu::new() {
        Err(Error::InvalidOption { value, .. }) => assert_eq!(value, "12"),
        Err(Error::NoAdapter { .. }) if std::env::var("CI").as_deref() != Ok("true") => {
            eprintln!("SKIPPED: no GPU adapter");
            return;
        }
        other => panic!("expected InvalidOption for 12 rows, got {other:?}"),
    }
    set("8");
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(gpu.limits().min_decode_rows, 8);
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        std::env::remove_var("WGPU_ATTENTION_DECODE_ROWS");
    }
}

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
