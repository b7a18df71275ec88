//! A key/value cache on the device, for decoding.
//!
//! K and V live in `[batch, kv_heads, capacity, dim]` buffers (layout `Bhsd`) that never leave
//! the device; `append` writes new tokens after each sequence's current length, and `attend`
//! runs new queries against everything cached so far with bottom-right causal alignment per
//! sequence (query `i` of sequence `b`, one of `n` new queries, sees keys
//! `j <= i + len[b] - n`), through the decode path when the queries are few.
//!
//! With a [`Rotary`] ([`KvCache::with_rotary`]) the cache applies RoPE itself, as
//! FlashAttention's `flash_attn_with_kvcache` does with `rotary_cos` / `rotary_sin`: `append`
//! turns each new K row by its place in the cache (row `len[b] + t`, computed from the unrounded
//! input before it is stored in the cache's dtype: on the host in f64 for a few rows, on the
//! device for many, and from tensors), and `attend` turns each query by its
//! position (`len[b] - n + i`, the place of the token it belongs to), so the caller passes K and
//! Q straight from their projections.

use crate::error::{Error, Result};
use crate::gpu::attention::Output;
use crate::gpu::context::Gpu;
use crate::gpu::limits::check_binding;
use crate::gpu::options::DeviceLens;
use crate::gpu::rotary::{self, Rotation};
use crate::gpu::tensor::{Tensor, expect_dims};
use crate::rotary::{MAX_POSITIONS, Positions, Rotary};
use crate::spec::{Attention, Causal, DType, Dims, Layout};
use std::sync::atomic::{AtomicBool, Ordering};

/// Elements a host append turns on the host (`batch * kv_heads * t * rotary_dim`); past this,
/// on the device. On the device a decoding step's append costs a submission: 57 µs of host
/// time per append on lavapipe, against 15 µs turned on the host (11 µs without RoPE).
const HOST_ROTATION_MAX: usize = 16 * 1024;

/// Rows of an append's K (`[batch, kv_heads, t, head_dim]`) to turn into the cache: sequence
/// `b`'s first `counts[b]`, into cache rows (and positions) from `starts[b]`; `first` and
/// `last` say whether this is the call's first and last pass (its timestamps).
struct RowsOf<'a> {
    t: usize,
    starts: &'a [u32],
    counts: &'a [u32],
    first: bool,
    last: bool,
}

/// Device K/V buffers with a capacity and per-sequence lengths.
///
/// ```no_run
/// use wgpu_attention::{Attention, Gpu, KvCache};
/// let gpu = Gpu::new()?;
/// let (batch, kv_heads, heads, dim) = (1, 2, 8, 64);
/// let mut cache = KvCache::new(&gpu, batch, kv_heads, 4096, dim, dim)?;
/// // The prompt: 100 tokens of K and V, [batch, kv_heads, 100, dim].
/// let k = vec![0.1f32; batch * kv_heads * 100 * dim];
/// cache.append(&gpu, &k, &k, &[100])?;
/// // Then one token at a time: append its K/V, attend with its query.
/// let kv1 = vec![0.2f32; batch * kv_heads * dim];
/// cache.append(&gpu, &kv1, &kv1, &[1])?;
/// let q = gpu.upload(&vec![0.3; batch * heads * dim], [batch, heads, 1, dim])?;
/// let out = cache.attend(&gpu, &q, &Attention::new())?;
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Debug)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    batch: usize,
    kv_heads: usize,
    capacity: usize,
    head_dim: usize,
    v_head_dim: usize,
    dtype: DType,
    lens: Vec<u32>,
    /// `lens` on the device, rewritten by each append (the K and V rows go up then anyway), so
    /// that `attend` uploads nothing for them.
    device_lens: DeviceLens,
    /// Set by `clear`, which has no device to write with: the next `attend` writes them.
    device_lens_stale: AtomicBool,
    /// RoPE applied to appended K and attending queries.
    rotary: Option<Rotary>,
}

