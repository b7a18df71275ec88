//! Scores and masks written by the user: PyTorch's FlexAttention (`score_mod`, `mask_mod`) for a
//! portable kernel library.
//!
//! A [`ScoreMod`] carries up to four small functions of a score's place `(b, h, i, j)`, each in
//! two forms: WGSL, which the GPU kernels compile in (every path: three-pass, fused, decode and
//! the backward), and a Rust closure, which the CPU paths run (the f64 reference, its backward
//! and `cpu::fast`). The two forms must agree; the tests of a program that writes one check it
//! the way this crate's tests check its own options, by running the GPU against
//! [`cpu::reference`](crate::cpu::reference).
//!
//! # Where it acts
//!
//! The score of `(b, h, i, j)` is `floor(mod(cap(scale · q·k), b, h, i, j) + bias + ALiBi)`:
//! the score mod sees the scaled dot product after the softcap (or the additive score), before
//! the bias and ALiBi, and its result is clamped to `SCORE_FLOOR ..= -SCORE_FLOOR` (NaN to the
//! floor) like every score. The mask mod removes keys as a boolean mask does, on top of every
//! other mask (causal, window, lengths, the boolean mask): a row it empties gives zeros and a
//! log-sum-exp of `-inf`. `h` is the query head (a GQA group's kv head is `h / group`); `i` and
//! `j` count within the sequence, also in a packed batch and a paged one. In a
//! [`KvCache`](crate::KvCache) step, `i` counts the call's new rows and `j` the cached keys: the
//! absolute position of row `i` is `attn_kv_len(b) - attn_q_len(b) + i`.
//!
//! # The WGSL
//!
//! Each form is the *body* of a function whose signature is fixed:
//!
//! ```text
//! fn attn_mask_mod(b: u32, h: u32, i: u32, j: u32) -> bool              // false removes the key
//! fn attn_score_mod(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32      // the new score
//! fn attn_score_mod_grad(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 // d attn_score_mod / ds
//! fn attn_key_range(b: u32, i: u32) -> vec2<u32>                        // keys lo..hi of row i
//! ```
//!
//! Beside their arguments the bodies may call `attn_data(k) -> u32` and `attn_data_f32(k) ->
//! f32` (word `k` of [`data_u32`](ScoreMod::data_u32) / [`data_f32`](ScoreMod::data_f32): a
//! table of relative-position buckets, document ids, per-head values), `attn_q_len(b)` and
//! `attn_kv_len(b)` (sequence `b`'s rows and keys, after `q_lens`, `kv_lens` or a packed batch),
//! and functions of their own from [`helpers`](ScoreMod::helpers) (named with a prefix of your
//! own: a helper named like any of the kernels' module-scope names, or starting with `attn_`,
//! is refused). Nothing else of the kernel is theirs to read. The source is checked when a
//! device first meets it: a typed [`Error::InvalidOption`] with the compiler's message (in the
//! browser, where wgpu's errors arrive late, that error is the next call's, as for every wgpu
//! error there). Every distinct source compiles its own pipelines, so per-call values go in the
//! data, not into the source text.
//!
//! Loops must be bounded: the kernels are compiled without wgpu's loop guards. On Mesa's
//! software driver (llvmpipe) a loop in a mod also spends the driver's budget of 65535 loop
//! iterations per invocation, over every score the invocation computes: a mod looping 40 times
//! per score over 2048 keys gave the fused kernel and the row backward wrong results there (a
//! review's case). On that driver keep mods' loops short, or cap the keys per dispatch
//! ([`LimitCaps::max_key_tiles_per_workgroup`](crate::LimitCaps::max_key_tiles_per_workgroup));
//! GPU drivers have no such budget.
//!
//! # The backward
//!
//! A score mod's gradient needs its derivative by `s`: the backward refuses a score mod without
//! [`grad_wgsl`](ScoreMod::grad_wgsl) (GPU) or [`grad_cpu`](ScoreMod::grad_cpu) (CPU). A mask mod
//! needs none.
//!
//! # Cost, and the key range
//!
//! A call with a mask or score mod runs its code for every score the kernels compute: the
//! fused and decode kernels then treat every key tile as one with per-key options. Key tiles a
//! mask mod removes entirely are still computed (as zeros). The key range is what lets the
//! kernels skip them (FlexAttention's block mask, by rows): `attn_key_range(b, i)` bounds the
//! keys row `i` of sequence `b` may see, for every head, and narrows the row's range as a
//! sliding window does (with a window and sink keys, the sink keys stay visible beside both;
//! sink keys act only with a window). The fused and decode kernels, the tiled backward and
//! `cpu::fast` bound the key tiles they visit by the rows' ranges, so a chunked or banded
//! pattern given as a range costs there what it keeps (the three-pass path and the row
//! backward compute every score and apply the range as a mask); a mask mod can remove keys
//! within it. Where a pattern is causal, a window or lengths, say so with those options too.
//! Three patterns come ready-made as key ranges: [`ScoreMod::chunked`],
//! [`ScoreMod::prefix_lm`] and [`ScoreMod::documents`].
//!
//! ```
//! use wgpu_attention::{Attention, Dims, ScoreMod, cpu};
//! // Llama 4's chunked attention (chunks of 4 tokens, causal within them) as a key range,
//! // every third key of a chunk removed by a mask mod, and a distance penalty per head.
//! let chunked = ScoreMod::new()
//!     .range_wgsl("return vec2<u32>(i / 4u * 4u, i / 4u * 4u + 4u);")
//!     .range_cpu(|_b, i| (i / 4 * 4, i / 4 * 4 + 4))
//!     .mask_wgsl("return j % 3u != 2u;")
//!     .mask_cpu(|_b, _h, _i, j| j % 3 != 2)
//!     .score_wgsl("return s - attn_data_f32(h) * f32(i - j);")
//!     .score_cpu(|s, _b, h, i, j| s - [0.5, 0.25][h] * (i - j) as f64)
//!     .data_f32(&[0.5, 0.25]);
//! let opts = Attention::new().causal(wgpu_attention::Causal::TopLeft).score_mod(chunked);
//! let dims = Dims::new(1, 2, 10, 8);
//! let x: Vec<f32> = (0..dims.q_elems()).map(|n| (n as f32 * 0.37).sin()).collect();
//! let out = cpu::reference(&x, &x, &x, dims, &opts.clone().return_weights(true))?;
//! // Row 7 of head 0 sees keys 4, 6 and 7 (5 is removed by the mask mod).
//! let w = &out.weights[7 * 10..8 * 10];
//! assert!(w.iter().enumerate().all(|(j, &p)| (p > 0.0) == [4, 6, 7].contains(&j)));
//! # Ok::<(), wgpu_attention::Error>(())
//! ```

