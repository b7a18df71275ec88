//! Every kernel, in every storage type, through naga's translators for every backend.
//!
//! This is the evidence that the kernels compile for Metal and DX12: naga is the shader
//! translator wgpu itself uses on those backends (WGSL -> MSL on Metal, WGSL -> HLSL on DX12,
//! WGSL -> SPIR-V on Vulkan), and its translators run without the hardware, so a kernel that
//! fails to translate here would fail to build a pipeline there. Each key is compiled exactly as
//! the crate compiles it: [`KernelKey::source`] (shared constants, generated uniform structs,
//! dtype preludes, `shaders/lib/` fragments, kernel) with the override constants of
//! [`KernelKey::constants`] resolved for the compute entry point `main`.
//!
//! What this cannot show is that the platform compilers downstream of naga (Metal's compiler,
//! FXC/DXC) accept the output, nor that the results are right there; the GPU tests do that on
//! whatever adapter runs them. No GPU is needed here.

use std::borrow::Cow;
use std::path::PathBuf;

use naga::back::{PipelineConstants, hlsl, msl, pipeline_constants, spv};
use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy};
use naga::valid::{Capabilities, ModuleInfo, ValidationFlags, Validator};
use naga::{Module, ShaderStage};
use wgpu_attention::gpu::kernels::{Fragment, Kernel, KernelKey, MaskOptions, Storage};

/// Every storage type (and its capabilities in [`capabilities`]).
const DTYPES: &[Storage] = &Storage::ALL;

/// The name of every kernel's entry point.
const ENTRY: &str = "main";

/// The naga capabilities a device needs for kernels of `dtype`: what wgpu enables with the
/// matching features. F32 needs none, so a kernel that used an optional capability by mistake
/// fails validation here.
fn capabilities(dtype: Storage) -> Capabilities {
    match dtype {
        // bf16 and fp8 use only bit operations and u32 atomics.
        Storage::F32 | Storage::Bf16 | Storage::F8E4M3 => Capabilities::empty(),
        // pack2x16float / unpack2x16float: wgpu grants this on Vulkan, Metal and DX12 (it is
        // a downlevel flag, missing only on some GL targets), with or without SHADER_F16.
        Storage::F16Packed => Capabilities::SHADER_FLOAT16_IN_FLOAT32,
        // The decode kernel reads native f16 K in 16-byte groups through unpack2x16float too.
        Storage::F16 => Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32,
    }
}

/// Every kernel in every storage type, over every tile configuration and a spread of options.
fn keys() -> Vec<KernelKey> {
    DTYPES.iter().flat_map(|&s| KernelKey::samples(s)).collect()
}

fn describe(key: &KernelKey) -> String {
    key.label()
}

/// The naga capabilities of a key: those of its widest storage.
fn key_capabilities(key: &KernelKey) -> Capabilities {
    let mut subgroups = if key.needs_subgroups() {
        // What wgpu grants with Features::SUBGROUP.
        Capabilities::SUBGROUP
    } else {
        Capabilities::empty()
    };
    if key.needs_cooperative_matrix() {
        // What wgpu grants with Features::EXPERIMENTAL_COOPERATIVE_MATRIX.
        subgroups |= Capabilities::COOPERATIVE_MATRIX;
    }
    key.storages()
        .into_iter()
        .fold(subgroups, |c, s| c | capabilities(s))
}

/// One key parsed, validated and specialised: what a backend translator receives.
struct Specialised {
    key: KernelKey,
    module: Module,
    info: ModuleInfo,
}

