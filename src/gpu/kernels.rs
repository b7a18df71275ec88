//! The one place that names every kernel: its shader, its bindings, its specialisations.
//!
//! A kernel's WGSL file never declares the tensors it reads and writes in their storage type.
//! The host prepends a *prelude* that declares each tensor binding and a `load_<name>(i) -> f32`
//! (and, when writable, `store_<name>(i, x)`) accessor for the tensor's [`Storage`]; a new
//! storage type is a new prelude, never a copy of a kernel. Everything else a kernel binds (uniforms, f32 scratch,
//! masks) it declares itself.
//!
//! Pipelines are compiled on first use and cached per [`KernelKey`]; the key is also the
//! pipeline's debug label. The fast path takes a read lock; a miss compiles outside any lock
//! and re-checks under the write lock, so two threads racing on the same key waste at most one
//! compilation and never block each other's dispatches.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, RwLock};

use crate::error::{Error, Result};
use crate::gpu::context::GpuLimits;
use crate::spec::DType;

/// WGSL source of the tiled `QK^T` kernel (and of additive scores, by a pipeline constant).
pub const QK_SCORES: &str = include_str!("../../shaders/qk_scores.wgsl");
/// WGSL source of the masked row-softmax kernel.
pub const MASKED_SOFTMAX: &str = include_str!("../../shaders/masked_softmax.wgsl");
/// WGSL source of the tiled `P V` kernel.
pub const PV_PRODUCT: &str = include_str!("../../shaders/pv_product.wgsl");
/// WGSL source of the fused flash-attention kernel.
pub const FLASH_ATTENTION: &str = include_str!("../../shaders/flash_attention.wgsl");
/// WGSL source of the kernel that merges partial results by their log-sum-exp.
pub const COMBINE_SPLITS: &str = include_str!("../../shaders/combine_splits.wgsl");
/// WGSL source of the batched matrix product with bias (the layer's projections).
pub const MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
/// WGSL of the masking rules shared by every kernel that masks (not a kernel itself).
pub const ATTENTION_MASK: &str = include_str!("../../shaders/attention_mask.wgsl");

/// Every kernel of the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `S = scale * Q K^T`, tiled (three-pass path, pass 1).
    QkScores,
    /// Masked softmax of S in place, with log-sum-exp (three-pass path, pass 2).
    MaskedSoftmax,
    /// `O = P V`, tiled (three-pass path, pass 3).
    PvProduct,
    /// Scores, online softmax and `P V` fused (flash attention).
    FlashAttention,
    /// Merges partial results over disjoint key sets (flash-decoding splits, public merge).
    CombineSplits,
    /// Batched `C = alpha A B^T + bias` with any strides (projections, head averages).
    Matmul,
}

/// What sits at one binding slot of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Uniform,
    /// A buffer the kernel declares itself.
    Storage {
        read_only: bool,
    },
    /// A tensor the prelude declares, with accessors named after it.
    Tensor {
        name: &'static str,
        read_only: bool,
    },
}

const fn tensor(name: &'static str, read_only: bool) -> Slot {
    Slot::Tensor { name, read_only }
}

impl Kernel {
    /// All kernels, for tests that compile every one.
    pub const ALL: [Kernel; 6] = [
        Kernel::QkScores,
        Kernel::MaskedSoftmax,
        Kernel::PvProduct,
        Kernel::FlashAttention,
        Kernel::CombineSplits,
        Kernel::Matmul,
    ];