impl KvCache {
    /// An empty f32 cache of `capacity` tokens per sequence.
    pub fn new(
        gpu: &Gpu,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        v_head_dim: usize,
    ) -> Result<KvCache> {
        KvCache::with_dtype(
            gpu,
            batch,
            kv_heads,
            capacity,
            head_dim,
            v_head_dim,
            DType::F32,
        )
    }

    /// An empty cache storing K and V as `dtype` (bf16 or f16 halve its memory, FP8 E4M3
    /// quarters it); queries of any dtype attend to it. Every row must start on a 4-byte
    /// boundary: even head dims for 16-bit types, multiples of 4 for 8-bit ones.
    pub fn with_dtype(
        gpu: &Gpu,
        batch: usize,
        kv_heads: usize,
        capacity: usize,
        head_dim: usize,
        v_head_dim: usize,
        dtype: DType,
    ) -> Result<KvCache> {
        // Appends write and copy whole 4-byte words.
        let words = |dim: usize| (dim * dtype.size()).is_multiple_of(4);
        if !(words(head_dim) && words(v_head_dim)) {
            return Err(Error::InvalidOption {
                what: "cache head dims",
                value: format!("{head_dim} and {v_head_dim} with {dtype:?}"),
                why: "a cache row must be whole 4-byte words: even head_dim and v_head_dim for \
                      16-bit types, multiples of 4 for 8-bit ones",
            });
        }
        // Validates the sizes as attention would see them.
        Attention::new().validate(Dims {
            batch,
            heads: kv_heads,
            kv_heads,
            q_len: 1,
            kv_len: capacity,
            head_dim,
            v_head_dim,
        })?;
        Ok(KvCache {
            k: gpu.empty_as([batch, kv_heads, capacity, head_dim], dtype)?,
            v: gpu.empty_as([batch, kv_heads, capacity, v_head_dim], dtype)?,
            batch,
            kv_heads,
            capacity,
            head_dim,
            v_head_dim,
            dtype,
            lens: vec![0; batch],
            device_lens: gpu.upload_lens(Some(&vec![0; batch]), None)?,
            device_lens_stale: AtomicBool::new(false),
            rotary: None,
        })
    }

    /// This cache applying `rotary` (RoPE) itself: each appended K row is turned by its row in
    /// the cache, each query of [`attend`](KvCache::attend) by its position (see the module
    /// docs). Pass K and Q unrotated. Set it on an empty cache: rows already cached stay as
    /// they were. M-RoPE is refused ([`Error::InvalidOption`]): its positions are not the
    /// cache's rows.
    ///
    /// ```no_run
    /// use wgpu_attention::{Attention, Gpu, KvCache, Rotary};
    /// let gpu = Gpu::new()?;
    /// let (kv_heads, heads, dim) = (2, 8, 64);
    /// let mut cache = KvCache::new(&gpu, 1, kv_heads, 4096, dim, dim)?
    ///     .with_rotary(Rotary::new(dim, 10_000.0)?)?;
    /// let k = vec![0.1f32; kv_heads * 5 * dim]; // 5 tokens of K and V, as projected
    /// cache.append(&gpu, &k, &k, &[5])?; // K turned to positions 0..5
    /// let q = gpu.upload(&vec![0.3; heads * dim], [1, heads, 1, dim])?;
    /// let out = cache.attend(&gpu, &q, &Attention::new())?; // q turned to position 4
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn with_rotary(mut self, rotary: Rotary) -> Result<KvCache> {
        rotary.fits(self.head_dim)?;
        rotary.fits_cache()?;
        if self.capacity as u64 > MAX_POSITIONS {
            return Err(Error::LengthOutOfRange {
                what: "cache capacity with a rotary embedding",
                index: 0,
                value: self.capacity,
                max: MAX_POSITIONS as usize,
            });
        }
        self.rotary = Some(rotary);
        Ok(self)
    }

    /// The rotary embedding the cache applies, if any.
    pub fn rotary(&self) -> Option<&Rotary> {
        self.rotary.as_ref()
    }

