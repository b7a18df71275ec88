//! A paged key/value cache (vLLM's layout): K and V live in pools of fixed-size pages, each
//! sequence owns a list of pages (its block table), and attention reads K and V through the
//! tables ([`Attention::paged`]) on the fused and decode paths.
//!
//! Pages come from a free list and go back when the last sequence holding them is freed.
//! [`fork`](PagedKvCache::fork) shares every page of a sequence with a new one (a prompt's
//! prefix served to several continuations); a page is copied only when a sequence appends into
//! a page it shares (copy on write: only the last, partial page ever is). An append that needs
//! more pages than are free is [`Error::CacheFull`] and changes nothing.
//!
//! A sliding-window layer's sequences need only their window (and StreamingLLM's sink
//! tokens): [`release_tokens`](PagedKvCache::release_tokens) gives back the pages of the tokens
//! no later row will see, and `attend` refuses a call that would see them.
//!
//! With a [`Rotary`] ([`PagedKvCache::with_rotary`]) the cache applies RoPE as
//! [`KvCache`](crate::KvCache) does: appended K turned by each token's position in its
//! sequence (on the host, in f64, before rounding to the cache's dtype), and the queries of
//! `attend` by theirs (on the device).

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::gpu::attention::Output;
use crate::gpu::context::Gpu;
use crate::gpu::rotary;
use crate::gpu::tensor::Tensor;
use crate::rotary::{MAX_POSITIONS, Positions, Rotary};
use crate::spec::{Attention, Causal, DType, Dims, Layout};

/// A sequence of a [`PagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The id as a number (what [`Error::UnknownSequence`] reports).
    pub fn get(self) -> u64 {
        self.0
    }
}

#[derive(Debug, Clone, Default)]
struct Sequence {
    pages: Vec<u32>,
    len: usize,
    /// Released tokens (`release_tokens`), whole pages `lo..hi` (empty when equal): their
    /// table entries hold the cache's zero page.
    released: (usize, usize),
}

/// K and V in pools of pages, `[pages, page_size, kv_heads, head_dim]` (and `v_head_dim`),
/// shared by any number of sequences.
///
/// ```no_run
/// use wgpu_attention::{Attention, Gpu, PagedKvCache};
/// let gpu = Gpu::new()?;
/// let (kv_heads, heads, dim) = (2, 8, 64);
/// // 256 pages of 16 tokens: 4096 tokens shared by every sequence.
/// let mut cache = PagedKvCache::new(&gpu, 256, 16, kv_heads, dim, dim)?;
/// let a = cache.add_sequence();
/// // A prompt of 100 tokens: K and V rows [100, kv_heads, dim].
/// let kv = vec![0.1f32; 100 * kv_heads * dim];
/// cache.append(&gpu, a, &kv, &kv)?;
/// // A second continuation of the same prompt shares its pages.
/// let b = cache.fork(a)?;
/// let one = vec![0.2f32; kv_heads * dim];
/// cache.append(&gpu, a, &one, &one)?;
/// cache.append(&gpu, b, &one, &one)?; // copies the shared last page first
/// // One query per sequence, [sequences, heads, 1, dim].
/// let q = gpu.upload(&vec![0.3; 2 * heads * dim], [2, heads, 1, dim])?;
/// let out = cache.attend(&gpu, &q, &[a, b], &Attention::new())?;
/// cache.free_sequence(a)?;
/// # Ok::<(), wgpu_attention::Error>(())
/// ```
#[derive(Debug)]
pub struct PagedKvCache {
    k: Tensor,
    v: Tensor,
    pages: usize,
    page_size: usize,
    kv_heads: usize,
    head_dim: usize,
    v_head_dim: usize,
    dtype: DType,
    /// Free pages, the next one last.
    free: Vec<u32>,
    /// Sequences holding each page.
    refs: Vec<u32>,
    seqs: BTreeMap<SeqId, Sequence>,
    next_id: u64,
    /// RoPE applied to appended K and attending queries.
    rotary: Option<Rotary>,
    /// A page of zeros that released tokens' table entries point to (taken on the first
    /// release; the cache holds one reference to it, each such entry another).
    zero_page: Option<u32>,
}

impl PagedKvCache {
    /// An empty f32 cache of `pages` pages of `page_size` tokens.
    pub fn new(
        gpu: &Gpu,
        pages: usize,
        page_size: usize,
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
    ) -> Result<PagedKvCache> {
        PagedKvCache::with_dtype(
            gpu,
            pages,
            page_size,
            kv_heads,
            head_dim,
            v_head_dim,
            DType::F32,
        )
    }

