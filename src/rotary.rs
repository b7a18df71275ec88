//! Rotary position embedding (RoPE): the rotation that Llama, Mistral, Qwen, gpt-oss and most
//! LLMs apply to Q and K before attention, on the GPU ([`gpu::rotate`](crate::gpu::rotate), and
//! inside a [`KvCache`](crate::KvCache) or [`PagedKvCache`](crate::PagedKvCache) that has one)
//! and on the CPU ([`cpu::rotate`](crate::cpu::rotate), in f64, the oracle of the GPU's).
//!
//! # What it computes
//!
//! Pair `k` of a head's first [`dim`](Rotary::dim) elements (`dim / 2` pairs), at position `p`,
//! is turned by the angle `p · f_k`:
//!
//! ```text
//! (x0, x1) -> (x0 · cos(p f_k) - x1 · sin(p f_k),  x0 · sin(p f_k) + x1 · cos(p f_k))
//! ```
//!
//! with `f_k = base^(-2k / dim)` ([`Rotary::new`]), YaRN's ([`Rotary::yarn`]), Llama 3.1's or
//! linear scaling of them, or frequencies of your own ([`Rotary::from_frequencies`]: NTK, or a
//! checkpoint's exact values). Which elements form pair `k` is the [`RotaryStyle`]: `(k, k + dim/2)`
//! (GPT-NeoX, Hugging Face's `rotate_half`, the default) or `(2k, 2k + 1)` (GPT-J, Meta's
//! original Llama, FlashAttention's `rotary_interleaved`). Elements past `dim` (partial rotary,
//! as GPT-NeoX and Phi use) pass unchanged. YaRN also scales the turned pairs by its attention
//! factor ([`Rotary::magnitude`], 1 otherwise), as Hugging Face's scaled `cos` and `sin` do.
//! Multimodal RoPE ([`Rotary::mrope`], [`Rotary::mrope_interleaved`]: Qwen2-VL to Qwen3.5)
//! turns each pair by one of three positions of its row ([`Positions::Axes`]: temporal, height,
//! width), chosen by the pair's section ([`MropeLayout`]).
//! [`Rotary::transpose`] turns the other way by the same angles: it is the rotation's backward,
//! so a training step takes dQ and dK back through RoPE with it, and for a magnitude of 1
//! (every rotation but YaRN's) it is also the inverse, undoing the rotation.
//!
//! # Exact at every position
//!
//! Angles are not computed from `p · f_k` in f32 on the GPU: at `p = 10^5` the f32 product is
//! off by up to `4 · 10^-3` radians, and GPUs' `cos`/`sin` are only promised to `2^-11` by
//! Vulkan. Instead the host computes, in f64, `cos` and `sin` of `m · 64^l · f_k` for each
//! base-64 digit `m` and level `l < 4`, and the kernel multiplies the four complex numbers of
//! `p`'s digits (angle addition): about `3 · 10^-7` from the f64 rotation at any position below
//! `2^24`, the limit. The table (`4 · 64 · dim / 2` pairs of f32: 64 KiB at `dim = 64`) is
//! built once per device and set of frequencies and kept (the last eight).
//!
//! Frequencies are f64 here. Hugging Face computes them in f32, which differs by up to half
//! an f32 ulp per frequency (the first, 1, is exact; at position `10^5` the next pairs' angles
//! move by up to about `3 · 10^-3` radians), and forms each angle `p · f` in f32 too, which
//! moves it more (half an ulp of the angle). To match such an implementation closely, give
//! its f32 frequencies to [`Rotary::from_frequencies`]; its angles' own rounding is not
//! reproduced.
//!
//! ```
//! use wgpu_attention::{Layout, cpu, rotary::{Positions, Rotary}};
//! // Llama 3.1 8B: head_dim 128, theta 500000, Llama 3 scaling of its frequencies.
//! let rope = Rotary::new(128, 500_000.0)?.llama3_scaling(Default::default())?;
//! // Two sequences of 3 tokens, one head, starting at positions 0 and 10.
//! let x = vec![0.5f32; 2 * 3 * 128];
//! let y = cpu::rotate(&x, [2, 1, 3, 128], Layout::Bhsd, &rope, &Positions::Start(vec![0, 10]))?;
//! // Position 0 is no rotation at all; the transpose undoes the rest.
//! assert_eq!(&y[..128], &x[..128]);
//! let back = cpu::rotate(&y, [2, 1, 3, 128], Layout::Bhsd, &rope.transpose(), &Positions::Start(vec![0, 10]))?;
//! assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-6));
//! # Ok::<(), wgpu_attention::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::spec::{Layout, MAX_HEAD_DIM};

