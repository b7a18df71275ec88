//! What an attention call computes: shapes, layout and options, validated once for every backend.
//!
//! [`Attention`] is the options builder; [`Dims`] the seven sizes of a problem. The CPU reference
//! and the GPU paths both start from [`Attention::validate`], so a bad input gets the same typed
//! [`Error`] whichever path it was sent to, before any work is done.

use crate::error::{Error, Result};

/// Scores (after scale, softcap and bias) below this are raised to it, on every path: a bias of
/// `f32::MIN` (PyTorch's `finfo.min` mask idiom) then gives a row of equal weights, as in exact
/// arithmetic, instead of an empty or NaN row.
pub const SCORE_FLOOR: f32 = -1.0e38;

/// The largest scale magnitude [`Attention::scale`] accepts.
///
/// Scores are f32 and the GPU kernels multiply Q by `scale * log2(e)` before the dot product,
/// so a huge scale overflows to infinity (and the softmax to NaN) however ordinary Q and K are:
/// `scale(f32::MAX)` did, before this bound. Within it, the outputs are finite whenever every
/// score `|scale| * sum_d |q_id k_jd|` stays below `1e38` (for example `|q|, |k| <= 1e13` at
/// `head_dim` 576 and the largest scale); larger scores are outside the contract.
pub const MAX_SCALE: f32 = 1.0e6;

/// The largest ALiBi slope magnitude [`Attention::alibi`] accepts: with key distances below
/// 2^32 the bias stays far inside f32 (at most about 4e15).
pub const MAX_ALIBI_SLOPE: f32 = 1.0e6;

/// The largest `head_dim` (Q and K) the kernels support: 576, DeepSeek's MLA shape.
pub const MAX_HEAD_DIM: usize = 576;

/// The largest `v_head_dim` (V and O) the kernels support: 512 (Gemma-class models; MLA's V).
pub const MAX_V_HEAD_DIM: usize = 512;

/// How the four dims of Q, K, V and O are ordered in memory (row-major, contiguous).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Layout {
    /// `[batch, heads, seq, head_dim]`: PyTorch's `scaled_dot_product_attention` layout.
    #[default]
    Bhsd,
    /// `[batch, seq, heads, head_dim]`: FlashAttention's and JAX's layout.
    Bshd,
}

impl Layout {
    /// The physical dims of a tensor with `heads` heads of `seq` rows of width `dim`.
    pub fn dims(self, batch: usize, heads: usize, seq: usize, dim: usize) -> [usize; 4] {
        match self {
            Layout::Bhsd => [batch, heads, seq, dim],
            Layout::Bshd => [batch, seq, heads, dim],
        }
    }

    /// Splits physical dims into `(batch, heads, seq, dim)`.
    pub fn split(self, dims: [usize; 4]) -> (usize, usize, usize, usize) {
        match self {
            Layout::Bhsd => (dims[0], dims[1], dims[2], dims[3]),
            Layout::Bshd => (dims[0], dims[2], dims[1], dims[3]),
        }
    }

    /// Element strides `(batch, head, seq)` of a tensor in this layout; the last dim has stride 1.
    pub fn strides(self, heads: usize, seq: usize, dim: usize) -> [usize; 3] {
        match self {
            Layout::Bhsd => [heads * seq * dim, seq * dim, dim],
            Layout::Bshd => [seq * heads * dim, dim, heads * dim],
        }
    }
}

/// Where the causal diagonal sits when `q_len != kv_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Causal {
    /// Query `i` sees keys `j <= i` (PyTorch's `is_causal=True`).
    TopLeft,
    /// Query `i` sees keys `j <= i + kv_len - q_len`: the last query sees every key
    /// (FlashAttention's convention, and what decoding against a KV cache needs).
    BottomRight,
}