    /// Tokens cached per sequence.
    pub fn lens(&self) -> &[u32] {
        &self.lens
    }

    /// Tokens each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The K buffer, `[batch, kv_heads, capacity, head_dim]`; rows past `lens()` are unspecified.
    pub fn k(&self) -> &Tensor {
        &self.k
    }

    /// The V buffer, `[batch, kv_heads, capacity, v_head_dim]`.
    pub fn v(&self) -> &Tensor {
        &self.v
    }

    /// Empties every sequence (the buffers are kept).
    pub fn clear(&mut self) {
        self.lens.fill(0);
        self.device_lens_stale.store(true, Ordering::Release);
    }

    /// Shortens sequence `b` to its first `lens[b]` tokens (Hugging Face's `crop`,
    /// llama.cpp's `seq_rm`): after speculative decoding, the draft tokens the model rejected.
    /// Nothing is copied; the next append writes after the new length, and with a [`Rotary`]
    /// its K rows are turned by their new positions. A length above a sequence's current one
    /// is [`Error::LengthOutOfRange`], and then nothing changes.
    ///
    /// ```no_run
    /// use wgpu_attention::{Gpu, KvCache};
    /// let gpu = Gpu::new()?;
    /// let (kv_heads, dim) = (2, 64);
    /// let mut cache = KvCache::new(&gpu, 1, kv_heads, 4096, dim, dim)?;
    /// // A prompt of 100 tokens, then 4 draft tokens; the model accepts 2 of them.
    /// let kv = vec![0.1f32; kv_heads * 104 * dim];
    /// cache.append(&gpu, &kv, &kv, &[104])?;
    /// cache.truncate(&[102])?;
    /// assert_eq!(cache.lens(), &[102]);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn truncate(&mut self, lens: &[usize]) -> Result<()> {
        if lens.len() != self.batch {
            return Err(Error::ShapeMismatch {
                what: "truncated lengths".into(),
                got: lens.len(),
                expected: self.batch,
            });
        }
        for (index, (&n, &len)) in lens.iter().zip(&self.lens).enumerate() {
            if n > len as usize {
                return Err(Error::LengthOutOfRange {
                    what: "truncated cache length",
                    index,
                    value: n,
                    max: len as usize,
                });
            }
        }
        for (len, &n) in self.lens.iter_mut().zip(lens) {
            *len = n as u32;
        }
        self.device_lens_stale.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes sequence `b` a copy of sequence `from[b]` (its rows and its length) for every `b`
    /// at once: beam search's reordering of the beams (Hugging Face's `reorder_cache`), where
    /// a beam may be copied into several slots and others dropped. Sequences with
    /// `from[b] == b` are left in place; the others' rows are copied on the device (through
    /// scratch buffers, so any permutation works), one submission in all. An index past the
    /// batch is [`Error::LengthOutOfRange`], and then nothing changes.
    ///
    /// ```no_run
    /// use wgpu_attention::{Gpu, KvCache};
    /// let gpu = Gpu::new()?;
    /// let (beams, kv_heads, dim) = (3, 2, 64);
    /// let mut cache = KvCache::new(&gpu, beams, kv_heads, 4096, dim, dim)?;
    /// let kv = vec![0.1f32; beams * kv_heads * 10 * dim];
    /// cache.append(&gpu, &kv, &kv, &[10, 10, 10])?;
    /// // Beams 0 and 2 survive; beam 0 is continued twice.
    /// cache.reorder(&gpu, &[0, 0, 2])?;
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn reorder(&mut self, gpu: &Gpu, from: &[usize]) -> Result<()> {
        gpu.expect_own("the cache", &self.k)?;
        if from.len() != self.batch {
            return Err(Error::ShapeMismatch {
                what: "reordered sequences".into(),
                got: from.len(),
                expected: self.batch,
            });
        }
        for (index, &f) in from.iter().enumerate() {
            if f >= self.batch {
                return Err(Error::LengthOutOfRange {
                    what: "reordered sequence index",
                    index,
                    value: f,
                    max: self.batch - 1,
                });
            }
        }
        // The sequences copied elsewhere (each once, however many slots take it), and the
        // slots that take a copy. A sequence's rows [0, len) are contiguous per kv head.
        let mut sources: Vec<usize> = from
            .iter()
            .enumerate()
            .filter(|&(b, &f)| f != b && self.lens[f] > 0)
            .map(|(_, &f)| f)
            .collect();
        sources.sort_unstable();
        sources.dedup();
        if !sources.is_empty() {
            let size = self.dtype.size() as u64;
            gpu.guarded("cache reorder", || {
                gpu.submit_with("cache reorder", |encoder| {
                    for (pool, dim) in [(&self.k, self.head_dim), (&self.v, self.v_head_dim)] {
                        // Every source into one scratch buffer first, then every destination
                        // from it: no copy reads a row another copy of the call wrote.
                        let rows = |f: usize| self.lens[f] as u64 * (dim as u64 * size);
                        let mut at = vec![0; self.batch];
                        let mut bytes = 0;
                        for &f in &sources {
                            at[f] = bytes;
                            bytes += rows(f) * self.kv_heads as u64;
                        }
                        let scratch = gpu.scratch(
                            "wgpu-attention cache reorder",
                            bytes,
                            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                        );
                        for &f in &sources {
                            for h in 0..self.kv_heads {
                                let src = self.row_offset(f, h, 0, dim);
                                let to = at[f] + h as u64 * rows(f);
                                encoder.copy_buffer_to_buffer(
                                    pool.buffer(),
                                    src,
                                    &scratch,
                                    to,
                                    rows(f),
                                );
                            }
                        }
                        for (b, &f) in from.iter().enumerate() {
                            if f == b || self.lens[f] == 0 {
                                continue;
                            }
                            for h in 0..self.kv_heads {
                                let dst = self.row_offset(b, h, 0, dim);
                                let from = at[f] + h as u64 * rows(f);
                                encoder.copy_buffer_to_buffer(
                                    &scratch,
                                    from,
                                    pool.buffer(),
                                    dst,
                                    rows(f),
                                );
                            }
                        }
                    }
                    Ok(())
                })
            })?;
        }
        self.lens = from.iter().map(|&f| self.lens[f]).collect();
        // Written now; if the write fails, the next attend writes them.
        self.device_lens_stale.store(true, Ordering::Release);
        self.device_lens.write(gpu, Some(&self.lens), None)?;
        self.device_lens_stale.store(false, Ordering::Release);
        Ok(())
    }