    /// An empty cache storing K and V as `dtype`. Every token's row must start on a 4-byte
    /// boundary: `kv_heads * head_dim` and `kv_heads * v_head_dim` even for 16-bit types,
    /// multiples of 4 for 8-bit ones.
    pub fn with_dtype(
        gpu: &Gpu,
        pages: usize,
        page_size: usize,
        kv_heads: usize,
        head_dim: usize,
        v_head_dim: usize,
        dtype: DType,
    ) -> Result<PagedKvCache> {
        for (what, n) in [
            ("pages", pages),
            ("page_size", page_size),
            ("kv_heads", kv_heads),
        ] {
            if n == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        if pages > u32::MAX as usize {
            return Err(Error::TooLarge {
                what: "paged cache pages",
                requested: pages as u64,
                max: u32::MAX as u64,
                hint: "; page numbers are 32-bit",
            });
        }
        // The sizes as attention sees them: the pool as one sequence of every page.
        let slots = crate::spec::checked_elements("paged cache tokens", &[pages, page_size])?;
        Attention::new().validate(Dims {
            batch: 1,
            heads: kv_heads,
            kv_heads,
            q_len: 1,
            kv_len: slots,
            head_dim,
            v_head_dim,
        })?;
        // Within u32 now (validated above).
        let words = |dim: usize| (kv_heads * dim * dtype.size()).is_multiple_of(4);
        if !(words(head_dim) && words(v_head_dim)) {
            return Err(Error::InvalidOption {
                what: "paged cache head dims",
                value: format!("{kv_heads} x {head_dim} and {v_head_dim} with {dtype:?}"),
                why: "a pool's token rows must be whole 4-byte words: even kv_heads * head_dim \
                      and kv_heads * v_head_dim for 16-bit types, multiples of 4 for 8-bit ones",
            });
        }
        Ok(PagedKvCache {
            k: gpu.empty_as([pages, page_size, kv_heads, head_dim], dtype)?,
            v: gpu.empty_as([pages, page_size, kv_heads, v_head_dim], dtype)?,
            pages,
            page_size,
            kv_heads,
            head_dim,
            v_head_dim,
            dtype,
            free: (0..pages as u32).rev().collect(),
            refs: vec![0; pages],
            seqs: BTreeMap::new(),
            next_id: 0,
            rotary: None,
            zero_page: None,
        })
    }

    /// This cache applying `rotary` (RoPE) itself: each appended K row is turned by its
    /// token's position in its sequence, each query of [`attend`](PagedKvCache::attend) by its
    /// own (its sequence's length minus the call's queries plus its row). Pass K and Q
    /// unrotated. Set it on an empty cache: rows already cached stay as they were. M-RoPE is
    /// refused ([`Error::InvalidOption`]): its positions are not the sequence's rows.
    pub fn with_rotary(mut self, rotary: Rotary) -> Result<PagedKvCache> {
        rotary.fits(self.head_dim)?;
        rotary.fits_cache()?;
        self.rotary = Some(rotary);
        Ok(self)
    }

    /// The rotary embedding the cache applies, if any.
    pub fn rotary(&self) -> Option<&Rotary> {
        self.rotary.as_ref()
    }

    /// A new, empty sequence.
    pub fn add_sequence(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Sequence::default());
        id
    }

