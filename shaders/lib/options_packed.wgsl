// The bias and the boolean mask of lib/masking.wgsl inside `lens`, behind the lengths, slopes,
// sinks and tables: two storage buffers fewer, for kernels that would otherwise pass WebGPU's
// default of 8 per stage (the backward).

// Element e of the bias (f32 bits).
fn bias_at(e: u32) -> f32 {
    return bitcast<f32>(lens[mparams.bias_offset + e]);
}

// Word w of the mask (four elements of one byte each).
fn mask_word(w: u32) -> u32 {
    return lens[mparams.mask_offset + w];
}
