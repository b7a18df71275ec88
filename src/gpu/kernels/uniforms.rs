//! Every parameter block and shared constant the host and the kernels agree on, declared once.
//!
//! A parameter block is a Rust struct written with [`uniform!`]; the macro also generates the
//! WGSL declaration of the same struct ([`Uniform::WGSL`]), which the host prepends to each
//! kernel that binds it. A field added here is therefore added on both sides; a kernel that
//! reads a field that is not here fails to compile (the naga tests catch it on any machine).
//!
//! Fields are 4-byte scalars only (`u32`, `i32`, `f32`), so the Rust `repr(C)` layout and the
//! WGSL uniform layout are the same by construction: no alignment padding on either side, and
//! no `_pad` fields to keep in step. Vectors of strides are spelled as one field per axis.
//! [`uniform_buffer`] pads the bytes to 16 for the binding.
//!
//! The constants both sides use (`-inf` as bits, the masked-score sentinel, the score floor,
//! the causal alignments, tile sizes) are generated the same way by [`shared_constants`].

use crate::spec::SCORE_FLOOR;

/// A parameter block with one Rust definition and a generated WGSL declaration.
pub(crate) trait Uniform: bytemuck::Pod {
    /// The struct's name on both sides.
    const NAME: &'static str;
    /// `struct Name { field: type, ... }` in WGSL.
    const WGSL: &'static str;
}

/// The WGSL scalar types a parameter field may have (same name, size and alignment in Rust).
pub(crate) trait WgslScalar {}
impl WgslScalar for u32 {}
impl WgslScalar for i32 {}
impl WgslScalar for f32 {}

