//! The per-device pipeline cache.
//!
//! The fast path takes a read lock; a miss compiles outside any lock and re-checks under the
//! write lock, so two threads racing on the same key waste at most one compilation and never
//! block each other's dispatches.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use super::uniforms::{TILE_INVOCATIONS, TILE_STAGE_BYTES};
use super::{KernelKey, MaskOptions, ParamsIn, Slot};
use crate::error::{Error, Result};
use crate::gpu::limits::{DispatchSize, GpuLimits};
use crate::gpu::scopes::{Deferred, Scopes};
use crate::spec::Spec;

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
    /// The WGSL of every score mod the device has met, numbered from 1 by first use
    /// (`MaskOptions::mods`; 0 is the identities): a key holds the number, so that it stays
    /// `Copy`, and two calls with the same source share their pipelines.
    mods: RwLock<Vec<Arc<str>>>,
    /// Bound where a kernel's optional input is absent (bindings cannot be left empty).
    pub(crate) placeholder: wgpu::Buffer,
    /// Bound where a kernel's optional output is absent: a buffer bound read-write may not also
    /// be bound read-only in the same dispatch, so inputs and outputs need one each.
    pub(crate) placeholder_out: wgpu::Buffer,
    /// Workgroup size of the row-reduction kernels, a power of two the device supports.
    pub(crate) row_workgroup: u32,
    /// How every kernel on this device binds its parameter blocks.
    pub(crate) params: ParamsIn,
    /// Where compile errors go when they cannot be waited for (the browser).
    deferred: Arc<Deferred>,
}

impl Kernels {
    pub(crate) fn new(
        device: &wgpu::Device,
        limits: &GpuLimits,
        params: ParamsIn,
        deferred: Arc<Deferred>,
    ) -> Result<Kernels> {
        if limits.max_invocations_per_workgroup < TILE_INVOCATIONS {
            return Err(Error::Unsupported {
                what: "invocations per workgroup",
                needed: TILE_INVOCATIONS as u64,
                available: limits.max_invocations_per_workgroup as u64,
            });
        }
        if limits.max_workgroup_storage < TILE_STAGE_BYTES {
            return Err(Error::Unsupported {
                what: "workgroup memory (bytes)",
                needed: TILE_STAGE_BYTES as u64,
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
            mods: RwLock::new(vec![crate::ScoreMod::default().wgsl().into()]),
            placeholder: placeholder("wgpu-attention placeholder input"),
            placeholder_out: placeholder("wgpu-attention placeholder output"),
            row_workgroup: 256,
            params,
            deferred,
        })
    }

    /// How many pipelines have been compiled on this device.
    pub(crate) fn compiled(&self) -> usize {
        self.cache.read().expect("pipeline cache poisoned").len()
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
        let number = key.masks().map_or(0, |m| m.mods) as usize;
        let mods = self.mods.read().expect("score mods poisoned")[number].clone();
        let compiled = compile(device, key, self.params, &mods, &self.deferred);
        // A kernel the user's WGSL is in that does not compile (the checks above let nothing
        // through that they know of) is the mod's error, typed as theirs are.
        let compiled = Arc::new(compiled.map_err(|e| match e {
            Error::Gpu(message) if number != 0 => Error::InvalidOption {
                what: "score mod",
                value: message,
                why: "a kernel with the score mod compiled in did not compile",
            },
            other => other,
        })?);
        let mut cache = self.cache.write().expect("pipeline cache poisoned");
        Ok(cache.entry(key).or_insert(compiled).clone())
    }

    /// The masking options `spec` compiles in, its score mod (if any) numbered: the mod's WGSL
    /// is checked when the device first meets it, and its forms against the GPU's needs (the
    /// derivative too for a `backward`).
    pub(crate) fn mask_options(
        &self,
        device: &wgpu::Device,
        spec: &Spec<'_>,
        backward: bool,
    ) -> Result<MaskOptions> {
        let mut masks = MaskOptions::of(spec);
        if let Some(m) = spec.opts.score_mod.as_ref().filter(|m| m.any()) {
            m.require(true, backward)?;
            masks.mods = self.mods_number(device, m)?;
        }
        Ok(masks)
    }

    /// The number of the score mods' WGSL `source`, checked and numbered on first use.
    fn mods_number(&self, device: &wgpu::Device, m: &crate::ScoreMod) -> Result<u32> {
        let source = &m.wgsl()[..];
        let find = |mods: &[Arc<str>]| mods.iter().position(|m| &**m == source);
        if let Some(n) = find(&self.mods.read().expect("score mods poisoned")) {
            return Ok(n as u32);
        }
        check_mods(device, source, &self.deferred)?;
        if let Some(name) = m.clashing_helper(super::module_scope_names()) {
            return Err(Error::InvalidOption {
                what: "score mod",
                value: format!("a helper declares `{name}`"),
                why: "the kernels declare that name (or it starts with attn_): give the \
                      helpers' functions and constants a prefix of your own",
            });
        }
        let mut mods = self.mods.write().expect("score mods poisoned");
        Ok(match find(&mods) {
            Some(n) => n,
            None => {
                mods.push(source.into());
                mods.len() - 1
            }
        } as u32)
    }
}

/// Compiles the WGSL of a score mod on its own, beside stand-ins for what it may call:
/// [`Error::InvalidOption`] with the compiler's message if it does not compile (also when it
/// reaches for anything of a kernel beyond its arguments and the `attn_` accessors).
fn check_mods(device: &wgpu::Device, source: &str, deferred: &Arc<Deferred>) -> Result<()> {
    let module = format!(
        "fn attn_data(k: u32) -> u32 {{ return k; }}\n\
         fn attn_data_f32(k: u32) -> f32 {{ return f32(k); }}\n\
         fn attn_q_len(b: u32) -> u32 {{ return b; }}\n\
         fn attn_kv_len(b: u32) -> u32 {{ return b; }}\n\
         {source}\n\
         @group(0) @binding(0) var<storage, read_write> attn_check_out: array<f32>;\n\
         @compute @workgroup_size(1)\n\
         fn main() {{\n    \
             let keep = attn_mask_mod(0u, 1u, 2u, 3u);\n    \
             attn_check_out[0] = select(0.0, attn_score_mod(0.5, 0u, 1u, 2u, 3u), keep) \
             + attn_score_mod_grad(0.5, 0u, 1u, 2u, 3u);\n    \
             attn_check_out[1] = f32(attn_key_range(0u, 2u).y);\n}}\n"
    );
    let scopes = Scopes::push(device);
    let _ = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("wgpu-attention score mod check"),
        source: wgpu::ShaderSource::Wgsl(module.into()),
    });
    scopes
        .pop(deferred, "checking the score mod's WGSL")
        .map_err(|e| match e {
            Error::Gpu(message) => Error::InvalidOption {
                what: "score mod",
                value: message,
                why: "its WGSL must compile: bodies of attn_mask_mod(b, h, i, j) -> bool, \
                  attn_score_mod(s, b, h, i, j) -> f32, attn_score_mod_grad(s, b, h, i, j) \
                  -> f32 and attn_key_range(b, i) -> vec2<u32> (u32 places, f32 scores), \
                  calling only their arguments, the attn_ accessors and the helpers",
            },
            other => other,
        })
}