    /// A new sequence holding the same tokens as `seq`, sharing its pages (nothing is copied
    /// until one of them appends into a shared page).
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId> {
        let copy = self.seq(seq)?.clone();
        for &p in &copy.pages {
            self.refs[p as usize] += 1;
        }
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, copy);
        Ok(id)
    }

    /// Removes `seq`; its pages no other sequence holds go back to the free list.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<()> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(Error::UnknownSequence { id: seq.0 })?;
        for p in s.pages {
            self.release(p);
        }
        Ok(())
    }

    /// Shortens `seq` to its first `len` tokens (after speculative decoding, the draft tokens
    /// the model rejected; llama.cpp's `seq_rm`, vLLM's freed slots). Pages past the new
    /// length go back to the free list unless another sequence holds them; a page the
    /// sequence still shares is copied when it next appends into it, as after
    /// [`fork`](PagedKvCache::fork). With a [`Rotary`], appended K is turned by its new
    /// positions. A `len` above the sequence's is [`Error::LengthOutOfRange`] (its `index` is
    /// the sequence's id), and then nothing changes.
    ///
    /// ```no_run
    /// use wgpu_attention::{Gpu, PagedKvCache};
    /// let gpu = Gpu::new()?;
    /// let (kv_heads, dim) = (2, 64);
    /// let mut cache = PagedKvCache::new(&gpu, 64, 16, kv_heads, dim, dim)?;
    /// let a = cache.add_sequence();
    /// // A prompt of 30 tokens and 5 draft tokens; the model accepts 3 of them.
    /// let kv = vec![0.1f32; 35 * kv_heads * dim];
    /// cache.append(&gpu, a, &kv, &kv)?;
    /// cache.truncate(a, 33)?;
    /// assert_eq!(cache.len(a)?, 33);
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let s = self.seq(seq)?;
        if len > s.len {
            return Err(Error::LengthOutOfRange {
                what: "truncated sequence length",
                index: seq.0 as usize,
                value: len,
                max: s.len,
            });
        }
        let (lo, hi) = s.released;
        if len > lo && len < hi {
            return Err(Error::InvalidOption {
                what: "truncated sequence length",
                value: format!("{len} inside the released tokens {lo}..{hi}"),
                why: "a sequence is truncated after its released tokens or before them, not \
                      into them (their rows are gone)",
            });
        }
        let s = self.seqs.get_mut(&seq).expect("checked above");
        let dropped = s.pages.split_off(len.div_ceil(self.page_size));
        s.len = len;
        if len <= lo {
            s.released = (0, 0);
        }
        for p in dropped {
            self.release(p);
        }
        Ok(())
    }

    /// Gives back the pages of `seq` that lie wholly inside `tokens` (a range of its token
    /// positions): a sliding-window layer's cache then holds about its window, not its
    /// history (vLLM frees such blocks; Mistral's, Gemma's and gpt-oss's windowed layers).
    /// The sequence keeps its length and positions; the released tokens' table entries point
    /// to a page of zeros the cache keeps (one of the pool's, taken by the first release).
    /// Returns the pages the sequence let go of; those no fork holds go back to the free list
    /// ([`free_pages`](Self::free_pages) says what the pool has, the page of zeros taken).
    ///
    /// A sequence has one released range: a later release must touch or overlap it (a window
    /// sliding on, or behind StreamingLLM's sink tokens, which stay). [`attend`](Self::attend)
    /// then refuses a call any of whose rows would see a released token
    /// ([`Error::InvalidOption`]): give the call the window (and sink keys) that stop short
    /// of them. [`truncate`](Self::truncate) may cut after the released tokens or before them,
    /// not into them.
    ///
    /// ```no_run
    /// use wgpu_attention::{Attention, Causal, Gpu, PagedKvCache};
    /// let gpu = Gpu::new()?;
    /// let (kv_heads, heads, dim, window) = (2, 8, 64, 128);
    /// let mut cache = PagedKvCache::new(&gpu, 64, 16, kv_heads, dim, dim)?;
    /// let s = cache.add_sequence();
    /// let kv = vec![0.1f32; 1000 * kv_heads * dim];
    /// cache.append(&gpu, s, &kv, &kv)?;
    /// // The next token sees the last `window` tokens, itself included: positions from
    /// // 1001 - window on; everything before can go.
    /// let one = vec![0.2f32; kv_heads * dim];
    /// cache.append(&gpu, s, &one, &one)?;
    /// cache.release_tokens(&gpu, s, 0..1001 - window)?;
    /// let q = gpu.upload(&vec![0.3; heads * dim], [1, heads, 1, dim])?;
    /// let opts = Attention::new().causal(Causal::BottomRight).window(window - 1, 0);
    /// let out = cache.attend(&gpu, &q, &[s], &opts)?;
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn release_tokens(
        &mut self,
        gpu: &Gpu,
        seq: SeqId,
        tokens: std::ops::Range<usize>,
    ) -> Result<usize> {
        gpu.expect_own("the paged cache", &self.k)?;
        let s = self.seq(seq)?;
        if tokens.start > tokens.end || tokens.end > s.len {
            return Err(Error::InvalidOption {
                what: "released tokens",
                value: format!("{tokens:?} of a sequence of {}", s.len),
                why: "the released range must be a range of the sequence's tokens",
            });
        }
        // Whole pages only.
        let (p0, p1) = (
            tokens.start.div_ceil(self.page_size),
            tokens.end / self.page_size,
        );
        if p0 >= p1 {
            return Ok(0);
        }
        let ps = self.page_size;
        let (lo, hi) = (s.released.0 / ps, s.released.1 / ps);
        if lo < hi && (p1 < lo || p0 > hi) {
            return Err(Error::InvalidOption {
                what: "released tokens",
                value: format!(
                    "{tokens:?} apart from the released {}..{}",
                    s.released.0, s.released.1
                ),
                why: "a sequence has one released range: a release must touch or overlap it",
            });
        }
        let fresh: Vec<usize> = (p0..p1)
            .filter(|&i| Some(s.pages[i]) != self.zero_page)
            .collect();
        // The zero page, once: a free page, or one this release frees, zeroed first.
        let zero = match self.zero_page {
            Some(z) => z,
            None => {
                let freed = fresh
                    .iter()
                    .map(|&i| s.pages[i])
                    .find(|&p| self.refs[p as usize] == 1);
                let Some(page) = freed.or(self.free.last().copied()) else {
                    return Err(Error::CacheFull { needed: 1, free: 0 });
                };
                let size = self.dtype.size() as u64;
                gpu.guarded("paged cache release", || {
                    gpu.submit_with("paged cache zero page", |encoder| {
                        for (pool, dim) in [(&self.k, self.head_dim), (&self.v, self.v_head_dim)] {
                            let bytes = (self.page_size * self.kv_heads * dim) as u64 * size;
                            encoder.clear_buffer(pool.buffer(), page as u64 * bytes, Some(bytes));
                        }
                        Ok(())
                    })
                })?;
                page
            }
        };
        let before = self.free.len();
        let pages: Vec<u32> = fresh.iter().map(|&i| s.pages[i]).collect();
        for p in pages {
            self.release(p);
        }
        debug_assert!(self.free.len() >= before);
        if self.zero_page.is_none() {
            let at = self
                .free
                .iter()
                .position(|&p| p == zero)
                .expect("free or just freed");
            self.free.remove(at);
            self.refs[zero as usize] = 1;
            self.zero_page = Some(zero);
        }
        let s = self.seqs.get_mut(&seq).expect("checked above");
        for &i in &fresh {
            s.pages[i] = zero;
        }
        self.refs[zero as usize] += fresh.len() as u32;
        let (lo, hi) = if lo < hi {
            (lo.min(p0), hi.max(p1))
        } else {
            (p0, p1)
        };
        s.released = (lo * ps, hi * ps);
        Ok(fresh.len())
    }

    /// Tokens held by `seq`.
    pub fn len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.seq(seq)?.len)
    }

    /// The pages of `seq`, in order (its block table); released tokens' entries are the
    /// cache's page of zeros ([`release_tokens`](Self::release_tokens)).
    pub fn pages_of(&self, seq: SeqId) -> Result<&[u32]> {
        Ok(&self.seq(seq)?.pages)
    }

    /// The sequences held, in the order they were added.
    pub fn sequences(&self) -> Vec<SeqId> {
        self.seqs.keys().copied().collect()
    }

    /// Pages on the free list.
    pub fn free_pages(&self) -> usize {
        self.free.len()
    }

    /// Pages in the pool.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Tokens per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The K pool, `[pages, page_size, kv_heads, head_dim]`; rows no sequence holds are
    /// unspecified.
    pub fn k(&self) -> &Tensor {
        &self.k
    }

    /// The V pool, `[pages, page_size, kv_heads, v_head_dim]`.
    pub fn v(&self) -> &Tensor {
        &self.v
    }

    fn seq(&self, seq: SeqId) -> Result<&Sequence> {
        self.seqs
            .get(&seq)
            .ok_or(Error::UnknownSequence { id: seq.0 })
    }

    fn release(&mut self, page: u32) {
        let r = &mut self.refs[page as usize];
        *r -= 1;
        if *r == 0 {
            self.free.push(page);
        }
    }

    fn take_page(&mut self) -> u32 {
        let page = self.free.pop().expect("pages counted before taking");
        self.refs[page as usize] = 1;
        page
    }

    /// Appends `t` tokens to `seq` from host rows `k` (`[t, kv_heads, head_dim]`) and `v`
    /// (`[t, kv_heads, v_head_dim]`), rounded to the cache's dtype. Takes pages from the free
    /// list as the sequence needs them, and first copies its last page if another sequence
    /// shares it; with too few free pages nothing changes and the error says how many were
    /// needed.
    pub fn append(&mut self, gpu: &Gpu, seq: SeqId, k: &[f32], v: &[f32]) -> Result<()> {
        gpu.expect_own("the paged cache", &self.k)?;
        let row_k = self.kv_heads * self.head_dim;
        let row_v = self.kv_heads * self.v_head_dim;
        let t = k.len() / row_k.max(1);
        for (what, data, row) in [("K", k, row_k), ("V", v, row_v)] {
            if data.len() != t * row || (row == 0 && !data.is_empty()) {
                return Err(Error::DataLength {
                    what,
                    dims: vec![t, self.kv_heads, row / self.kv_heads],
                    expected: t * row,
                    got: data.len(),
                });
            }
        }
        if t == 0 {
            return Err(Error::ZeroSize {
                what: "appended tokens",
            });
        }
        let (len, total, _) = self.plan_append(seq, t)?;
        // K turned by its tokens' positions, in f64 on the host, before it is rounded.
        let turned;
        let k = match &self.rotary {
            Some(rotary) => {
                if total as u64 > MAX_POSITIONS {
                    return Err(Error::LengthOutOfRange {
                        what: "rotary position",
                        index: 0,
                        value: total - 1,
                        max: MAX_POSITIONS as usize - 1,
                    });
                }
                turned = crate::cpu::rotate(
                    k,
                    [1, t, self.kv_heads, self.head_dim],
                    Layout::Bshd,
                    rotary,
                    &Positions::Start(vec![len as u32]),
                )?;
                &turned[..]
            }
            None => k,
        };
        let size = self.dtype.size();
        gpu.guarded("paged cache append", || {
            let pages = self.take_pages(gpu, seq, len, total)?;
            // One write per page touched, for K and for V.
            for (done, slot, n) in self.runs(&pages, len, t) {
                for (pool, data, row) in [(&self.k, k, row_k), (&self.v, v, row_v)] {
                    let bytes =
                        crate::gpu::tensor::encode(&data[done * row..][..n * row], self.dtype);
                    gpu.queue
                        .write_buffer(pool.buffer(), (slot * row * size) as u64, &bytes);
                }
            }
            let s = self.seqs.get_mut(&seq).expect("checked above");
            s.pages = pages;
            s.len = total;
            Ok(())
        })
    }

    /// [`append`](PagedKvCache::append) from tensors already on the device, for any number of
    /// sequences at once: `new[i]` tokens to `seqs[i]`, their rows packed one sequence after
    /// the other in K `[total, kv_heads, head_dim]` and V `[total, kv_heads, v_head_dim]`
    /// (`total = sum(new)`; rank 3, or rank 4 with a leading 1), in the cache's dtype. The
    /// rows are copied buffer to buffer into the sequences' pages in one submission, never
    /// through the host: a serving engine's projections of a whole batch stay on the GPU.
    /// With a [`Rotary`], K is turned on the device by each token's position (into scratch,
    /// then copied), from the tensor's values (already in the cache's dtype: rounded again
    /// after the rotation, where the host append rounds once). A sequence may appear once per
    /// call. With too few free pages for all of them it is [`Error::CacheFull`], and on any
    /// error nothing changes.
    ///
    /// ```no_run
    /// use wgpu_attention::{Gpu, PagedKvCache};
    /// let gpu = Gpu::new()?;
    /// let (kv_heads, dim) = (2, 64);
    /// let mut cache = PagedKvCache::new(&gpu, 256, 16, kv_heads, dim, dim)?;
    /// let (a, b) = (cache.add_sequence(), cache.add_sequence());
    /// // A decoding step of two sequences: one new token each, K and V from the projections.
    /// let k = gpu.upload(&vec![0.1; 2 * kv_heads * dim], [2, kv_heads, dim])?;
    /// cache.append_tensors(&gpu, &[a, b], &[1, 1], &k, &k)?;
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn append_tensors(
        &mut self,
        gpu: &Gpu,
        seqs: &[SeqId],
        new: &[usize],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<()> {
        gpu.expect_own("the paged cache", &self.k)?;
        if new.len() != seqs.len() {
            return Err(Error::ShapeMismatch {
                what: "appended token counts (one per sequence)".into(),
                got: new.len(),
                expected: seqs.len(),
            });
        }
        let rows = new
            .iter()
            .try_fold(0usize, |a, &n| a.checked_add(n))
            .ok_or(Error::TooLarge {
                what: "appended tokens",
                requested: u64::MAX,
                max: usize::MAX as u64,
                hint: "",
            })?;
        for (what, tensor, dim) in [("K", k, self.head_dim), ("V", v, self.v_head_dim)] {
            let want = [1, rows, self.kv_heads, dim];
            crate::gpu::cache::check_appended(gpu, what, tensor, want, (&self.k, &self.v))?;
        }
        if rows == 0 {
            return Err(Error::ZeroSize {
                what: "appended tokens",
            });
        }
        // Each sequence's lengths, and the pages all of them need against the free list.
        let mut plans = Vec::with_capacity(seqs.len());
        let mut needed = 0;
        let mut seen = std::collections::HashSet::with_capacity(seqs.len());
        // References to shared last pages that earlier sequences of the batch drop.
        let mut dropped = std::collections::HashMap::new();
        for (i, (&seq, &n)) in seqs.iter().zip(new).enumerate() {
            if !seen.insert(seq) {
                return Err(Error::InvalidOption {
                    what: "appended sequences",
                    value: format!("sequence {} twice", seq.0),
                    why: "a sequence may appear once in an append",
                });
            }
            if n == 0 {
                let len = self.seq(seq)?.len;
                plans.push((seq, 0, len, len));
                continue;
            }
            let (len, total, mut pages) = self.plan_append(seq, n)?;
            // A partly filled last page shared with sequences earlier in the batch: each of
            // those copies it first and lets go of it, so it may be this one's alone by its
            // turn (take_pages copies only a page still shared).
            let held = &self.seqs[&seq].pages;
            if !len.is_multiple_of(self.page_size) {
                let tail = held[held.len() - 1];
                let refs = self.refs[tail as usize];
                let copied = dropped.entry(tail).or_insert(0u32);
                if refs > 1 {
                    if refs - *copied > 1 {
                        *copied += 1;
                    } else {
                        pages -= 1;
                    }
                }
            }
            if self.rotary.is_some() && total as u64 > MAX_POSITIONS {
                return Err(Error::LengthOutOfRange {
                    what: "rotary position",
                    index: i,
                    value: total - 1,
                    max: MAX_POSITIONS as usize - 1,
                });
            }
            needed += pages;
            plans.push((seq, n, len, total));
        }
        if needed > self.free.len() {
            return Err(Error::CacheFull {
                needed,
                free: self.free.len(),
            });
        }
        let size = self.dtype.size();
        gpu.guarded("paged cache append", || {
            // K turned into scratch first, where the cache turns it: row by row, each at its
            // token's position.
            let turned = match &self.rotary {
                Some(_) => Some(gpu.empty_as(k.dims(), self.dtype)?),
                None => None,
            };
            let positions: Vec<u32> = plans
                .iter()
                .flat_map(|&(_, n, len, _)| (len..len + n).map(|p| p as u32))
                .collect();
            // The pages each sequence held and holds, and what a failure gives back.
            let mut taken: Vec<(SeqId, Vec<u32>, Vec<u32>)> = Vec::with_capacity(plans.len());
            let mut result = Ok(());
            for &(seq, n, len, total) in &plans {
                if n == 0 {
                    continue;
                }
                let before = self.seqs[&seq].pages.clone();
                match self.take_pages(gpu, seq, len, total) {
                    Ok(pages) => taken.push((seq, before, pages)),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if result.is_ok() {
                result = gpu.submit_with("paged cache append", |encoder| {
                    if let (Some(rotary), Some(turned)) = (&self.rotary, &turned) {
                        let strides = Layout::Bshd.strides(self.kv_heads, rows, self.head_dim);
                        let rotation = rotary::Rotation {
                            x: k.buffer(),
                            x_dtype: k.dtype(),
                            x_bytes: k.byte_len(),
                            x_strides: strides,
                            y: turned,
                            y_strides: strides,
                            batch: 1,
                            heads: self.kv_heads,
                            seq: rows,
                            dim: self.head_dim,
                            positions: &positions,
                            per_row: true,
                            axes: false,
                            counts: None,
                            rows_at_position: false,
                            first: true,
                            last: true,
                        };
                        rotary::encode(gpu, encoder, rotary, &rotation)?;
                    }
                    let k = turned.as_ref().unwrap_or(k);
                    let (row_k, row_v) = (
                        self.kv_heads * self.head_dim,
                        self.kv_heads * self.v_head_dim,
                    );
                    let mut first = 0;
                    let mut held = taken.iter();
                    for &(_, n, len, _) in &plans {
                        if n == 0 {
                            continue;
                        }
                        let (_, _, pages) = held.next().expect("one per sequence appended to");
                        for (done, slot, run) in self.runs(pages, len, n) {
                            for (pool, src, row) in [(&self.k, k, row_k), (&self.v, v, row_v)] {
                                let bytes = (row * size) as u64;
                                encoder.copy_buffer_to_buffer(
                                    src.buffer(),
                                    (first + done) as u64 * bytes,
                                    pool.buffer(),
                                    slot as u64 * bytes,
                                    run as u64 * bytes,
                                );
                            }
                        }
                        first += n;
                    }
                    Ok(())
                });
            }
            if let Err(e) = result {
                // A typed error of the rotation (a binding past the limits) or a failed
                // submission: every sequence's pages go back as they were.
                for (_, before, pages) in taken.iter().rev() {
                    self.untake(before, pages);
                }
                return Err(e);
            }
            for ((seq, _, pages), &(_, _, _, total)) in
                taken.into_iter().zip(plans.iter().filter(|p| p.1 > 0))
            {
                let s = self.seqs.get_mut(&seq).expect("checked above");
                s.pages = pages;
                s.len = total;
            }
            Ok(())
        })
    }

    /// [`Error::InvalidOption`] if a row of the call `opts` (the cache's, `width` pages per
    /// sequence) would see a released token of its sequence, by its key range or its sink keys
    /// (before the boolean mask and per-key mods, which only hide more).
    fn check_released(
        &self,
        q: &Tensor,
        seqs: &[SeqId],
        held: &[&Sequence],
        width: usize,
        opts: &Attention,
    ) -> Result<()> {
        let [batch, heads, q_len, head_dim] = q.dims();
        let dims = Dims {
            batch,
            heads,
            kv_heads: self.kv_heads,
            q_len,
            kv_len: width * self.page_size,
            head_dim,
            v_head_dim: self.v_head_dim,
        };
        let spec = opts.validate(dims)?;
        for (b, s) in held.iter().enumerate() {
            let (lo, hi) = s.released;
            for i in 0..q_len {
                let (a, e) = spec.key_range(b, i);
                let sinks = spec.sink_end(b, i);
                if (a < hi && e > lo && a < e) || sinks > lo && lo < hi {
                    return Err(Error::InvalidOption {
                        what: "released tokens",
                        value: format!(
                            "row {i} of sequence {} sees keys {a}..{e} (and sink keys 0..{sinks}), \
                             tokens {lo}..{hi} are released",
                            seqs[b].0
                        ),
                        why: "a call must not see a sequence's released tokens: give it a \
                              window (and sink keys) that stop short of them",
                    });
                }
            }
        }
        Ok(())
    }

    /// `(len, total, needed)`: `seq`'s length before and after appending `t` tokens, and the
    /// pages that takes, once the pool is known to have them ([`Error::CacheFull`] if not;
    /// nothing changes).
    fn plan_append(&self, seq: SeqId, t: usize) -> Result<(usize, usize, usize)> {
        let s = self.seq(seq)?;
        let (len, held) = (s.len, s.pages.len());
        let total = len.checked_add(t).ok_or(Error::TooLarge {
            what: "paged sequence length",
            requested: u64::MAX,
            max: usize::MAX as u64,
            hint: "",
        })?;
        // Copy on write: the last page, partly filled and shared.
        let shared_tail =
            !len.is_multiple_of(self.page_size) && self.refs[s.pages[held - 1] as usize] > 1;
        let needed = total.div_ceil(self.page_size) - held + shared_tail as usize;
        if needed > self.free.len() {
            return Err(Error::CacheFull {
                needed,
                free: self.free.len(),
            });
        }
        Ok((len, total, needed))
    }

    /// The pages `seq` holds once grown from `len` to `total` tokens (checked by
    /// `plan_append`): its last page copied first if partly filled and shared (copy on write),
    /// then pages taken from the free list. Call inside [`Gpu::guarded`]; the caller stores
    /// them once the rows are written, or gives them back with `untake` if that fails. On an
    /// error (the copy's submission) nothing has changed.
    fn take_pages(&mut self, gpu: &Gpu, seq: SeqId, len: usize, total: usize) -> Result<Vec<u32>> {
        let mut pages = self.seqs[&seq].pages.clone();
        let held = pages.len();
        if !len.is_multiple_of(self.page_size) && self.refs[pages[held - 1] as usize] > 1 {
            let old = pages[held - 1];
            // The page take_page will give, taken once the copy is submitted.
            let new = *self.free.last().expect("pages counted before taking");
            let rows = (len % self.page_size) as u64;
            let size = self.dtype.size();
            let (row_k, row_v) = (
                self.kv_heads * self.head_dim,
                self.kv_heads * self.v_head_dim,
            );
            // Through a scratch buffer: wgpu copies between two distinct buffers only.
            gpu.submit_with("paged cache copy on write", |encoder| {
                for (pool, row) in [(&self.k, row_k), (&self.v, row_v)] {
                    let page_bytes = (self.page_size * row * size) as u64;
                    let bytes = rows * (row * size) as u64;
                    let scratch = gpu.scratch(
                        "wgpu-attention page copy",
                        bytes,
                        wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    );
                    let (src, dst) = (old as u64 * page_bytes, new as u64 * page_bytes);
                    encoder.copy_buffer_to_buffer(pool.buffer(), src, &scratch, 0, bytes);
                    encoder.copy_buffer_to_buffer(&scratch, 0, pool.buffer(), dst, bytes);
                }
                Ok(())
            })?;
            let taken = self.take_page();
            debug_assert_eq!(taken, new);
            self.release(old);
            pages[held - 1] = new;
        }
        while pages.len() < total.div_ceil(self.page_size) {
            let page = self.take_page();
            pages.push(page);
        }
        Ok(pages)
    }

    /// Undoes `take_pages`, which turned a sequence's pages `before` into `after`: the pages
    /// it took go back to the free list (in the order they came off it), and a page it copied
    /// on write gets back the reference the sequence held.
    fn untake(&mut self, before: &[u32], after: &[u32]) {
        for (i, &p) in after.iter().enumerate().rev() {
            match before.get(i) {
                Some(&old) if old == p => continue,
                Some(&old) => self.refs[old as usize] += 1,
                None => {}
            }
            self.refs[p as usize] = 0;
            self.free.push(p);
        }
    }

    /// The runs of an append of `t` tokens after `len` into `pages`, one per page touched:
    /// `(first token of the run, pool slot it goes to, tokens)`.
    fn runs(&self, pages: &[u32], len: usize, t: usize) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < t {
            let at = len + done;
            let (page, offset) = (pages[at / self.page_size], at % self.page_size);
            let n = (self.page_size - offset).min(t - done);
            out.push((done, page as usize * self.page_size + offset, n));
            done += n;
        }
        out
    }

    /// Attention of queries `q` (`[seqs.len(), heads, q_len, head_dim]`, layout `Bhsd`) against
    /// the sequences `seqs`, through their block tables: `kv_lens` are their lengths and causal
    /// alignment is bottom-right per sequence unless `opts` sets another (as
    /// [`KvCache::attend`](crate::KvCache::attend)). `opts` may carry every option but its own
    /// `kv_lens`, a block table or another layout.
    pub fn attend(
        &self,
        gpu: &Gpu,
        q: &Tensor,
        seqs: &[SeqId],
        opts: &Attention,
    ) -> Result<Output> {
        if opts.kv_lens.is_some() || opts.device.lens.is_some() || opts.pages.is_some() {
            return Err(Error::InvalidOption {
                what: "paged cache options",
                value: "kv_lens or a block table".into(),
                why: "the cache sets the lengths and the block tables of its sequences",
            });
        }
        if opts.layout != Layout::Bhsd {
            return Err(Error::InvalidOption {
                what: "layout",
                value: format!("{:?}", opts.layout),
                why: "the paged cache attends queries in the Bhsd layout",
            });
        }
        if seqs.is_empty() {
            return Err(Error::ZeroSize { what: "sequences" });
        }
        let held: Vec<&Sequence> = seqs.iter().map(|&s| self.seq(s)).collect::<Result<_>>()?;
        // Tables padded to the longest with page 0, a page of the pool: keys past a sequence's
        // length may be staged from it but are masked, and never reach the output.
        let width = held.iter().map(|s| s.pages.len()).max().unwrap_or(0).max(1);
        let mut table = vec![0u32; seqs.len() * width];
        for (row, s) in table.chunks_mut(width).zip(&held) {
            row[..s.pages.len()].copy_from_slice(&s.pages);
        }
        let lens = held.iter().map(|s| s.len as u32).collect();
        let mut opts = opts.clone().kv_lens(lens).paged(self.page_size, table);
        if opts.causal.is_none() {
            opts = opts.causal(Causal::BottomRight);
        }
        if held.iter().any(|s| s.released.0 < s.released.1) {
            self.check_released(q, seqs, &held, width, &opts)?;
        }
        match &self.rotary {
            Some(rotary) => {
                let lens: Vec<u32> = held.iter().map(|s| s.len as u32).collect();
                rotary::attend_rotated(gpu, &opts, (q, &self.k, &self.v), rotary, &lens)
            }
            None => opts.run(gpu, q, &self.k, &self.v),
        }
    }
}
