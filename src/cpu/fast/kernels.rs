//! The copies of `cpu::fast`'s micro-kernel, one per instruction set, and the choice among them.
//!
//! Every copy computes the same `C[MR x NR] += A B` over the same packed operands; they differ
//! in `NR` (two vectors of the instruction set, four for AVX-512: 8, 16 or 64 floats), in how
//! the left operand
//! is stored, and in the target features the block code around them is compiled with. The
//! portable copy is plain loops that LLVM vectorises for the compile-time target (SSE2 on the
//! default x86-64 target, NEON on aarch64); the x86-64 copies are written with `std::arch`
//! intrinsics so that no choice of the vectoriser can undo them. That choice is what went
//! wrong before: built with `-C target-cpu=native` on an AVX-512 machine, LLVM vectorised the
//! old plain-loop kernel across its four rows, with a gather and a scatter per
//! multiply-add, and `cpu::fast` ran 15x slower than the default build (NOTES.md).

use crate::error::{Error, Result};

/// Query rows per micro-tile.
pub(super) const MR: usize = 4;

/// `NR` consecutive values of a packed K or V panel, aligned to a cache line.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Panel<const NR: usize>(pub(super) [f32; NR]);

impl<const NR: usize> Default for Panel<NR> {
    fn default() -> Self {
        Panel([0.0; NR])
    }
}

/// Which copy of [`fast`](super::fast)'s block kernel runs: chosen at run time from what the
/// CPU has ([`CpuKernel::chosen`]), or asked for by name ([`fast_with_kernel`](super::fast_with_kernel)).
///
/// ```
/// use wgpu_attention::cpu::CpuKernel;
/// let chosen = CpuKernel::chosen();
/// assert!(CpuKernel::available().contains(&chosen));
/// println!("cpu::fast runs its {} copy", chosen.name());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum CpuKernel {
    /// Plain loops vectorised for the compile-time target: SSE2 on the default x86-64 target
    /// (4 lanes), NEON on aarch64, whatever the target has elsewhere. Always available.
    Baseline,
    /// x86-64 AVX2 without FMA: 8 lanes, separate multiplies and adds.
    Avx2,
    /// x86-64 AVX2 and FMA: 8 lanes, fused multiply-adds.
    Avx2Fma,
    /// x86-64 AVX-512F: 16 lanes, fused multiply-adds.
    Avx512,
}

impl CpuKernel {
    /// Every copy, slowest first.
    pub const ALL: [CpuKernel; 4] = [
        CpuKernel::Baseline,
        CpuKernel::Avx2,
        CpuKernel::Avx2Fma,
        CpuKernel::Avx512,
    ];

    /// Its name, as `WGPU_ATTENTION_CPU_KERNEL` takes it: `sse2`, `neon` or `portable` for
    /// the baseline (by target), `avx2`, `avx2+fma`, `avx512f`.
    pub fn name(self) -> &'static str {
        match self {
            CpuKernel::Baseline if cfg!(target_arch = "x86_64") => "sse2",
            CpuKernel::Baseline if cfg!(target_arch = "aarch64") => "neon",
            CpuKernel::Baseline => "portable",
            CpuKernel::Avx2 => "avx2",
            CpuKernel::Avx2Fma => "avx2+fma",
            CpuKernel::Avx512 => "avx512f",
        }
    }

    /// Whether this CPU can run it (detected at run time on x86-64).
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                CpuKernel::Baseline => true,
                CpuKernel::Avx2 => has!("avx2"),
                CpuKernel::Avx2Fma => has!("avx2") && has!("fma"),
                CpuKernel::Avx512 => has!("avx512f") && has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == CpuKernel::Baseline
        }
    }

    /// The copies this CPU can run, slowest first (the baseline always).
    pub fn available() -> Vec<CpuKernel> {
        CpuKernel::ALL
            .into_iter()
            .filter(|k| k.is_available())
            .collect()
    }

    /// The copy [`fast`](super::fast) runs: the fastest this CPU has, unless
    /// `WGPU_ATTENTION_CPU_KERNEL` names another available one
    /// (`WGPU_ATTENTION_CPU_BASELINE=1` is the same as naming the baseline). A name that is
    /// unknown or not available on this CPU is reported once on stderr and ignored. Read once
    /// per process.
    pub fn chosen() -> CpuKernel {
        static CHOSEN: std::sync::OnceLock<CpuKernel> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let best = *CpuKernel::available()
                .last()
                .expect("the baseline is always available");
            let baseline = std::env::var("WGPU_ATTENTION_CPU_BASELINE").is_ok_and(|v| v != "0");
            if baseline {
                return CpuKernel::Baseline;
            }
            match std::env::var("WGPU_ATTENTION_CPU_KERNEL") {
                Ok(name) if !name.is_empty() => match CpuKernel::from_name(&name) {
                    Ok(k) => k,
                    Err(e) => {
                        eprintln!("wgpu-attention: WGPU_ATTENTION_CPU_KERNEL ignored: {e}");
                        best
                    }
                },
                _ => best,
            }
        })
    }

    /// The copy of that name ([`CpuKernel::name`]; `baseline` names the baseline on every
    /// target), if this CPU can run it.
    pub fn from_name(name: &str) -> Result<CpuKernel> {
        let kernel = CpuKernel::ALL
            .into_iter()
            .find(|k| k.name() == name || (name == "baseline" && *k == CpuKernel::Baseline))
            .ok_or_else(|| Error::InvalidOption {
                what: "cpu kernel",
                value: name.to_string(),
                why: "not a kernel name: baseline, sse2, neon, portable, avx2, avx2+fma or avx512f",
            })?;
        kernel.check()?;
        Ok(kernel)
    }

    /// `Ok` if this CPU can run it, else the typed error saying so.
    pub(super) fn check(self) -> Result<()> {
        if self.is_available() {
            Ok(())
        } else {
            Err(Error::InvalidOption {
                what: "cpu kernel",
                value: self.name().to_string(),
                why: "this CPU lacks the instructions it needs (CpuKernel::available lists those it has)",
            })
        }
    }
}

