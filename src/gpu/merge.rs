//! Merging attention results computed over disjoint key sets, by their log-sum-exp.
//!
//! Attention over keys `A ∪ B` equals the merge of attention over `A` and over `B`:
//! `O = (e^{lse_A} O_A + e^{lse_B} O_B) / (e^{lse_A} + e^{lse_B})`, `lse = log(e^{lse_A} + e^{lse_B})`
//! (computed relative to the larger log-sum-exp so nothing overflows). That is what lets a
//! caller split the keys across chunks, devices or a paged cache. A side with log-sum-exp
//! `-inf` (no allowed key) weighs nothing; if both have none the row is zeros and `-inf`.

use crate::error::{Error, Result};
use crate::gpu::attention::Output;
use crate::gpu::context::Gpu;
use crate::gpu::dispatch::combine::{self, Combine};
use crate::gpu::kernels::uniforms::CombineParams;
use crate::gpu::limits::check_binding;
use crate::gpu::tensor::{Tensor, expect_dims};
use crate::spec::Layout;

/// One partial result: the output `o` (`[batch, heads, q_len, v_head_dim]` in `layout`) and its
/// log-sum-exp `lse` (`[batch, heads, q_len, 1]`), as [`Attention::run`](crate::Attention::run)
/// returns them with [`return_lse`](crate::Attention::return_lse).
#[derive(Debug, Clone, Copy)]
pub struct Partial<'a> {
    /// The partial output.
    pub o: &'a Tensor,
    /// Its log-sum-exp.
    pub lse: &'a Tensor,
}

