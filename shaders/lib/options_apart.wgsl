// The bias and the boolean mask of lib/masking.wgsl in buffers of their own: the kernel binds
// `bias: array<f32>` and `mask: array<u32>`.

// Element e of the bias.
fn bias_at(e: u32) -> f32 {
    return bias[e];
}

// Word w of the mask (four elements of one byte each).
fn mask_word(w: u32) -> u32 {
    return mask[w];
}