/// Bits of a position each level of the angle table covers.
pub(crate) const LEVEL_BITS: u32 = 6;
/// Levels of the angle table: positions below `64^4 = 2^24`.
pub(crate) const LEVELS: u32 = 4;
/// Entries per level.
pub(crate) const ENTRIES: u32 = 1 << LEVEL_BITS;
/// Positions must be below this (`2^24`): the angle table's reach, and the largest integer an
/// f32 holds exactly.
pub const MAX_POSITIONS: u64 = 1 << (LEVEL_BITS * LEVELS);

/// Which elements of a head form a rotated pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RotaryStyle {
    /// Pair `k` is `(k, k + dim / 2)`: GPT-NeoX, Hugging Face's `rotate_half` (Llama, Mistral,
    /// Qwen checkpoints in `transformers`).
    #[default]
    Halves,
    /// Pair `k` is `(2k, 2k + 1)`: GPT-J, Meta's original Llama, llama.cpp's "normal" mode,
    /// FlashAttention's `rotary_interleaved=True`.
    Interleaved,
}

/// How multimodal RoPE (M-RoPE, [`Rotary::mrope`]) gives each pair one of the three position
/// axes (temporal, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MropeLayout {
    /// Sections of consecutive pairs: the first `sections[0]` pairs take the temporal
    /// position, the next `sections[1]` the height, the last `sections[2]` the width (Qwen2-VL
    /// and Qwen2.5-VL: `mrope_section` in their configs).
    Sections,
    /// Pairs cycle through the axes, `T H W T H W ...`, until the height and width have their
    /// pairs; the rest take the temporal position (Qwen3-VL and Qwen3.5's `mrope_interleaved`:
    /// pair `k` takes the height if `k % 3 == 1` and `k < 3 · sections[1]`, the width if
    /// `k % 3 == 2` and `k < 3 · sections[2]`).
    Interleaved,
}

/// Llama 3.1's scaling of the frequencies for long contexts (`rope_type: "llama3"` in a
/// Hugging Face config): wavelengths longer than `original_max_positions / low_freq_factor`
/// are stretched by `factor`, those shorter than `original_max_positions / high_freq_factor`
/// are kept, and those between are blended. The default is Llama 3.1's (8, 1, 4, 8192).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3Scaling {
    /// How much the longest wavelengths are stretched.
    pub factor: f64,
    /// Wavelengths past `original_max_positions / low_freq_factor` take the whole factor.
    pub low_freq_factor: f64,
    /// Wavelengths below `original_max_positions / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was trained at before scaling.
    pub original_max_positions: f64,
}

impl Default for Llama3Scaling {
    fn default() -> Self {
        Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 8192.0,
        }
    }
}

/// YaRN's scaling of the frequencies (`rope_type: "yarn"` in a Hugging Face config: gpt-oss,
/// DeepSeek V3, Qwen's long contexts): pairs that turn more than `beta_fast` times over the
/// original context keep their frequency, pairs that turn fewer than `beta_slow` times are
/// divided by `factor`, and those between are blended along a linear ramp. YaRN also
/// multiplies the turned pairs by its [`attention_factor`](YarnScaling::attention_factor),
/// which [`Rotary::yarn`] makes the rotation's [`magnitude`](Rotary::magnitude), as Hugging
/// Face's scaled `cos` and `sin` do (so only the rotated part of a partial rotation is
/// scaled). DeepSeek V3's attention also multiplies its softmax scale by
/// `(0.1 · mscale_all_dim · ln(factor) + 1)²`: that one goes into
/// [`Attention::scale`](crate::Attention::scale).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YarnScaling {
    /// How much the context is stretched.
    pub factor: f64,
    /// The context length before scaling (`original_max_position_embeddings`).
    pub original_max_positions: f64,
    /// Rotations over the original context above which a pair keeps its frequency (32).
    pub beta_fast: f64,
    /// Rotations below which a pair takes the whole factor (1).
    pub beta_slow: f64,
    /// Whether the ramp's ends are rounded out to whole pairs (`truncate`, true; gpt-oss sets
    /// false).
    pub truncate: bool,
    /// The attention factor as the config states it (`attention_factor`), if it does.
    pub attention_factor: Option<f64>,
    /// DeepSeek's `mscale` and `mscale_all_dim`, if the config has both: the attention factor
    /// is then their ratio of `0.1 · m · ln(factor) + 1`.
    pub mscale: Option<(f64, f64)>,
}