    /// Appends `new[b]` tokens to sequence `b` from host data `k` and `v`, shaped
    /// `[batch, kv_heads, t, head_dim]` and `[batch, kv_heads, t, v_head_dim]` with
    /// `t = max(new)`; rows past `new[b]` of sequence `b` are ignored. Values are rounded to
    /// the cache's dtype.
    pub fn append(&mut self, gpu: &Gpu, k: &[f32], v: &[f32], new: &[usize]) -> Result<()> {
        gpu.expect_own("the cache", &self.k)?;
        let t = self.check_append(new)?;
        for (what, data, dim) in [("K", k, self.head_dim), ("V", v, self.v_head_dim)] {
            // t <= capacity (check_append), so this is within the cache's own size.
            let expected = self.batch * self.kv_heads * t * dim;
            if data.len() != expected {
                return Err(Error::DataLength {
                    what,
                    dims: vec![self.batch, self.kv_heads, t, dim],
                    expected,
                    got: data.len(),
                });
            }
        }
        if let Some(rotary) = &self.rotary {
            if self.batch * self.kv_heads * t * rotary.dim() <= HOST_ROTATION_MAX {
                // A few tokens (a decoding step): turned on the host in f64, then written as
                // usual, which costs no submission.
                let positions = (0..self.batch)
                    .flat_map(|b| (0..t).map(move |i| (b, i)))
                    .map(|(b, i)| (self.lens[b] as u64 + i as u64).min(MAX_POSITIONS - 1) as u32)
                    .collect();
                let turned = crate::cpu::rotate(
                    k,
                    [self.batch, self.kv_heads, t, self.head_dim],
                    Layout::Bhsd,
                    rotary,
                    &Positions::Each(positions),
                )?;
                self.write_rows(gpu, &self.k, &turned, self.head_dim, t, new)?;
                self.write_rows(gpu, &self.v, v, self.v_head_dim, t, new)?;
                self.grow(gpu, new)?;
                return Ok(());
            }
            // K goes up as f32 through staging buffers of the pool, in chunks of rows that fit
            // one binding (f32 rows are larger than a 16- or 8-bit cache's), each turned by
            // the kernel into its rows; V as usual. What can fail is checked before V moves.
            check_binding(&gpu.limits, "cache K", self.k.byte_len())?;
            let row_bytes = (self.batch * self.kv_heads * self.head_dim * 4) as u64;
            let chunk = (gpu.limits.max_storage_binding / row_bytes).min(t as u64) as usize;
            if chunk == 0 {
                return Err(Error::TooLarge {
                    what: "one appended token's K rows in f32",
                    requested: row_bytes,
                    max: gpu.limits.max_storage_binding,
                    hint: " bytes (max_storage_buffer_binding_size)",
                });
            }
            self.write_rows(gpu, &self.v, v, self.v_head_dim, t, new)?;
            gpu.submit_with("cache append", |encoder| {
                let dim = self.head_dim;
                for from in (0..t).step_by(chunk) {
                    let rows = chunk.min(t - from);
                    let part: std::borrow::Cow<[f32]> = if rows == t {
                        k.into()
                    } else {
                        k.chunks(t * dim)
                            .flat_map(|head| &head[from * dim..(from + rows) * dim])
                            .copied()
                            .collect::<Vec<f32>>()
                            .into()
                    };
                    let staged = gpu.submission_buffer(
                        "wgpu-attention appended K",
                        bytemuck::cast_slice(&part),
                        wgpu::BufferUsages::STORAGE,
                    );
                    let starts: Vec<u32> = self.lens.iter().map(|&l| l + from as u32).collect();
                    let counts: Vec<u32> = new
                        .iter()
                        .map(|&n| n.saturating_sub(from).min(rows) as u32)
                        .collect();
                    let rows_of = RowsOf {
                        t: rows,
                        starts: &starts,
                        counts: &counts,
                        first: from == 0,
                        last: from + rows == t,
                    };
                    let staged = (&staged, DType::F32, (part.len() * 4) as u64);
                    self.encode_rotated_k(gpu, encoder, rotary, staged, rows_of)?;
                }
                Ok(())
            })?;
            self.grow(gpu, new)?;
            return Ok(());
        }
        self.write_rows(gpu, &self.k, k, self.head_dim, t, new)?;
        self.write_rows(gpu, &self.v, v, self.v_head_dim, t, new)?;
        self.grow(gpu, new)?;
        Ok(())
    }