use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};

/// The CPU form of a mask mod: `(b, h, i, j) -> keep`.
pub type MaskFn = dyn Fn(usize, usize, usize, usize) -> bool + Send + Sync;
/// The CPU form of a score mod or of its derivative: `(s, b, h, i, j) -> value`.
pub type ScoreFn = dyn Fn(f64, usize, usize, usize, usize) -> f64 + Send + Sync;
/// The CPU form of a key range: `(b, i) -> (lo, hi)`, the keys `lo..hi` row `i` may see.
pub type RangeFn = dyn Fn(usize, usize) -> (usize, usize) + Send + Sync;

/// A user-written mask and score modification ([module docs](crate::score_mod)): FlexAttention's
/// `mask_mod` and `score_mod`, in WGSL for the GPU and as closures for the CPU paths. Give it to
/// a call with [`Attention::score_mod`](crate::Attention::score_mod).
#[derive(Clone, Default)]
pub struct ScoreMod {
    pub(crate) helpers: String,
    pub(crate) mask_wgsl: Option<String>,
    pub(crate) score_wgsl: Option<String>,
    pub(crate) grad_wgsl: Option<String>,
    pub(crate) range_wgsl: Option<String>,
    pub(crate) data: Vec<u32>,
    pub(crate) mask_cpu: Option<Arc<MaskFn>>,
    pub(crate) score_cpu: Option<Arc<ScoreFn>>,
    pub(crate) grad_cpu: Option<Arc<ScoreFn>>,
    pub(crate) range_cpu: Option<Arc<RangeFn>>,
    /// The ready-made mods' rows: the CPU range is called with each row's position in its
    /// sequence (the last row at the last key), as their WGSL computes it.
    pub(crate) rows_at_end: bool,
    /// A ready-made range's words, uploaded after `data` (`mods_ready(k)`).
    pub(crate) ready: Vec<u32>,
}