impl YarnScaling {
    /// YaRN with the given factor and original context, and the defaults of `transformers`
    /// for the rest (betas 32 and 1, truncated ramp, attention factor from the factor).
    pub fn new(factor: f64, original_max_positions: f64) -> YarnScaling {
        YarnScaling {
            factor,
            original_max_positions,
            beta_fast: 32.0,
            beta_slow: 1.0,
            truncate: true,
            attention_factor: None,
            mscale: None,
        }
    }

    /// The factor YaRN multiplies `cos` and `sin` by (the rotation's
    /// [`magnitude`](Rotary::magnitude) from [`Rotary::yarn`]): `0.1 · ln(factor) + 1` unless the
    /// config states it (or DeepSeek's `mscale` pair); 1 for a factor of at most 1.
    pub fn attention_factor(&self) -> f64 {
        let m = |scale: f64| {
            if self.factor <= 1.0 {
                1.0
            } else {
                0.1 * scale * self.factor.ln() + 1.0
            }
        };
        match (self.attention_factor, self.mscale) {
            (Some(a), _) => a,
            (None, Some((mscale, all_dim))) if mscale != 0.0 && all_dim != 0.0 => {
                m(mscale) / m(all_dim)
            }
            _ => m(1.0),
        }
    }
}

/// A rotary position embedding: its frequencies, which elements pair up, and its direction.
/// See the [module docs](self).
#[derive(Debug, Clone, PartialEq)]
pub struct Rotary {
    frequencies: Vec<f64>,
    style: RotaryStyle,
    transposed: bool,
    /// What the turned pairs are multiplied by (YaRN's attention factor; 1 otherwise).
    magnitude: f64,
    /// M-RoPE: pairs per axis and how they are laid out.
    mrope: Option<([u32; 3], MropeLayout)>,
}

/// The position of each row a rotation turns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Positions {
    /// One start per batch entry: row `i` of sequence `b` is at `start[b] + i` (a prompt from
    /// 0, or new tokens after a cache's `len[b]`).
    Start(Vec<u32>),
    /// One position per row, `[batch, seq]` row-major: packed batches whose sequences restart,
    /// or positions of your own.
    Each(Vec<u32>),
    /// Three positions per row, `[batch, seq]` row-major, each `[temporal, height, width]`:
    /// M-RoPE's ([`Rotary::mrope`]). A text token has the same position on all three (where
    /// [`Each`](Positions::Each) gives the same rotation); an image's patches differ in height
    /// and width.
    Axes(Vec<[u32; 3]>),
}

impl Positions {
    /// The positions as the kernel reads them: the starts, the rows' positions, or the rows'
    /// `[t, h, w]` triples one after another.
    pub(crate) fn words(&self) -> std::borrow::Cow<'_, [u32]> {
        match self {
            Positions::Start(w) | Positions::Each(w) => w.as_slice().into(),
            Positions::Axes(a) => a.iter().flatten().copied().collect::<Vec<u32>>().into(),
        }
    }
}

fn invalid(what: &'static str, value: String, why: &'static str) -> Error {
    Error::InvalidOption { what, value, why }
}

impl Rotary {
    /// RoPE over the first `rotary_dim` elements of each head with frequencies
    /// `base^(-2k / rotary_dim)` (`base` is a config's `rope_theta`: 10000 for Llama 2, 500000
    /// for Llama 3), in the [`Halves`](RotaryStyle::Halves) style.
    pub fn new(rotary_dim: usize, base: f64) -> Result<Rotary> {
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > MAX_HEAD_DIM {
            return Err(invalid(
                "rotary dim",
                rotary_dim.to_string(),
                "rotary_dim counts pairs of elements: even, at least 2, at most MAX_HEAD_DIM",
            ));
        }
        if !(base.is_finite() && base > 0.0) {
            return Err(invalid(
                "rotary base",
                base.to_string(),
                "the base (rope_theta) must be finite and positive",
            ));
        }
        let frequencies = (0..rotary_dim / 2)
            .map(|k| base.powf(-((2 * k) as f64) / rotary_dim as f64))
            .collect();
        Rotary::from_frequencies(frequencies)
    }

    /// RoPE with the given frequency of each pair, in radians per position (`inv_freq` in Hugging
    /// Face's code): `rotary_dim` is twice their number. They must be finite and not negative.
    pub fn from_frequencies(frequencies: Vec<f64>) -> Result<Rotary> {
        if frequencies.is_empty() || 2 * frequencies.len() > MAX_HEAD_DIM {
            return Err(invalid(
                "rotary frequencies",
                format!("{} frequencies", frequencies.len()),
                "one frequency per pair: at least one, at most MAX_HEAD_DIM / 2",
            ));
        }
        if let Some(f) = frequencies.iter().find(|f| !(f.is_finite() && **f >= 0.0)) {
            return Err(invalid(
                "rotary frequency",
                f.to_string(),
                "frequencies must be finite and not negative",
            ));
        }
        Ok(Rotary {
            frequencies,
            style: RotaryStyle::Halves,
            transposed: false,
            magnitude: 1.0,
            mrope: None,
        })
    }

