//! The attention paths: one file per path with its plan and its encoding, and the choice
//! between them.
//!
//! Planning is pure arithmetic: [`choose`] and every plan it returns (chunks, splits, passes,
//! workgroup counts, scratch sizes) depend on the validated call and the [`GpuLimits`] alone,
//! so the tests below check them against the limits of real devices with no adapter.

pub(crate) mod fused;
pub(crate) mod masking;
pub(crate) mod three_pass;

pub use fused::FusedPlan;
pub use three_pass::{Chunk, ThreePassPlan};

use crate::error::Result;
use crate::gpu::context::Gpu;
use crate::gpu::kernels::Storage;
use crate::gpu::limits::{GpuLimits, check_binding};
use crate::gpu::tensor::Tensor;
use crate::spec::{Path, Spec};

/// Which kernels a call runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Plan {
    /// QK^T, masked softmax and P·V as three kernels, with the scores materialised.
    ThreePass {
        /// Chunking of the scores.
        plan: ThreePassPlan,
        /// Why this path.
        why: &'static str,
    },
    /// One fused kernel, online softmax, O(N) memory; its keys split across workgroups only
    /// where the device caps the keys one workgroup may stream.
    Fused {
        /// Dispatch and specialisation.
        plan: FusedPlan,
        /// Why this path.
        why: &'static str,
    },
    /// The decode-shaped kernel (`flash_decode.wgsl`, up to 16 rows per kv head) or the
    /// fused kernel, GQA groups packed, the keys split to fill the device and the splits
    /// merged by log-sum-exp (flash-decoding).
    Decode {
        /// Dispatch, splits and specialisation.
        plan: FusedPlan,
        /// Why this path.
        why: &'static str,
    },
}

impl Plan {
    /// The path's name, as `attn-bench` prints it.
    pub fn name(&self) -> &'static str {
        match self {
            Plan::ThreePass { .. } => "three-pass",
            Plan::Fused { .. } => "fused",
            Plan::Decode { .. } => "decode",
        }
    }

    /// Why this path and this chunking were chosen.
    pub fn reason(&self) -> String {
        match self {
            Plan::ThreePass { plan, why } => format!(
                "three-pass ({why}): {} chunk(s) of {} bytes of scores ({})",
                plan.chunks.len(),
                plan.scratch_bytes,
                plan.reason
            ),
            Plan::Fused { plan, why } | Plan::Decode { plan, why } => format!(
                "{} ({why}): {}, {} workgroups of {} rows and {} invocations, {} key split(s) x \
                 {} pass(es) of {} tiles, v_head_dim in {} chunk(s) of 64, {} bytes of scratch",
                self.name(),
                if plan.keys_across_invocations {
                    "flash_decode (keys across invocations)".to_string()
                } else {
                    let q = match (plan.mma, plan.resident_q) {
                        (Some(_), _) => "Q staged as f16, 64 dims at a time".to_string(),
                        (None, 0) => "Q staged per key tile".to_string(),
                        (None, n) => format!("Q resident ({} dims)", 16 * n),
                    };
                    let stages = match plan.mma {
                        Some(m) => format!(
                            ", 16-bit products ({} {}x{})",
                            if m.cooperative {
                                "cooperative matrices"
                            } else {
                                "emulated"
                            },
                            m.size,
                            m.size
                        ),
                        None if plan.double_buffer => ", double-buffered".to_string(),
                        None => String::new(),
                    };
                    format!(
                        "flash_attention (row tiles, {} blocks, {q}{stages})",
                        plan.block.name()
                    )
                },
                plan.workgroups,
                plan.rows_per_workgroup,
                plan.invocations,
                plan.splits,
                plan.passes,
                plan.tiles_per_split,
                plan.o_chunks,
                plan.scratch_bytes
            ),
        }
    }

    /// Bytes of device memory the plan allocates besides inputs and outputs.
    pub fn scratch_bytes(&self) -> u64 {
        match self {
            Plan::ThreePass { plan, .. } => plan.scratch_bytes,
            Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => plan.scratch_bytes,
        }
    }
}

