// The products of lib/mma.wgsl by plain FMAs over the staged f16 operands, four results of a
// row per item: the cooperative kernel's structure on any adapter with SHADER_F16 (the tests
// run it where no cooperative matrices exist). Products of two f16 are exact in f32, so this
// differs from a tensor core only in the order of the sums.

// mma_s = Q K^T over the staged slice (the first slice), [row][key].
fn mma_scores_product(li: u32) {
    mma_scores_emulated(li, false);
}

// mma_s += Q K^T over the staged slice (the later slices).
fn mma_scores_product_add(li: u32) {
    mma_scores_emulated(li, true);
}

fn mma_scores_emulated(li: u32, accumulate: bool) {
    for (var g = li; g < MMA_ROWS * TILE / 4u; g += INV) {
        let row = g / (TILE / 4u);
        let key = (g % (TILE / 4u)) * 4u;
        let at = row * TILE + key;
        var acc = vec4<f32>();
        if accumulate {
            acc = vec4<f32>(mma_s[at], mma_s[at + 1u], mma_s[at + 2u], mma_s[at + 3u]);
        }
        for (var d0 = 0u; d0 < QS; d0 += CM) {
            for (var dd = 0u; dd < CM; dd++) {
                let d = d0 + dd;
                let q = f32(mma_q[row * QS + d]);
                acc += q * vec4<f32>(
                    f32(mma_kv[key * KVW + d]),
                    f32(mma_kv[(key + 1u) * KVW + d]),
                    f32(mma_kv[(key + 2u) * KVW + d]),
                    f32(mma_kv[(key + 3u) * KVW + d]),
                );
            }
        }
        mma_s[at] = acc.x;
        mma_s[at + 1u] = acc.y;
        mma_s[at + 2u] = acc.z;
        mma_s[at + 3u] = acc.w;
    }
}

// mma_s = P V for the staged chunk of V, [row][column of the chunk].
fn mma_pv_product(li: u32) {
    for (var g = li; g < MMA_ROWS * PV_COLS / 4u; g += INV) {
        let row = g / (PV_COLS / 4u);
        let n = (g % (PV_COLS / 4u)) * 4u;
        var acc = vec4<f32>();
        for (var k0 = 0u; k0 < TILE; k0 += CM) {
            for (var kk = 0u; kk < CM; kk++) {
                let k = k0 + kk;
                let p = f32(mma_p[row * TILE + k]);
                let at = k * KVW + n;
                acc += p * vec4<f32>(
                    f32(mma_kv[at]),
                    f32(mma_kv[at + 1u]),
                    f32(mma_kv[at + 2u]),
                    f32(mma_kv[at + 3u]),
                );
            }
        }
        let at = row * TILE + n;
        mma_s[at] = acc.x;
        mma_s[at + 1u] = acc.y;
        mma_s[at + 2u] = acc.z;
        mma_s[at + 3u] = acc.w;
    }
}