    /// Writes host rows `data` (`[batch, kv_heads, t, dim]`) after each sequence's length.
    fn write_rows(
        &self,
        gpu: &Gpu,
        dst: &Tensor,
        data: &[f32],
        dim: usize,
        t: usize,
        new: &[usize],
    ) -> Result<()> {
        gpu.guarded("cache append", || {
            {
                for (b, &n) in new.iter().enumerate() {
                    for h in 0..self.kv_heads {
                        if n == 0 {
                            continue;
                        }
                        let src = &data[((b * self.kv_heads + h) * t) * dim..][..n * dim];
                        let offset = self.row_offset(b, h, self.lens[b] as usize, dim);
                        let bytes = crate::gpu::tensor::encode(src, self.dtype);
                        gpu.queue.write_buffer(dst.buffer(), offset, &bytes);
                    }
                }
            }
            Ok(())
        })
    }

    /// Records the rotation of `k` (`[batch, kv_heads, t, head_dim]`: its buffer, dtype and
    /// bytes) into the cache's K rows `rows` names, turned by those rows' positions.
    fn encode_rotated_k(
        &self,
        gpu: &Gpu,
        encoder: &mut wgpu::CommandEncoder,
        rotary: &Rotary,
        (k, k_dtype, k_bytes): (&wgpu::Buffer, DType, u64),
        rows: RowsOf<'_>,
    ) -> Result<()> {
        let rotation = Rotation {
            x: k,
            x_dtype: k_dtype,
            x_bytes: k_bytes,
            x_strides: Layout::Bhsd.strides(self.kv_heads, rows.t, self.head_dim),
            y: &self.k,
            y_strides: Layout::Bhsd.strides(self.kv_heads, self.capacity, self.head_dim),
            batch: self.batch,
            heads: self.kv_heads,
            seq: rows.t,
            dim: self.head_dim,
            positions: rows.starts,
            per_row: false,
            axes: false,
            counts: Some(rows.counts),
            rows_at_position: true,
            first: rows.first,
            last: rows.last,
        };
        rotary::encode(gpu, encoder, rotary, &rotation)
    }