/// The plan for a validated call on a device with `limits`; `weights` says whether the
/// attention weights will be written (which only the three-pass path can do), `half` whether
/// Q, K and V are native f16 (the fused kernel's 16-bit products, [`FusedPlan::mma`]).
pub(crate) fn choose(
    spec: &Spec<'_>,
    limits: &GpuLimits,
    weights: bool,
    half: bool,
) -> Result<Plan> {
    let dims = spec.dims;
    let opts = spec.opts;
    let three_pass = |why| -> Result<Plan> {
        Ok(Plan::ThreePass {
            plan: ThreePassPlan::new(spec, limits)?,
            why,
        })
    };
    let fused = |why| -> Result<Plan> {
        Ok(Plan::Fused {
            plan: FusedPlan::new(spec, limits, false, half)?,
            why,
        })
    };
    let decode = |why| -> Result<Plan> {
        Ok(Plan::Decode {
            plan: FusedPlan::new(spec, limits, true, half)?,
            why,
        })
    };
    // A few query rows (a whole GQA group fits one workgroup) over many keys: the fused grid
    // would be a handful of workgroups each streaming every key. Up to 16 rows per kv head,
    // over any number of keys: the fused path's 64-row tile would be mostly padding, where the
    // decode path sizes its workgroup to the rows (on lavapipe, 2026-12-07: 2.8-4x faster at
    // one query over 128 and 512 keys, 1.2-1.5x at 16 queries over 256 and 512).
    let packed = dims.group() * dims.q_len;
    let short_queries = packed <= 16 || (packed <= 64 && dims.kv_len >= 1024);
    let few_rows = if packed <= 16 {
        "up to 16 rows per kv head: a workgroup sized to them, not a 64-row tile"
    } else {
        "a few queries over many keys"
    };
    let plan = match opts.path {
        Path::ThreePass => three_pass("forced")?,
        Path::Fused => fused("forced")?,
        Path::Decode => decode("forced")?,
        Path::Auto if weights => three_pass("the weights were asked for")?,
        Path::Auto if opts.additive.is_some() => {
            three_pass("additive scores need the three-pass path")?
        }
        Path::Auto => match fused::unsupported(spec, limits, short_queries) {
            // The decode-shaped kernel needs less workgroup memory than the row-tiled one.
            _ if short_queries && fused::keys_kernel(spec, limits).is_some() => decode(few_rows)?,
            // The fused kernel needs more of a limit than the device has; the limit is the why.
            Some(short) => three_pass(short.what)?,
            None if short_queries => decode(few_rows)?,
            None => fused("the default: O(N) memory, one pass")?,
        },
    };
    if (opts.pages.is_some() || opts.varlen.is_some())
        && let Plan::ThreePass { why, .. } = &plan
    {
        return Err(crate::error::Error::InvalidOption {
            what: if opts.pages.is_some() {
                "paged K/V"
            } else {
                "varlen"
            },
            value: format!("three-pass ({why})"),
            why: "paged K/V and packed batches run on the fused and decode paths only, and \
                  neither can run this call on this device",
        });
    }
    log::debug!("wgpu-attention: {dims:?}: {}", plan.reason());
    Ok(plan)
}

/// Element strides (batch, head, row) of a tensor of `heads x seq x dim` rows in `spec`'s
/// layout, as the kernels' uniforms take them.
fn strides(spec: &Spec<'_>, heads: usize, seq: usize, dim: usize) -> [u32; 3] {
    spec.opts.layout.strides(heads, seq, dim).map(|x| x as u32)
}

/// The buffers one call reads and writes.
pub(crate) struct Io<'a> {
    pub(crate) q: &'a Tensor,
    pub(crate) k: &'a Tensor,
    pub(crate) v: &'a Tensor,
    pub(crate) o: &'a Tensor,
    pub(crate) lse: Option<&'a Tensor>,
    pub(crate) weights: Option<&'a Tensor>,
}

impl Io<'_> {
    /// Every tensor a kernel binds whole must fit one storage binding.
    pub(crate) fn check_bindings(&self, limits: &GpuLimits) -> Result<()> {
        for (what, t) in [("Q", self.q), ("K", self.k), ("V", self.v), ("O", self.o)] {
            check_binding(limits, what, t.byte_len())?;
        }
        if let Some(lse) = self.lse {
            check_binding(limits, "log-sum-exp", lse.byte_len())?;
        }
        Ok(())
    }

    /// How the kernels see Q, K, V and O on `gpu`.
    pub(crate) fn storage(&self, gpu: &Gpu) -> [Storage; 4] {
        [self.q, self.k, self.v, self.o].map(|t| gpu.storage(t.dtype()))
    }
}

/// Encodes a planned call into `encoder`.
pub(crate) fn encode(
    gpu: &Gpu,
    spec: &Spec<'_>,
    plan: &Plan,
    io: &Io<'_>,
    encoder: &mut wgpu::CommandEncoder,
) -> Result<()> {
    match plan {
        Plan::ThreePass { plan, .. } => three_pass::encode(gpu, spec, plan, io, encoder),
        Plan::Fused { plan, .. } | Plan::Decode { plan, .. } => {
            fused::encode(gpu, spec, plan, io, encoder)
        }
    }
}

#[cfg(test)]
mod tests;
