//! The environment variables `Gpu::new` reads: `WGPU_ADAPTER_NAME` naming no adapter is a typed
//! error that says how to get one (wgpu's own helper panics there); `WGPU_ATTENTION_DECODE_ROWS`
//! sets the decode tile rows, `WGPU_ATTENTION_DECODE_KERNEL` and `WGPU_ATTENTION_SUBGROUPS`
//! the decode kernel, `WGPU_ATTENTION_FUSED_BLOCK` and `WGPU_ATTENTION_GEMM_BLOCK` the
//! invocation blocks, `WGPU_ATTENTION_RESIDENT_Q` the fused kernel's resident Q,
//! `WGPU_ATTENTION_DOUBLE_BUFFER` its staging buffers, `WGPU_ATTENTION_TILED_BACKWARD` the
//! backward's kernels, `WGPU_ATTENTION_BACKWARD_BLOCK` the tiled backward's block,
//! `WGPU_ATTENTION_MMA` the fused kernel's 16-bit products (and, set to `cooperative`, asks the
//! adapter for cooperative matrices), and a bad value of any is a typed error. One test in its own binary: it
//! sets the environment of the process.

mod common;

use wgpu_attention::{Error, Gpu};

#[test]
fn environment_variables() {
    // An adapter, or the suite's rule for having none (fail, or skip where allowed).
    if common::gpu().is_none() {
        return;
    }
    decode_rows();
    decode_kernel_and_subgroups();
    blocks();
    resident_q();
    double_buffer();
    tiled_backward();
    mma();
    params();
    pool();
    unknown_adapter_name_is_a_typed_error();
}

fn blocks() {
    use wgpu_attention::TileBlock;
    rejects(&[
        ("WGPU_ATTENTION_FUSED_BLOCK", "4x8"),
        ("WGPU_ATTENTION_GEMM_BLOCK", "16x16"),
        ("WGPU_ATTENTION_GEMM_BLOCK", "big"),
        ("WGPU_ATTENTION_BACKWARD_BLOCK", "8x2"),
    ]);
    set_env("WGPU_ATTENTION_FUSED_BLOCK", Some("8x4"));
    set_env("WGPU_ATTENTION_GEMM_BLOCK", Some(" 4x4"));
    set_env("WGPU_ATTENTION_BACKWARD_BLOCK", Some("4x4"));
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(gpu.tile_config().fused_block, TileBlock::B8X4);
    assert_eq!(gpu.tile_config().gemm_block, TileBlock::B4X4);
    assert_eq!(gpu.tile_config().backward_block, TileBlock::B4X4);
    let other = gpu.with_backward_block(TileBlock::B8X8).unwrap();
    assert_eq!(other.tile_config().backward_block, TileBlock::B8X8);
    assert_eq!(other.tile_config().fused_block, TileBlock::B8X4);
    let bad = TileBlock { rows: 2, cols: 8 };
    assert!(matches!(
        gpu.with_backward_block(bad),
        Err(Error::InvalidOption { .. })
    ));
    set_env("WGPU_ATTENTION_FUSED_BLOCK", None);
    set_env("WGPU_ATTENTION_GEMM_BLOCK", None);
    set_env("WGPU_ATTENTION_BACKWARD_BLOCK", None);
}