/// The seven sizes of an attention problem, independent of layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dims {
    /// Batch size.
    pub batch: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads % kv_heads == 0` (grouped-query attention; 1 is multi-query).
    pub kv_heads: usize,
    /// Query rows per head.
    pub q_len: usize,
    /// Key/value rows per head.
    pub kv_len: usize,
    /// Width of Q and K rows.
    pub head_dim: usize,
    /// Width of V and O rows.
    pub v_head_dim: usize,
}

impl Dims {
    /// Self-attention dims: `kv_heads == heads`, `kv_len == q_len`, `v_head_dim == head_dim`.
    pub fn new(batch: usize, heads: usize, seq: usize, head_dim: usize) -> Dims {
        Dims {
            batch,
            heads,
            kv_heads: heads,
            q_len: seq,
            kv_len: seq,
            head_dim,
            v_head_dim: head_dim,
        }
    }

    /// Reads the dims from the physical shapes of Q, K and V, checking that they agree.
    pub fn from_shapes(
        layout: Layout,
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
    ) -> Result<Dims> {
        let (batch, heads, q_len, head_dim) = layout.split(q);
        let (kb, kv_heads, kv_len, kd) = layout.split(k);
        let (vb, vh, vs, v_head_dim) = layout.split(v);
        let check = |what: &str, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(Error::ShapeMismatch {
                    what: what.to_string(),
                    got,
                    expected,
                })
            }
        };
        check("K batch", kb, batch)?;
        check("V batch", vb, batch)?;
        check("K head_dim", kd, head_dim)?;
        check("V heads", vh, kv_heads)?;
        check("V seq len", vs, kv_len)?;
        Ok(Dims {
            batch,
            heads,
            kv_heads,
            q_len,
            kv_len,
            head_dim,
            v_head_dim,
        })
    }

    /// Physical shape of Q in `layout`.
    pub fn q_shape(&self, layout: Layout) -> [usize; 4] {
        layout.dims(self.batch, self.heads, self.q_len, self.head_dim)
    }
    /// Physical shape of K in `layout`.
    pub fn k_shape(&self, layout: Layout) -> [usize; 4] {
        layout.dims(self.batch, self.kv_heads, self.kv_len, self.head_dim)
    }
    /// Physical shape of V in `layout`.
    pub fn v_shape(&self, layout: Layout) -> [usize; 4] {
        layout.dims(self.batch, self.kv_heads, self.kv_len, self.v_head_dim)
    }
    /// Physical shape of O in `layout`.
    pub fn o_shape(&self, layout: Layout) -> [usize; 4] {
        layout.dims(self.batch, self.heads, self.q_len, self.v_head_dim)
    }
    /// Elements of Q.
    pub fn q_elems(&self) -> usize {
        self.batch * self.heads * self.q_len * self.head_dim
    }
    /// Elements of K.
    pub fn k_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.head_dim
    }
    /// Elements of V.
    pub fn v_elems(&self) -> usize {
        self.batch * self.kv_heads * self.kv_len * self.v_head_dim
    }
    /// Elements of O.
    pub fn o_elems(&self) -> usize {
        self.batch * self.heads * self.q_len * self.v_head_dim
    }
    /// Elements of the log-sum-exp output `[batch, heads, q_len]`.
    pub fn lse_elems(&self) -> usize {
        self.batch * self.heads * self.q_len
    }
    /// Elements of the weights output `[batch, heads, q_len, kv_len]`.
    pub fn weights_elems(&self) -> usize {
        self.batch * self.heads * self.q_len * self.kv_len
    }
    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
    /// `[batch, heads, q_len, kv_len]`, the shape masks and biases broadcast to.
    pub fn score_shape(&self) -> [usize; 4] {
        [self.batch, self.heads, self.q_len, self.kv_len]
    }

    /// FLOPs by the convention of DESIGN.md: two products of `2 * q_len * kv_len` multiply-adds
    /// per head (`head_dim` for QK^T, `v_head_dim` for PV), halved for causal self-attention.
    pub fn flops(&self, causal: bool) -> f64 {
        let per_row = 2.0 * self.kv_len as f64 * (self.head_dim + self.v_head_dim) as f64;
        let full = self.batch as f64 * self.heads as f64 * self.q_len as f64 * per_row;
        if causal && self.q_len == self.kv_len {
            full / 2.0
        } else {
            full
        }
    }

    /// Checks the sizes; a packed batch (`Some((total_q, total_k))` rows, see
    /// [`Attention::varlen`]) counts the elements of its packed tensors, not padded ones.
    fn validate_packed(&self, packed: Option<(usize, usize)>) -> Result<()> {
        for (what, value) in [
            ("batch", self.batch),
            ("heads", self.heads),
            ("kv_heads", self.kv_heads),
            ("q_len", self.q_len),
            ("kv_len", self.kv_len),
            ("head_dim", self.head_dim),
            ("v_head_dim", self.v_head_dim),
        ] {
            if value == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::HeadsNotDivisible {
                heads: self.heads,
                kv_heads: self.kv_heads,
            });
        }
        for (what, got, max) in [
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("v_head_dim", self.v_head_dim, MAX_V_HEAD_DIM),
        ] {
            if got > max {
                return Err(Error::HeadDimTooLarge { what, got, max });
            }
        }
        // Indices are u32 in the kernels; keep every tensor addressable. Counted with checked
        // arithmetic: the `*_elems` helpers are only safe to call once this has passed.
        let count = |dims: [usize; 4]| {
            dims.iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
                .unwrap_or(u64::MAX)
        };
        let (b, h, hkv) = (self.batch, self.heads, self.kv_heads);
        let (l, s) = (self.q_len, self.kv_len);
        // The log-sum-exp stays padded, packed or not.
        let lse = count([b, h, l, 1]);
        // Packed: one "batch" of every sequence's rows.
        let (b, l, s) = match packed {
            Some((tq, tk)) => (1, tq, tk),
            None => (b, l, s),
        };
        for (what, elems) in [
            ("Q", count([b, h, l, self.head_dim])),
            ("K", count([b, hkv, s, self.head_dim])),
            ("V", count([b, hkv, s, self.v_head_dim])),
            ("O", count([b, h, l, self.v_head_dim])),
            ("log-sum-exp", lse),
        ] {
            if elems > u32::MAX as u64 {
                return Err(Error::TooLarge {
                    what,
                    requested: elems,
                    max: u32::MAX as u64,
                    hint: " elements; indices are 32-bit",
                });
            }
        }
        Ok(())
    }
}

/// A boolean mask broadcastable to `[batch, heads, q_len, kv_len]`; `true` means attend
/// (PyTorch's convention for boolean `attn_mask`).
#[derive(Debug, Clone, PartialEq)]
pub struct BoolMask {
    /// Shape; each dim is 1 (broadcast) or the full size.
    pub shape: [usize; 4],
    /// Row-major values.
    pub data: Vec<bool>,
}

/// An additive float bias broadcastable to `[batch, heads, q_len, kv_len]`, added to the scores
/// after scaling and softcap. Values must be finite: remove keys with a [`BoolMask`] instead of
/// a `-inf` bias.
#[derive(Debug, Clone, PartialEq)]
pub struct Bias {
    /// Shape; each dim is 1 (broadcast) or the full size.
    pub shape: [usize; 4],
    /// Row-major values.
    pub data: Vec<f32>,
}

/// Dropout on the attention weights, as PyTorch's `scaled_dot_product_attention(dropout_p=p)`
/// and FlashAttention's `dropout_p` apply it in training: after the softmax, each weight
/// `p_ij` is kept with probability `1 - p` and scaled by `1 / (1 - p)`, or dropped (zero). The
/// log-sum-exp is the softmax's, before dropout, and so are the row sums it normalises by.
///
/// Which weights are dropped is a pure function of `seed` and the element's place
/// `(b, h, i, j)` in the call (batch entry `b`, query head `h`, query row `i` of its sequence,
/// key `j`):
/// [`keeps`](Dropout::keeps) says it, and every path (the CPU reference, the three GPU paths and the
/// backward) computes the same bits. So a forward and its backward drop the same weights when
/// given the same options, and a test can check the GPU element by element against the f64
/// reference. The generator is a counter-based hash (two 32-bit words of state per row from
/// the seed, the head and the row; two rounds of Wellons' `lowbias32` integer hash per key), not
/// PyTorch's Philox: the same seed drops different weights here than in PyTorch.
///
/// The place counts within one call. Two calls with the same seed drop the same places: a
/// computation split over calls (keys split and merged by [`gpu::merge`](crate::gpu::merge),
/// a prompt fed to a [`KvCache`](crate::KvCache) in chunks, the sequences of a
/// [`PagedKvCache`](crate::PagedKvCache) call, numbered by their place in it) repeats its
/// pattern from call to call, which a single call would not: give each call its own seed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// The probability of dropping a weight, `0 ..= 1` (1 drops every weight: O is zero).
    pub p: f32,
    /// The seed; a training loop gives every step (and every layer) its own.
    pub seed: u64,
}

/// One round of Chris Wellons' `lowbias32` integer hash (hash-prospector): a bijection of u32
/// whose output bits each flip with probability close to 1/2 for any flipped input bit. The
/// WGSL twin is `mix32` in `shaders/lib/masking.wgsl`: change one, change the other.
pub(crate) const fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

impl Dropout {
    /// Whether the weight of query head `h`, row `i`, key `j` of batch entry `b` is kept, in a
    /// call of `dims` (`i` and `j` count within the sequence, also in a packed batch).
    ///
    /// ```
    /// use wgpu_attention::{Dims, Dropout};
    /// let dims = Dims::new(1, 2, 64, 8);
    /// let d = Dropout { p: 0.25, seed: 7 };
    /// let kept = (0..64 * 64).filter(|&n| d.keeps(dims, 0, 1, n / 64, n % 64)).count();
    /// assert!((2900..3250).contains(&kept)); // about 75% of 4096
    /// ```
    pub fn keeps(&self, dims: Dims, b: usize, h: usize, i: usize, j: usize) -> bool {
        if self.p >= 1.0 {
            return false;
        }
        let bh = (b * dims.heads + h) as u32;
        let row = self.row(bh, i as u32);
        Dropout::bits(row, j as u32) >= self.threshold()
    }

    /// The factor a kept weight is multiplied by: `1 / (1 - p)`, and 0 for `p = 1` (nothing is
    /// kept).
    pub fn scale(&self) -> f32 {
        if self.p >= 1.0 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }

    /// Whether it drops anything (`p > 0`); the kernels compile it in only then.
    pub(crate) fn active(&self) -> bool {
        self.p > 0.0
    }

    /// The two words of the call's key, from the seed: what the kernels read from their
    /// uniforms.
    pub(crate) fn keys(&self) -> [u32; 2] {
        let a = mix32(self.seed as u32 ^ 0x9e37_79b9);
        let b = mix32((self.seed >> 32) as u32 ^ mix32(a ^ 0x85eb_ca6b));
        [a, b]
    }

    /// A weight is kept where its 32 random bits are at least this: `round(p * 2^32)`, at most
    /// `u32::MAX`. The kernels then keep one weight in 2^32 at `p = 1` and multiply it by its
    /// scale of 0; [`keeps`](Dropout::keeps) says `false` for every weight there.
    pub(crate) fn threshold(&self) -> u32 {
        (self.p as f64 * 4_294_967_296.0)
            .round()
            .min(u32::MAX as f64) as u32
    }

    /// The state of row `i` of head `bh` (`b * heads + h`): two words made apart, so two rows
    /// share their bits only if both words collide.
    pub(crate) fn row(&self, bh: u32, i: u32) -> [u32; 2] {
        let [ka, kb] = self.keys();
        [
            mix32(mix32(bh ^ ka).wrapping_add(i)),
            mix32(mix32(bh ^ kb) ^ mix32(i.wrapping_add(kb))),
        ]
    }

    /// The 32 random bits of key `j` in a row of state `row`: the kernels keep the weight
    /// where they reach [`threshold`](Dropout::threshold).
    pub(crate) fn bits(row: [u32; 2], j: u32) -> u32 {
        mix32(mix32(j ^ row[0]).wrapping_add(row[1]))
    }
}

/// The product of `dims` with checked arithmetic: [`Error::TooLarge`] naming `what` where it
/// overflows `usize`. Every count of elements computed from a user's sizes goes through it.
pub(crate) fn checked_elements(what: &'static str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(Error::TooLarge {
            what,
            requested: u64::MAX,
            max: usize::MAX as u64,
            hint: " elements (the sizes overflow)",
        })
}

/// Element strides of a broadcast `[b, h, i, j]` tensor: 0 where the dim is broadcast.
pub(crate) fn broadcast_strides(shape: [usize; 4]) -> [usize; 4] {
    let mut strides = [0; 4];
    let mut step = 1;
    for d in (0..4).rev() {
        strides[d] = if shape[d] == 1 { 0 } else { step };
        step *= shape[d];
    }
    strides
}