impl ScoreMod {
    /// No change to any score: add the parts with the other methods.
    pub fn new() -> ScoreMod {
        ScoreMod::default()
    }

    /// Chunked attention (Llama 4's local layers): row `i` sees the keys of its own chunk of
    /// `chunk` tokens, as a key range (the kernels skip the other chunks' tiles); with
    /// `Causal::BottomRight`, up to itself. The ready-made mods number rows by their position
    /// in the sequence, the last row at the last key (`attn_kv_len(b) - attn_q_len(b) + i`, as
    /// bottom-right alignment does): in self-attention row `i` is token `i`, and a
    /// [`KvCache`](crate::KvCache) step's new rows are the tokens after the cache (so pair
    /// them with `Causal::BottomRight`: `TopLeft` would put a step's rows at the start). A
    /// `chunk` of 0 is taken as 1. A ready-made mod takes mask and score mods, helpers and
    /// data of yours beside its range (its own words follow yours); giving it a range of yours
    /// replaces its own.
    ///
    /// ```
    /// use wgpu_attention::{Attention, Causal, Dims, ScoreMod, cpu};
    /// let opts = Attention::new().causal(Causal::BottomRight).score_mod(ScoreMod::chunked(4));
    /// let dims = Dims::new(1, 1, 10, 8);
    /// let x: Vec<f32> = (0..80).map(|n| (n as f32 * 0.37).sin()).collect();
    /// let w = cpu::reference(&x, &x, &x, dims, &opts.return_weights(true))?.weights;
    /// // Row 6 sees keys 4, 5 and 6.
    /// assert!((0..10).all(|j| (w[6 * 10 + j] > 0.0) == (4..=6).contains(&j)));
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn chunked(chunk: usize) -> ScoreMod {
        let c = chunk.max(1);
        ScoreMod::ready_made(
            "let p = mods_row_position(b, i); let c = mods_ready(0u);\n\
             if p < 0 { return vec2<u32>(0u, 0u); }\n\
             return vec2<u32>(u32(p) / c * c, u32(p) / c * c + c);",
            move |_, p| (p / c * c, p / c * c + c),
            vec![c.min(u32::MAX as usize) as u32],
        )
    }

    /// A prefix LM (T5's, PaliGemma's): every row sees the first `prefix` keys (the prompt,
    /// attended bidirectionally), and the keys up to itself: the key range `0 .. max(prefix,
    /// p + 1)` for the row at position `p` (as for [`chunked`](ScoreMod::chunked)); no causal
    /// option is needed.
    pub fn prefix_lm(prefix: usize) -> ScoreMod {
        let p = prefix.min(u32::MAX as usize);
        ScoreMod::ready_made(
            "let p = mods_row_position(b, i);\n\
             if p < 0 { return vec2<u32>(0u, 0u); }\n\
             return vec2<u32>(0u, max(mods_ready(0u), u32(p) + 1u));",
            move |_, i| (0, p.max(i + 1)),
            vec![p as u32],
        )
    }