fn mma() {
    use wgpu_attention::MmaChoice;
    rejects(&[("WGPU_ATTENTION_MMA", "tensor")]);
    let f16 = common::gpu()
        .unwrap()
        .features()
        .contains(wgpu::Features::SHADER_F16);
    // A preference: where the device cannot run it (the emulation without f16), the Gpu
    // opens with the adapter's entry (off) and a warning, never an error.
    let emulated = if f16 {
        MmaChoice::Emulated
    } else {
        MmaChoice::Off
    };
    for (value, want) in [("emulated", emulated), (" off", MmaChoice::Off)] {
        set_env("WGPU_ATTENTION_MMA", Some(value));
        let gpu = Gpu::new().expect("an adapter");
        assert_eq!(gpu.tile_config().mma, want, "{value:?}");
    }
    // Cooperative matrices: where the adapter lists an f16 shape, the Gpu has them and runs
    // them; elsewhere (lavapipe) it opens without them, as configured for the adapter.
    set_env("WGPU_ATTENTION_MMA", Some("cooperative"));
    let gpu = Gpu::new().expect("an adapter");
    if gpu.limits().cooperative_matrix > 0 {
        assert_eq!(gpu.tile_config().mma, MmaChoice::Cooperative);
        assert!([8, 16].contains(&gpu.limits().cooperative_matrix));
        assert!(gpu.limits().subgroup_size > 0);
        // Cooperative products need subgroups: turning them off is a typed error.
        let off = gpu
            .with_decode_kernel(gpu.tile_config().decode_kernel, false)
            .unwrap();
        assert!(matches!(
            off.with_mma(MmaChoice::Cooperative),
            Err(Error::Unsupported { .. })
        ));
    } else {
        assert_eq!(gpu.tile_config().mma, MmaChoice::Off);
        assert!(matches!(
            gpu.with_mma(MmaChoice::Cooperative),
            Err(Error::Unsupported { .. })
        ));
    }
    set_env("WGPU_ATTENTION_MMA", None);
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(
        gpu.limits().cooperative_matrix,
        0,
        "asked for only by the variable"
    );
    assert!(matches!(
        gpu.with_mma(MmaChoice::Cooperative),
        Err(Error::Unsupported { .. })
    ));
    // An application's own device, with its adapter: cooperative matrices only where the
    // device was created with them (not here), everything else as from_wgpu.
    let instance =
        wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        force_fallback_adapter: false,
        compatible_surface: None,
        apply_limit_buckets: false,
    }))
    .expect("an adapter");
    let features = adapter.features() & (wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: None,
        required_features: features,
        required_limits: adapter.limits(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    }))
    .expect("a device");
    let own = Gpu::from_wgpu_with_adapter(&adapter, device, queue).expect("wrapped");
    assert_eq!(own.limits().cooperative_matrix, 0);
    assert_eq!(own.tile_config().mma, MmaChoice::Off);
    assert!(matches!(
        own.with_mma(MmaChoice::Cooperative),
        Err(Error::Unsupported { .. })
    ));
    if features.contains(wgpu::Features::SHADER_F16) {
        assert_eq!(
            own.with_mma(MmaChoice::Emulated).unwrap().tile_config().mma,
            MmaChoice::Emulated
        );
    }
}

fn resident_q() {
    rejects(&[("WGPU_ATTENTION_RESIDENT_Q", "yes")]);
    for (value, want) in [("0", false), (" 1", true)] {
        set_env("WGPU_ATTENTION_RESIDENT_Q", Some(value));
        let gpu = Gpu::new().expect("an adapter");
        assert_eq!(gpu.tile_config().resident_q, want, "{value:?}");
        assert_eq!(gpu.with_resident_q(!want).tile_config().resident_q, !want);
    }
    set_env("WGPU_ATTENTION_RESIDENT_Q", None);
}

fn double_buffer() {
    rejects(&[("WGPU_ATTENTION_DOUBLE_BUFFER", "2")]);
    for (value, want) in [("1", true), ("0", false)] {
        set_env("WGPU_ATTENTION_DOUBLE_BUFFER", Some(value));
        let gpu = Gpu::new().expect("an adapter");
        assert_eq!(gpu.tile_config().double_buffer, want, "{value:?}");
        let flipped = gpu.with_double_buffer(!want).tile_config();
        assert_eq!(flipped.double_buffer, !want);
    }
    set_env("WGPU_ATTENTION_DOUBLE_BUFFER", None);
}