/// The options of one attention call; `Attention::new()` is plain `softmax(QK^T / sqrt(d)) V`.
///
/// The builder is backend-neutral: [`Attention::run`](crate::Attention::run) runs it on a
/// [`Gpu`](crate::Gpu), [`cpu::reference`](crate::cpu::reference) on the CPU. The GPU entry
/// points (`plan`, `plan_for_limits`, `run`, `run_into`) are in `src/gpu/attention.rs`; they
/// start from [`Attention::validate`], as the CPU paths do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Attention {
    pub(crate) layout: Layout,
    pub(crate) scale: Option<f32>,
    pub(crate) causal: Option<Causal>,
    pub(crate) softcap: Option<f32>,
    pub(crate) mask: Option<BoolMask>,
    pub(crate) bias: Option<Bias>,
    pub(crate) kv_lens: Option<Vec<u32>>,
    pub(crate) q_lens: Option<Vec<u32>>,
    pub(crate) window: Option<(usize, usize)>,
    pub(crate) window_align: Option<Causal>,
    pub(crate) want_lse: bool,
    pub(crate) want_weights: bool,
    pub(crate) path: Path,
    pub(crate) additive: Option<Vec<f32>>,
    /// ALiBi slopes, `[heads]` or `[batch, heads]`.
    pub(crate) alibi: Option<Vec<f32>>,
    /// Learnable sink logits, `[heads]`.
    pub(crate) sinks: Option<Vec<f32>>,
    /// The first keys every row keeps beside its sliding window (StreamingLLM).
    pub(crate) sink_keys: usize,
    /// K and V read through a block table from pools of pages (vLLM's layout).
    pub(crate) pages: Option<BlockTable>,
    /// Packed variable-length sequences: `cu_seqlens_q`, `cu_seqlens_k`.
    pub(crate) varlen: Option<(Vec<u32>, Vec<u32>)>,
    /// Masking options that live on the device (`gpu::options`).
    pub(crate) device: DeviceOptions,
    /// The GPU backward also gives the bias's and the sinks' gradients.
    pub(crate) want_bias_grad: bool,
    pub(crate) want_sinks_grad: bool,
    /// Dropout on the weights (training).
    pub(crate) dropout: Option<Dropout>,
    /// The factors K and V are stored divided by (`kv_scales`).
    pub(crate) kv_scales: Option<(f32, f32)>,
    /// The user's mask and score mods.
    pub(crate) score_mod: Option<crate::ScoreMod>,
}

/// The device-resident forms of the masking options (each replaces its host form).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct DeviceOptions {
    pub(crate) bias: Option<crate::Tensor>,
    pub(crate) mask: Option<crate::gpu::DeviceMask>,
    pub(crate) lens: Option<crate::gpu::DeviceLens>,
}

impl DeviceOptions {
    /// Whether any option is on the device (the CPU paths cannot read it).
    pub(crate) fn any(&self) -> bool {
        self.bias.is_some() || self.mask.is_some() || self.lens.is_some()
    }
}

/// Where each sequence's keys live in a paged K/V pool: [`Attention::paged`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTable {
    /// Keys per page.
    pub page_size: usize,
    /// `[batch, pages_per_seq]`, row-major: the pool pages holding keys
    /// `p * page_size .. (p + 1) * page_size` of each sequence, in order.
    pub table: Vec<u32>,
}

impl BlockTable {
    /// Pages per sequence in the table, for a call with `batch` sequences.
    pub fn pages_per_seq(&self, batch: usize) -> usize {
        self.table.len() / batch.max(1)
    }

    /// The pool row (`page * page_size + offset`) of key `j` of sequence `b`.
    pub fn slot(&self, batch: usize, b: usize, j: usize) -> usize {
        let page = self.table[b * self.pages_per_seq(batch) + j / self.page_size] as usize;
        page * self.page_size + j % self.page_size
    }

    /// Checks every entry against a pool of `pages` pages.
    pub(crate) fn check_pool(&self, pages: usize) -> Result<()> {
        match self
            .table
            .iter()
            .enumerate()
            .find(|(_, p)| **p as usize >= pages)
        {
            Some((index, &value)) => Err(Error::LengthOutOfRange {
                what: "block table entry (a page of the pool)",
                index,
                value: value as usize,
                max: pages.saturating_sub(1),
            }),
            None => Ok(()),
        }
    }

    /// K and V pools of a call with `dims` in host memory, checked and copied into
    /// contiguous tensors in `layout` (what the CPU paths read).
    pub(crate) fn unpage<T: Copy + Default>(
        &self,
        k: &[T],
        v: &[T],
        dims: Dims,
        layout: Layout,
    ) -> Result<(Vec<T>, Vec<T>)> {
        let row = checked_elements("K pool", &[self.page_size, dims.kv_heads])?;
        let k_page = checked_elements("K pool", &[row, dims.head_dim])?;
        let pages = k.len() / k_page.max(1);
        let pool = |what, width: usize, got: usize| -> Result<()> {
            let expected = checked_elements(what, &[pages.max(1), row, width])?;
            if got == expected {
                Ok(())
            } else {
                Err(Error::DataLength {
                    what,
                    dims: vec![pages.max(1), self.page_size, dims.kv_heads, width],
                    expected,
                    got,
                })
            }
        };
        pool("K pool", dims.head_dim, k.len())?;
        pool("V pool", dims.v_head_dim, v.len())?;
        self.check_pool(pages)?;
        Ok((
            self.gather(k, dims, dims.head_dim, layout),
            self.gather(v, dims, dims.v_head_dim, layout),
        ))
    }

    /// Copies the keys (or values) of a paged pool, `[pages, page_size, kv_heads, width]`,
    /// into a contiguous tensor of `dims`' K shape (or V's, with `width = v_head_dim`) in
    /// `layout`: what the CPU paths read.
    pub(crate) fn gather<T: Copy + Default>(
        &self,
        pool: &[T],
        dims: Dims,
        width: usize,
        layout: Layout,
    ) -> Vec<T> {
        let (b_n, h_n, s_n) = (dims.batch, dims.kv_heads, dims.kv_len);
        let st = layout.strides(h_n, s_n, width);
        let mut out = vec![T::default(); b_n * h_n * s_n * width];
        for b in 0..b_n {
            for j in 0..s_n {
                let row = self.slot(b_n, b, j);
                for h in 0..h_n {
                    let src = (row * h_n + h) * width;
                    let dst = b * st[0] + h * st[1] + j * st[2];
                    out[dst..dst + width].copy_from_slice(&pool[src..src + width]);
                }
            }
        }
        out
    }
}

/// A packed tensor of `heads` heads of rows of `width` (`[1, total, heads, width]` in `Bshd`,
/// `[1, heads, total, width]` in `Bhsd`) between its padded form of `len` rows per sequence,
/// `cu` the sequences' row offsets: what the CPU paths do with packed batches.
pub(crate) struct Packing<'a> {
    pub(crate) cu: &'a [u32],
    pub(crate) heads: usize,
    pub(crate) width: usize,
    pub(crate) len: usize,
    pub(crate) layout: Layout,
}

impl Packing<'_> {
    fn total(&self) -> usize {
        self.cu.last().copied().unwrap_or(0) as usize
    }

    /// The element offsets (packed, padded) of every row of every sequence, `width` each.
    fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let total = self.total();
        let padded = self.layout.strides(self.heads, self.len, self.width);
        let packed = self.layout.strides(self.heads, total, self.width);
        (0..self.cu.len().saturating_sub(1)).flat_map(move |b| {
            let (start, end) = (self.cu[b] as usize, self.cu[b + 1] as usize);
            (0..self.heads).flat_map(move |h| {
                (start..end).map(move |t| {
                    (
                        h * packed[1] + t * packed[2],
                        b * padded[0] + h * padded[1] + (t - start) * padded[2],
                    )
                })
            })
        })
    }

    /// The packed `x` (checked to hold every packed row) as padded rows, zero past each
    /// sequence.
    pub(crate) fn pad<T: Copy + Default>(&self, what: &'static str, x: &[T]) -> Result<Vec<T>> {
        let expected = checked_elements(what, &[self.total(), self.heads, self.width])?;
        if x.len() != expected {
            return Err(Error::DataLength {
                what,
                dims: vec![1, self.total(), self.heads, self.width],
                expected,
                got: x.len(),
            });
        }
        let b = self.cu.len().saturating_sub(1);
        let mut out = vec![T::default(); b * self.heads * self.len * self.width];
        for (src, dst) in self.rows() {
            out[dst..dst + self.width].copy_from_slice(&x[src..src + self.width]);
        }
        Ok(out)
    }

    /// The padded `x` packed again.
    pub(crate) fn pack<T: Copy + Default>(&self, x: &[T]) -> Vec<T> {
        let mut out = vec![T::default(); self.total() * self.heads * self.width];
        for (dst, src) in self.rows() {
            out[dst..dst + self.width].copy_from_slice(&x[src..src + self.width]);
        }
        out
    }
}

impl Attention {
    /// For the CPU paths: a packed call's Q, K and V padded, and the options with the
    /// lengths instead of the offsets (the [`Packing`] of Q and O first).
    #[allow(clippy::type_complexity)]
    pub(crate) fn unpack<'a, T: Copy + Default>(
        &'a self,
        (q, k, v): (&[T], &[T], &[T]),
        dims: Dims,
    ) -> Result<Option<(Packing<'a>, [Vec<T>; 3], Attention)>> {
        let (Some([pq, pk, pv, po]), Some((kv_lens, q_lens))) =
            (self.packings(dims), self.varlen_lens())
        else {
            return Ok(None);
        };
        let q = pq.pad("packed Q", q)?;
        let k = pk.pad("packed K", k)?;
        let v = pv.pad("packed V", v)?;
        let flat = Attention {
            varlen: None,
            ..self.clone()
        }
        .kv_lens(kv_lens)
        .q_lens(q_lens);
        Ok(Some((po, [q, k, v], flat)))
    }

    /// A packed call's [`Packing`]s of Q, K, V and O (O's also dO's), or `None` for a call
    /// that is not packed.
    pub(crate) fn packings(&self, dims: Dims) -> Option<[Packing<'_>; 4]> {
        let (cq, ck) = self.varlen.as_ref()?;
        let packing = |cu, heads, width, len| Packing {
            cu,
            heads,
            width,
            len,
            layout: self.layout,
        };
        Some([
            packing(cq, dims.heads, dims.head_dim, dims.q_len),
            packing(ck, dims.kv_heads, dims.head_dim, dims.kv_len),
            packing(ck, dims.kv_heads, dims.v_head_dim, dims.kv_len),
            packing(cq, dims.heads, dims.v_head_dim, dims.q_len),
        ])
    }
}