impl std::fmt::Display for CpuKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One copy of the micro-kernel: `NR` columns per micro-tile, and the form of the left
/// operand (one `k` step of `MR` rows).
pub(super) trait MicroKernel<const NR: usize>: Copy + Send + Sync + 'static {
    /// One `k` step of the left operand: `MR` values, stored as the kernel reads them.
    type A: Copy + Send + Sync + std::fmt::Debug;
    /// The left operand of a padding row.
    const ZERO: Self::A;
    /// `x` stored as the kernel reads it.
    fn a(x: [f32; MR]) -> Self::A;
    /// `c += a b` for `a` a `MR x kc` block (`kc` steps) and `b` a `kc x NR` panel.
    fn tile(a: &[Self::A], b: &[Panel<NR>], c: &mut [[f32; NR]; MR]);
    /// The maximum of a row of scores, NaN ignored, `-inf` for none: the plain loops LLVM
    /// vectorises, unless the copy has its own.
    #[inline(always)]
    fn row_max(s: &[f32]) -> f32 {
        super::row_max(s)
    }
    /// `p = 2^(s - m)` for a row of scores, and the sum of `p`: likewise.
    #[inline(always)]
    fn exp2_rows(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
        super::exp2_rows(s, m, p)
    }
}

/// Lanes of the baseline: 4, the width of SSE2 and NEON.
const BASE_LANES: usize = 4;

/// The baseline copy: plain loops, two 4-lane vectors per row.
#[derive(Debug, Clone, Copy)]
pub(super) struct Baseline;

/// One f32 repeated over a vector, so the baseline kernel multiplies without shuffling.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
pub(super) struct Splat([f32; BASE_LANES]);

/// Whether the baseline kernel takes two steps per iteration: 5% faster with SSE2, where the
/// loop overhead is a fifth of the instructions (measured on Zen 3).
const UNROLL: bool = true;

impl MicroKernel<8> for Baseline {
    type A = [Splat; MR];
    const ZERO: Self::A = [Splat([0.0; BASE_LANES]); MR];

    #[inline(always)]
    fn a(x: [f32; MR]) -> Self::A {
        x.map(|v| Splat([v; BASE_LANES]))
    }