/// Parses, validates and resolves the overrides of `key`, panicking with the kernel, the dtype,
/// the stage that failed and naga's error.
fn specialise(key: KernelKey) -> Specialised {
    let what = describe(&key);
    let source = key.source();
    let module = naga::front::wgsl::parse_str(&source)
        .unwrap_or_else(|e| panic!("{what}: WGSL parse failed:\n{}", e.emit_to_string(&source)));
    let info = Validator::new(ValidationFlags::all(), key_capabilities(&key))
        .validate(&module)
        .unwrap_or_else(|e| {
            panic!(
                "{what}: naga validation failed:\n{}",
                e.emit_to_string(&source)
            )
        });
    let entry = module
        .entry_points
        .iter()
        .find(|ep| ep.name == ENTRY)
        .unwrap_or_else(|| panic!("{what}: no entry point named {ENTRY:?}"));
    assert_eq!(
        entry.stage,
        ShaderStage::Compute,
        "{what}: entry point {ENTRY:?} is not a compute shader"
    );
    let constants: PipelineConstants = key
        .constants()
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    let (module, info) = pipeline_constants::process_overrides(
        &module,
        &info,
        Some((ShaderStage::Compute, ENTRY)),
        &constants,
    )
    .unwrap_or_else(|e| panic!("{what}: resolving override constants {constants:?} failed: {e}"));
    // process_overrides keeps the (now unused) override declarations; what matters is that no
    // expression and no workgroup size still refers to one.
    let ep = module
        .entry_points
        .iter()
        .find(|ep| ep.name == ENTRY)
        .unwrap_or_else(|| panic!("{what}: process_overrides dropped the entry point"));
    assert!(
        ep.workgroup_size_overrides.is_none(),
        "{what}: workgroup size still refers to an override after process_overrides"
    );
    let unresolved = module
        .global_expressions
        .iter()
        .chain(
            module
                .functions
                .iter()
                .flat_map(|(_, f)| f.expressions.iter()),
        )
        .chain(ep.function.expressions.iter())
        .any(|(_, e)| matches!(e, naga::Expression::Override(_)));
    assert!(
        !unresolved,
        "{what}: an override expression is left after process_overrides"
    );
    if let KernelKey::MaskedSoftmax { workgroup, .. } = key {
        let size: u32 = ep.workgroup_size.iter().product();
        assert_eq!(
            size, workgroup,
            "{what}: workgroup size {:?} after specialisation, expected {workgroup} invocations",
            ep.workgroup_size
        );
    }
    Specialised {
        key,
        module: Cow::into_owned(module),
        info: Cow::into_owned(info),
    }
}

fn specialised() -> Vec<Specialised> {
    keys().into_iter().map(specialise).collect()
}

/// Bounds checks as wgpu asks for them on a shader module with runtime checks (the default).
fn bounds_checks() -> BoundsCheckPolicies {
    BoundsCheckPolicies {
        index: BoundsCheckPolicy::Restrict,
        buffer: BoundsCheckPolicy::Restrict,
        image_load: BoundsCheckPolicy::Restrict,
        binding_array: BoundsCheckPolicy::Unchecked,
    }
}

#[test]
fn every_kernel_parses_validates_and_specialises() {
    let all = specialised();
    for kernel in Kernel::ALL {
        assert!(
            all.iter().any(|s| s.key.kernel() == kernel),
            "no key of {kernel:?} was compiled"
        );
    }
}

/// The override really reaches the kernel: a size other than the WGSL default (256) changes
/// the specialised workgroup size (checked in `specialise`) and still translates.
#[test]
fn row_workgroup_override_is_applied() {
    for workgroup in [64, 128] {
        let s = specialise(KernelKey::MaskedSoftmax {
            workgroup,
            masks: MaskOptions::default(),
        });
        let pipeline = spv::PipelineOptions {
            shader_stage: ShaderStage::Compute,
            entry_point: ENTRY.to_string(),
        };
        spv::write_vec(
            &s.module,
            &s.info,
            &spv::Options::default(),
            Some(&pipeline),
        )
        .unwrap_or_else(|e| panic!("{}: SPIR-V backend failed: {e}", describe(&s.key)));
    }
}

/// The workgroup memory the host plans with (computed from the tile sizes) is what the
/// compiled module declares, for every kernel.
#[test]
fn workgroup_memory_matches_the_host_figure() {
    for s in specialised() {
        let mut layouter = naga::proc::Layouter::default();
        layouter
            .update(s.module.to_ctx())
            .expect("naga lays out every type");
        let bytes: u32 = s
            .module
            .global_variables
            .iter()
            .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
            .map(|(_, g)| layouter[g.ty].size)
            .sum();
        assert_eq!(
            bytes,
            s.key.workgroup_bytes(),
            "{}: workgroup memory of the module vs KernelKey::workgroup_bytes",
            describe(&s.key)
        );
    }
}

/// The options of a key reach the masking kernels as constants: after specialisation every
/// `HAS_*` override is a literal of the key's value, so the branches they guard
/// are resolved when the pipeline is built and a call without an option runs none of its code.
#[test]
fn options_are_compiled_in() {
    let flash = |masks| KernelKey::FlashAttention {
        q: Storage::F32,
        k: Storage::F32,
        v: Storage::F32,
        o: Storage::F32,
        block: wgpu_attention::TileBlock::B8X8,
        o_vec4s: 1,
        rows: 64,
        resident_q: 0,
        double_buffer: false,
        subgroups: false,
        mma: None,
        masks,
    };
    let softmax = |masks| KernelKey::MaskedSoftmax {
        workgroup: 256,
        masks,
    };
    for masks in MaskOptions::all() {
        for key in [flash(masks), softmax(masks)] {
            let s = specialise(key);
            let expected: Vec<(&str, f64)> = key
                .constants()
                .into_iter()
                .filter(|(name, _)| name.starts_with("HAS_"))
                .collect();
            // The softmax reads no Q, K, V or O, so has no HAS_PAGES or HAS_VARLEN.
            let count = if matches!(key, KernelKey::MaskedSoftmax { .. }) {
                10
            } else {
                12
            };
            assert_eq!(
                expected.len(),
                count,
                "{}: constants {expected:?}",
                describe(&key)
            );
            for (name, value) in expected {
                let (_, o) = s
                    .module
                    .overrides
                    .iter()
                    .find(|(_, o)| o.name.as_deref() == Some(name))
                    .unwrap_or_else(|| panic!("{}: no override {name}", describe(&key)));
                let init = o.init.expect("a specialised override has a value");
                let got = match s.module.global_expressions[init] {
                    naga::Expression::Literal(naga::Literal::Bool(b)) => b as u8 as f64,
                    ref other => panic!("{}: {name} is {other:?}", describe(&key)),
                };
                assert_eq!(got, value, "{}: {name}", describe(&key));
            }
        }
    }
}