    fn source(self) -> &'static str {
        match self {
            Kernel::QkScores => QK_SCORES,
            Kernel::MaskedSoftmax => MASKED_SOFTMAX,
            Kernel::PvProduct => PV_PRODUCT,
            Kernel::FlashAttention => FLASH_ATTENTION,
            Kernel::CombineSplits => COMBINE_SPLITS,
            Kernel::Matmul => MATMUL,
        }
    }

    /// Whether the kernel applies masks, and so needs the shared masking rules.
    fn masks(self) -> bool {
        matches!(self, Kernel::MaskedSoftmax | Kernel::FlashAttention)
    }

    /// The specialisations a test should compile: every variant the plans can choose.
    pub fn variants(self) -> &'static [u32] {
        match self {
            Kernel::MaskedSoftmax => &[64, 128, 256],
            Kernel::FlashAttention => &[1, 2, 3, 4],
            // 1: additive scores.
            Kernel::QkScores => &[0, 1],
            Kernel::PvProduct | Kernel::CombineSplits | Kernel::Matmul => &[0],
        }
    }

    /// Slot `n` is `@binding(n)` of group 0.
    fn slots(self) -> &'static [Slot] {
        const READ: Slot = Slot::Storage { read_only: true };
        const WRITE: Slot = Slot::Storage { read_only: false };
        match self {
            Kernel::QkScores => {
                const S: &[Slot] = &[
                    Slot::Uniform,
                    tensor("q", true),
                    tensor("k", true),
                    WRITE,
                    READ,
                ];
                S
            }
            Kernel::MaskedSoftmax => {
                &[Slot::Uniform, WRITE, READ, READ, READ, WRITE, Slot::Uniform]
            }
            Kernel::FlashAttention => {
                const S: &[Slot] = &[
                    Slot::Uniform,
                    tensor("q", true),
                    tensor("k", true),
                    tensor("v", true),
                    tensor("o", false),
                    READ,
                    READ,
                    READ,
                    WRITE,
                    Slot::Uniform,
                ];
                S
            }
            Kernel::CombineSplits => {
                const S: &[Slot] = &[
                    Slot::Uniform,
                    tensor("p", true),
                    READ,
                    tensor("o", false),
                    WRITE,
                ];
                S
            }
            Kernel::Matmul => {
                const S: &[Slot] = &[
                    Slot::Uniform,
                    tensor("a", true),
                    tensor("b", true),
                    tensor("c", false),
                    READ,
                ];
                S
            }
            Kernel::PvProduct => {
                const S: &[Slot] = &[Slot::Uniform, READ, tensor("v", true), tensor("o", false)];
                S
            }
        }
    }

    /// The name used in labels and errors.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::QkScores => "qk_scores",
            Kernel::MaskedSoftmax => "masked_softmax",
            Kernel::PvProduct => "pv_product",
            Kernel::FlashAttention => "flash_attention",
            Kernel::CombineSplits => "combine_splits",
            Kernel::Matmul => "matmul",
        }
    }
}

/// How a tensor is stored, as a kernel sees it: the [`DType`] plus, for f16, whether the
/// adapter reads it natively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Storage {
    /// `array<f32>`.
    #[default]
    F32,
    /// `array<f16>` with `enable f16` (adapters with `SHADER_F16`).
    F16,
    /// f16 packed two to a `u32`, converted with `unpack2x16float` / `pack2x16float`.
    F16Packed,
    /// bf16 packed two to a `u32`, converted by bit shifts; rounded to nearest even on store.
    Bf16,
}

impl Storage {
    /// The storage of `dtype` on an adapter with (or without) native f16.
    pub fn of(dtype: DType, native_f16: bool) -> Storage {
        match dtype {
            DType::F32 => Storage::F32,
            DType::F16 if native_f16 => Storage::F16,
            DType::F16 => Storage::F16Packed,
            DType::Bf16 => Storage::Bf16,
        }
    }
}

/// The storage of each tensor a kernel may bind, by the names the kernels use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TensorStorage {
    /// Queries.
    pub q: Storage,
    /// Keys.
    pub k: Storage,
    /// Values.
    pub v: Storage,
    /// Output (and, for the combine kernel, its partial outputs `p`).
    pub o: Storage,
    /// Partial outputs merged by the combine kernel.
    pub p: Storage,
    /// The matrix product's left operand.
    pub a: Storage,
    /// The matrix product's right operand.
    pub b: Storage,
    /// The matrix product's result.
    pub c: Storage,
}

impl TensorStorage {
    /// Every tensor stored as `storage`.
    pub fn all(storage: Storage) -> TensorStorage {
        TensorStorage {
            q: storage,
            k: storage,
            v: storage,
            o: storage,
            p: storage,
            a: storage,
            b: storage,
            c: storage,
        }
    }

    fn get(&self, name: &str) -> Storage {
        match name {
            "q" => self.q,
            "k" => self.k,
            "v" => self.v,
            "o" => self.o,
            "p" => self.p,
            "a" => self.a,
            "b" => self.b,
            "c" => self.c,
            other => unreachable!("no tensor named {other}"),
        }
    }
}

