// lib/mma.wgsl's interface for the scalar fused kernel (MMA = 0), never called: the kernel's
// branches on MMA are constant, and these keep both sides compiling without the 16-bit
// workgroup arrays.

fn mma_stage_q(li: u32, b: u32, kvh: u32) {}

fn mma_scores(li: u32, ty: u32, tx: u32) -> Block {
    return Block();
}

fn mma_put_p(s: Block, ty: u32, tx: u32) {}

fn mma_pv(acc: array<vec4<f32>, OC * BR>, li: u32, ty: u32, tx: u32, v_base: u32)
    -> array<vec4<f32>, OC * BR> {
    return acc;
}
