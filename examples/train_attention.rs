//! A tiny model that learns, trained with the crate's backward: an embedding of tokens and
//! positions, one multi-head self-attention layer on the GPU, and a linear read-out, trained
//! with Adam (written here) to *reverse* a random sequence of tokens. Reversal needs attention:
//! output position `i` must read the token at position `L - 1 - i`, which the layer learns to
//! find from the position embeddings.
//!
//! `cargo run --release --example train_attention [-- STEPS [DROPOUT]]`. It prints the loss as
//! it falls and the final accuracy on fresh sequences, and exits with an error if the loss has
//! not fallen below `LOSS_TARGET` (CI runs it). With `DROPOUT` (a probability, default 0) the
//! layer drops attention weights while training, a new seed each step (its backward takes
//! the same options, so it drops the same weights); the accuracy is measured without. The layer's forward and backward run on the
//! GPU (`MultiHeadAttention::forward_for_backward` and `backward`); the embedding, the
//! read-out, the cross-entropy and Adam are a few host loops, as small as the model.

use std::time::Instant;

use wgpu_attention::{Attention, Gpu, MhaConfig, MhaWeights, MultiHeadAttention};

const VOCAB: usize = 16;
const SEQ: usize = 12;
const EMBED: usize = 32;
const HEADS: usize = 2;
const BATCH: usize = 32;
/// The loss (mean cross-entropy, nats) the run must reach: a model that ignores attention
/// cannot beat `ln(VOCAB)` = 2.77.
const LOSS_TARGET: f32 = 0.1;

/// xorshift: the example needs no seed from outside.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn uniform(&mut self, scale: f32) -> f32 {
        ((self.next() >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0) * scale
    }

    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }

    fn token(&mut self) -> usize {
        (self.next() % VOCAB as u64) as usize
    }
}