    /// Documents packed into each sequence (the packing of pre-training): the row at position
    /// `p` of batch entry `b` (as for [`chunked`](ScoreMod::chunked)) sees the keys of its own
    /// document only, as a key range; with `Causal::BottomRight`, up to itself. `docs[b]`
    /// lists entry `b`'s document lengths in order, over the whole sequence (a cache's tokens
    /// included); positions past them, and batch entries past `docs`, see no key. Two words of
    /// data per token (each token's document bounds), uploaded with each call.
    /// [`Error::InvalidOption`] when an entry's documents add up past `u32::MAX` tokens or
    /// the table would pass 2^28 words (1 GiB).
    pub fn documents(docs: &[Vec<usize>]) -> Result<ScoreMod> {
        let too_big = |value: String| Error::InvalidOption {
            what: "documents",
            value,
            why: "each entry's documents must add up to at most u32::MAX tokens, and the \
                  table (2 words per token of the longest entry, per entry) to at most 2^28 \
                  words",
        };
        let mut stride = 0u32;
        for (b, lens) in docs.iter().enumerate() {
            let total = lens
                .iter()
                .try_fold(0u32, |a, &l| a.checked_add(u32::try_from(l).ok()?))
                .ok_or_else(|| too_big(format!("entry {b}'s lengths {lens:?}")))?;
            stride = stride.max(total);
        }
        let words = (stride as usize)
            .checked_mul(2 * docs.len())
            .filter(|&w| w <= 1 << 28)
            .ok_or_else(|| too_big(format!("{} entries of {stride} tokens", docs.len())))?;
        let mut bounds = vec![0u32; words];
        for (b, lens) in docs.iter().enumerate() {
            let mut start = 0u32;
            for &len in lens {
                let end = start + len as u32;
                for t in start..end {
                    let at = 2 * (b * stride as usize + t as usize);
                    bounds[at..at + 2].copy_from_slice(&[start, end]);
                }
                start = end;
            }
        }
        let table = Arc::new(bounds.clone());
        let mut data = vec![stride, docs.len() as u32];
        data.extend(bounds);
        let stride = stride as usize;
        Ok(ScoreMod::ready_made(
            "let stride = mods_ready(0u);\n\
             let p = mods_row_position(b, i);\n\
             if p < 0 || u32(p) >= stride || b >= mods_ready(1u) { return vec2<u32>(0u, 0u); }\n\
             let k = 2u + 2u * (b * stride + u32(p));\n\
             return vec2<u32>(mods_ready(k), mods_ready(k + 1u));",
            move |b, p| {
                let at = 2 * (b * stride + p);
                match table.get(at..at + 2) {
                    Some(&[lo, hi]) if p < stride => (lo as usize, hi as usize),
                    _ => (0, 0),
                }
            },
            data,
        ))
    }

    /// A ready-made key range: its WGSL body (reading its words with `mods_ready(k)` and its
    /// row's position with `mods_row_position(b, i)`), the same on the CPU (given positions),
    /// and its words.
    fn ready_made(
        wgsl: &str,
        cpu: impl Fn(usize, usize) -> (usize, usize) + Send + Sync + 'static,
        words: Vec<u32>,
    ) -> ScoreMod {
        ScoreMod {
            range_wgsl: Some(wgsl.into()),
            range_cpu: Some(Arc::new(cpu)),
            ready: words,
            rows_at_end: true,
            ..ScoreMod::default()
        }
    }

    /// The words uploaded with a call: the user's data, then a ready-made range's.
    pub(crate) fn words(&self) -> Vec<u32> {
        [&self.data[..], &self.ready[..]].concat()
    }

    /// The body of `fn attn_mask_mod(b: u32, h: u32, i: u32, j: u32) -> bool`: `false` removes
    /// key `j` from row `i`.
    pub fn mask_wgsl(mut self, body: impl Into<String>) -> Self {
        self.mask_wgsl = Some(body.into());
        self
    }

    /// The mask mod on the CPU paths: the same function as [`mask_wgsl`](ScoreMod::mask_wgsl).
    pub fn mask_cpu(
        mut self,
        f: impl Fn(usize, usize, usize, usize) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.mask_cpu = Some(Arc::new(f));
        self
    }