fn tiled_backward() {
    rejects(&[("WGPU_ATTENTION_TILED_BACKWARD", "on")]);
    for (value, want) in [("0", false), ("1 ", true)] {
        set_env("WGPU_ATTENTION_TILED_BACKWARD", Some(value));
        let gpu = Gpu::new().expect("an adapter");
        assert_eq!(gpu.tile_config().tiled_backward, want, "{value:?}");
        let flipped = gpu.with_tiled_backward(!want).tile_config();
        assert_eq!(flipped.tiled_backward, !want);
    }
    set_env("WGPU_ATTENTION_TILED_BACKWARD", None);
}

fn params() {
    use wgpu_attention::ParamsIn;
    rejects(&[("WGPU_ATTENTION_PARAMS", "push")]);
    for (value, want) in [
        ("uniform", ParamsIn::Uniform),
        ("storage ", ParamsIn::ReadOnlyStorage),
    ] {
        set_env("WGPU_ATTENTION_PARAMS", Some(value));
        assert_eq!(Gpu::new().expect("an adapter").params_in(), want);
    }
    set_env("WGPU_ATTENTION_PARAMS", None);
}

fn pool() {
    rejects(&[("WGPU_ATTENTION_POOL", "yes")]);
    set_env("WGPU_ATTENTION_POOL", Some("0"));
    let gpu = Gpu::new().expect("an adapter");
    assert!(!gpu.pool_enabled());
    let q = gpu.upload(&[0.5; 64], [1, 2, 4, 8]).unwrap();
    let before = gpu.pool_stats();
    for _ in 0..3 {
        let out = wgpu_attention::Attention::new()
            .run(&gpu, &q, &q, &q)
            .unwrap();
        out.o.download(&gpu).unwrap();
    }
    let after = gpu.pool_stats();
    assert_eq!(after.reused, 0, "no reuse with the pool off");
    assert!(
        after.created >= before.created + 3 * 2,
        "every call allocates its parameters and readback: {before:?} -> {after:?}"
    );
    set_env("WGPU_ATTENTION_POOL", None);
    assert!(Gpu::new().expect("an adapter").pool_enabled());
}

/// Each `(variable, bad value)` makes `Gpu::new` fail with `InvalidOption` naming both.
fn rejects(cases: &[(&'static str, &str)]) {
    for &(name, bad) in cases {
        set_env(name, Some(bad));
        match Gpu::new() {
            Err(Error::InvalidOption { value, what, .. }) => {
                assert_eq!((what, value.as_str()), (name, bad))
            }
            other => panic!("expected InvalidOption for {name}={bad}, got {other:?}"),
        }
        set_env(name, None);
    }
}

fn set_env(name: &str, value: Option<&str>) {
    #[allow(unsafe_code)]
    // SAFETY: this binary runs one test, so no other thread reads the environment.
    unsafe {
        match value {
            Some(v) => std::env::set_var(name, v),
            None => std::env::remove_var(name),
        }
    }
}

fn decode_kernel_and_subgroups() {
    use wgpu_attention::DecodeKernel;
    rejects(&[
        ("WGPU_ATTENTION_DECODE_KERNEL", "keys48"),
        ("WGPU_ATTENTION_DECODE_KERNEL", "fast"),
        ("WGPU_ATTENTION_SUBGROUPS", "yes"),
    ]);
    set_env("WGPU_ATTENTION_DECODE_KERNEL", Some("keys32"));
    set_env("WGPU_ATTENTION_SUBGROUPS", Some("0"));
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(
        gpu.limits().tile.decode_kernel,
        DecodeKernel::KeysAcrossInvocations { workgroup: 32 }
    );
    assert!(!gpu.limits().tile.subgroups);
    set_env("WGPU_ATTENTION_DECODE_KERNEL", Some("tiles"));
    set_env("WGPU_ATTENTION_SUBGROUPS", None);
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(gpu.limits().tile.decode_kernel, DecodeKernel::RowTiles);
    set_env("WGPU_ATTENTION_DECODE_KERNEL", None);
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
        other => panic!("expected InvalidOption for 12 rows, got {other:?}"),
    }
    set("8");
    let gpu = Gpu::new().expect("an adapter");
    assert_eq!(gpu.limits().tile.min_decode_rows, 8);
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