    /// Multimodal RoPE (M-RoPE, Qwen2-VL's): each pair turns by one of three positions of its
    /// row (temporal, height, width: [`Positions::Axes`]), the first `sections[0]` pairs by
    /// the temporal, the next `sections[1]` by the height, the last `sections[2]` by the width
    /// ([`MropeLayout::Sections`]). `sections` is a config's `mrope_section` and must add up
    /// to the pairs (`dim() / 2`). With one position per row (text), it is the plain rotation.
    ///
    /// ```
    /// use wgpu_attention::{Layout, cpu, rotary::{Positions, Rotary}};
    /// // Qwen2.5-VL 7B: head_dim 128, theta 1000000, mrope_section [16, 24, 24].
    /// let rope = Rotary::new(128, 1_000_000.0)?.mrope([16, 24, 24])?;
    /// // Two text tokens, then a 1 x 2 grid of image patches, then text again.
    /// let at = Positions::Axes(vec![[0, 0, 0], [1, 1, 1], [2, 2, 2], [2, 2, 3], [4, 4, 4]]);
    /// let x = vec![0.5f32; 5 * 128];
    /// let y = cpu::rotate(&x, [1, 1, 5, 128], Layout::Bhsd, &rope, &at)?;
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn mrope(self, sections: [usize; 3]) -> Result<Rotary> {
        self.with_mrope(sections, MropeLayout::Sections)
    }

    /// Multimodal RoPE with the axes interleaved across the pairs (Qwen3-VL's and Qwen3.5's
    /// `mrope_interleaved`, [`MropeLayout::Interleaved`]). `sections` (`mrope_section`, such as
    /// `[24, 20, 20]`) must add up to the pairs, and the cycle must reach every height and width
    /// pair: `3 · sections[1]` and `3 · sections[2]` at most the pairs, give or take the
    /// cycle's offset.
    pub fn mrope_interleaved(self, sections: [usize; 3]) -> Result<Rotary> {
        self.with_mrope(sections, MropeLayout::Interleaved)
    }

    fn with_mrope(mut self, sections: [usize; 3], layout: MropeLayout) -> Result<Rotary> {
        let pairs = self.frequencies.len();
        let bad = || {
            invalid(
                "mrope sections",
                format!("{sections:?} ({layout:?}) over {pairs} pairs"),
                "the sections must add up to the rotated pairs (rotary_dim / 2), and \
                 interleaved, the cycle T H W must reach every height and width pair",
            )
        };
        if sections.iter().try_fold(0usize, |a, &n| a.checked_add(n)) != Some(pairs) {
            return Err(bad());
        }
        let words = sections.map(|n| n as u32);
        self.mrope = Some((words, layout));
        let mut counts = [0; 3];
        for k in 0..pairs {
            counts[self.axis_of(k)] += 1;
        }
        if counts != sections {
            return Err(bad());
        }
        Ok(self)
    }

    /// M-RoPE's pairs per axis and their layout, if this is M-RoPE.
    pub fn mrope_sections(&self) -> Option<([usize; 3], MropeLayout)> {
        self.mrope.map(|(s, l)| (s.map(|n| n as usize), l))
    }

    /// Which position axis pair `k` turns by (0 without M-RoPE). `shaders/rotate.wgsl`'s
    /// `axis_of` is the same rule: change one, change the other.
    pub(crate) fn axis_of(&self, k: usize) -> usize {
        let Some((s, layout)) = self.mrope else {
            return 0;
        };
        let [s0, s1, s2] = s.map(|n| n as usize);
        match layout {
            MropeLayout::Sections if k < s0 => 0,
            MropeLayout::Sections if k < s0 + s1 => 1,
            MropeLayout::Sections => 2,
            MropeLayout::Interleaved if k % 3 == 1 && k < 3 * s1 => 1,
            MropeLayout::Interleaved if k % 3 == 2 && k < 3 * s2 => 2,
            MropeLayout::Interleaved => 0,
        }
    }

    /// The same rotation with pairs formed as `style` says.
    pub fn style(mut self, style: RotaryStyle) -> Rotary {
        self.style = style;
        self
    }

    /// The [`Interleaved`](RotaryStyle::Interleaved) style: pairs `(2k, 2k + 1)`.
    pub fn interleaved(self) -> Rotary {
        self.style(RotaryStyle::Interleaved)
    }