/// The SPIR-V of a specialised key, as wgpu's Vulkan backend writes it (bounds checks on,
/// workgroup memory not zeroed).
fn spirv(s: &Specialised, lang_version: (u8, u8)) -> Result<Vec<u32>, spv::Error> {
    let options = spv::Options {
        lang_version,
        bounds_check_policies: bounds_checks(),
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        ..spv::Options::default()
    };
    let pipeline = spv::PipelineOptions {
        shader_stage: ShaderStage::Compute,
        entry_point: ENTRY.to_string(),
    };
    spv::write_vec(&s.module, &s.info, &options, Some(&pipeline))
}

#[test]
fn every_kernel_translates_to_spirv() {
    for s in specialised() {
        let what = describe(&s.key);
        // SPV_KHR_cooperative_matrix needs SPIR-V 1.3 at least (wgpu's Vulkan backend writes
        // 1.3 or later where the device has it).
        let versions: &[(u8, u8)] = if s.key.needs_cooperative_matrix() {
            &[(1, 3), (1, 6)]
        } else {
            &[(1, 0), (1, 3)]
        };
        for &lang_version in versions {
            let words = spirv(&s, lang_version).unwrap_or_else(|e| {
                panic!("{what}: SPIR-V {lang_version:?} (Vulkan) backend failed: {e} ({e:?})")
            });
            assert!(
                words.len() > 5,
                "{what}: SPIR-V {lang_version:?} backend wrote no code"
            );
            assert_eq!(
                words[0], 0x0723_0203,
                "{what}: SPIR-V output lacks the magic number"
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_msl() {
    for s in specialised() {
        let what = describe(&s.key);
        // 2.0 is the oldest Metal Shading Language wgpu's Metal backend targets in practice;
        // 3.0 is Apple silicon today. Simdgroup matrices need 2.3 and are 8 x 8 only: the
        // planner never gives Metal a 16 x 16 key (its adapter lists no such shape).
        let versions: &[(u8, u8)] = match s.key {
            _ if !s.key.needs_cooperative_matrix() => &[(2, 0), (3, 0)],
            KernelKey::FlashAttention { mma: Some(m), .. } if m.size == 8 => &[(2, 3), (3, 0)],
            _ => &[],
        };
        for &lang_version in versions {
            let options = msl::Options {
                lang_version,
                bounds_check_policies: bounds_checks(),
                zero_initialize_workgroup_memory: false,
                ..msl::Options::default()
            };
            let pipeline = msl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, ENTRY.to_string())),
                ..msl::PipelineOptions::default()
            };
            let (text, _) = msl::write_string(&s.module, &s.info, &options, &pipeline)
                .unwrap_or_else(|e| {
                    panic!("{what}: MSL {lang_version:?} (Metal) backend failed: {e} ({e:?})")
                });
            assert!(
                text.contains("kernel"),
                "{what}: MSL {lang_version:?} backend wrote no kernel function:\n{text}"
            );
        }
    }
}

#[test]
fn every_kernel_translates_to_hlsl() {
    // naga's HLSL writer has no cooperative matrices, and wgpu no such feature on DX12.
    for s in specialised()
        .into_iter()
        .filter(|s| !s.key.needs_cooperative_matrix())
    {
        let what = describe(&s.key);
        // 5.1 is what FXC compiles; 6.0 the floor of DXC.
        for shader_model in [hlsl::ShaderModel::V5_1, hlsl::ShaderModel::V6_0] {
            let options = hlsl::Options {
                shader_model,
                zero_initialize_workgroup_memory: false,
                ..hlsl::Options::default()
            };
            let pipeline = hlsl::PipelineOptions {
                entry_point: Some((ShaderStage::Compute, ENTRY.to_string())),
            };
            let mut text = String::new();
            hlsl::Writer::new(&mut text, &options, &pipeline)
                .write(&s.module, &s.info, None)
                .unwrap_or_else(|e| {
                    panic!("{what}: HLSL {shader_model:?} (DX12) backend failed: {e} ({e:?})")
                });
            assert!(
                text.contains("[numthreads("),
                "{what}: HLSL {shader_model:?} backend wrote no compute entry point:\n{text}"
            );
        }
    }
}

fn shader_files() -> Vec<(PathBuf, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("shaders");
    let read = |dir: &PathBuf| {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .collect::<Vec<_>>()
    };
    let mut files: Vec<(PathBuf, String)> = read(&dir)
        .into_iter()
        .chain(read(&dir.join("lib")))
        .filter(|path| path.extension().is_some_and(|ext| ext == "wgsl"))
        .map(|path| {
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
            (path, text)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no .wgsl files under {}", dir.display());
    files
}

/// Every fragment is a file under `shaders/lib/` that some kernel includes.
#[test]
fn every_fragment_is_included() {
    let sources: Vec<String> = keys().iter().map(KernelKey::source).collect();
    for fragment in Fragment::ALL {
        assert!(
            sources.iter().any(|src| src.contains(fragment.source())),
            "{fragment:?} is included by no kernel"
        );
    }
}

/// A shader file no kernel compiles would never be tested on any backend.
#[test]
fn every_shader_file_is_used_by_a_kernel() {
    let sources: Vec<String> = keys().iter().map(KernelKey::source).collect();
    for (path, text) in shader_files() {
        assert!(
            sources.iter().any(|src| src.contains(text.as_str())),
            "{} is not compiled by any kernel: register it in src/gpu/kernels/mod.rs (Kernel or Fragment)",
            path.display()
        );
    }
}

/// And the other way round: every kernel compiles one of the files (no inline WGSL that
/// escaped the `shaders/` directory).
#[test]
fn every_kernel_compiles_a_shader_file() {
    let files = shader_files();
    for key in keys() {
        let source = key.source();
        assert!(
            files.iter().any(|(_, text)| source.contains(text.as_str())),
            "{}: its source contains none of the files under shaders/",
            describe(&key)
        );
    }
}

/// Every key with its parameter blocks in read-only storage (lavapipe's binding, `ParamsIn`)
/// parses and validates too.
#[test]
fn every_kernel_validates_with_parameter_blocks_in_storage() {
    for key in keys() {
        let what = describe(&key);
        let source = key.source_with(wgpu_attention::ParamsIn::ReadOnlyStorage);
        assert!(
            !source.contains("var<uniform>"),
            "{what}: a uniform is left"
        );
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| {
            panic!("{what}: WGSL parse failed:\n{}", e.emit_to_string(&source))
        });
        Validator::new(ValidationFlags::all(), key_capabilities(&key))
            .validate(&module)
            .unwrap_or_else(|e| {
                panic!(
                    "{what}: naga validation failed:\n{}",
                    e.emit_to_string(&source)
                )
            });
    }
}

/// Every function-scope `var` has an initializer. WGSL zeroes a `var` declared without one
/// each time its declaration runs, but Chromium's WebGPU (Dawn, SwiftShader adapter, Chromium
/// 156) did not re-zero one declared in a loop body: scores of one key tile added to the next,
/// masked keys kept the last key's probability (wrong outputs on the fused and decode paths;
/// web/tests/browser.rs found it). naga does, so only the browser showed it. `var x = T();`
/// means the same everywhere.
#[test]
fn every_function_var_is_initialised() {
    for key in keys() {
        let source = key.source();
        for (n, line) in source.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").trim();
            if code.starts_with("var ") && !code.contains('=') {
                panic!(
                    "{}: line {}: `{code}` has no initializer (write `var x = T();`)",
                    describe(&key),
                    n + 1
                );
            }
        }
    }
}

/// Writes the SPIR-V (1.6, as wgpu writes it for a Vulkan 1.3 device) of every cooperative
/// key of the samples into `$WGPU_ATTENTION_SPV_DIR`, for `scripts/validate-cooperative-spirv.sh`
/// (spirv-val from SPIRV-Tools 2023.3 or later, which knows SPV_KHR_cooperative_matrix; CI's
/// Debian has an older one). Ignored: a tool, not a check, and it needs the directory.
#[test]
#[ignore]
fn dump_cooperative_spirv() {
    let dir = PathBuf::from(std::env::var("WGPU_ATTENTION_SPV_DIR").expect("an output directory"));
    std::fs::create_dir_all(&dir).unwrap();
    let cooperative = specialised()
        .into_iter()
        .filter(|s| s.key.needs_cooperative_matrix());
    for (n, s) in cooperative.enumerate() {
        let words = spirv(&s, (1, 6)).unwrap();
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(dir.join(format!("cooperative-{n:02}.spv")), bytes).unwrap();
        std::fs::write(
            dir.join(format!("cooperative-{n:02}.txt")),
            describe(&s.key),
        )
        .unwrap();
    }
}