    /// The body of `fn attn_score_mod(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32`: the new
    /// score from `s` (the scaled dot product after the softcap). Its result should be finite;
    /// it is clamped to `SCORE_FLOOR ..= -SCORE_FLOOR`, and NaN counts as the floor.
    pub fn score_wgsl(mut self, body: impl Into<String>) -> Self {
        self.score_wgsl = Some(body.into());
        self
    }

    /// The score mod on the CPU paths (in f64): the same function as
    /// [`score_wgsl`](ScoreMod::score_wgsl).
    pub fn score_cpu(
        mut self,
        f: impl Fn(f64, usize, usize, usize, usize) -> f64 + Send + Sync + 'static,
    ) -> Self {
        self.score_cpu = Some(Arc::new(f));
        self
    }

    /// The body of `fn attn_score_mod_grad(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32`:
    /// the derivative of the score mod by `s`, which the GPU backward needs (`return 1.0;` for
    /// a mod that adds to the score).
    pub fn grad_wgsl(mut self, body: impl Into<String>) -> Self {
        self.grad_wgsl = Some(body.into());
        self
    }

    /// The derivative of the score mod by `s` on the CPU ([`cpu::reference_backward`]).
    ///
    /// [`cpu::reference_backward`]: crate::cpu::reference_backward
    pub fn grad_cpu(
        mut self,
        f: impl Fn(f64, usize, usize, usize, usize) -> f64 + Send + Sync + 'static,
    ) -> Self {
        self.grad_cpu = Some(Arc::new(f));
        self
    }

    /// The body of `fn attn_key_range(b: u32, i: u32) -> vec2<u32>`: the keys `lo..hi` (half
    /// open) that row `i` of sequence `b` may see at most, for every head. Keys outside are
    /// removed as a window removes them (with a window and sink keys, the sink keys stay
    /// visible beside both), and the fused and decode kernels, the tiled backward and
    /// `cpu::fast` skip the key tiles no row of theirs may see: this is what makes a sparse
    /// pattern (chunks, a document, a prefix) cost what it keeps. A mask mod can then remove
    /// keys within the range.
    pub fn range_wgsl(mut self, body: impl Into<String>) -> Self {
        self.drop_ready_made();
        self.range_wgsl = Some(body.into());
        self
    }

    /// A range of the user's replaces a ready-made one whole: both forms (so that a form left
    /// out is an error, not the ready-made one numbering rows otherwise), and its words.
    fn drop_ready_made(&mut self) {
        if self.rows_at_end {
            self.rows_at_end = false;
            self.range_wgsl = None;
            self.range_cpu = None;
            self.ready.clear();
        }
    }

    /// The key range on the CPU paths: the same function as
    /// [`range_wgsl`](ScoreMod::range_wgsl), `(b, i) -> (lo, hi)`.
    pub fn range_cpu(
        mut self,
        f: impl Fn(usize, usize) -> (usize, usize) + Send + Sync + 'static,
    ) -> Self {
        self.drop_ready_made();
        self.range_cpu = Some(Arc::new(f));
        self
    }

    /// WGSL declared beside the functions: helpers of their own, constants.
    pub fn helpers(mut self, wgsl: impl Into<String>) -> Self {
        self.helpers = wgsl.into();
        self
    }

    /// Words the WGSL reads with `attn_data(k)` (and `attn_data_f32(k)`, the same words as
    /// f32 bits); uploaded with each call.
    pub fn data_u32(mut self, words: Vec<u32>) -> Self {
        self.data = words;
        self
    }

    /// [`data_u32`](ScoreMod::data_u32) from f32 values, for `attn_data_f32(k)`.
    pub fn data_f32(mut self, values: &[f32]) -> Self {
        self.data = values.iter().map(|x| x.to_bits()).collect();
        self
    }

    /// Whether it changes anything (a part in either form).
    pub(crate) fn any(&self) -> bool {
        self.has_mask() || self.has_score() || self.has_range()
    }