/// Which GPU path runs a call. [`Path::Auto`] chooses; the others force one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Path {
    /// Three-pass when the weights are asked for (or additive scores), decode for up to 16 rows
    /// per kv head (`group * q_len`) over any number of keys and up to 64 over 1024 keys or
    /// more, fused otherwise.
    #[default]
    Auto,
    /// QK^T, masked softmax and P·V as three kernels, with the scores materialised
    /// (memory grows with `q_len * kv_len`; the only path that returns the weights).
    ThreePass,
    /// One fused kernel with online softmax (flash attention): O(N) memory.
    Fused,
    /// Fused attention shaped for decoding: the query heads of a GQA group packed into one
    /// workgroup (for up to 16 rows per kv head, a kernel that spreads each key tile over the
    /// invocations; past that, the fused kernel), the keys split across workgroups and the
    /// partial results merged by their log-sum-exp (flash-decoding): for a few queries over
    /// many keys.
    Decode,
}

impl Attention {
    /// Default options: layout `Bhsd`, scale `1/sqrt(head_dim)`, no mask, only O returned.
    pub fn new() -> Attention {
        Attention::default()
    }

    /// Memory layout of Q, K, V and O.
    pub fn layout(mut self, layout: Layout) -> Self {
        self.layout = layout;
        self
    }

    /// Multiplies `QK^T` by `scale` instead of `1/sqrt(head_dim)`; `scale(1.0)` is Luong's
    /// unscaled dot-product attention. The scale does not apply to
    /// [`additive`](Attention::additive) scores. Finite scales of magnitude up to
    /// [`MAX_SCALE`] are accepted; others are [`Error::InvalidOption`] when the call is
    /// validated.
    pub fn scale(mut self, scale: f32) -> Self {
        self.scale = Some(scale);
        self
    }

    /// Additive (Bahdanau) scores instead of dot products, in the convention of Keras'
    /// `AdditiveAttention`: `s_ij = sum_d w[d] * tanh(q_id + k_jd)`, with Q and K already
    /// projected and `w` of length `head_dim`. The [`scale`](Attention::scale) is not applied;
    /// softcap, bias, masks, causal masking, the window and the lengths apply as they do to
    /// dot-product scores. Only the three-pass path computes additive scores: [`Path::Auto`]
    /// chooses it, and forcing [`Path::Fused`] or [`Path::Decode`] is an error.
    pub fn additive(mut self, w: Vec<f32>) -> Self {
        self.additive = Some(w);
        self
    }

    /// Causal masking with the given alignment of the diagonal. With `kv_lens` / `q_lens`,
    /// bottom-right alignment uses each sequence's own lengths: query `i` of sequence `b` sees
    /// keys `j <= i + kv_lens[b] - q_lens[b]`.
    pub fn causal(mut self, causal: Causal) -> Self {
        self.causal = Some(causal);
        self
    }

    /// Caps scores smoothly: `s = cap * tanh(s / cap)` (Gemma 2, Grok); `cap > 0`.
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Dropout on the attention weights with probability `p` (`0 ..= 1`), its pattern drawn
    /// from `seed` ([`Dropout`]): PyTorch's `dropout_p`, for training. Every path applies it,
    /// forward and backward, and so do the CPU paths, bit for bit the same pattern. The
    /// returned weights
    /// ([`return_weights`](Attention::return_weights)) are the dropped and rescaled ones, as
    /// PyTorch's `MultiheadAttention` returns them; the log-sum-exp is the softmax's. `p = 0`
    /// is no dropout at all. Give every training step its own seed, and its backward the same
    /// options as its forward.
    ///
    /// ```
    /// use wgpu_attention::{Attention, Dims, cpu};
    /// let dims = Dims::new(1, 2, 16, 8);
    /// let x: Vec<f32> = (0..dims.q_elems()).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let plain = cpu::reference(&x, &x, &x, dims, &Attention::new().return_weights(true))?;
    /// let opts = Attention::new().dropout(0.5, 42).return_weights(true);
    /// let dropped = cpu::reference(&x, &x, &x, dims, &opts)?;
    /// // Each weight is either dropped or doubled.
    /// for (w, p) in dropped.weights.iter().zip(&plain.weights) {
    ///     assert!(*w == 0.0 || (w - 2.0 * p).abs() < 1e-6);
    /// }
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn dropout(mut self, p: f32, seed: u64) -> Self {
        self.dropout = Some(Dropout { p, seed });
        self
    }

    /// K and V as stored, times `k_scale` and `v_scale`: the keys and values attended to are
    /// `k_scale * K` and `v_scale * V`. For 8-bit caches ([`DType::F8E4M3`], largest value
    /// 448) whose values were divided by a scale to fit, as vLLM's `k_scale` / `v_scale` and
    /// FlashAttention 3's `descale_k` / `descale_v`; any dtype takes them. `k_scale` joins the
    /// score scale (a `scale(s)` with `k_scale` is the scale `s * k_scale`), `v_scale`
    /// multiplies O; both finite and positive. Dot-product scores only (additive scores are an
    /// error), and the backward takes `v_scale` 1 only (its gradients are by K and V as
    /// stored; with `k_scale` that is what it gives).
    ///
    /// ```
    /// use wgpu_attention::{Attention, Dims, cpu};
    /// let dims = Dims::new(1, 1, 4, 8);
    /// let q: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    /// let kv: Vec<f32> = (0..32).map(|i| (i as f32 * 0.11).cos() * 1000.0).collect();
    /// // Stored divided by 4, attended to as they were.
    /// let stored: Vec<f32> = kv.iter().map(|x| x / 4.0).collect();
    /// let a = cpu::reference(&q, &kv, &kv, dims, &Attention::new())?;
    /// let b = cpu::reference(&q, &stored, &stored, dims, &Attention::new().kv_scales(4.0, 4.0))?;
    /// for (x, y) in a.o.iter().zip(&b.o) {
    ///     assert!((x - y).abs() <= 1e-4 * x.abs().max(1.0));
    /// }
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn kv_scales(mut self, k_scale: f32, v_scale: f32) -> Self {
        self.kv_scales = Some((k_scale, v_scale));
        self
    }

