// The row maxima of a key tile of flash_decode.wgsl through workgroup memory only (devices
// without subgroups, and WebGPU, where wgpu does not map them): every invocation's scores go
// to the kernel's p_sh (overwritten by the probabilities afterwards), RED_PARTS partial
// maxima per row to `red`, two barriers. Same interface as lib/reduce_subgroup.wgsl.

const RED_PARTS: u32 = 8u;

struct ReduceInvocation {
    @builtin(local_invocation_index) lid: u32,
}

// [parity][row][part], double-buffered by tile parity like p_sh.
var<workgroup> red: array<f32, 2u * ROWS * RED_PARTS>;

fn rows_max(s: array<f32, ROWS>, par: u32, inv: ReduceInvocation) -> array<f32, ROWS> {
    for (var r = 0u; r < ROWS; r++) {
        p_sh[p_index(par, inv.lid, r)] = s[r];
    }
    workgroupBarrier();
    let span = TILE / RED_PARTS;
    for (var x = inv.lid; x < ROWS * RED_PARTS; x += WG) {
        let r = x / RED_PARTS;
        let first = (x % RED_PARTS) * span;
        var m = NEG_BIG;
        for (var k = 0u; k < span; k++) {
            m = max(m, p_sh[p_index(par, first + k, r)]);
        }
        red[(par * ROWS + r) * RED_PARTS + x % RED_PARTS] = m;
    }
    workgroupBarrier();
    var out: array<f32, ROWS>;
    for (var r = 0u; r < ROWS; r++) {
        var m = NEG_BIG;
        for (var g = 0u; g < RED_PARTS; g++) {
            m = max(m, red[(par * ROWS + r) * RED_PARTS + g]);
        }
        out[r] = m;
    }
    return out;
}