    /// Whether it has a key range, in either form.
    pub(crate) fn has_range(&self) -> bool {
        self.range_wgsl.is_some() || self.range_cpu.is_some()
    }

    /// The CPU key range of row `i` of sequence `b`, whose rows start `shift` keys in
    /// (`kv_len - q_len` of the sequence), if it has one.
    pub(crate) fn range(&self, b: usize, i: usize, shift: i64) -> Option<(usize, usize)> {
        let f = self.range_cpu.as_ref()?;
        if !self.rows_at_end {
            return Some(f(b, i));
        }
        Some(match usize::try_from(i as i64 + shift) {
            Ok(p) => f(b, p),
            Err(_) => (0, 0),
        })
    }

    /// Whether it has a mask mod, in either form.
    pub(crate) fn has_mask(&self) -> bool {
        self.mask_wgsl.is_some() || self.mask_cpu.is_some()
    }

    /// Whether it has a score mod, in either form.
    pub(crate) fn has_score(&self) -> bool {
        self.score_wgsl.is_some() || self.score_cpu.is_some()
    }

    /// [`Error::InvalidOption`] unless every part has the form `side` runs ("WGSL" for the
    /// GPU, "CPU" for the CPU paths), and, for a backward, the score mod its derivative.
    pub(crate) fn require(&self, gpu: bool, backward: bool) -> Result<()> {
        // (part, whether the call needs it, whether `side` has it): the builder's methods are
        // `<part>_wgsl` and `<part>_cpu`.
        let pick = |w: bool, c: bool| if gpu { w } else { c };
        let parts = [
            (
                "mask",
                self.has_mask(),
                pick(self.mask_wgsl.is_some(), self.mask_cpu.is_some()),
            ),
            (
                "score",
                self.has_score(),
                pick(self.score_wgsl.is_some(), self.score_cpu.is_some()),
            ),
            (
                "range",
                self.has_range(),
                pick(self.range_wgsl.is_some(), self.range_cpu.is_some()),
            ),
            (
                "grad",
                backward && self.has_score(),
                pick(self.grad_wgsl.is_some(), self.grad_cpu.is_some()),
            ),
        ];
        match parts.into_iter().find(|&(_, needed, have)| needed && !have) {
            Some((part, ..)) => Err(Error::InvalidOption {
                what: "score mod",
                value: format!("no ScoreMod::{part}_{}", if gpu { "wgsl" } else { "cpu" }),
                why: "the GPU runs each part's WGSL and the CPU paths its closure, and a \
                      backward needs the score mod's derivative (grad): give the form named",
            }),
            None => Ok(()),
        }
    }

    /// The WGSL the kernels compile in: the ready-made range's accessors, the helpers and the
    /// four functions, each part not given the identity (keep every key, leave the score,
    /// derivative 1, every key in range).
    pub(crate) fn wgsl(&self) -> String {
        let body = |b: &Option<String>, default: &str| b.clone().unwrap_or_else(|| default.into());
        // A ready-made range's accessors: its words follow the user's.
        let ready = if self.rows_at_end {
            format!(
                "{ROW_POSITION}\nfn mods_ready(k: u32) -> u32 {{ return attn_data({}u + k); }}\n",
                self.data.len().min(u32::MAX as usize)
            )
        } else {
            String::new()
        };
        format!(
            "// The call's score mod (wgpu_attention::ScoreMod).\n{ready}{}\n\
             fn attn_mask_mod(b: u32, h: u32, i: u32, j: u32) -> bool {{\n{}\n}}\n\
             fn attn_score_mod(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {{\n{}\n}}\n\
             fn attn_score_mod_grad(s: f32, b: u32, h: u32, i: u32, j: u32) -> f32 {{\n{}\n}}\n\
             fn attn_key_range(b: u32, i: u32) -> vec2<u32> {{\n{}\n}}\n",
            self.helpers,
            body(&self.mask_wgsl, "return true;"),
            body(&self.score_wgsl, "return s;"),
            body(&self.grad_wgsl, "return 1.0;"),
            body(&self.range_wgsl, "return vec2<u32>(0u, 0xffffffffu);"),
        )
    }

