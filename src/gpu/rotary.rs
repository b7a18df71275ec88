//! Rotary position embedding on the device (`shaders/rotate.wgsl`): [`rotate`], and the
//! rotation a [`KvCache`](crate::KvCache) or [`PagedKvCache`](crate::PagedKvCache) with a
//! [`Rotary`] applies to the K it appends (the paged one on the host) and the queries it
//! attends with. What is computed, and how the angles stay exact, is in
//! [`crate::rotary`].

use crate::error::{Error, Result};
use crate::gpu::attention::Output;
use crate::gpu::context::Gpu;
use crate::gpu::kernels::KernelKey;
use crate::gpu::kernels::uniforms::{RotateParams, uniform_buffer};
use crate::gpu::limits::{DispatchSize, check_binding};
use crate::gpu::tensor::{Tensor, init_buffer};
use crate::rotary::{ENTRIES, LEVELS, MropeLayout, Positions, Rotary, RotaryStyle};
use crate::spec::{Attention, DType, Layout};

/// Angle tables a device keeps, the least recently used dropped first.
const KEPT_TABLES: usize = 8;

/// `x` (dims in `layout`) with each row turned by its position: a new tensor of `x`'s shape
/// and dtype, in one submit. The rotation is computed in f32 from an f64 table of angles
/// ([`crate::rotary`]); [`cpu::rotate`](crate::cpu::rotate) is its f64 twin.
///
/// ```no_run
/// use wgpu_attention::{Gpu, Layout, gpu::rotate, rotary::{Positions, Rotary}};
/// let gpu = Gpu::new()?;
/// let rope = Rotary::new(64, 10_000.0)?;
/// // A prompt of 100 tokens, 8 heads, Bshd, from position 0.
/// let q = gpu.upload(&vec![0.1; 100 * 8 * 64], [1, 100, 8, 64])?;
/// let q = rotate(&gpu, &q, Layout::Bshd, &rope, &Positions::Start(vec![0]))?;
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
pub fn rotate(
    gpu: &Gpu,
    x: &Tensor,
    layout: Layout,
    rotary: &Rotary,
    positions: &Positions,
) -> Result<Tensor> {
    gpu.expect_own("rotated tensor", x)?;
    let dims = x.dims();
    let (batch, heads, seq, dim) = rotary.check(dims, layout, positions)?;
    let strides = layout.strides(heads, seq, dim);
    // The output keeps the input's rank (a rank-3 tensor stays rank 3).
    let y = match x.rank() {
        3 => gpu.empty_as([dims[1], dims[2], dims[3]], x.dtype())?,
        _ => gpu.empty_as(dims, x.dtype())?,
    };
    let words = positions.words();
    let per_row = !matches!(positions, Positions::Start(_));
    let axes = matches!(positions, Positions::Axes(_));
    gpu.submit_with("rotate", |encoder| {
        encode(
            gpu,
            encoder,
            rotary,
            &Rotation {
                x: x.buffer(),
                x_dtype: x.dtype(),
                x_bytes: x.byte_len(),
                x_strides: strides,
                y: &y,
                y_strides: strides,
                batch,
                heads,
                seq,
                dim,
                positions: &words,
                per_row,
                axes,
                counts: None,
                rows_at_position: false,
                first: true,
                last: true,
            },
        )
    })?;
    Ok(y)
}