    /// RoPE over `rotary_dim` elements with YaRN's frequencies for `base` ([`YarnScaling`]),
    /// its turned pairs multiplied by YaRN's attention factor.
    ///
    /// ```
    /// use wgpu_attention::rotary::{Rotary, YarnScaling};
    /// // gpt-oss: head_dim 64, theta 150000, YaRN x32 over 4096 positions, ramp not truncated.
    /// let yarn = YarnScaling { truncate: false, ..YarnScaling::new(32.0, 4096.0) };
    /// let rope = Rotary::yarn(64, 150_000.0, &yarn)?;
    /// assert!((rope.magnitude() - 1.3466).abs() < 1e-4); // 0.1 ln 32 + 1
    /// # Ok::<(), wgpu_attention::Error>(())
    /// ```
    pub fn yarn(rotary_dim: usize, base: f64, yarn: &YarnScaling) -> Result<Rotary> {
        let plain = Rotary::new(rotary_dim, base)?;
        let y = *yarn;
        let fine = |x: f64| x.is_finite() && x > 0.0;
        let attention_ok = y.attention_factor.is_none_or(fine)
            && y.mscale.is_none_or(|(a, b)| a.is_finite() && b.is_finite());
        if !(fine(y.factor)
            && fine(y.original_max_positions)
            && fine(y.beta_fast)
            && fine(y.beta_slow)
            && y.beta_fast >= y.beta_slow
            && base != 1.0
            && attention_ok)
        {
            return Err(invalid(
                "yarn rotary scaling",
                format!("{y:?} with base {base}"),
                "factor, original_max_positions and the betas must be finite and positive, \
                 beta_fast at least beta_slow, any attention factor finite and positive, and \
                 the base other than 1",
            ));
        }
        let dim = rotary_dim as f64;
        // The pair that turns `rotations` times over the original context.
        let pair_of = |rotations: f64| {
            dim * (y.original_max_positions / (rotations * std::f64::consts::TAU)).ln()
                / (2.0 * base.ln())
        };
        let (mut low, mut high) = (pair_of(y.beta_fast), pair_of(y.beta_slow));
        if y.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
        if low == high {
            high += 0.001;
        }
        let frequencies = plain
            .frequencies
            .iter()
            .enumerate()
            .map(|(k, &f)| {
                // 1 keeps the frequency (extrapolation), 0 divides it by the factor.
                let keep = 1.0 - ((k as f64 - low) / (high - low)).clamp(0.0, 1.0);
                f / y.factor * (1.0 - keep) + f * keep
            })
            .collect();
        let attention = y.attention_factor();
        if !(attention.is_finite() && attention > 0.0) {
            return Err(invalid(
                "yarn attention factor",
                format!("{attention} from {y:?}"),
                "the attention factor must come out finite and positive",
            ));
        }
        Rotary::from_frequencies(frequencies)?.with_magnitude(attention)
    }