    /// [`append`](KvCache::append) from tensors already on the device (dims
    /// `[batch, kv_heads, t, dim]`): copied buffer to buffer, never through the host.
    pub fn append_tensors(
        &mut self,
        gpu: &Gpu,
        k: &Tensor,
        v: &Tensor,
        new: &[usize],
    ) -> Result<()> {
        gpu.expect_own("the cache", &self.k)?;
        let t = self.check_append(new)?;
        for (what, tensor, dim) in [("K", k, self.head_dim), ("V", v, self.v_head_dim)] {
            let want = [self.batch, self.kv_heads, t, dim];
            check_appended(gpu, what, tensor, want, (&self.k, &self.v))?;
        }
        gpu.submit_with("cache append", |encoder| {
            let mut copied = vec![(&self.v, v, self.v_head_dim)];
            match &self.rotary {
                Some(rotary) => {
                    let counts: Vec<u32> = new.iter().map(|&n| n as u32).collect();
                    let rows = RowsOf {
                        t,
                        starts: &self.lens,
                        counts: &counts,
                        first: true,
                        last: true,
                    };
                    let k = (k.buffer(), k.dtype(), k.byte_len());
                    self.encode_rotated_k(gpu, encoder, rotary, k, rows)?
                }
                None => copied.push((&self.k, k, self.head_dim)),
            }
            for (dst, src, dim) in copied {
                for (b, &n) in new.iter().enumerate() {
                    for h in 0..self.kv_heads {
                        if n == 0 {
                            continue;
                        }
                        let size = self.dtype.size();
                        let from = (((b * self.kv_heads + h) * t) * dim * size) as u64;
                        let to = self.row_offset(b, h, self.lens[b] as usize, dim);
                        let size = (n * dim * size) as u64;
                        encoder.copy_buffer_to_buffer(src.buffer(), from, dst.buffer(), to, size);
                    }
                }
            }
            Ok(())
        })?;
        self.grow(gpu, new)?;
        Ok(())
    }