    /// A mask and score modification of the user's own, in WGSL for the GPU and as closures
    /// for the CPU paths: PyTorch's FlexAttention `mask_mod` and `score_mod`
    /// ([`ScoreMod`](crate::ScoreMod), whose docs say where it acts and what its WGSL may
    /// call). Every path takes it, forward and backward (which needs the score mod's
    /// derivative).
    ///
    /// ```
    /// use wgpu_attention::{Attention, Dims, ScoreMod, cpu};
    /// // A prefix-LM: the first 3 keys are seen by every row, the rest causally.
    /// let prefix = ScoreMod::new()
    ///     .mask_wgsl("return j < 3u || j <= i;")
    ///     .mask_cpu(|_, _, i, j| j < 3 || j <= i);
    /// let dims = Dims::new(1, 1, 6, 4);
    /// let x: Vec<f32> = (0..24).map(|n| (n as f32 * 0.7).cos()).collect();
    /// let out = cpu::reference(&x, &x, &x, dims, &Attention::new().score_mod(prefix).return_weights(true))?;
    /// assert!(out.weights[2] > 0.0 && out.weights[6 + 2] > 0.0 && out.weights[6 * 3 + 4] == 0.0);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn score_mod(mut self, m: crate::ScoreMod) -> Self {
        self.score_mod = Some(m);
        self
    }

    /// The factor of V (`kv_scales`), 1 without.
    pub(crate) fn v_scale(&self) -> f32 {
        self.kv_scales.map_or(1.0, |(_, v)| v)
    }

    /// The dropout of the call, if it drops anything.
    pub(crate) fn active_dropout(&self) -> Option<Dropout> {
        self.dropout.filter(Dropout::active)
    }

    /// A boolean mask (`true` = attend) of shape `shape`, broadcastable to
    /// `[batch, heads, q_len, kv_len]`.
    pub fn mask(mut self, shape: [usize; 4], data: Vec<bool>) -> Self {
        self.device.mask = None;
        self.mask = Some(BoolMask { shape, data });
        self
    }

    /// An additive bias of shape `shape`, broadcastable to `[batch, heads, q_len, kv_len]`.
    pub fn bias(mut self, shape: [usize; 4], data: Vec<f32>) -> Self {
        self.device.bias = None;
        self.bias = Some(Bias { shape, data });
        self
    }

    /// Sliding window: query `i` sees keys `i + off - left <= j <= i + off + right`, where `off`
    /// is 0 for top-left alignment and `kv_len - q_len` for bottom-right. The alignment is the
    /// causal one when [`causal`](Attention::causal) is set, else bottom-right
    /// (FlashAttention's); [`window_align`](Attention::window_align) overrides it.
    /// `window(w, 0)` with causal masking is the local attention of Mistral and Gemma.
    pub fn window(mut self, left: usize, right: usize) -> Self {
        self.window = Some((left, right));
        self
    }

    /// Aligns the sliding window top-left or bottom-right, whatever the causal setting.
    pub fn window_align(mut self, align: Causal) -> Self {
        self.window_align = Some(align);
        self
    }

    /// ALiBi (Press et al.): adds `-slope * |i + off - j|` to the score of query `i` and key
    /// `j`, computed in the kernels (never materialised as a bias). `off` is the offset of the
    /// aligned diagonal, the window's: 0 for top-left alignment, `kv_len - q_len` of the
    /// sequence (per-sequence lengths included) for bottom-right, which is the default and
    /// FlashAttention's `alibi_slopes` convention. Under causal masking every allowed key has
    /// `j <= i + off`, so this is the causal form `slope * (j - i - off)`.
    ///
    /// `slopes` holds one slope per query head (`[heads]`), or one per batch entry and head
    /// (`[batch, heads]`, row-major); each finite, from 0 to [`MAX_ALIBI_SLOPE`] (ALiBi's
    /// slopes are positive: a negative one would favour far keys, whose scores outgrow f32's
    /// precision).
    /// The bias is added after the softcap, with any additive [`bias`](Attention::bias).
    ///
    /// ```
    /// use wgpu_attention::{Attention, Causal, Dims, cpu};
    /// let dims = Dims::new(1, 2, 3, 4);
    /// let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
    /// // The slopes of a 2-head model: 2^(-8/2) and 2^(-16/2).
    /// let opts = Attention::new().causal(Causal::TopLeft).alibi(vec![1.0 / 16.0, 1.0 / 256.0]);
    /// let r = cpu::reference(&x, &x, &x, dims, &opts)?;
    /// assert_eq!(r.o.len(), 24);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn alibi(mut self, slopes: Vec<f32>) -> Self {
        self.alibi = Some(slopes);
        self
    }

    /// Learnable attention sinks (gpt-oss): a logit per query head that joins each row's
    /// softmax denominator and attends to nothing. Row `i` of head `h` then has weights
    /// `p_ij = exp(s_ij) / (exp(sink_h) + sum_j exp(s_ij))`, which sum to less than one, and
    /// log-sum-exp `log(exp(sink_h) + sum_j exp(s_ij))`; a row with no allowed key outputs
    /// zeros with log-sum-exp `sink_h`. `logits` has one value per query head (`[heads]`), in
    /// natural-log units like the scores, each finite and at most `1e30` in magnitude.
    ///
    /// Partial results over disjoint key sets carry the sink once each, so merging two of them
    /// ([`gpu::merge`](crate::gpu::merge)) counts it twice: give the sink to one part only.
    pub fn sinks(mut self, logits: Vec<f32>) -> Self {
        self.sinks = Some(logits);
        self
    }

    /// StreamingLLM's attention sinks: the first `n` keys stay visible to every row beside its
    /// sliding [`window`](Attention::window), still subject to causal masking, the lengths and
    /// the boolean mask. Without a window every key the other options allow is visible anyway,
    /// so this changes nothing. `sink_keys(4)` with `window(w, 0)` and causal masking is the
    /// StreamingLLM pattern.
    pub fn sink_keys(mut self, n: usize) -> Self {
        self.sink_keys = n;
        self
    }

    /// K and V through a block table (vLLM's paged KV cache): the K and V of a call are pools
    /// of pages, `[pages, page_size, kv_heads, head_dim]` and `[pages, page_size, kv_heads,
    /// v_head_dim]` whatever the [`layout`](Attention::layout) (which Q and O keep), and key
    /// `j` of sequence `b` is row `j % page_size` of page `table[b][j / page_size]`. `table`
    /// is `[batch, pages_per_seq]`, row-major; the call's `kv_len` is
    /// `pages_per_seq * page_size`, and [`kv_lens`](Attention::kv_lens) gives each sequence's
    /// own length (keys past it are never read). Pages need not be contiguous, in order or
    /// distinct (sequences may share a prefix's pages); every entry must be a page of the
    /// pool.
    ///
    /// Only the fused and decode paths read paged K/V: the three-pass path, the weights and
    /// additive scores are refused with [`Error::InvalidOption`]. [`PagedKvCache`] manages
    /// the pages.
    ///
    /// [`PagedKvCache`]: crate::PagedKvCache
    pub fn paged(mut self, page_size: usize, table: Vec<u32>) -> Self {
        self.pages = Some(BlockTable { page_size, table });
        self
    }

    /// Packed variable-length batches (FlashAttention's `cu_seqlens_q` / `cu_seqlens_k`):
    /// `batch` sequences of different lengths concatenated without padding. Sequence `b` has
    /// the query rows `cu_seqlens_q[b] .. cu_seqlens_q[b + 1]` and the key rows
    /// `cu_seqlens_k[b] .. cu_seqlens_k[b + 1]`; each vector has `batch + 1` entries, starts at
    /// 0, never decreases and ends at the total. Q is `[1, total_q, heads, head_dim]` in the
    /// `Bshd` layout (FlashAttention's `[total_q, heads, head_dim]`) or
    /// `[1, heads, total_q, head_dim]` in `Bhsd`; K, V and O likewise. The call's `q_len` and
    /// `kv_len` are the longest sequence's, and the lengths act as per-sequence
    /// [`q_lens`](Attention::q_lens) and [`kv_lens`](Attention::kv_lens) (causal bottom-right
    /// alignment per sequence, as FlashAttention's varlen calls): no row reads or writes
    /// another sequence's rows. The log-sum-exp stays padded, `[batch, heads, q_len]`: past
    /// each sequence's rows it is that of a row with no key (`-inf`, or the sink logit with
    /// [`sinks`](Attention::sinks)). Element counts are checked on the packed tensors, so a
    /// batch of short sequences beside one long one is not refused for its padded size.
    ///
    /// The fused and decode paths run packed batches, and the backward
    /// ([`Attention::backward`](crate::Attention::backward)); the three-pass path, the weights,
    /// additive scores, explicit lengths and a block table are refused with
    /// [`Error::InvalidOption`].
    pub fn varlen(mut self, cu_seqlens_q: Vec<u32>, cu_seqlens_k: Vec<u32>) -> Self {
        self.varlen = Some((cu_seqlens_q, cu_seqlens_k));
        self
    }

    /// Per-sequence `(kv_lens, q_lens)` of a packed call, from its offsets.
    pub(crate) fn varlen_lens(&self) -> Option<(Vec<u32>, Vec<u32>)> {
        let (cq, ck) = self.varlen.as_ref()?;
        let diff = |c: &[u32]| c.windows(2).map(|w| w[1].saturating_sub(w[0])).collect();
        Some((diff(ck), diff(cq)))
    }

    /// Forces a GPU path instead of letting the plan choose.
    pub fn path(mut self, path: Path) -> Self {
        self.path = path;
        self
    }

    /// Per-sequence key lengths: sequence `b` attends only to keys `j < kv_lens[b]`.
    /// A length of 0 gives zero output and a log-sum-exp of `-inf` for the whole sequence.
    pub fn kv_lens(mut self, lens: Vec<u32>) -> Self {
        self.kv_lens = Some(lens);
        self
    }

    /// Per-sequence query lengths: rows `i >= q_lens[b]` of sequence `b` output zeros.
    pub fn q_lens(mut self, lens: Vec<u32>) -> Self {
        self.q_lens = Some(lens);
        self
    }

    /// Also return the natural log-sum-exp of each row's scores, `[batch, heads, q_len]`.
    pub fn return_lse(mut self, yes: bool) -> Self {
        self.want_lse = yes;
        self
    }

    /// Also return the attention weights, `[batch, heads, q_len, kv_len]`.
    pub fn return_weights(mut self, yes: bool) -> Self {
        self.want_weights = yes;
        self
    }

    /// [`Attention::backward`] also gives the gradient by the additive bias (in the bias's own
    /// shape, summed over the dimensions it is broadcast along). The forward ignores it.
    pub fn return_bias_grad(mut self, yes: bool) -> Self {
        self.want_bias_grad = yes;
        self
    }

    /// [`Attention::backward`] also gives the gradient by the learnable sink logits. The
    /// forward ignores it.
    pub fn return_sinks_grad(mut self, yes: bool) -> Self {
        self.want_sinks_grad = yes;
        self
    }

    /// The layout set on these options.
    pub fn get_layout(&self) -> Layout {
        self.layout
    }

    /// The causal alignment set on these options, if any.
    pub fn get_causal(&self) -> Option<Causal> {
        self.causal
    }

    /// Checks the options against `dims` and resolves defaults. Every backend calls this first,
    /// once per call, and passes the [`Spec`] on.
    pub fn validate(&self, dims: Dims) -> Result<Spec<'_>> {
        dims.validate_packed(self.varlen.as_ref().map(|(cq, ck)| {
            let last = |c: &[u32]| c.last().copied().unwrap_or(0) as usize;
            (last(cq), last(ck))
        }))?;
        let scale = self.check_scalars(dims)?;
        let target = dims.score_shape();
        if let Some(mask) = &self.mask {
            check_broadcast("mask", mask.shape, mask.data.len(), target)?;
        }
        if let Some(bias) = &self.bias {
            check_broadcast("bias", bias.shape, bias.data.len(), target)?;
            check_finite(
                "bias",
                &bias.data,
                "bias values must be finite; remove keys with a boolean mask",
            )?;
        }
        if let Some(w) = &self.additive {
            if w.len() != dims.head_dim {
                return Err(Error::DataLength {
                    what: "additive weights",
                    dims: vec![dims.head_dim],
                    expected: dims.head_dim,
                    got: w.len(),
                });
            }
            check_finite("additive weights", w, "must be finite")?;
        }
        if let Some(slopes) = &self.alibi {
            let (h, bh) = (
                dims.heads,
                checked_elements("alibi slopes", &[dims.batch, dims.heads])?,
            );
            if slopes.len() != h && slopes.len() != bh {
                return Err(Error::DataLength {
                    what: "alibi slopes",
                    dims: vec![dims.heads],
                    expected: h,
                    got: slopes.len(),
                });
            }
            if let Some(bad) = slopes
                .iter()
                .position(|x| !(x.is_finite() && (0.0..=MAX_ALIBI_SLOPE).contains(x)))
            {
                return Err(Error::InvalidOption {
                    what: "alibi slopes",
                    value: format!("{} at index {bad}", slopes[bad]),
                    why: "slopes must be finite, at least 0 and at most 1e6 (MAX_ALIBI_SLOPE): \
                          a negative slope favours far keys, whose scores then outgrow f32's \
                          precision",
                });
            }
        }
        if let Some(sinks) = &self.sinks {
            if sinks.len() != dims.heads {
                return Err(Error::DataLength {
                    what: "sink logits",
                    dims: vec![dims.heads],
                    expected: dims.heads,
                    got: sinks.len(),
                });
            }
            if let Some(bad) = sinks
                .iter()
                .position(|x| !(x.is_finite() && x.abs() <= 1e30))
            {
                return Err(Error::InvalidOption {
                    what: "sink logits",
                    value: format!("{} at index {bad}", sinks[bad]),
                    why: "sink logits must be finite and at most 1e30 in magnitude",
                });
            }
        }
        self.check_path()?;
        if let Some(pages) = &self.pages {
            self.check_paged(pages, dims)?;
        }
        if let Some((cq, ck)) = &self.varlen {
            self.check_varlen(cq, ck, dims)?;
        }
        if let Some(lens) = &self.kv_lens {
            check_lens("kv_lens", lens, dims.batch, dims.kv_len)?;
        }
        if let Some(lens) = &self.q_lens {
            check_lens("q_lens", lens, dims.batch, dims.q_len)?;
        }
        self.check_device_options(dims)?;
        Ok(Spec {
            dims,
            opts: self,
            scale,
        })
    }

    /// The device forms' shapes and dtypes (their values stay on the device).
    fn check_device_options(&self, dims: Dims) -> Result<()> {
        let target = dims.score_shape();
        let d = &self.device;
        if let Some(bias) = &d.bias {
            check_broadcast("bias tensor", bias.dims(), bias.len(), target)?;
            if bias.dtype() != DType::F32 {
                return Err(Error::InvalidOption {
                    what: "bias tensor dtype",
                    value: format!("{:?}", bias.dtype()),
                    why: "a bias is f32",
                });
            }
        }
        if let Some(mask) = &d.mask {
            let elems = checked_elements("mask tensor", &mask.shape)?;
            check_broadcast("mask tensor", mask.shape, elems, target)?;
        }
        if let Some(lens) = &d.lens {
            if self.kv_lens.is_some() || self.q_lens.is_some() {
                return Err(Error::InvalidOption {
                    what: "lengths",
                    value: "given both on the host and on the device".into(),
                    why: "the device lengths hold kv_lens and q_lens together: upload both with \
                          Gpu::upload_lens, or give both on the host",
                });
            }
            if lens.batch != dims.batch {
                return Err(Error::ShapeMismatch {
                    what: "device lengths' batch".into(),
                    got: lens.batch,
                    expected: dims.batch,
                });
            }
        }
        Ok(())
    }

    /// [`Error::InvalidOption`] if an option lives on the device: for the CPU paths.
    pub(crate) fn require_host_options(&self) -> Result<()> {
        if let Some(m) = &self.score_mod {
            m.require(false, false)?;
        }
        if self.device.any() {
            return Err(Error::InvalidOption {
                what: "device-resident option",
                value: "a mask, bias or lengths on the device".into(),
                why: "the CPU paths read host data: pass the host form (mask, bias, kv_lens, \
                      q_lens)",
            });
        }
        Ok(())
    }

    /// The score scale (default `1 / sqrt(head_dim)`, times K's scale), checked with the
    /// softcap, the K and V scales and the dropout probability.
    fn check_scalars(&self, dims: Dims) -> Result<f32> {
        let mut scale = self.scale.unwrap_or(1.0 / (dims.head_dim as f32).sqrt());
        if let Some((k, v)) = self.kv_scales {
            if !(k.is_finite() && k > 0.0 && v.is_finite() && v > 0.0) {
                return Err(Error::InvalidOption {
                    what: "kv_scales",
                    value: format!("{k}, {v}"),
                    why: "K's and V's scales must be finite and positive",
                });
            }
            if self.additive.is_some() {
                return Err(Error::InvalidOption {
                    what: "kv_scales",
                    value: format!("{k}, {v}"),
                    why: "additive scores take K as it is (tanh(q + k)); scale K beforehand",
                });
            }
            // K's scale is a factor of every dot product: it joins the score scale (whose
            // bound below then covers the product).
            scale *= k;
        }
        if !(scale.is_finite() && scale.abs() <= MAX_SCALE) {
            return Err(Error::InvalidOption {
                what: "scale",
                value: scale.to_string(),
                why: "must be finite and at most 1e6 in magnitude (MAX_SCALE): larger scales \
                      overflow f32 scores for inputs of ordinary size",
            });
        }
        if let Some(cap) = self.softcap
            && !(cap.is_finite() && cap > 0.0)
        {
            return Err(Error::InvalidOption {
                what: "softcap",
                value: cap.to_string(),
                why: "must be finite and > 0",
            });
        }
        if let Some(d) = self.dropout
            && !(0.0..=1.0).contains(&d.p)
        {
            return Err(Error::InvalidOption {
                what: "dropout",
                value: d.p.to_string(),
                why: "the probability of dropping a weight must be from 0 to 1",
            });
        }
        Ok(scale)
    }

    /// A block table's shape against `dims`; the entries are checked against the pool where
    /// its size is known ([`BlockTable::check_pool`]).
    fn check_paged(&self, pages: &BlockTable, dims: Dims) -> Result<()> {
        let refuse = |value: String, why: &'static str| {
            Err(Error::InvalidOption {
                what: "paged K/V",
                value,
                why,
            })
        };
        if pages.page_size == 0 {
            return Err(Error::ZeroSize { what: "page_size" });
        }
        let pps = pages.pages_per_seq(dims.batch);
        if pps == 0 || pages.table.len() != dims.batch * pps {
            return Err(Error::DataLength {
                what: "block table",
                dims: vec![dims.batch, pps.max(1)],
                expected: dims.batch * pps.max(1),
                got: pages.table.len(),
            });
        }
        if pps.checked_mul(pages.page_size) != Some(dims.kv_len) {
            return Err(Error::ShapeMismatch {
                what: "kv_len of a paged call (pages_per_seq * page_size)".into(),
                got: dims.kv_len,
                expected: pps.saturating_mul(pages.page_size),
            });
        }
        if self.path == Path::ThreePass || self.want_weights || self.additive.is_some() {
            return refuse(
                format!("{:?}", self.path),
                "paged K/V are read by the fused and decode paths only: no three-pass path,                  weights or additive scores",
            );
        }
        Ok(())
    }

    /// Offsets of a packed call against `dims`: `batch + 1` of each, from 0, never
    /// decreasing, no sequence longer than `q_len` / `kv_len`.
    fn check_varlen(&self, cq: &[u32], ck: &[u32], dims: Dims) -> Result<()> {
        for (what, cu, max) in [
            ("cu_seqlens_q", cq, dims.q_len),
            ("cu_seqlens_k", ck, dims.kv_len),
        ] {
            if cu.len() != dims.batch + 1 {
                return Err(Error::ShapeMismatch {
                    what: format!("{what} length (batch + 1)"),
                    got: cu.len(),
                    expected: dims.batch + 1,
                });
            }
            if cu[0] != 0 {
                return Err(Error::InvalidOption {
                    what,
                    value: format!("starts at {}", cu[0]),
                    why: "the offsets start at 0",
                });
            }
            if let Some(b) = cu.windows(2).position(|w| w[1] < w[0]) {
                return Err(Error::InvalidOption {
                    what,
                    value: format!("{} at {} after {}", cu[b + 1], b + 1, cu[b]),
                    why: "the offsets never decrease",
                });
            }
            if let Some(b) = cu.windows(2).position(|w| (w[1] - w[0]) as usize > max) {
                return Err(Error::LengthOutOfRange {
                    what,
                    index: b,
                    value: (cu[b + 1] - cu[b]) as usize,
                    max,
                });
            }
        }
        let why = if self.kv_lens.is_some() || self.q_lens.is_some() || self.device.lens.is_some() {
            "a packed batch's lengths are its offsets: give no kv_lens or q_lens"
        } else if self.pages.is_some() {
            "a packed batch and a block table do not combine"
        } else if self.path == Path::ThreePass || self.want_weights || self.additive.is_some() {
            "packed batches run on the fused and decode paths only: no three-pass path, \
             weights or additive scores"
        } else {
            return Ok(());
        };
        Err(Error::InvalidOption {
            what: "varlen",
            value: format!("{:?}", self.path),
            why,
        })
    }

    /// The physical shape of O for a call of `dims`: `dims.o_shape`, or for a packed batch
    /// the packed rows.
    pub fn o_shape_for(&self, dims: Dims) -> [usize; 4] {
        match &self.varlen {
            Some((cq, _)) => {
                let total = *cq.last().unwrap_or(&0) as usize;
                self.layout.dims(1, dims.heads, total, dims.v_head_dim)
            }
            None => dims.o_shape(self.layout),
        }
    }

    /// The dims of a call on Q of `q` and paged K/V pools `k`, `v`
    /// (`[pages, page_size, kv_heads, width]`), with the table's entries checked against the
    /// pool; for a call without pages, [`Dims::from_shapes`].
    pub fn dims_for(&self, q: [usize; 4], k: [usize; 4], v: [usize; 4]) -> Result<Dims> {
        if let Some((cq, ck)) = &self.varlen {
            return self.packed_dims(cq, ck, q, k, v);
        }
        let Some(pages) = &self.pages else {
            return Dims::from_shapes(self.layout, q, k, v);
        };
        let (batch, heads, q_len, head_dim) = self.layout.split(q);
        let check = |what: &str, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(Error::ShapeMismatch {
                    what: what.to_string(),
                    got,
                    expected,
                })
            }
        };
        check("K pool page size", k[1], pages.page_size)?;
        check("V pool pages", v[0], k[0])?;
        check("V pool page size", v[1], k[1])?;
        check("V pool kv_heads", v[2], k[2])?;
        check("K pool head_dim", k[3], head_dim)?;
        pages.check_pool(k[0])?;
        Ok(Dims {
            batch,
            heads,
            kv_heads: k[2],
            q_len,
            kv_len: pages.pages_per_seq(batch).saturating_mul(pages.page_size),
            head_dim,
            v_head_dim: v[3],
        })
    }

    /// The dims of a packed call (see [`Attention::varlen`]) on tensors of one "batch" of the
    /// packed rows.
    fn packed_dims(
        &self,
        cq: &[u32],
        ck: &[u32],
        q: [usize; 4],
        k: [usize; 4],
        v: [usize; 4],
    ) -> Result<Dims> {
        let flat = Dims::from_shapes(self.layout, q, k, v)?;
        let check = |what: &str, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(Error::ShapeMismatch {
                    what: what.to_string(),
                    got,
                    expected,
                })
            }
        };
        check("batch of packed Q, K and V", flat.batch, 1)?;
        let last = |c: &[u32]| c.last().copied().unwrap_or(0) as usize;
        check("packed Q rows (cu_seqlens_q's last)", flat.q_len, last(cq))?;
        check("packed K rows (cu_seqlens_k's last)", flat.kv_len, last(ck))?;
        let longest = |c: &[u32]| c.windows(2).map(|w| w[1].saturating_sub(w[0])).max();
        Ok(Dims {
            batch: cq.len().saturating_sub(1),
            q_len: longest(cq).unwrap_or(0) as usize,
            kv_len: longest(ck).unwrap_or(0) as usize,
            ..flat
        })
    }

    /// Weights and additive scores exist only on the three-pass path: forcing another is an
    /// error, never a silent omission.
    fn check_path(&self) -> Result<()> {
        if !matches!(self.path, Path::Fused | Path::Decode) {
            return Ok(());
        }
        let why = if self.want_weights {
            "only the three-pass path materialises the weights; use Path::Auto or \
             Path::ThreePass with return_weights"
        } else if self.additive.is_some() {
            "only the three-pass path computes additive scores; use Path::Auto or \
             Path::ThreePass with additive"
        } else {
            return Ok(());
        };
        Err(Error::InvalidOption {
            what: "path",
            value: format!("{:?}", self.path),
            why,
        })
    }
}