    /// The first module-scope name the helpers declare that `taken` holds (a name of the
    /// kernels'): such a helper would fail to compile in some kernel, or in one kernel only.
    pub(crate) fn clashing_helper(
        &self,
        taken: &std::collections::HashSet<String>,
    ) -> Option<String> {
        module_scope_names(&self.helpers)
            .into_iter()
            .find(|name| taken.contains(name) || name.starts_with("attn_"))
    }

    /// The CPU mask mod of `(b, h, i, j)`: true without one.
    pub(crate) fn keeps(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        self.mask_cpu.as_ref().is_none_or(|f| f(b, h, i, j))
    }

    /// The CPU score mod of `s` at `(b, h, i, j)`, clamped as the kernels clamp it, and its
    /// derivative (0 where the clamp acts); `(s, 1)` without one.
    pub(crate) fn apply(&self, s: f64, b: usize, h: usize, i: usize, j: usize) -> (f64, f64) {
        let Some(f) = &self.score_cpu else {
            return (s, 1.0);
        };
        let floor = crate::spec::SCORE_FLOOR as f64;
        let y = f(s, b, h, i, j);
        if !(y >= floor && y <= -floor) {
            return (if y > 0.0 { -floor } else { floor }, 0.0);
        }
        let slope = self.grad_cpu.as_ref().map_or(1.0, |g| g(s, b, h, i, j));
        (y, slope)
    }
}

/// The names WGSL `source` declares at module scope (functions, constants, overrides,
/// variables, structs, aliases): the first identifier after such a keyword at brace depth 0
/// (past a `var`'s `<address space, access>`), however many declarations share a line, with
/// line and block comments (nested, as WGSL's) removed first. A scan, not a parser.
pub(crate) fn module_scope_names(source: &str) -> Vec<String> {
    // The source without comments (each block comment a space).
    let mut text = String::with_capacity(source.len());
    let mut chars = source.chars().peekable();
    let mut nested = 0;
    while let Some(c) = chars.next() {
        let next = chars.peek().copied();
        match (c, next) {
            ('/', Some('*')) => {
                chars.next();
                nested += 1;
                text.push(' ');
            }
            ('*', Some('/')) if nested > 0 => {
                chars.next();
                nested -= 1;
            }
            _ if nested > 0 => {}
            ('/', Some('/')) => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        text.push('\n');
                        break;
                    }
                }
            }
            _ => text.push(c),
        }
    }
    let mut names = Vec::new();
    let (mut depth, mut angle) = (0i32, 0i32);
    // After a declaring keyword at depth 0, until its name.
    let mut declaring = false;
    let mut word = String::new();
    for c in text.chars().chain([' ']) {
        if c.is_alphanumeric() || c == '_' {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            if declaring && angle == 0 {
                names.push(std::mem::take(&mut word));
                declaring = false;
            } else if depth == 0
                && !declaring
                && matches!(
                    word.as_str(),
                    "fn" | "const" | "override" | "var" | "struct" | "alias"
                )
            {
                declaring = true;
            }
            word.clear();
        }
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            '<' if declaring => angle += 1,
            '>' if declaring => angle -= 1,
            _ => {}
        }
    }
    names
}

/// The ready-made mods' helper: row `i`'s position in sequence `b`, the last row at the last
/// key (negative for rows before the first key when a call has more rows than keys).
const ROW_POSITION: &str = "fn mods_row_position(b: u32, i: u32) -> i32 {\n    \
    return i32(attn_kv_len(b)) - i32(attn_q_len(b)) + i32(i);\n}";