    /// Attention of new queries `q` (`[batch, heads, n, head_dim]`, layout `Bhsd`) against the
    /// cache: `kv_lens` are the cached lengths and causal alignment is bottom-right per
    /// sequence unless `opts` sets another. With `q_lens` in `opts`, sequence `b` has
    /// `q_lens[b]` real queries (its last `q_lens[b]` appended tokens).
    pub fn attend(&self, gpu: &Gpu, q: &Tensor, opts: &Attention) -> Result<Output> {
        if opts.kv_lens.is_some() || opts.device.lens.is_some() {
            return Err(Error::InvalidOption {
                what: "kv_lens",
                value: "Some".into(),
                why: "the cache sets kv_lens to its own lengths (give q_lens on the host)",
            });
        }
        if opts.layout != Layout::Bhsd {
            return Err(Error::InvalidOption {
                what: "layout",
                value: format!("{:?}", opts.layout),
                why: "the cache holds K and V in the Bhsd layout",
            });
        }
        // The lengths on the device, unless the call brings per-sequence query lengths, which
        // share their buffer (those calls upload both).
        let mut opts = if opts.q_lens.is_none() {
            // Cleared only once the write is queued: a thread that sees it cleared must not
            // submit before the write (two threads writing the same values is harmless).
            if self.device_lens_stale.load(Ordering::Acquire) {
                self.device_lens.write(gpu, Some(&self.lens), None)?;
                self.device_lens_stale.store(false, Ordering::Release);
            }
            opts.clone().lens_tensor(&self.device_lens)
        } else {
            opts.clone().kv_lens(self.lens.clone())
        };
        if opts.causal.is_none() {
            opts = opts.causal(Causal::BottomRight);
        }
        match &self.rotary {
            Some(rotary) => {
                rotary::attend_rotated(gpu, &opts, (q, &self.k, &self.v), rotary, &self.lens)
            }
            None => opts.run(gpu, q, &self.k, &self.v),
        }
    }

    fn check_append(&self, new: &[usize]) -> Result<usize> {
        if new.len() != self.batch {
            return Err(Error::ShapeMismatch {
                what: "appended lengths".into(),
                got: new.len(),
                expected: self.batch,
            });
        }
        for (index, (&n, &len)) in new.iter().zip(&self.lens).enumerate() {
            match (len as usize).checked_add(n) {
                Some(total) if total <= self.capacity => {}
                total => {
                    return Err(Error::LengthOutOfRange {
                        what: "cache length after append",
                        index,
                        value: total.unwrap_or(usize::MAX),
                        max: self.capacity,
                    });
                }
            }
        }
        let t = new.iter().copied().max().unwrap_or(0);
        if t == 0 {
            return Err(Error::ZeroSize {
                what: "appended tokens",
            });
        }
        Ok(t)
    }

    fn row_offset(&self, b: usize, h: usize, row: usize, dim: usize) -> u64 {
        ((((b * self.kv_heads + h) * self.capacity) + row) * dim * self.dtype.size()) as u64
    }

    /// Adds the appended tokens to the lengths, here and on the device.
    fn grow(&mut self, gpu: &Gpu, new: &[usize]) -> Result<()> {
        for (len, &n) in self.lens.iter_mut().zip(new) {
            *len += n as u32;
        }
        self.device_lens.write(gpu, Some(&self.lens), None)?;
        self.device_lens_stale.store(false, Ordering::Release);
        Ok(())
    }
}

/// Checks a tensor appended to a cache from the device (`what`: "K" or "V"): of this device,
/// of dims `want`, in the cache's dtype (appends copy bytes), not the cache's own K or V
/// `pools` (a buffer cannot be copied into itself), and a copy source.
pub(crate) fn check_appended(
    gpu: &Gpu,
    what: &str,
    tensor: &Tensor,
    want: [usize; 4],
    pools: (&Tensor, &Tensor),
) -> Result<()> {
    let what = format!("appended {what}");
    gpu.expect_own(&what, tensor)?;
    expect_dims(&what, tensor.dims(), want)?;
    if tensor.buffer() == pools.0.buffer() || tensor.buffer() == pools.1.buffer() {
        return Err(Error::InvalidOption {
            what: "appended tensor",
            value: "the cache's own buffer".into(),
            why: "a buffer cannot be copied into itself; append from another tensor",
        });
    }
    if tensor.dtype() != pools.0.dtype() {
        return Err(Error::InvalidOption {
            what: "appended tensor dtype",
            value: format!("{:?}", tensor.dtype()),
            why: "device appends copy bytes: the tensor must have the cache's dtype",
        });
    }
    if !tensor
        .buffer()
        .usage()
        .contains(wgpu::BufferUsages::COPY_SRC)
    {
        return Err(Error::BufferUsage {
            what: "appended tensor",
            needed: "COPY_SRC",
        });
    }
    Ok(())
}