/// One specialisation of a kernel: everything that changes the compiled pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelKey {
    /// Which kernel.
    pub kernel: Kernel,
    /// Storage of the prelude's tensors.
    pub storage: TensorStorage,
    /// The kernel's specialisation (0 where it has none): the workgroup size of
    /// `MaskedSoftmax`, `ceil(v_head_dim / 64)` for `FlashAttention`.
    pub variant: u32,
}

impl KernelKey {
    fn label(&self) -> String {
        let s = &self.storage;
        let mut names = Vec::new();
        for (binding, slot) in self.kernel.slots().iter().enumerate() {
            if let Slot::Tensor { name, .. } = slot {
                names.push(format!("{name}@{binding}:{:?}", s.get(name)));
            }
        }
        format!(
            "{}<{}; {}>",
            self.kernel.name(),
            names.join(","),
            self.variant
        )
    }

    /// Whether a tensor of this key is stored as native f16 (the device needs `SHADER_F16`).
    pub fn needs_f16(&self) -> bool {
        self.kernel.slots().iter().any(|slot| {
            matches!(slot, Slot::Tensor { name, .. } if self.storage.get(name) == Storage::F16)
        })
    }

    /// The `override` constants this specialisation sets.
    pub fn constants(&self) -> Vec<(&'static str, f64)> {
        match self.kernel {
            Kernel::MaskedSoftmax => vec![("WG", self.variant as f64)],
            Kernel::FlashAttention => {
                // The V slice holds BKV * 16 * O_CHUNKS vec4s <= 512, and BKV divides the
                // 64-key tile.
                let bkv = match self.variant {
                    1 => 32,
                    2 => 16,
                    _ => 8,
                };
                vec![("O_CHUNKS", self.variant as f64), ("BKV", bkv as f64)]
            }
            Kernel::QkScores => vec![("ADDITIVE", self.variant as f64)],
            Kernel::PvProduct | Kernel::CombineSplits | Kernel::Matmul => Vec::new(),
        }
    }

    /// The complete WGSL the crate compiles for this key: the storage preludes, the shared
    /// masking rules where the kernel masks, then the kernel.
    pub fn source(&self) -> String {
        let mut src = String::new();
        if self.needs_f16() {
            src.push_str("enable f16;\n");
        }
        for (binding, slot) in self.kernel.slots().iter().enumerate() {
            if let Slot::Tensor { name, read_only } = *slot {
                prelude(&mut src, name, binding, self.storage.get(name), read_only);
            }
        }
        if self.kernel.masks() {
            src.push_str(ATTENTION_MASK);
        }
        src.push_str(self.kernel.source());
        src
    }
}