    #[inline(always)]
    fn tile(a: &[Self::A], b: &[Panel<8>], c: &mut [[f32; 8]; MR]) {
        #[inline(always)]
        fn step(x: &[Splat; MR], y: &Panel<8>, acc: &mut [[f32; 8]; MR]) {
            for (row, xr) in acc.iter_mut().zip(x) {
                let (lo, hi) = row.split_at_mut(BASE_LANES);
                let (ylo, yhi) = y.0.split_at(BASE_LANES);
                for l in 0..BASE_LANES {
                    lo[l] = mul_add(xr.0[l], ylo[l], lo[l]);
                }
                for l in 0..BASE_LANES {
                    hi[l] = mul_add(xr.0[l], yhi[l], hi[l]);
                }
            }
        }
        let mut acc = *c;
        let (a, b) = if UNROLL {
            let (a2, a_rest) = a.as_chunks::<2>();
            let (b2, b_rest) = b.as_chunks::<2>();
            for (x, y) in a2.iter().zip(b2) {
                step(&x[0], &y[0], &mut acc);
                step(&x[1], &y[1], &mut acc);
            }
            (a_rest, b_rest)
        } else {
            (a, b)
        };
        for (x, y) in a.iter().zip(b) {
            step(x, y, &mut acc);
        }
        *c = acc;
    }
}