/// Declares a parameter block: a `repr(C)` Pod struct and its WGSL twin.
macro_rules! uniform {
    ($(#[$meta:meta])* struct $name:ident { $($(#[$fmeta:meta])* $field:ident: $ty:ident,)* }) => {
        $(#[$meta])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
        pub(crate) struct $name {
            $($(#[$fmeta])* pub(crate) $field: $ty,)*
        }

        impl $name {
            /// Fails to compile if a field is not a WGSL scalar.
            #[allow(dead_code)]
            fn scalar_fields() {
                fn scalar<T: WgslScalar>() {}
                $(scalar::<$ty>();)*
            }
        }

        impl Uniform for $name {
            const NAME: &'static str = stringify!($name);
            const WGSL: &'static str = concat!(
                "struct ", stringify!($name), " {\n",
                $("    ", stringify!($field), ": ", stringify!($ty), ",\n",)*
                "}\n"
            );
        }
    };
}

uniform! {
    /// `flash_attention.wgsl`: one dispatch of the fused kernel (the masking options are in
    /// [`MaskParams`]).
    struct FlashParams {
        heads: u32,
        kv_heads: u32,
        group: u32,
        /// `group * q_len`: the rows one kv head serves.
        packed_rows: u32,
        tiles_m: u32,
        splits: u32,
        tiles_per_split: u32,
        groups_total: u32,
        head_dim: u32,
        v_head_dim: u32,
        write_lse: u32,
        scale: f32,
        /// Offset of the partial log-sum-exps in `lse_or_partials`, in elements.
        parts_lse_offset: u32,
        /// First key tile of this dispatch (of split 0).
        first_tile: u32,
        /// Nonzero when an earlier dispatch covered earlier key tiles: merge with its O and
        /// log-sum-exp instead of overwriting them.
        resume: u32,
        q_stride_b: u32,
        q_stride_h: u32,
        q_stride_s: u32,
        k_stride_b: u32,
        k_stride_h: u32,
        k_stride_s: u32,
        v_stride_b: u32,
        v_stride_h: u32,
        v_stride_s: u32,
        o_stride_b: u32,
        o_stride_h: u32,
        o_stride_s: u32,
    }
}

uniform! {
    /// `lib/masking.wgsl`: the sizes and values of the masking options. Whether a call has a
    /// boolean mask, a bias or a softcap is compiled in
    /// ([`MaskOptions`](crate::gpu::kernels::MaskOptions)); the options that narrow key ranges
    /// are read from here.
    struct MaskParams {
        batch: u32,
        q_len: u32,
        kv_len: u32,
        /// 0, [`CAUSAL_TOP_LEFT`] or [`CAUSAL_BOTTOM_RIGHT`].
        causal: u32,
        has_kv_lens: u32,
        has_q_lens: u32,
        has_window: u32,
        softcap: f32,
        /// Window bounds relative to the aligned diagonal: keys `i + off - win_left ..=
        /// i + off + win_right`, `off = win_off * (kv_len - q_len)` of the sequence.
        win_left: i32,
        win_right: i32,
        win_off: i32,
        /// Element strides of the bias over (b, h, i, j); 0 where broadcast.
        bias_stride_b: u32,
        bias_stride_h: u32,
        bias_stride_i: u32,
        bias_stride_j: u32,
        /// Element strides of the boolean mask over (b, h, i, j); 0 where broadcast.
        mask_stride_b: u32,
        mask_stride_h: u32,
        mask_stride_i: u32,
        mask_stride_j: u32,
        /// Where the ALiBi slopes start in `lens` (words), and their stride over the batch (0
        /// when one slope per head serves every batch entry).
        alibi_offset: u32,
        alibi_stride_b: u32,
        /// Where the sink logits start in `lens` (words), one per query head.
        sink_offset: u32,
        /// StreamingLLM's sink keys (at most `kv_len`).
        sink_keys: u32,
        /// Paged K/V: where the block table starts in `lens` (words), and its pages per
        /// sequence (the page size is compiled in: `MaskOptions::page_size`).
        page_offset: u32,
        pages_per_seq: u32,
        /// A packed batch: where its offsets start in `lens` (`cu_seqlens_q`, `batch + 1`
        /// words, then `cu_seqlens_k`).
        varlen_offset: u32,
        /// Kernels with the options packed (`lib/options_packed.wgsl`): where the mask's
        /// words and the bias's f32 bits start in `lens`.
        mask_offset: u32,
        bias_offset: u32,
        /// Dropout (`spec::Dropout`): the two words of the key from the seed, the threshold
        /// a weight's bits must reach to be kept, and the factor of a kept weight.
        dropout_key_a: u32,
        dropout_key_b: u32,
        dropout_threshold: u32,
        dropout_scale: f32,
        /// V's factor (`Attention::kv_scales`; 1 without), applied to O.
        v_scale: f32,
        /// Where the score mod's data start in `lens` (`attn_data`).
        mod_offset: u32,
    }
}

uniform! {
    /// `qk_scores.wgsl`: one chunk of the three-pass path's first pass.
    struct QkParams {
        bh_start: u32,
        bh_count: u32,
        row_start: u32,
        rows: u32,
        kv_len: u32,
        head_dim: u32,
        heads: u32,
        group: u32,
        tiles_i: u32,
        tiles_j: u32,
        q_stride_b: u32,
        q_stride_h: u32,
        q_stride_s: u32,
        k_stride_b: u32,
        k_stride_h: u32,
        k_stride_s: u32,
        scale: f32,
    }
}

uniform! {
    /// `masked_softmax.wgsl`: one chunk of the three-pass path's second pass.
    struct SoftmaxParams {
        bh_start: u32,
        bh_count: u32,
        row_start: u32,
        rows: u32,
        heads: u32,
        write_lse: u32,
    }
}

uniform! {
    /// `pv_product.wgsl`: one chunk of the three-pass path's third pass.
    struct PvParams {
        /// V's factor (`Attention::kv_scales`; 1 without), applied to O.
        v_scale: f32,
        bh_start: u32,
        bh_count: u32,
        row_start: u32,
        rows: u32,
        kv_len: u32,
        v_head_dim: u32,
        heads: u32,
        group: u32,
        tiles_i: u32,
        tiles_n: u32,
        v_stride_b: u32,
        v_stride_h: u32,
        v_stride_s: u32,
        o_stride_b: u32,
        o_stride_h: u32,
        o_stride_s: u32,
    }
}

uniform! {
    /// `rotate.wgsl`: rotary position embedding of one tensor's rows into another's.
    struct RotateParams {
        /// Tokens of x, `batch * seq` (a workgroup each, for every head).
        tokens: u32,
        heads: u32,
        seq: u32,
        /// Elements per row (head_dim).
        dim: u32,
        /// Rotated pairs (`Rotary::dim() / 2`), and the table's row length.
        pairs: u32,
        /// Pairs are `(2k, 2k + 1)`, not `(k, k + pairs)`.
        interleaved: u32,
        /// Turns by minus the angle.
        transposed: u32,
        /// What the turned pairs are multiplied by.
        magnitude: f32,
        /// `positions` holds one position per row, not one start per batch entry.
        per_row: u32,
        /// With `per_row`, three positions per row (M-RoPE's temporal, height, width).
        axes: u32,
        /// M-RoPE's layout of the axes over the pairs: 0 none (every pair takes axis 0), 1
        /// sections, 2 interleaved (`Rotary::axis_of`).
        mrope: u32,
        /// M-RoPE's pairs per axis.
        section_t: u32,
        section_h: u32,
        section_w: u32,
        /// Rows go to y at their position (a cache's rows), not at their index.
        rows_at_position: u32,
        /// Only the first `positions[counts_offset + b]` rows of batch entry `b` are written.
        has_counts: u32,
        counts_offset: u32,
        x_stride_b: u32,
        x_stride_h: u32,
        x_stride_s: u32,
        y_stride_b: u32,
        y_stride_h: u32,
        y_stride_s: u32,
    }
}

uniform! {
    /// `combine_splits.wgsl`: partial results merged by their log-sum-exp.
    struct CombineParams {
        splits: u32,
        rows: u32,
        heads: u32,
        q_len: u32,
        v_head_dim: u32,
        write_lse: u32,
        /// Where the partial log-sum-exps start in their buffer, in elements.
        lse_offset: u32,
        /// Element strides of the partial outputs over (split, batch, head, row); the column
        /// stride is 1.
        part_stride_s: u32,
        part_stride_b: u32,
        part_stride_h: u32,
        part_stride_i: u32,
        /// Element strides of the partial log-sum-exps over (split, batch, head, row).
        part_lse_stride_s: u32,
        part_lse_stride_b: u32,
        part_lse_stride_h: u32,
        part_lse_stride_i: u32,
        o_stride_b: u32,
        o_stride_h: u32,
        o_stride_s: u32,
        /// Nonzero when `sinks` holds a sink logit per head from `sink_offset`: each joins its
        /// rows' merge as a part with no output (flash-decoding of a call with sinks).
        has_sinks: u32,
        sink_offset: u32,
        /// A packed batch: rows go to `lens[varlen_offset + b] + i`, none past the sequence.
        has_varlen: u32,
        varlen_offset: u32,
        /// With `has_varlen`: the partial outputs are packed like O (the f32 copy of several
        /// passes), not padded (the splits' partials).
        parts_packed: u32,
    }
}

uniform! {
    /// `attention_backward.wgsl`: one dispatch of one phase of the backward (the masking
    /// options are in [`MaskParams`]). `rows` counts the phase's invocations: query rows
    /// `[batch, heads, q_len]` for the first two phases, key rows `[batch, kv_heads, kv_len]`
    /// for the third; `first .. first + count` are the keys (phase 1) or query rows (phase 2)
    /// this dispatch adds in.
    struct BackwardParams {
        heads: u32,
        kv_heads: u32,
        group: u32,
        q_len: u32,
        kv_len: u32,
        head_dim: u32,
        v_head_dim: u32,
        rows: u32,
        scale: f32,
        first: u32,
        count: u32,
        /// 1 when an earlier dispatch of the phase wrote the gradients: add to them.
        resume: u32,
        q_stride_b: u32,
        q_stride_h: u32,
        q_stride_s: u32,
        k_stride_b: u32,
        k_stride_h: u32,
        k_stride_s: u32,
        v_stride_b: u32,
        v_stride_h: u32,
        v_stride_s: u32,
        o_stride_b: u32,
        o_stride_h: u32,
        o_stride_s: u32,
        /// The bias's shape (phase 3): each 1 (broadcast) or the full size.
        bias_b: u32,
        bias_h: u32,
        bias_i: u32,
        bias_j: u32,
        batch: u32,
    }
}

uniform! {
    /// `matmul.wgsl`: a batched `C = alpha A B^T + bias` with any element strides.
    struct MatmulParams {
        m: u32,
        n: u32,
        k: u32,
        batches: u32,
        tiles_m: u32,
        tiles_n: u32,
        has_bias: u32,
        alpha: f32,
        a_stride_z: u32,
        a_stride_m: u32,
        a_stride_k: u32,
        b_stride_z: u32,
        b_stride_n: u32,
        b_stride_k: u32,
        c_stride_z: u32,
        c_stride_m: u32,
        c_stride_n: u32,
    }
}

/// `-inf` as f32 bits: the log-sum-exp of a row with no allowed key. WGSL may assume there are
/// no infinities, so kernels only ever write it as this bit pattern.
pub(crate) const NEG_INF_BITS: u32 = 0xff80_0000;
/// The masked-score sentinel: below every adjusted score (which never go below
/// [`SCORE_FLOOR`]), and finite.
pub(crate) const NEG_BIG: f32 = -3.0e38;
/// `causal` value of top-left alignment in the kernels (0 is no causal mask).
pub(crate) const CAUSAL_TOP_LEFT: u32 = 1;
/// `causal` value of bottom-right alignment.
pub(crate) const CAUSAL_BOTTOM_RIGHT: u32 = 2;

/// Rows and columns of one tile of the register-blocked product (`lib/tile_gemm.wgsl`).
pub(crate) const TILE: u32 = 64;
/// The summed axis of the tile product is staged `TILE_K` at a time.
pub(crate) const TILE_K: u32 = 16;
/// Invocations of a 64-row tile-product workgroup with 4 x 4 blocks (16 x 16): the
/// most any kernel of the crate uses.
pub(crate) const TILE_INVOCATIONS: u32 = (TILE / 4) * (TILE / 4);
/// Workgroup memory of the tile product's staging: one `TILE_K x TILE` slice of each operand.
pub(crate) const TILE_STAGE_BYTES: u32 = 2 * TILE_K * TILE * 4;

/// The constants every kernel sees, generated from the Rust ones.
pub(crate) fn shared_constants() -> String {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2: f32 = std::f32::consts::LN_2;
    const {
        assert!(NEG_INF_BITS == f32::NEG_INFINITY.to_bits());
        assert!(NEG_BIG < SCORE_FLOOR);
        // tile_gemm.wgsl stages a TILE_K x TILE slice as [k][column / 4] vec4s, TILE_X = TILE / 4
        // of them per k, and its items (four rows of one k) divide evenly among the
        // invocations of every block.
        assert!(TILE_K == TILE / 4);
    }
    format!(
        "const NEG_INF_BITS: u32 = {NEG_INF_BITS}u;\n\
         const NEG_BIG: f32 = {NEG_BIG:e};\n\
         const SCORE_FLOOR: f32 = {SCORE_FLOOR:e};\n\
         const CAUSAL_TOP_LEFT: u32 = {CAUSAL_TOP_LEFT}u;\n\
         const CAUSAL_BOTTOM_RIGHT: u32 = {CAUSAL_BOTTOM_RIGHT}u;\n\
         const TILE: u32 = {TILE}u;\n\
         const TILE_K: u32 = {TILE_K}u;\n\
         const LOG2E: f32 = {LOG2E:e};\n\
         const LN2: f32 = {LN2:e};\n\
         // SCORE_FLOOR in log2 units (scores pre-scaled by log2(e), softmax by exp2).\n\
         const SCORE_FLOOR2: f32 = SCORE_FLOOR * LOG2E;\n"
    )
}

/// A buffer holding `params` for the submission being encoded (from the pool), bindable as a
/// uniform or a read-only storage buffer ([`ParamsIn`](super::ParamsIn)).
pub(crate) fn uniform_buffer<U: Uniform>(
    gpu: &crate::Gpu,
    params: &U,
) -> crate::Result<wgpu::Buffer> {
    let mut bytes = bytemuck::bytes_of(params).to_vec();
    bytes.resize(bytes.len().next_multiple_of(16), 0);
    Ok(gpu.submission_buffer(
        U::NAME,
        &bytes,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::STORAGE,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// naga's layout of each generated struct (what the kernels see) is the Rust layout: the
    /// same size, and member `n` of 4 bytes at offset `4 n`, as `repr(C)` puts it.
    fn check<U: Uniform>() {
        let module = naga::front::wgsl::parse_str(U::WGSL)
            .unwrap_or_else(|e| panic!("{}: {}", U::NAME, e.emit_to_string(U::WGSL)));
        let mut layouter = naga::proc::Layouter::default();
        layouter.update(module.to_ctx()).expect("layout");
        let (handle, ty) = module
            .types
            .iter()
            .find(|(_, t)| t.name.as_deref() == Some(U::NAME))
            .expect("the struct is declared under its Rust name");
        assert_eq!(
            layouter[handle].size as usize,
            std::mem::size_of::<U>(),
            "{}: WGSL size vs Rust size",
            U::NAME
        );
        let naga::TypeInner::Struct { members, .. } = &ty.inner else {
            panic!("{} is not a struct", U::NAME)
        };
        assert_eq!(members.len() * 4, std::mem::size_of::<U>(), "{}", U::NAME);
        for (n, m) in members.iter().enumerate() {
            assert_eq!(m.offset as usize, 4 * n, "{}.{:?}", U::NAME, m.name);
        }
    }

    #[test]
    fn generated_structs_have_the_rust_layout() {
        check::<FlashParams>();
        check::<MaskParams>();
        check::<QkParams>();
        check::<SoftmaxParams>();
        check::<PvParams>();
        check::<CombineParams>();
        check::<RotateParams>();
        check::<MatmulParams>();
    }

    #[test]
    fn shared_constants_parse() {
        let src = shared_constants();
        naga::front::wgsl::parse_str(&src).unwrap_or_else(|e| panic!("{}", e.emit_to_string(&src)));
        assert!(
            src.contains("const NEG_INF_BITS: u32 = 4286578688u;"),
            "{src}"
        );
    }
}
