// The row maxima of a key tile of flash_decode.wgsl through workgroup memory only (devices
// without subgroups, and WebGPU, where wgpu does not map them): every invocation's maxima go
// to the kernel's p_sh (overwritten by the probabilities afterwards), RED_PARTS partial
// maxima of 8 invocations each per row to `red`, two barriers. Same interface as
// lib/reduce_subgroup.wgsl.

const RED_PARTS: u32 = WG / 8u;

struct ReduceInvocation {
    @builtin(local_invocation_index) lid: u32,
}

// [parity][row][part], double-buffered by tile parity like p_sh.
var<workgroup> red: array<f32, 2u * ROWS * RED_PARTS>;

// The maximum of m[r] over the workgroup, for every row r. Called in uniform control flow;
// par alternates between consecutive calls.
fn rows_max(m: array<f32, ROWS>, par: u32, inv: ReduceInvocation) -> array<f32, ROWS> {
    let m4 = rows_vec4(m);
    for (var q = 0u; q < R4; q++) {
        p_sh[p_index(par, inv.lid, q)] = m4[q];
    }
    workgroupBarrier();
    for (var x = inv.lid; x < ROWS * RED_PARTS; x += WG) {
        let r = x / RED_PARTS;
        let part = x % RED_PARTS;
        var top = NEG_BIG;
        for (var k = 0u; k < 8u; k++) {
            top = max(top, p_sh[p_index(par, part * 8u + k, r / 4u)][r % 4u]);
        }
        red[(par * ROWS + r) * RED_PARTS + part] = top;
    }
    workgroupBarrier();
    var out = array<f32, ROWS>();
    for (var r = 0u; r < ROWS; r++) {
        var top = NEG_BIG;
        for (var g = 0u; g < RED_PARTS; g++) {
            top = max(top, red[(par * ROWS + r) * RED_PARTS + g]);
        }
        out[r] = top;
    }
    return out;
}