/// Declares tensor `name` at `binding` in `storage`, with its f32 accessors: `load_<name>(i)`,
/// and `store_<name>(i, x)` when writable. Packed types store through atomics on the word
/// that holds the element, because the other half may belong to another invocation.
fn prelude(src: &mut String, name: &str, binding: usize, storage: Storage, read_only: bool) {
    let access = if read_only { "read" } else { "read_write" };
    let decl = |ty: &str| {
        format!("@group(0) @binding({binding}) var<storage, {access}> {name}_buf: {ty};\n")
    };
    // The 32-bit word holding element i, as a value.
    let word = if read_only {
        format!("{name}_buf[i >> 1u]")
    } else {
        format!("atomicLoad(&{name}_buf[i >> 1u])")
    };
    let packed_store = |bits: &str| {
        format!(
            "fn store_{name}(i: u32, x: f32) {{\n    let bits = {bits};\n    let shift = (i & 1u) * 16u;\n    \
             atomicAnd(&{name}_buf[i >> 1u], ~(0xffffu << shift));\n    \
             atomicOr(&{name}_buf[i >> 1u], bits << shift);\n}}\n"
        )
    };
    match storage {
        Storage::F32 => {
            src.push_str(&decl("array<f32>"));
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return {name}_buf[i]; }}"
            );
            if !read_only {
                let _ = writeln!(
                    src,
                    "fn store_{name}(i: u32, x: f32) {{ {name}_buf[i] = x; }}"
                );
            }
        }
        Storage::F16 => {
            src.push_str(&decl("array<f16>"));
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return f32({name}_buf[i]); }}"
            );
            if !read_only {
                let _ = writeln!(
                    src,
                    "fn store_{name}(i: u32, x: f32) {{ {name}_buf[i] = f16(x); }}"
                );
            }
        }
        Storage::F16Packed => {
            src.push_str(&decl(if read_only {
                "array<u32>"
            } else {
                "array<atomic<u32>>"
            }));
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{\n    let pair = unpack2x16float({word});\n    \
                 return select(pair.x, pair.y, (i & 1u) != 0u);\n}}"
            );
            if !read_only {
                src.push_str(&packed_store("pack2x16float(vec2<f32>(x, 0.0)) & 0xffffu"));
            }
        }
        Storage::Bf16 => {
            src.push_str(&decl(if read_only {
                "array<u32>"
            } else {
                "array<atomic<u32>>"
            }));
            let _ = writeln!(
                src,
                "fn load_{name}(i: u32) -> f32 {{ return bitcast<f32>((({word} >> ((i & 1u) * 16u)) & 0xffffu) << 16u); }}"
            );
            if !read_only {
                // Round to nearest even; NaN stays a (quiet) NaN.
                let _ = writeln!(
                    src,
                    "fn bf16_bits_{name}(x: f32) -> u32 {{\n    let u = bitcast<u32>(x);\n    \
                     if (u & 0x7fffffffu) > 0x7f800000u {{ return 0x7fc0u; }}\n    \
                     return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;\n}}"
                );
                src.push_str(&packed_store(&format!("bf16_bits_{name}(x)")));
            }
        }
    }
}

/// A compiled kernel and the layout its bind groups are made from.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub(crate) pipeline: wgpu::ComputePipeline,
    pub(crate) layout: wgpu::BindGroupLayout,
    pub(crate) label: String,
}

/// Per-device pipeline cache and shared small buffers.
#[derive(Debug)]
pub(crate) struct Kernels {
    cache: RwLock<HashMap<KernelKey, Arc<Compiled>>>,
    /// Bound where a kernel's optional input is absent (bindings cannot be left empty).
    pub(crate) placeholder: wgpu::Buffer,
    /// Bound where a kernel's optional output is absent: a buffer bound read-write may not also
    /// be bound read-only in the same dispatch, so inputs and outputs need one each.
    pub(crate) placeholder_out: wgpu::Buffer,
    /// Workgroup size of the row-reduction kernels, a power of two the device supports.
    pub(crate) row_workgroup: u32,
}

/// Invocations of the tiled product kernels (16 x 16).
const GEMM_INVOCATIONS: u32 = 256;
/// Workgroup memory of the tiled product kernels: two 16 x 64 f32 tiles.
const GEMM_WORKGROUP_BYTES: u32 = 2 * 16 * 64 * 4;
/// Workgroup memory of the fused kernel: an 8 KiB stage, a 64 x 64 probability tile, a
/// 64 x 16 reduction buffer and the tile bounds.
pub(crate) const FLASH_WORKGROUP_BYTES: u32 = 8192 + 16384 + 4096 + 8;

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, limits: &GpuLimits) -> Result<Kernels> {
        if limits.max_invocations_per_workgroup < GEMM_INVOCATIONS {
            return Err(Error::Unsupported {
                what: "invocations per workgroup",
                needed: GEMM_INVOCATIONS as u64,
                available: limits.max_invocations_per_workgroup as u64,
            });
        }
        if limits.max_workgroup_storage < GEMM_WORKGROUP_BYTES {
            return Err(Error::Unsupported {
                what: "workgroup memory (bytes)",
                needed: GEMM_WORKGROUP_BYTES as u64,
                available: limits.max_workgroup_storage as u64,
            });
        }
        let placeholder = |label| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        Ok(Kernels {
            cache: RwLock::new(HashMap::new()),
            placeholder: placeholder("wgpu-attention placeholder input"),
            placeholder_out: placeholder("wgpu-attention placeholder output"),
            row_workgroup: 256,
        })
    }

    /// The pipeline for `key`, compiling it on first use.
    pub(crate) fn get(&self, device: &wgpu::Device, key: KernelKey) -> Result<Arc<Compiled>> {
        if let Some(hit) = self
            .cache
            .read()
            .expect("pipeline cache poisoned")
            .get(&key)
        {
            return Ok(hit.clone());
        }
        let compiled = Arc::new(compile(device, key)?);
        let mut cache = self.cache.write().expect("pipeline cache poisoned");
        Ok(cache.entry(key).or_insert(compiled).clone())
    }
}