/// Merges two partial results over disjoint key sets into one (O and log-sum-exp), on the GPU,
/// in one submit.
///
/// A row whose log-sum-exp is `-inf` on one side (it saw no key there) takes the other side's
/// output, whatever the empty side's O holds; on both sides, zeros and `-inf`. Log-sum-exps
/// must be finite or `-inf`: the GPU does not check their values ([`cpu::merge`](crate::cpu::merge)
/// does).
///
/// ```no_run
/// use wgpu_attention::{Attention, Gpu, Layout, gpu::merge};
/// # fn demo(gpu: &Gpu, q: &wgpu_attention::Tensor, k1: &wgpu_attention::Tensor,
/// #         v1: &wgpu_attention::Tensor, k2: &wgpu_attention::Tensor,
/// #         v2: &wgpu_attention::Tensor) -> wgpu_attention::Result<()> {
/// let opts = Attention::new().return_lse(true);
/// let a = opts.run(gpu, q, k1, v1)?; // keys 0..n
/// let b = opts.run(gpu, q, k2, v2)?; // keys n..
/// let all = merge(
///     gpu,
///     a.as_partial()?,
///     b.as_partial()?,
///     Layout::Bhsd,
/// )?;
/// # Ok(()) }
/// ```
pub fn merge(gpu: &Gpu, a: Partial<'_>, b: Partial<'_>, layout: Layout) -> Result<Output> {
    for (what, t) in [
        ("first partial output", a.o),
        ("first log-sum-exp", a.lse),
        ("second partial output", b.o),
        ("second log-sum-exp", b.lse),
    ] {
        gpu.expect_own(what, t)?;
    }
    let dims = a.o.dims();
    for (what, got, want) in [
        ("second output", b.o.dims(), dims),
        ("first log-sum-exp", a.lse.dims(), lse_dims(layout, dims)),
        ("second log-sum-exp", b.lse.dims(), lse_dims(layout, dims)),
    ] {
        expect_dims(what, got, want)?;
    }
    if b.o.dtype() != a.o.dtype() {
        return Err(Error::InvalidOption {
            what: "merge inputs",
            value: format!("{:?} and {:?}", a.o.dtype(), b.o.dtype()),
            why: "both partial outputs must have the same dtype",
        });
    }
    for t in [a.lse, b.lse] {
        if t.dtype() != crate::DType::F32 {
            return Err(Error::InvalidOption {
                what: "log-sum-exp dtype",
                value: format!("{:?}", t.dtype()),
                why: "log-sum-exps are f32",
            });
        }
    }
    let (batch, heads, q_len, v_head_dim) = layout.split(dims);
    let o_bytes = a.o.byte_len();
    let lse_bytes = a.lse.byte_len();
    let rows = (batch * heads * q_len) as u32;
    let bytes = 2 * (o_bytes + lse_bytes);
    check_binding(&gpu.limits, "stacked partial results", bytes)?;
    for t in [a.o, a.lse, b.o, b.lse] {
        if !t.buffer().usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::BufferUsage {
                what: "partial result",
                needed: "COPY_SRC",
            });
        }
    }

    let out = Output {
        o: gpu.empty_as(dims, a.o.dtype())?,
        lse: Some(gpu.empty([batch, heads, q_len, 1])?),
        weights: None,
    };
    gpu.submit_with("merge", |encoder| {
        let stacked = gpu.scratch(
            "wgpu-attention merge inputs",
            bytes,
            wgpu::BufferUsages::COPY_DST,
        );
        // [o_a | o_b | lse_a | lse_b]: the combine kernel reads them as two splits.
        encoder.copy_buffer_to_buffer(a.o.buffer(), 0, &stacked, 0, o_bytes);
        encoder.copy_buffer_to_buffer(b.o.buffer(), 0, &stacked, o_bytes, o_bytes);
        encoder.copy_buffer_to_buffer(a.lse.buffer(), 0, &stacked, 2 * o_bytes, lse_bytes);
        encoder.copy_buffer_to_buffer(
            b.lse.buffer(),
            0,
            &stacked,
            2 * o_bytes + lse_bytes,
            lse_bytes,
        );
        let [sb, sh, ss] = layout.strides(heads, q_len, v_head_dim).map(|x| x as u32);
        // Elements from one partial's start to the next (its bytes are padded to whole words).
        let o_elems = (o_bytes / a.o.dtype().size() as u64) as u32;
        let lse_offset = (2 * o_bytes / 4) as u32;
        let params = CombineParams {
            splits: 2,
            has_sinks: 0,
            sink_offset: 0,
            has_varlen: 0,
            varlen_offset: 0,
            parts_packed: 0,
            rows,
            heads: heads as u32,
            q_len: q_len as u32,
            v_head_dim: v_head_dim as u32,
            write_lse: 1,
            lse_offset,
            part_stride_s: o_elems,
            part_stride_b: sb,
            part_stride_h: sh,
            part_stride_i: ss,
            part_lse_stride_s: rows,
            part_lse_stride_b: (heads * q_len) as u32,
            part_lse_stride_h: q_len as u32,
            part_lse_stride_i: 1,
            o_stride_b: sb,
            o_stride_h: sh,
            o_stride_s: ss,
        };
        let merge = Combine {
            params,
            parts: &stacked,
            part_lses: &stacked,
            parts_storage: gpu.storage(a.o.dtype()),
            o: &out.o,
            lse: out.lse.as_ref().map(|t| t.buffer()),
            lens: None,
            last: false,
        };
        combine::encode(gpu, encoder, &merge)?;
        Ok(())
    })?;
    Ok(out)
}

fn lse_dims(layout: Layout, o_dims: [usize; 4]) -> [usize; 4] {
    let (batch, heads, q_len, _) = layout.split(o_dims);
    [batch, heads, q_len, 1]
}

impl Output {
    /// This result as one side of a [`merge`]; needs the log-sum-exp
    /// ([`Attention::return_lse`](crate::Attention::return_lse)).
    pub fn as_partial(&self) -> Result<Partial<'_>> {
        let lse = self.lse.as_ref().ok_or(Error::InvalidOption {
            what: "merge input",
            value: "an output without log-sum-exp".into(),
            why: "merging weighs each side by its log-sum-exp: run it with return_lse(true)",
        })?;
        Ok(Partial { o: &self.o, lse })
    }
}