    /// Frequencies divided by `factor` (`rope_type: "linear"`, position interpolation).
    pub fn linear_scaling(mut self, factor: f64) -> Result<Rotary> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(invalid(
                "rotary scaling factor",
                factor.to_string(),
                "the factor must be finite and positive",
            ));
        }
        for f in &mut self.frequencies {
            *f /= factor;
        }
        Ok(self)
    }

    /// Llama 3.1's scaling of the frequencies ([`Llama3Scaling`]).
    pub fn llama3_scaling(mut self, s: Llama3Scaling) -> Result<Rotary> {
        let fine = |x: f64| x.is_finite() && x > 0.0;
        if !(fine(s.factor)
            && fine(s.low_freq_factor)
            && fine(s.high_freq_factor)
            && fine(s.original_max_positions)
            && s.high_freq_factor > s.low_freq_factor)
        {
            return Err(invalid(
                "llama3 rotary scaling",
                format!("{s:?}"),
                "every field must be finite and positive, and high_freq_factor above \
                 low_freq_factor",
            ));
        }
        let low_wavelen = s.original_max_positions / s.low_freq_factor;
        let high_wavelen = s.original_max_positions / s.high_freq_factor;
        for f in &mut self.frequencies {
            if *f == 0.0 {
                continue;
            }
            let wavelen = 2.0 * std::f64::consts::PI / *f;
            if wavelen > low_wavelen {
                *f /= s.factor;
            } else if wavelen >= high_wavelen {
                let smooth = (s.original_max_positions / wavelen - s.low_freq_factor)
                    / (s.high_freq_factor - s.low_freq_factor);
                *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
            }
        }
        Ok(self)
    }

    /// The transpose: the same angles the other way, times the same magnitude. It is this
    /// rotation's backward (takes the gradient by the turned tensor to the gradient by the
    /// tensor before it) and, with a magnitude of 1, its inverse (it undoes the rotation).
    pub fn transpose(mut self) -> Rotary {
        self.transposed = !self.transposed;
        self
    }

    /// The turned pairs multiplied by `m` (elements past [`dim`](Rotary::dim) are not): what
    /// YaRN does with its attention factor. [`Rotary::yarn`] sets it; 1 by default.
    pub fn with_magnitude(mut self, m: f64) -> Result<Rotary> {
        if !(m.is_finite() && m > 0.0) {
            return Err(invalid(
                "rotary magnitude",
                m.to_string(),
                "the magnitude must be finite and positive",
            ));
        }
        self.magnitude = m;
        Ok(self)
    }

    /// What the turned pairs are multiplied by.
    pub fn magnitude(&self) -> f64 {
        self.magnitude
    }

    /// Elements of each head the rotation turns (twice the number of frequencies).
    pub fn dim(&self) -> usize {
        2 * self.frequencies.len()
    }

    /// Each pair's frequency, in radians per position.
    pub fn frequencies(&self) -> &[f64] {
        &self.frequencies
    }

    /// Which elements pair up.
    pub fn pairing(&self) -> RotaryStyle {
        self.style
    }

    /// Whether this is the transposed rotation.
    pub fn is_transposed(&self) -> bool {
        self.transposed
    }

    /// `(cos, sin)` of pair `k`'s angle at `position` times the magnitude, in f64 (negated
    /// sine for the transpose).
    pub(crate) fn turn(&self, position: u64, k: usize) -> (f64, f64) {
        let angle = (position as f64 * self.frequencies[k]).rem_euclid(std::f64::consts::TAU);
        let (sin, cos) = angle.sin_cos();
        let sin = if self.transposed { -sin } else { sin };
        (cos * self.magnitude, sin * self.magnitude)
    }

    /// Element `d`'s pair: `(k, partner, first)`, for `d < dim()`.
    pub(crate) fn pair_of(&self, d: usize) -> (usize, usize, bool) {
        let half = self.frequencies.len();
        match self.style {
            RotaryStyle::Halves if d < half => (d, d + half, true),
            RotaryStyle::Halves => (d - half, d - half, false),
            RotaryStyle::Interleaved => (d / 2, d ^ 1, d.is_multiple_of(2)),
        }
    }

    /// The angle table the kernel multiplies out: `(cos, sin)` of `m · 64^l · f_k` at
    /// `[(l · 64 + m) · pairs + k]`, computed in f64.
    pub(crate) fn table(&self) -> Vec<[f32; 2]> {
        let pairs = self.frequencies.len();
        let mut out = Vec::with_capacity((LEVELS * ENTRIES) as usize * pairs);
        for l in 0..LEVELS {
            for m in 0..ENTRIES as u64 {
                for &f in &self.frequencies {
                    let angle =
                        ((m << (l * LEVEL_BITS)) as f64 * f).rem_euclid(std::f64::consts::TAU);
                    let (sin, cos) = angle.sin_cos();
                    out.push([cos as f32, sin as f32]);
                }
            }
        }
        out
    }

    /// The table's identity on a device: the frequencies' bits.
    pub(crate) fn table_key(&self) -> Vec<u64> {
        self.frequencies.iter().map(|f| f.to_bits()).collect()
    }

    /// [`Error::InvalidOption`] unless the rotation fits heads of `head_dim` elements.
    pub(crate) fn fits(&self, head_dim: usize) -> Result<()> {
        if self.dim() > head_dim {
            return Err(invalid(
                "rotary dim",
                format!("{} over a head_dim of {head_dim}", self.dim()),
                "the rotation turns the first rotary_dim elements of each head: at most head_dim",
            ));
        }
        Ok(())
    }

    /// [`Error::InvalidOption`] for M-RoPE, which a cache cannot apply: its positions are not
    /// the cache's rows (an image's patches share a temporal position, and the text after it
    /// continues past the patches' largest).
    pub(crate) fn fits_cache(&self) -> Result<()> {
        if self.mrope.is_some() {
            return Err(invalid(
                "cache rotary",
                "M-RoPE".into(),
                "a cache turns rows by their place in it, and M-RoPE's positions are not \
                 those: turn K and Q with gpu::rotate and Positions::Axes and append to a cache \
                 without a rotation (for text alone, M-RoPE is the plain rotation of the same \
                 frequencies)",
            ));
        }
        Ok(())
    }

    /// Checks a rotation of a tensor of `dims` in `layout` at `positions`; returns
    /// `(batch, heads, seq, head_dim)`.
    pub(crate) fn check(
        &self,
        dims: [usize; 4],
        layout: Layout,
        positions: &Positions,
    ) -> Result<(usize, usize, usize, usize)> {
        let (batch, heads, seq, head_dim) = layout.split(dims);
        for (what, n) in [
            ("batch", batch),
            ("heads", heads),
            ("seq", seq),
            ("head_dim", head_dim),
        ] {
            if n == 0 {
                return Err(Error::ZeroSize { what });
            }
        }
        self.fits(head_dim)?;
        let values = positions.words();
        let (expected, last_row) = match positions {
            Positions::Start(_) => (batch, seq - 1),
            Positions::Each(_) => (batch.saturating_mul(seq), 0),
            Positions::Axes(_) => {
                if self.mrope.is_none() {
                    return Err(invalid(
                        "rotary positions",
                        "Positions::Axes".into(),
                        "positions per axis are M-RoPE's: build the rotation with \
                         Rotary::mrope or mrope_interleaved",
                    ));
                }
                (batch.saturating_mul(seq).saturating_mul(3), 0)
            }
        };
        if values.len() != expected {
            return Err(Error::ShapeMismatch {
                what: match positions {
                    Positions::Start(_) => "rotary positions (one start per batch entry)".into(),
                    Positions::Each(_) => "rotary positions (one per row, [batch, seq])".into(),
                    Positions::Axes(_) => {
                        "rotary positions (three per row, [batch, seq] x [t, h, w], counted \
                         as positions)"
                            .into()
                    }
                },
                got: values.len(),
                expected,
            });
        }
        for (index, &p) in values.iter().enumerate() {
            let last = p as u64 + last_row as u64;
            if last >= MAX_POSITIONS {
                return Err(Error::LengthOutOfRange {
                    what: "rotary position",
                    index,
                    value: last as usize,
                    max: MAX_POSITIONS as usize - 1,
                });
            }
        }
        Ok((batch, heads, seq, head_dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_follow_the_base() {
        let r = Rotary::new(8, 10_000.0).unwrap();
        let want = [1.0, 0.1, 0.01, 0.001];
        for (got, want) in r.frequencies().iter().zip(want) {
            assert!(
                (got - want).abs() < 1e-15 * want.max(1.0),
                "{got} vs {want}"
            );
        }
    }

    #[test]
    fn llama3_scaling_keeps_fast_and_stretches_slow() {
        // Llama 3.1 8B: the fastest pair (wavelength 2π) is kept, the slowest (far past 8192
        // positions) divided by 8, one in the blended band lies between.
        let plain = Rotary::new(128, 500_000.0).unwrap();
        let scaled = plain
            .clone()
            .llama3_scaling(Llama3Scaling::default())
            .unwrap();
        let (p, s) = (plain.frequencies(), scaled.frequencies());
        assert_eq!(s[0], p[0]);
        assert!((s[63] - p[63] / 8.0).abs() < 1e-18);
        let band = (0..64)
            .find(|&k| {
                let w = std::f64::consts::TAU / p[k];
                (2048.0..=8192.0).contains(&w)
            })
            .unwrap();
        assert!(s[band] < p[band] && s[band] > p[band] / 8.0, "{band}");
    }

    #[test]
    fn the_table_multiplies_out_to_the_angle() {
        let r = Rotary::new(16, 10_000.0).unwrap();
        let table = r.table();
        let pairs = 8;
        for &p in &[0u64, 1, 63, 64, 4095, 100_000, (1 << 24) - 1] {
            for k in 0..pairs {
                let (mut c, mut s) = (1.0f64, 0.0f64);
                for l in 0..LEVELS {
                    let m = (p >> (l * LEVEL_BITS)) & (ENTRIES as u64 - 1);
                    let [tc, ts] = table[((l * ENTRIES) as u64 + m) as usize * pairs + k];
                    (c, s) = (c * tc as f64 - s * ts as f64, c * ts as f64 + s * tc as f64);
                }
                let (wc, ws) = r.turn(p, k);
                assert!(
                    (c - wc).abs() < 3e-7 && (s - ws).abs() < 3e-7,
                    "{p} {k}: {c} {s} vs {wc} {ws}"
                );
            }
        }
    }

    /// Against a transcription of `_compute_yarn_parameters` in Python (f64, no torch), on
    /// gpt-oss's settings and on a truncated ramp.
    #[test]
    fn yarn_frequencies() {
        let close = |got: f64, want: f64| {
            assert!((got - want).abs() <= 1e-12 * want, "{got} vs {want}");
        };
        let gpt_oss = YarnScaling {
            truncate: false,
            ..YarnScaling::new(32.0, 4096.0)
        };
        let f = Rotary::yarn(64, 150_000.0, &gpt_oss).unwrap();
        for (k, want) in [
            (0, 1.0),
            (8, 0.050813274815461475),
            (12, 0.006794959489732219),
            (16, 0.00045648391922324086),
            (31, 3.0235114281192144e-07),
        ] {
            close(f.frequencies()[k], want);
        }
        let r = Rotary::yarn(128, 10_000.0, &YarnScaling::new(4.0, 32768.0)).unwrap();
        for (k, want) in [
            (0, 1.0),
            (20, 0.056234132519034905),
            (40, 0.0026879360111431226),
            (63, 2.8869549617236455e-05),
        ] {
            close(r.frequencies()[k], want);
        }
        close(gpt_oss.attention_factor(), 1.3465735902799727);
        let deepseek = YarnScaling {
            mscale: Some((1.0, 1.0)),
            ..YarnScaling::new(40.0, 4096.0)
        };
        close(deepseek.attention_factor(), 1.0);
        assert_eq!(YarnScaling::new(1.0, 4096.0).attention_factor(), 1.0);
        let bad = YarnScaling {
            beta_fast: 0.5,
            ..YarnScaling::new(4.0, 4096.0)
        };
        assert!(Rotary::yarn(64, 1e4, &bad).is_err());
        assert!(Rotary::yarn(64, 1.0, &YarnScaling::new(4.0, 4096.0)).is_err());
        // An mscale pair whose denominator is not positive (a review's case).
        let negative = YarnScaling {
            mscale: Some((1.0, -10.0 / 40f64.ln())),
            ..YarnScaling::new(40.0, 4096.0)
        };
        assert!(Rotary::yarn(64, 1e4, &negative).is_err());
        assert!(Rotary::new(8, 1e4).unwrap().with_magnitude(0.0).is_err());
    }

    #[test]
    fn bad_settings_are_typed_errors() {
        assert!(Rotary::new(0, 1e4).is_err());
        assert!(Rotary::new(7, 1e4).is_err());
        assert!(Rotary::new(8, 0.0).is_err());
        assert!(Rotary::new(8, f64::NAN).is_err());
        assert!(Rotary::from_frequencies(vec![]).is_err());
        assert!(Rotary::from_frequencies(vec![1.0, f64::INFINITY]).is_err());
        assert!(Rotary::from_frequencies(vec![-1.0]).is_err());
        assert!(Rotary::new(8, 1e4).unwrap().linear_scaling(0.0).is_err());
        let bad = Llama3Scaling {
            high_freq_factor: 1.0,
            ..Default::default()
        };
        assert!(Rotary::new(8, 1e4).unwrap().llama3_scaling(bad).is_err());
    }

    /// Each pair's axis as `transformers` builds it, transcribed: Qwen2-VL splits the
    /// duplicated `cos` (head_dim wide) into chunks `mrope_section * 2` and takes chunk `i`
    /// from axis `i % 3`; Qwen3-VL starts from the temporal frequencies and overwrites
    /// `freqs_t[offset : 3 * section : 3]` with the height's (offset 1) and width's (2).
    #[test]
    fn mrope_axes_follow_transformers() {
        let pairs = 64;
        let sections = [16, 24, 24];
        let mut chunked = Vec::new();
        for (i, &n) in sections.iter().chain(&sections).enumerate() {
            chunked.extend(std::iter::repeat_n(i % 3, n));
        }
        let r = Rotary::new(2 * pairs, 1e6)
            .unwrap()
            .mrope(sections)
            .unwrap();
        for k in 0..pairs {
            // Both elements of pair k (k and k + pairs in the duplicated cos) take its axis.
            assert_eq!(r.axis_of(k), chunked[k], "pair {k}");
            assert_eq!(r.axis_of(k), chunked[k + pairs], "pair {k}");
        }
        let sections = [24, 20, 20];
        let mut freqs_t = [0; 64];
        for (dim, offset) in [(1, 1), (2, 2)] {
            for idx in (offset..3 * sections[dim]).step_by(3) {
                freqs_t[idx] = dim;
            }
        }
        let r = Rotary::new(2 * pairs, 1e6)
            .unwrap()
            .mrope_interleaved(sections)
            .unwrap();
        for (k, &axis) in freqs_t.iter().enumerate() {
            assert_eq!(r.axis_of(k), axis, "pair {k}");
        }
        // Without M-RoPE every pair takes axis 0.
        assert!((0..pairs).all(|k| Rotary::new(128, 1e4).unwrap().axis_of(k) == 0));
    }
}