/// `a * b + c`, fused where the build targets FMA (a separate multiply and add otherwise: a
/// software `fma` would be far slower).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    #[cfg(target_feature = "fma")]
    {
        a.mul_add(b, c)
    }
    #[cfg(not(target_feature = "fma"))]
    {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{Avx2, Avx2Fma, Avx512};

/// The x86-64 copies. Their `unsafe` is of two kinds, each with its own `SAFETY` note: calling
/// a function compiled for features the CPU must have (sound because [`CpuKernel::check`]
/// passed before any of them is reached), and unaligned vector loads and stores through
/// pointers into arrays of exactly the vector's length.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{MR, MicroKernel, Panel};
    use std::arch::x86_64::*;

    /// AVX2, separate multiplies and adds: `NR = 16`, two `__m256` per row.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::cpu::fast) struct Avx2;
    /// AVX2 and FMA: `NR = 16`, two `__m256` per row.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::cpu::fast) struct Avx2Fma;
    /// AVX-512F: `NR = 64`, four `__m512` per row.
    #[derive(Debug, Clone, Copy)]
    pub(in crate::cpu::fast) struct Avx512;

    #[inline]
    #[target_feature(enable = "avx")]
    fn load8(x: &[f32]) -> __m256 {
        assert!(x.len() >= 8);
        #[allow(unsafe_code)]
        // SAFETY: `x` holds at least 8 f32s (checked); `loadu` needs no alignment.
        unsafe {
            _mm256_loadu_ps(x.as_ptr())
        }
    }

    #[inline]
    #[target_feature(enable = "avx")]
    fn store8(x: &mut [f32], v: __m256) {
        assert!(x.len() >= 8);
        #[allow(unsafe_code)]
        // SAFETY: `x` holds at least 8 writable f32s (checked); `storeu` needs no alignment.
        unsafe {
            _mm256_storeu_ps(x.as_mut_ptr(), v)
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load16(x: &[f32]) -> __m512 {
        assert!(x.len() >= 16);
        #[allow(unsafe_code)]
        // SAFETY: `x` holds at least 16 f32s (checked); `loadu` needs no alignment.
        unsafe {
            _mm512_loadu_ps(x.as_ptr())
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store16(x: &mut [f32], v: __m512) {
        assert!(x.len() >= 16);
        #[allow(unsafe_code)]
        // SAFETY: `x` holds at least 16 writable f32s (checked); `storeu` needs no alignment.
        unsafe {
            _mm512_storeu_ps(x.as_mut_ptr(), v)
        }
    }

    /// The AVX2 tile; `$madd` is the multiply-add, fused or not.
    macro_rules! tile_avx2 {
        ($a:ident, $b:ident, $c:ident, $madd:expr) => {{
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            for (acc, row) in acc.iter_mut().zip($c.iter()) {
                *acc = [load8(&row[..8]), load8(&row[8..])];
            }
            for (x, y) in $a.iter().zip($b) {
                let (y0, y1) = (load8(&y.0[..8]), load8(&y.0[8..]));
                for (acc, &xr) in acc.iter_mut().zip(x) {
                    let s = _mm256_set1_ps(xr);
                    acc[0] = $madd(s, y0, acc[0]);
                    acc[1] = $madd(s, y1, acc[1]);
                }
            }
            for (acc, row) in acc.iter().zip($c.iter_mut()) {
                store8(&mut row[..8], acc[0]);
                store8(&mut row[8..], acc[1]);
            }
        }};
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    fn tile_avx2(a: &[[f32; MR]], b: &[Panel<16>], c: &mut [[f32; 16]; MR]) {
        #[inline]
        #[target_feature(enable = "avx")]
        fn madd(x: __m256, y: __m256, z: __m256) -> __m256 {
            _mm256_add_ps(_mm256_mul_ps(x, y), z)
        }
        tile_avx2!(a, b, c, madd)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn tile_avx2_fma(a: &[[f32; MR]], b: &[Panel<16>], c: &mut [[f32; 16]; MR]) {
        tile_avx2!(a, b, c, _mm256_fmadd_ps)
    }

    /// The AVX-512 tile: four vectors per row, so 16 accumulators are in flight (with two,
    /// eight chains of 4-cycle FMAs kept the loop at the latency bound).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn tile_avx512(a: &[[f32; MR]], b: &[Panel<64>], c: &mut [[f32; 64]; MR]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; MR];
        for (acc, row) in acc.iter_mut().zip(c.iter()) {
            for (v, x) in acc.iter_mut().zip(row.chunks_exact(16)) {
                *v = load16(x);
            }
        }
        for (x, y) in a.iter().zip(b) {
            let (y0, y1) = (load16(&y.0[..16]), load16(&y.0[16..32]));
            let (y2, y3) = (load16(&y.0[32..48]), load16(&y.0[48..]));
            for (acc, &xr) in acc.iter_mut().zip(x) {
                let s = _mm512_set1_ps(xr);
                acc[0] = _mm512_fmadd_ps(s, y0, acc[0]);
                acc[1] = _mm512_fmadd_ps(s, y1, acc[1]);
                acc[2] = _mm512_fmadd_ps(s, y2, acc[2]);
                acc[3] = _mm512_fmadd_ps(s, y3, acc[3]);
            }
        }
        for (acc, row) in acc.iter().zip(c.iter_mut()) {
            for (v, x) in acc.iter().zip(row.chunks_exact_mut(16)) {
                store16(x, *v);
            }
        }
    }

    impl MicroKernel<16> for Avx2 {
        type A = [f32; MR];
        const ZERO: Self::A = [0.0; MR];
        #[inline(always)]
        fn a(x: [f32; MR]) -> Self::A {
            x
        }
        #[inline(always)]
        fn tile(a: &[Self::A], b: &[Panel<16>], c: &mut [[f32; 16]; MR]) {
            #[allow(unsafe_code)]
            // SAFETY: this copy runs only after `CpuKernel::Avx2.check()` passed: the CPU
            // has AVX2.
            unsafe {
                tile_avx2(a, b, c)
            }
        }
    }

    impl MicroKernel<16> for Avx2Fma {
        type A = [f32; MR];
        const ZERO: Self::A = [0.0; MR];
        #[inline(always)]
        fn a(x: [f32; MR]) -> Self::A {
            x
        }
        #[inline(always)]
        fn tile(a: &[Self::A], b: &[Panel<16>], c: &mut [[f32; 16]; MR]) {
            #[allow(unsafe_code)]
            // SAFETY: this copy runs only after `CpuKernel::Avx2Fma.check()` passed: the CPU
            // has AVX2 and FMA.
            unsafe {
                tile_avx2_fma(a, b, c)
            }
        }
    }

    /// Lanes `0 .. n` of a 16-lane mask (all 16 from n = 16 on).
    fn lanes(n: usize) -> __mmask16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    /// The row maximum in zmm: one `vmaxps` per 16 scores, the tail through a masked load,
    /// one tree reduction at the end. `max(x, m)` returns `m` where `x` is NaN: NaN ignored,
    /// as the plain loops do.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn row_max_avx512(s: &[f32]) -> f32 {
        let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..s.len()).step_by(16) {
            #[allow(unsafe_code)]
            // SAFETY: the mask covers only lanes i .. min(i + 16, len) of `s`; masked-off
            // lanes are not read (they take m's values).
            let x = unsafe { _mm512_mask_loadu_ps(m, lanes(s.len() - i), s.as_ptr().add(i)) };
            m = _mm512_max_ps(x, m);
        }
        _mm512_reduce_max_ps(m)
    }

    /// `2^x` in zmm, as `fast::exp2` computes it (the same rounding to n and polynomial, in
    /// fused multiply-adds; `vscalefps` for 2^n): 0 below -126, NaN stays NaN.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp2_avx512(x: __m512) -> __m512 {
        let floor = _mm512_set1_ps(-126.0);
        // max(floor, x) returns x where x is NaN.
        let xc = _mm512_max_ps(floor, x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(xc);
        let f = _mm512_sub_ps(xc, n);
        let mut p = _mm512_set1_ps(1.533_757_7e-4);
        for c in [
            1.339_986e-3,
            9.618_52e-3,
            5.550_329e-2,
            2.402_264_6e-1,
            6.931_472e-1,
            1.0,
        ] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        let y = _mm512_scalef_ps(p, n);
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, floor);
        _mm512_mask_mov_ps(y, below, _mm512_setzero_ps())
    }

    /// `p = 2^(s - m)` and its sum in zmm: the tail through masked loads and stores, its
    /// unused lanes zeroed before the sum.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn exp2_rows_avx512(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
        assert_eq!(s.len(), p.len());
        let mv = _mm512_set1_ps(m);
        let mut sum = _mm512_setzero_ps();
        for i in (0..s.len()).step_by(16) {
            let k = lanes(s.len() - i);
            #[allow(unsafe_code)]
            // SAFETY: the mask covers only lanes i .. min(i + 16, len) of `s`.
            let x = unsafe { _mm512_maskz_loadu_ps(k, s.as_ptr().add(i)) };
            let y = _mm512_maskz_mov_ps(k, exp2_avx512(_mm512_sub_ps(x, mv)));
            #[allow(unsafe_code)]
            // SAFETY: the same lanes of `p`, which is as long as `s` (checked).
            unsafe {
                _mm512_mask_storeu_ps(p.as_mut_ptr().add(i), k, y)
            };
            sum = _mm512_add_ps(sum, y);
        }
        _mm512_reduce_add_ps(sum)
    }

    impl MicroKernel<64> for Avx512 {
        type A = [f32; MR];
        const ZERO: Self::A = [0.0; MR];
        #[inline(always)]
        fn a(x: [f32; MR]) -> Self::A {
            x
        }
        #[inline(always)]
        fn row_max(s: &[f32]) -> f32 {
            #[allow(unsafe_code)]
            // SAFETY: this copy runs only after `CpuKernel::Avx512.check()` passed: the CPU
            // has AVX-512F.
            unsafe {
                row_max_avx512(s)
            }
        }
        #[inline(always)]
        fn exp2_rows(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
            #[allow(unsafe_code)]
            // SAFETY: as above.
            unsafe {
                exp2_rows_avx512(s, m, p)
            }
        }
        #[inline(always)]
        fn tile(a: &[Self::A], b: &[Panel<64>], c: &mut [[f32; 64]; MR]) {
            #[allow(unsafe_code)]
            // SAFETY: this copy runs only after `CpuKernel::Avx512.check()` passed: the CPU
            // has AVX-512F.
            unsafe {
                tile_avx512(a, b, c)
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::{MicroKernel, x86::Avx512};

    /// The AVX-512 row maximum and exponentials against the plain loops every other copy
    /// runs, on rows of every tail length with NaN, -inf, f32::MAX and the exponent floor.
    #[test]
    fn avx512_softmax_matches_the_plain_loops() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512F here: nothing to compare");
            return;
        }
        for n in [0, 1, 5, 15, 16, 17, 31, 32, 33, 64, 128, 130] {
            for special in [None, Some(f32::NAN), Some(f32::NEG_INFINITY), Some(-300.0)] {
                let mut s: Vec<f32> = (0..n)
                    .map(|i| ((i * 37) % 101) as f32 * 0.7 - 60.0)
                    .collect();
                if let Some(x) = special
                    && n > 0
                {
                    s[n / 2] = x;
                }
                let want_m = super::super::row_max(&s);
                let got_m = Avx512::row_max(&s);
                assert_eq!(got_m.to_bits(), want_m.to_bits(), "max, n={n}, {special:?}");
                let m = if want_m.is_finite() { want_m } else { 0.0 };
                let (mut want_p, mut got_p) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                let want_l = super::super::exp2_rows(&s, m, &mut want_p);
                let got_l = Avx512::exp2_rows(&s, m, &mut got_p);
                for (j, (g, w)) in got_p.iter().zip(&want_p).enumerate() {
                    assert!(
                        (g.is_nan() && w.is_nan()) || (g - w).abs() <= 3e-7 * w.abs(),
                        "p[{j}], n={n}, {special:?}: {g} against {w}"
                    );
                }
                assert!(
                    (got_l.is_nan() && want_l.is_nan()) || (got_l - want_l).abs() <= 1e-6 * want_l,
                    "sum, n={n}, {special:?}: {got_l} against {want_l}"
                );
            }
        }
    }
}