/// One parameter array with its Adam moments.
struct Param {
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl Param {
    fn new(w: Vec<f32>) -> Param {
        let n = w.len();
        Param {
            w,
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// One Adam step (β = 0.9, 0.999) with learning rate `lr` at step `t` (from 1).
    fn adam(&mut self, g: &[f32], lr: f32, t: i32) {
        let (b1, b2) = (0.9f32, 0.999f32);
        let (c1, c2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        for (((w, m), v), &g) in self.w.iter_mut().zip(&mut self.m).zip(&mut self.v).zip(g) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + 1e-8);
        }
    }
}

/// Everything the model learns.
struct Model {
    tokens: Param,    // [VOCAB, EMBED]
    positions: Param, // [SEQ, EMBED]
    q_w: Param,
    k_w: Param,
    v_w: Param,
    o_w: Param,       // [EMBED, EMBED] each, PyTorch's [out, in]
    read: Param,      // [VOCAB, EMBED]
    read_bias: Param, // [VOCAB]
}

impl Model {
    fn new(r: &mut Rng) -> Model {
        let s = 1.0 / (EMBED as f32).sqrt();
        let mut square = || Param::new(r.vec(EMBED * EMBED, s));
        let (q_w, k_w, v_w, o_w) = (square(), square(), square(), square());
        Model {
            tokens: Param::new(r.vec(VOCAB * EMBED, 1.0)),
            positions: Param::new(r.vec(SEQ * EMBED, 1.0)),
            q_w,
            k_w,
            v_w,
            o_w,
            read: Param::new(r.vec(VOCAB * EMBED, s)),
            read_bias: Param::new(vec![0.0; VOCAB]),
        }
    }

    fn layer(&self, gpu: &Gpu) -> wgpu_attention::Result<MultiHeadAttention> {
        let weights = MhaWeights::new(
            self.q_w.w.clone(),
            self.k_w.w.clone(),
            self.v_w.w.clone(),
            self.o_w.w.clone(),
        );
        MultiHeadAttention::new(gpu, MhaConfig::new(EMBED, HEADS), &weights)
    }

    /// The embedded batch `[BATCH, SEQ, EMBED]`.
    fn embed(&self, seqs: &[[usize; SEQ]]) -> Vec<f32> {
        let mut x = vec![0.0; seqs.len() * SEQ * EMBED];
        for (b, seq) in seqs.iter().enumerate() {
            for (i, &t) in seq.iter().enumerate() {
                let row = &mut x[(b * SEQ + i) * EMBED..][..EMBED];
                for (e, dst) in row.iter_mut().enumerate() {
                    *dst = self.tokens.w[t * EMBED + e] + self.positions.w[i * EMBED + e];
                }
            }
        }
        x
    }

    /// Logits `[rows, VOCAB]` of the layer's output `h` `[rows, EMBED]`.
    fn read_out(&self, h: &[f32]) -> Vec<f32> {
        let rows = h.len() / EMBED;
        let mut logits = vec![0.0; rows * VOCAB];
        for r in 0..rows {
            for c in 0..VOCAB {
                let w = &self.read.w[c * EMBED..][..EMBED];
                let dot: f32 = h[r * EMBED..][..EMBED]
                    .iter()
                    .zip(w)
                    .map(|(a, b)| a * b)
                    .sum();
                logits[r * VOCAB + c] = dot + self.read_bias.w[c];
            }
        }
        logits
    }
}

/// The reversed sequence.
fn target(seq: &[usize; SEQ], i: usize) -> usize {
    seq[SEQ - 1 - i]
}

fn batch(r: &mut Rng) -> Vec<[usize; SEQ]> {
    (0..BATCH)
        .map(|_| std::array::from_fn(|_| r.token()))
        .collect()
}

/// Softmax in place of each row of `logits`; returns the mean cross-entropy against the
/// targets and the number of rows whose arg-max is the target.
fn softmax_cross_entropy(logits: &mut [f32], seqs: &[[usize; SEQ]]) -> (f32, usize) {
    let (mut loss, mut right) = (0.0, 0);
    for (r, row) in logits.chunks_mut(VOCAB).enumerate() {
        let want = target(&seqs[r / SEQ], r % SEQ);
        let best = (0..VOCAB)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap();
        right += (best == want) as usize;
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
        for x in row.iter_mut() {
            *x = (*x - max).exp() / sum;
        }
        loss -= row[want].max(1e-30).ln();
    }
    (loss / (logits.len() / VOCAB) as f32, right)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let steps: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 200,
    };
    let dropout: f32 = match std::env::args().nth(2) {
        Some(s) => s.parse()?,
        None => 0.0,
    };
    let gpu = Gpu::new()?;
    println!(
        "training on {} (attention dropout {dropout})",
        gpu.describe()
    );
    let mut r = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::new(&mut r);
    let opts = Attention::new();
    let rows = BATCH * SEQ;
    let started = Instant::now();
    let mut loss = f32::INFINITY;
    for step in 1..=steps {
        let seqs = batch(&mut r);
        let x = gpu.upload(&model.embed(&seqs), [BATCH, SEQ, EMBED])?;
        let layer = model.layer(&gpu)?;
        let train = opts.clone().dropout(dropout, step as u64);
        let (out, kept) = layer.forward_for_backward(&gpu, &x, &x, &x, &train)?;
        let h = out.out.download(&gpu)?;
        let mut probs = model.read_out(&h);
        let (l, _) = softmax_cross_entropy(&mut probs, &seqs);
        loss = l;
        // d logits = (softmax - one-hot) / rows; the read-out's gradients and d h.
        let mut d_read = vec![0.0; VOCAB * EMBED];
        let mut d_read_bias = vec![0.0; VOCAB];
        let mut d_h = vec![0.0; rows * EMBED];
        for row in 0..rows {
            let want = target(&seqs[row / SEQ], row % SEQ);
            for c in 0..VOCAB {
                let g = (probs[row * VOCAB + c] - (c == want) as u8 as f32) / rows as f32;
                d_read_bias[c] += g;
                for e in 0..EMBED {
                    d_read[c * EMBED + e] += g * h[row * EMBED + e];
                    d_h[row * EMBED + e] += g * model.read.w[c * EMBED + e];
                }
            }
        }
        let g = layer.backward(&gpu, &kept, &gpu.upload(&d_h, [BATCH, SEQ, EMBED])?)?;
        // Self-attention: the gradient by x is the sum of those by query, key and value.
        let (dq, dk, dv) = (
            g.query.download(&gpu)?,
            g.key.download(&gpu)?,
            g.value.download(&gpu)?,
        );
        let mut d_tokens = vec![0.0; VOCAB * EMBED];
        let mut d_positions = vec![0.0; SEQ * EMBED];
        for (b, seq) in seqs.iter().enumerate() {
            for (i, &t) in seq.iter().enumerate() {
                for e in 0..EMBED {
                    let n = (b * SEQ + i) * EMBED + e;
                    let d = dq[n] + dk[n] + dv[n];
                    d_tokens[t * EMBED + e] += d;
                    d_positions[i * EMBED + e] += d;
                }
            }
        }
        let lr = 3e-3;
        let t = step as i32;
        model.tokens.adam(&d_tokens, lr, t);
        model.positions.adam(&d_positions, lr, t);
        model.q_w.adam(&g.q_weight.download(&gpu)?, lr, t);
        model.k_w.adam(&g.k_weight.download(&gpu)?, lr, t);
        model.v_w.adam(&g.v_weight.download(&gpu)?, lr, t);
        model.o_w.adam(&g.out_weight.download(&gpu)?, lr, t);
        model.read.adam(&d_read, lr, t);
        model.read_bias.adam(&d_read_bias, lr, t);
        if step == 1 || step % 25 == 0 || step == steps {
            println!("step {step:4}: loss {loss:.4}");
        }
    }
    // Accuracy on fresh sequences.
    let (mut right, mut total) = (0, 0);
    let layer = model.layer(&gpu)?;
    for _ in 0..8 {
        let seqs = batch(&mut r);
        let x = gpu.upload(&model.embed(&seqs), [BATCH, SEQ, EMBED])?;
        let h = layer.forward(&gpu, &x, &x, &x, &opts)?.out.download(&gpu)?;
        let mut probs = model.read_out(&h);
        right += softmax_cross_entropy(&mut probs, &seqs).1;
        total += rows;
    }
    let accuracy = right as f32 / total as f32;
    println!(
        "{steps} steps in {:.1} s; final loss {loss:.4}; accuracy on {total} fresh tokens {:.1}%",
        started.elapsed().as_secs_f32(),
        100.0 * accuracy
    );
    if loss.is_nan() || loss >= LOSS_TARGET {
        return Err(format!("the loss did not fall below {LOSS_TARGET}: {loss}").into());
    }
    Ok(())
}