/// Attention of a cache's queries `q` (`[batch, heads, n, head_dim]`, Bhsd) turned by their
/// positions, against `k` and `v` with `opts`, in one submission (the rotation into a new
/// tensor first): row `i` of sequence `b` is the token at `lens[b] - q_lens[b] + i`
/// (`q_lens[b]` = `n` without them), as bottom-right alignment places it. A row before
/// position 0 sees no key; it is turned as position 0.
///
/// The attention validates the call with the turned tensor, which has `q`'s dims, before the
/// prelude runs: dims against the cache's (so `head_dim`, which `with_rotary` checked the
/// rotation fits), `q_lens` and the lengths (one per sequence of `lens`), every size nonzero.
pub(crate) fn attend_rotated(
    gpu: &Gpu,
    opts: &Attention,
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    rotary: &Rotary,
    lens: &[u32],
) -> Result<Output> {
    gpu.expect_own("queries", q)?;
    let [batch, heads, n, dim] = q.dims();
    let turned = gpu.empty_as(q.dims(), q.dtype())?;
    opts.run_with_prelude(gpu, &turned, k, v, |encoder| {
        // A real row's position is below its sequence's length, which the caches keep within
        // MAX_POSITIONS; padding rows past the limit (and rows before position 0) are clamped
        // by the kernel. Starts are i32 bits: below 0 is "before the first position".
        let q_lens = opts.q_lens.as_deref();
        let starts: Vec<u32> = lens
            .iter()
            .enumerate()
            .map(|(b, &len)| {
                let rows = q_lens.map_or(n as i64, |l| l[b] as i64);
                (len as i64 - rows).max(i32::MIN as i64) as i32 as u32
            })
            .collect();
        let strides = Layout::Bhsd.strides(heads, n, dim);
        let rotation = Rotation {
            x: q.buffer(),
            x_dtype: q.dtype(),
            x_bytes: q.byte_len(),
            x_strides: strides,
            y: &turned,
            y_strides: strides,
            batch,
            heads,
            seq: n,
            dim,
            positions: &starts,
            per_row: false,
            axes: false,
            counts: None,
            rows_at_position: false,
            first: true,
            last: false,
        };
        encode(gpu, encoder, rotary, &rotation)
    })
}

/// One rotation of `x`'s rows `[batch, heads, seq, dim]` (element strides over batch, head
/// and row; the last dim's is 1) into `y`.
pub(crate) struct Rotation<'a> {
    pub(crate) x: &'a wgpu::Buffer,
    /// How `x` holds its elements.
    pub(crate) x_dtype: DType,
    /// The bytes of `x` the rotation reads (a pooled buffer may be larger).
    pub(crate) x_bytes: u64,
    pub(crate) x_strides: [usize; 3],
    pub(crate) y: &'a Tensor,
    pub(crate) y_strides: [usize; 3],
    pub(crate) batch: usize,
    pub(crate) heads: usize,
    pub(crate) seq: usize,
    pub(crate) dim: usize,
    /// One start per batch entry (i32 bits: negative starts turn their first rows as position
    /// 0), or with `per_row` one position per row `[batch, seq]`.
    pub(crate) positions: &'a [u32],
    pub(crate) per_row: bool,
    /// With `per_row`, three positions per row (M-RoPE's `[t, h, w]`).
    pub(crate) axes: bool,
    /// Rows of batch entry `b` written: the first `counts[b]` (all without).
    pub(crate) counts: Option<&'a [u32]>,
    /// Row `i` of batch entry `b` goes to y's row `start[b] + i` (a cache's rows), not `i`.
    pub(crate) rows_at_position: bool,
    /// Whether its pass is the call's first and last (a timing context's start and end
    /// timestamps; only a submission's first pass marked first writes the start).
    pub(crate) first: bool,
    pub(crate) last: bool,
}