fn compile(device: &wgpu::Device, key: KernelKey) -> Result<Compiled> {
    let label = key.label();
    log::debug!("wgpu-attention: compiling {label}");
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    // A backend compiler (Metal's, DXC, a Vulkan driver) rejecting the translated shader is an
    // internal error, not a validation one.
    let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
    // naga's loop bounding adds a counter to every loop so that an infinite loop cannot be
    // undefined behaviour. It also hides every loop's trip count from the driver, so no loop is
    // unrolled: that costs speed everywhere, and on llvmpipe it breaks results, because
    // llvmpipe stops an invocation's loops after 65535 iterations *in total* (over all loops
    // and re-entries), so a long-enough kernel silently skips work (NOTES.md).
    #[allow(unsafe_code)]
    // SAFETY: every loop in these kernels is bounded by sizes from a uniform or a constant,
    // which the plans validate; bounds checks on memory accesses stay on.
    let module = unsafe {
        device.create_shader_module_trusted(
            wgpu::ShaderModuleDescriptor {
                label: Some(&label),
                source: wgpu::ShaderSource::Wgsl(key.source().into()),
            },
            wgpu::ShaderRuntimeChecks {
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            },
        )
    };
    let entries: Vec<wgpu::BindGroupLayoutEntry> = key
        .kernel
        .slots()
        .iter()
        .enumerate()
        .map(|(binding, slot)| {
            let ty = match *slot {
                Slot::Uniform => wgpu::BufferBindingType::Uniform,
                Slot::Storage { read_only } | Slot::Tensor { read_only, .. } => {
                    wgpu::BufferBindingType::Storage { read_only }
                }
            };
            wgpu::BindGroupLayoutEntry {
                binding: binding as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty,
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            }
        })
        .collect();
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(&label),
        entries: &entries,
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: Some(&label),
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let constants = key.constants();
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(&label),
        layout: Some(&pipeline_layout),
        module: &module,
        entry_point: Some("main"),
        compilation_options: wgpu::PipelineCompilationOptions {
            constants: &constants,
            // Every kernel writes its workgroup memory before reading it.
            zero_initialize_workgroup_memory: false,
        },
        cache: None,
    });
    let internal = pollster::block_on(internal.pop());
    if let Some(err) = pollster::block_on(scope.pop()).or(internal) {
        return Err(Error::Gpu(format!("compiling {label}: {err}")));
    }
    Ok(Compiled {
        pipeline,
        layout,
        label,
    })
}

impl Compiled {
    /// A bind group with `buffers[n]` at `@binding(n)`, each bound whole.
    pub(crate) fn bind(&self, device: &wgpu::Device, buffers: &[&wgpu::Buffer]) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(binding, buffer)| wgpu::BindGroupEntry {
                binding: binding as u32,
                resource: buffer.as_entire_binding(),
            })
            .collect();
        device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&self.label),
            layout: &self.layout,
            entries: &entries,
        })
    }
}

/// Workgroup counts for a 1-D grid of `groups` workgroups, spilled into y and z when x is full.
/// Kernels recover the linear index as `x + nx * (y + ny * z)` and skip indices past the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchSize {
    /// Workgroups in x, y and z.
    pub counts: [u32; 3],
}

impl DispatchSize {
    /// Fits `groups` into at most `max_per_dim` per dimension.
    pub fn linear(groups: u64, max_per_dim: u32, what: &'static str) -> Result<DispatchSize> {
        let max = max_per_dim.max(1) as u64;
        if groups > max * max * max {
            return Err(Error::TooLarge {
                what,
                requested: groups,
                max: max * max * max,
                hint: " workgroups (x * y * z)",
            });
        }
        let x = groups.min(max);
        let rest = groups.div_ceil(x.max(1));
        let y = rest.min(max);
        let z = rest.div_ceil(y.max(1));
        Ok(DispatchSize {
            counts: [x as u32, y as u32, z as u32],
        })
    }
}