/// A mask or bias of `shape` and `len` elements must broadcast to `target`.
fn check_broadcast(
    what: &'static str,
    shape: [usize; 4],
    len: usize,
    target: [usize; 4],
) -> Result<()> {
    if (0..4).any(|d| shape[d] != 1 && shape[d] != target[d]) {
        return Err(Error::BroadcastShape {
            what,
            got: shape,
            target,
        });
    }
    // Each dim is 1 or the target's; the target's product may still overflow.
    let expected = checked_elements(what, &shape)?;
    if len != expected {
        return Err(Error::DataLength {
            what,
            dims: shape.to_vec(),
            expected,
            got: len,
        });
    }
    Ok(())
}

/// Every value finite (WGSL may assume no infinities), else the first bad one's index.
fn check_finite(what: &'static str, data: &[f32], why: &'static str) -> Result<()> {
    match data.iter().position(|x| !x.is_finite()) {
        Some(bad) => Err(Error::InvalidOption {
            what,
            value: format!("{} at index {bad}", data[bad]),
            why,
        }),
        None => Ok(()),
    }
}

/// Per-sequence lengths: one per batch entry, none above `max`.
fn check_lens(what: &'static str, lens: &[u32], batch: usize, max: usize) -> Result<()> {
    if lens.len() != batch {
        return Err(Error::ShapeMismatch {
            what: format!("{what} length"),
            got: lens.len(),
            expected: batch,
        });
    }
    if let Some((index, &value)) = lens.iter().enumerate().find(|(_, l)| **l as usize > max) {
        return Err(Error::LengthOutOfRange {
            what,
            index,
            value: value as usize,
            max,
        });
    }
    Ok(())
}