/// Records `r` into `encoder`. Call inside [`Gpu::guarded`] (as `submit_with` does).
pub(crate) fn encode(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    rotary: &Rotary,
    r: &Rotation<'_>,
) -> Result<()> {
    let too_large = |what: &'static str, n: usize| Error::TooLarge {
        what,
        requested: n as u64,
        max: u32::MAX as u64,
        hint: "",
    };
    let u = |what: &'static str, n: usize| u32::try_from(n).map_err(|_| too_large(what, n));
    let tokens = r
        .batch
        .checked_mul(r.seq)
        .ok_or(too_large("rotated tokens", usize::MAX))?;
    let mut words = r.positions.to_vec();
    let counts_offset = words.len();
    if let Some(counts) = r.counts {
        words.extend_from_slice(counts);
    }
    let sections = rotary
        .mrope_sections()
        .map_or([0; 3], |(s, _)| s.map(|n| n as u32));
    let [xb, xh, xs] = r.x_strides;
    let [yb, yh, ys] = r.y_strides;
    let params = RotateParams {
        tokens: u("rotated tokens", tokens)?,
        heads: u("heads", r.heads)?,
        seq: u("rows per head", r.seq)?,
        dim: u("head_dim", r.dim)?,
        pairs: (rotary.dim() / 2) as u32,
        interleaved: (rotary.pairing() == RotaryStyle::Interleaved) as u32,
        transposed: rotary.is_transposed() as u32,
        magnitude: rotary.magnitude() as f32,
        per_row: r.per_row as u32,
        axes: r.axes as u32,
        mrope: match rotary.mrope_sections() {
            None => 0,
            Some((_, MropeLayout::Sections)) => 1,
            Some((_, MropeLayout::Interleaved)) => 2,
        },
        section_t: sections[0],
        section_h: sections[1],
        section_w: sections[2],
        rows_at_position: r.rows_at_position as u32,
        has_counts: r.counts.is_some() as u32,
        counts_offset: u("rotary positions", counts_offset)?,
        x_stride_b: u("strides", xb)?,
        x_stride_h: u("strides", xh)?,
        x_stride_s: u("strides", xs)?,
        y_stride_b: u("strides", yb)?,
        y_stride_h: u("strides", yh)?,
        y_stride_s: u("strides", ys)?,
    };
    check_binding(&gpu.limits, "rotated tensor", r.x_bytes)?;
    check_binding(&gpu.limits, "rotation output", r.y.byte_len())?;
    let table_bytes = (LEVELS * ENTRIES) as u64 * rotary.dim() as u64 / 2 * 8;
    check_binding(&gpu.limits, "rotary angle table", table_bytes)?;
    let device = &gpu.device;
    let kernel = gpu.kernels.get(
        device,
        KernelKey::Rotate {
            x: gpu.storage(r.x_dtype),
            y: gpu.storage(r.y.dtype()),
        },
    )?;
    let uniform = uniform_buffer(gpu, &params)?;
    let table = table(gpu, rotary)?;
    let positions = gpu.submission_buffer(
        "wgpu-attention rotary positions",
        bytemuck::cast_slice(&words),
        wgpu::BufferUsages::STORAGE,
    );
    let bind = kernel.bind(device, &[&uniform, r.x, r.y.buffer(), &table, &positions]);
    let size = DispatchSize::linear(
        tokens as u64,
        gpu.limits.max_workgroups_per_dim,
        "rotate dispatch",
    )?;
    let mut pass = gpu.begin_pass(encoder, "wgpu-attention rotate", r.first, r.last);
    kernel.dispatch(&mut pass, &bind, size);
    Ok(())
}

/// The device's angle table for `rotary`'s frequencies, built and uploaded on first use.
fn table(gpu: &Gpu, rotary: &Rotary) -> Result<wgpu::Buffer> {
    let key = rotary.table_key();
    let mut tables = gpu
        .state
        .rotary_tables
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(at) = tables.iter().position(|(k, _)| *k == key) {
        let entry = tables.remove(at);
        let buffer = entry.1.clone();
        tables.push(entry);
        return Ok(buffer);
    }
    let buffer = init_buffer(
        &gpu.device,
        "wgpu-attention rotary table",
        bytemuck::cast_slice(&rotary.table()),
        wgpu::BufferUsages::STORAGE,
    )?;
    tables.push((key, buffer.clone()));
    if tables.len() > KEPT_TABLES {
        tables.remove(0);
    }
    Ok(buffer)
}