fn compile(
    device: &wgpu::Device,
    key: KernelKey,
    params: ParamsIn,
    mods: &str,
    deferred: &Arc<Deferred>,
) -> Result<Compiled> {
    let label = key.label();
    log::debug!("wgpu-attention: compiling {label}");
    // A backend compiler (Metal's, DXC, a Vulkan driver) rejecting the translated shader is an
    // internal error, not a validation one; the scopes catch both.
    let scopes = Scopes::push(device);
    // naga's loop bounding adds a counter to every loop so that an infinite loop cannot be
    // undefined behaviour. It also hides every loop's trip count from the driver, so no loop is
    // unrolled: that costs speed everywhere, and on llvmpipe it breaks results, because
    // llvmpipe stops an invocation's loops after 65535 iterations *in total* (over all loops
    // and re-entries), so a long-enough kernel silently skips work (NOTES.md).
    let source = wgpu::ShaderModuleDescriptor {
        label: Some(&label),
        source: wgpu::ShaderSource::Wgsl(super::compose::source(&key, params, mods).into()),
    };
    // In the browser the module is the WGSL text itself, checked by the browser's compiler
    // (which adds its own safeguards): no native-only options.
    #[cfg(target_arch = "wasm32")]
    let module = device.create_shader_module(source);
    #[cfg(not(target_arch = "wasm32"))]
    #[allow(unsafe_code)]
    // SAFETY: every loop in these kernels is bounded by sizes from a uniform or a constant,
    // which the plans validate; bounds checks on memory accesses stay on.
    let module = unsafe {
        device.create_shader_module_trusted(
            source,
            wgpu::ShaderRuntimeChecks {
                force_loop_bounding: false,
                ..wgpu::ShaderRuntimeChecks::checked()
            },
        )
    };
    let entries: Vec<wgpu::BindGroupLayoutEntry> = key
        .kernel()
        .slots()
        .iter()
        .enumerate()
        .map(|(binding, slot)| {
            let ty = match *slot {
                Slot::Uniform { .. } => match params {
                    ParamsIn::Uniform => wgpu::BufferBindingType::Uniform,
                    ParamsIn::ReadOnlyStorage => {
                        wgpu::BufferBindingType::Storage { read_only: true }
                    }
                },
                Slot::Storage { read_only, .. } | Slot::Tensor { read_only, .. } => {
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
    scopes.pop(deferred, &format!("compiling {label}"))?;
    Ok(Compiled {
        pipeline,
        layout,
        label,
    })
}

impl Compiled {
    /// Records one dispatch of this pipeline with `bind` over `size` workgroups.
    pub(crate) fn dispatch(
        &self,
        pass: &mut wgpu::ComputePass<'_>,
        bind: &wgpu::BindGroup,
        size: DispatchSize,
    ) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, bind, &[]);
        let [x, y, z] = size.counts;
        pass.dispatch_workgroups(x, y, z);
    }

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