/// Options checked against dims, with defaults resolved: what every backend executes.
#[derive(Debug, Clone, Copy)]
pub struct Spec<'a> {
    /// The problem's sizes.
    pub dims: Dims,
    /// The options, as given.
    pub opts: &'a Attention,
    /// The resolved score scale: `1 / sqrt(head_dim)` or the one given, times K's scale
    /// ([`Attention::kv_scales`]).
    pub scale: f32,
}

impl Spec<'_> {
    /// The half-open range of keys `lo..hi` that causal alignment, the window, `kv_lens` and
    /// a score mod's key range ([`ScoreMod::range_cpu`](crate::ScoreMod::range_cpu)) leave to
    /// query row `i` of batch entry `b`, before the boolean mask; empty (`hi <= lo`) when the
    /// row has no key or is past `q_lens[b]`.
    pub fn key_range(&self, b: usize, i: usize) -> (usize, usize) {
        self.range(b, i, true)
    }

    /// [`Spec::key_range`], narrowed by the window and a score mod's key range
    /// (`with_window`) or not (the range the sink keys are taken from).
    fn range(&self, b: usize, i: usize, with_window: bool) -> (usize, usize) {
        let d = &self.dims;
        let o = self.opts;
        if let Some(q_lens) = &o.q_lens
            && i >= q_lens[b] as usize
        {
            return (0, 0);
        }
        let i = i as i64;
        // Bottom-right alignment follows each sequence's own lengths (FlashAttention's
        // variable-length convention): the last query of a sequence sees its last key.
        let kv_len = o.kv_lens.as_ref().map_or(d.kv_len, |l| l[b] as usize) as i64;
        let q_len = o.q_lens.as_ref().map_or(d.q_len, |l| l[b] as usize) as i64;
        let shift = kv_len - q_len;
        let mut lo = 0i64;
        let mut hi = kv_len;
        match o.causal {
            Some(Causal::TopLeft) => hi = hi.min(i + 1),
            Some(Causal::BottomRight) => hi = hi.min(i + shift + 1),
            None => {}
        }
        if let Some((left, right)) = o.window.filter(|_| with_window) {
            let off = match self.window_align() {
                Causal::TopLeft => 0,
                Causal::BottomRight => shift,
            };
            lo = lo.max(i + off - left.min(i64::MAX as usize / 4) as i64);
            hi = hi.min(i + off + right.min(i64::MAX as usize / 4) as i64 + 1);
        }
        // A score mod's key range narrows it as the window does (sink keys escape both).
        if let Some((a, e)) = (o.score_mod.as_ref())
            .filter(|_| with_window)
            .and_then(|m| m.range(b, i as usize, shift))
        {
            lo = lo.max(a.min(kv_len as usize) as i64);
            hi = hi.min(e.min(kv_len as usize) as i64);
        }
        if hi <= lo {
            return (0, 0);
        }
        (lo as usize, hi as usize)
    }

    /// The keys `0..n` that row `i` of batch entry `b` sees beside [`Spec::key_range`]
    /// (StreamingLLM's sink keys, [`Attention::sink_keys`]): the first keys, as far as causal
    /// masking and `kv_lens` allow; 0 when there are none, or the row is past `q_lens[b]`.
    /// Row `i` sees key `j` (before the boolean mask) when `j < n` or `lo <= j < hi`.
    pub fn sink_end(&self, b: usize, i: usize) -> usize {
        let o = self.opts;
        if o.sink_keys == 0 || o.window.is_none() {
            return 0;
        }
        // The row's range without the window: causal masking and the lengths only.
        let (_, hi) = self.range(b, i, false);
        o.sink_keys.min(hi)
    }

    /// The signed offset of the aligned diagonal for batch entry `b`: row `i`'s diagonal key
    /// is `i + off`. 0 for top-left alignment, `kv_len - q_len` of the sequence for
    /// bottom-right (the window's alignment, [`Spec::window_align`]). ALiBi measures distances
    /// from it.
    pub fn diagonal_offset(&self, b: usize) -> i64 {
        let d = &self.dims;
        let o = self.opts;
        match self.window_align() {
            Causal::TopLeft => 0,
            Causal::BottomRight => {
                let kv_len = o.kv_lens.as_ref().map_or(d.kv_len, |l| l[b] as usize) as i64;
                let q_len = o.q_lens.as_ref().map_or(d.q_len, |l| l[b] as usize) as i64;
                kv_len - q_len
            }
        }
    }

    /// The ALiBi slope of batch entry `b`, query head `h`, if the call has ALiBi.
    pub fn alibi_slope(&self, b: usize, h: usize) -> Option<f32> {
        let slopes = self.opts.alibi.as_ref()?;
        let heads = self.dims.heads;
        Some(if slopes.len() == heads {
            slopes[h]
        } else {
            slopes[b * heads + h]
        })
    }

    /// The alignment of the sliding window: explicit, else the causal one, else bottom-right.
    pub fn window_align(&self) -> Causal {
        self.opts
            .window_align
            .or(self.opts.causal)
            .unwrap_or(Causal::BottomRight)
    }
}