impl fmt::Debug for ScoreMod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScoreMod")
            .field("helpers", &self.helpers)
            .field("mask_wgsl", &self.mask_wgsl)
            .field("score_wgsl", &self.score_wgsl)
            .field("grad_wgsl", &self.grad_wgsl)
            .field("range_wgsl", &self.range_wgsl)
            .field("data", &self.data.len())
            .field("ready", &self.ready.len())
            .field("mask_cpu", &self.mask_cpu.is_some())
            .field("score_cpu", &self.score_cpu.is_some())
            .field("grad_cpu", &self.grad_cpu.is_some())
            .field("range_cpu", &self.range_cpu.is_some())
            .field("rows_at_end", &self.rows_at_end)
            .finish()
    }
}

/// Equal when the WGSL and the data are, and the closures are the same ones.
impl PartialEq for ScoreMod {
    fn eq(&self, other: &ScoreMod) -> bool {
        fn same<T: ?Sized>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (None, None) => true,
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                _ => false,
            }
        }
        self.helpers == other.helpers
            && self.mask_wgsl == other.mask_wgsl
            && self.score_wgsl == other.score_wgsl
            && self.grad_wgsl == other.grad_wgsl
            && self.range_wgsl == other.range_wgsl
            && self.data == other.data
            && same(&self.mask_cpu, &other.mask_cpu)
            && same(&self.score_cpu, &other.score_cpu)
            && same(&self.grad_cpu, &other.grad_cpu)
            && same(&self.range_cpu, &other.range_cpu)
            && self.rows_at_end == other.rows_at_end
            && self.ready == other.ready
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_scope_names_of_wgsl() {
        let src = "// fn not_this() {}\n\
                   const MY_K: u32 = 3u;\n\
                   @group(0) @binding(2) var<storage, read> my_buf: array<u32>;\n\
                   var<workgroup> my_tile: array<f32, 64>;\n\
                   struct MyPair { a: u32, }\n\
                   fn my_doc(x: u32) -> u32 {\n\
                   var d = 0u;\n\
                   return d;\n\
                   }\n\
                   override MY_ON: bool = false;\n";
        assert_eq!(
            module_scope_names(src),
            ["MY_K", "my_buf", "my_tile", "MyPair", "my_doc", "MY_ON"]
        );
        // Several declarations on a line, and block comments (nested) anywhere (an outside
        // review found the second name of a line, and a name after a block comment, missed).
        let src = "fn my_a() -> u32 { return 0u; } fn hmax(x: f32) -> f32 { return x; }\n\
                   /* a /* nested */ comment fn not_this() */ fn attn_mine() -> u32 { return 1u; }\n\
                   const A: u32 = 1u; const B: u32 = 2u; // fn nor_this()\n\
                   var<private> p: array<vec4<f32>, 4>; alias Pair = vec2<u32>;";
        assert_eq!(
            module_scope_names(src),
            ["my_a", "hmax", "attn_mine", "A", "B", "p", "Pair"]
        );
        // The kernels' names: functions of the fragments and of one kernel only, constants,
        // bindings and their accessors, parameter structs.
        let taken = crate::gpu::kernels::module_scope_names();
        for name in [
            "mix32",
            "hmax",
            "TILE",
            "LN2",
            "MaskParams",
            "mparams",
            "lens",
            "load_q",
            "store_o",
            "key_range",
            "HAS_MASK_MOD",
        ] {
            assert!(
                taken.contains(name),
                "{name} not among {} names",
                taken.len()
            );
        }
        // Kernels that compose no mods (the rotation, the GEMM) leave their names free.
        for word in [
            "read",
            "storage",
            "workgroup",
            "d",
            "x",
            "turn",
            "complex_mul",
        ] {
            assert!(!taken.contains(word), "{word}");
        }
        let m = ScoreMod::new().helpers("fn hmax(x: f32) -> f32 { return x; }");
        assert_eq!(m.clashing_helper(taken).as_deref(), Some("hmax"));
        let m = ScoreMod::new().helpers("fn attn_mine(x: f32) -> f32 { return x; }");
        assert_eq!(m.clashing_helper(taken).as_deref(), Some("attn_mine"));
        let m = ScoreMod::new().helpers("fn my_hmax(x: f32) -> f32 { return x; }");
        assert_eq!(m.clashing_helper(taken), None);
    }
}