/// Storage type of a tensor on the device. Accumulation is always f32.
///
/// Q, K, V and O may each have their own (a bf16 KV cache with f32 queries is the common
/// decoding case). `F16` runs on every adapter: natively where it has `SHADER_F16`, packed two
/// to a `u32` and converted on load elsewhere; `Bf16` is always packed and unpacked by bit
/// shifts, and rounded to nearest even when written. `F8E4M3` (8 bits) is for K and V caches
/// above all: a quarter of f32's memory and traffic, with 3 bits of mantissa.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16. Values past ±65504 round to infinities, as IEEE (and PyTorch's
    /// `half()`) round them: keep such values in bf16 or f32.
    F16,
    /// bfloat16: the top 16 bits of a binary32.
    Bf16,
    /// 8-bit float, OCP FP8 E4M3 ("E4M3FN", what vLLM's and PyTorch's `float8_e4m3fn` KV
    /// caches store): 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no infinities, finite
    /// values up to 448 and down to 2^-9. Stored values are rounded to nearest even and
    /// saturated at ±448: K and V whose values reach past that range are stored divided by a
    /// scale, given back by [`Attention::kv_scales`]. Packed four to a `u32`, converted by
    /// bit operations on any adapter. A NaN is stored as 0x7f, which the host reads back as
    /// NaN and the kernels as 480 (they have no NaN case). An 8-bit Q gives an 8-bit O unless
    /// the output is given ([`Attention::run_into`]).
    F8E4M3,
}

/// `x` as OCP FP8 E4M3 bits: rounded to nearest even, saturated at ±448 (infinities too);
/// NaN is `0x7f`. The WGSL twin is `f8_bits` in `gpu::kernels::compose`.
pub(crate) fn f8e4m3_from_f32(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let u = x.to_bits();
    let sign = ((u >> 24) & 0x80) as u8;
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    if a < 0.015625 {
        // Subnormal: a multiple of 2^-9 (the scaling is exact); 8 carries into the exponent.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: the f32 exponent rebased (bias 127 to 7), the mantissa's top 3 bits rounded to
    // nearest even; a carry out of the mantissa moves into the exponent by the addition.
    let e = ((u >> 23) & 0xff) - 120;
    let mant = u & 0x7f_ffff;
    let (r, rem) = (mant >> 20, mant & 0xf_ffff);
    let up = (rem > 0x8_0000 || (rem == 0x8_0000 && r & 1 == 1)) as u32;
    sign | ((e << 3) + r + up) as u8
}

/// The value of OCP FP8 E4M3 bits `b` (NaN for `0x7f` and `0xff`).
pub(crate) fn f8e4m3_to_f32(b: u8) -> f32 {
    let (e, m) = (((b >> 3) & 0xf) as u32, (b & 7) as u32);
    if e == 0xf && m == 7 {
        return f32::NAN;
    }
    let mag = if e == 0 {
        m as f32 / 512.0
    } else {
        f32::from_bits(((e + 120) << 23) | (m << 20))
    };
    if b & 0x80 != 0 { -mag } else { mag }
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// Bytes of a buffer holding `elems` elements (rounded up to whole 4-byte words).
    pub fn buffer_bytes(self, elems: u64) -> u64 {
        (elems * self.size() as u64).div_ceil(4) * 4
    }

    /// `x` rounded to this type and back (what storing it and loading it gives).
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::F32 => x,
            DType::F16 => half::f16::from_f32(x).to_f32(),
            DType::Bf16 => half::bf16::from_f32(x).to_f32(),
            DType::F8E4M3 => f8e4m3_to_f32(f8e4m3_from_f32(x)),
        }
    }
}

#[cfg(test)]
mod f8_tests {
    use super::{f8e4m3_from_f32, f8e4m3_to_f32};

    /// Every code decodes to a value that encodes back to it (but NaN and -0's sign kept),
    /// and rounding picks the nearest code, ties to even, saturating at 448.
    #[test]
    fn e4m3_round_trips_and_rounds_to_nearest_even() {
        let mut finite: Vec<(f32, u8)> = Vec::new();
        for b in 0..=255u8 {
            let x = f8e4m3_to_f32(b);
            if b & 0x7f == 0x7f {
                assert!(x.is_nan(), "{b:#x}");
                continue;
            }
            assert_eq!(f8e4m3_from_f32(x), b, "{b:#x} = {x}");
            if b & 0x80 == 0 {
                finite.push((x, b));
            }
        }
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(f8e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        // Midpoints between neighbours round to the even code; just off them, to the nearer.
        for w in finite.windows(2) {
            let ((lo, bl), (hi, bh)) = (w[0], w[1]);
            let mid = (lo + hi) / 2.0;
            let even = if bl & 1 == 0 { bl } else { bh };
            assert_eq!(f8e4m3_from_f32(mid), even, "midpoint of {lo} and {hi}");
            assert_eq!(f8e4m3_from_f32(mid - (hi - lo) * 0.01), bl, "below {mid}");
            assert_eq!(f8e4m3_from_f32(mid + (hi - lo) * 0.01), bh, "above {mid}");
            assert_eq!(f8e4m3_from_f32(-mid), even | 0x80, "-{mid}");
        }
        for x in [449.0, 500.0, 1e30, f32::INFINITY] {
            assert_eq!(f8e4m3_from_f32(x), 0x7e, "{x}");
            assert_eq!(f8e4m3_from_f32(-x), 0xfe, "-{x}");
        }
        assert_eq!(f8e4m3_from_f32(f32::NAN), 0x7f);
        assert_eq!(f8e4m3_from_f32(1e-4), 0x00);
        assert_eq!(f8e4m3_from_f32(-0.0), 0x80);
    }
}
