//! A made-up decoder stack served the way an inference engine serves one: several sequences
//! of different lengths prefilled in one packed call per layer (`Attention::varlen`), then
//! decoded a token at a time against a paged KV cache per layer (`PagedKvCache`), sequences
//! joining and finishing as it goes. Q and K carry rotary position embeddings as Llama's do:
//! turned by `gpu::rotate` at each token's position in its sequence for the packed prefill,
//! and by the caches themselves (`with_rotary`) when decoding. Every attention call is checked
//! against the CPU reference on the same K and V, kept here on the host unrotated and turned
//! by `cpu::rotate`.
//!
//! `cargo run --release --example serve_batch`

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use wgpu_attention::rotary::{Positions, Rotary};
use wgpu_attention::{Attention, Causal, Dims, Gpu, Layout, PagedKvCache, SeqId, cpu};

const VOCAB: usize = 50;
const MODEL: usize = 64;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const DIM: usize = MODEL / HEADS;
const LAYERS: usize = 2;
/// Largest error any attention call may have against the reference.
const TOL: f32 = 1e-4;
/// Llama 3's `rope_theta`.
const THETA: f64 = 500_000.0;

/// Weights of one layer: `[MODEL, out]` row-major projections.
struct Layer {
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
}

fn random(rng: &mut StdRng, n: usize, amp: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-amp..amp)).collect()
}

/// `x [rows, MODEL] @ w [MODEL, out]`.
fn matmul(x: &[f32], w: &[f32], out: usize) -> Vec<f32> {
    let rows = x.len() / MODEL;
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        for (k, &a) in x[r * MODEL..(r + 1) * MODEL].iter().enumerate() {
            for (dst, &b) in y[r * out..(r + 1) * out].iter_mut().zip(&w[k * out..]) {
                *dst += a * b;
            }
        }
    }
    y
}

/// One sequence being served: its tokens, and per layer the K and V rows it has cached
/// (`[len, KV_HEADS, DIM]`, the reference's copy of what the paged caches hold).
struct Served {
    id: [SeqId; LAYERS],
    tokens: Vec<usize>,
    k: [Vec<f32>; LAYERS],
    v: [Vec<f32>; LAYERS],
    /// Tokens to generate before it finishes.
    left: usize,
}

fn max_err(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn main() -> Result<(), wgpu_attention::Error> {
    let gpu = Gpu::new()?;
    println!("adapter: {}", gpu.describe());
    let mut rng = StdRng::seed_from_u64(7);
    let embed = random(&mut rng, VOCAB * MODEL, 1.0);
    let unembed = random(&mut rng, MODEL * VOCAB, 0.3);
    let scale = 1.0 / (MODEL as f32).sqrt();
    let layers: Vec<Layer> = (0..LAYERS)
        .map(|_| Layer {
            wq: random(&mut rng, MODEL * MODEL, scale),
            wk: random(&mut rng, MODEL * KV_HEADS * DIM, scale),
            wv: random(&mut rng, MODEL * KV_HEADS * DIM, scale),
            wo: random(&mut rng, MODEL * MODEL, scale),
        })
        .collect();
    let rope = Rotary::new(DIM, THETA)?;
    // 64 pages of 8 tokens per layer, shared by every sequence; the caches turn K and the
    // queries themselves.
    let mut caches: Vec<PagedKvCache> = (0..LAYERS)
        .map(|_| PagedKvCache::new(&gpu, 64, 8, KV_HEADS, DIM, DIM)?.with_rotary(rope.clone()))
        .collect::<Result<_, _>>()?;
    let mut worst = 0f32;
    let mut calls = 0usize;

    // Prefill: prompts of 5, 13 and 1 tokens, one packed call per layer.
    let mut served: Vec<Served> = Vec::new();
    let prompts: Vec<Vec<usize>> = [5usize, 13, 1]
        .iter()
        .map(|&n| (0..n).map(|_| rng.random_range(0..VOCAB)).collect())
        .collect();
    for (n, prompt) in prompts.iter().enumerate() {
        served.push(Served {
            id: std::array::from_fn(|l| caches[l].add_sequence()),
            tokens: prompt.clone(),
            k: Default::default(),
            v: Default::default(),
            left: 6 + 3 * n,
        });
    }
    let start = Instant::now();
    let lens: Vec<usize> = served.iter().map(|s| s.tokens.len()).collect();
    let mut cu = vec![0u32];
    for &l in &lens {
        cu.push(cu.last().unwrap() + l as u32);
    }
    let total = *cu.last().unwrap() as usize;
    let mut x: Vec<f32> = served
        .iter()
        .flat_map(|s| {
            s.tokens
                .iter()
                .flat_map(|&t| embed[t * MODEL..(t + 1) * MODEL].to_vec())
        })
        .collect();
    let dims = Dims {
        batch: served.len(),
        heads: HEADS,
        kv_heads: KV_HEADS,
        q_len: *lens.iter().max().unwrap(),
        kv_len: *lens.iter().max().unwrap(),
        head_dim: DIM,
        v_head_dim: DIM,
    };
    let packed = Attention::new()
        .layout(Layout::Bshd)
        .causal(Causal::BottomRight)
        .varlen(cu.clone(), cu.clone());
    // Each packed row's position in its own sequence.
    let positions = Positions::Each(lens.iter().flat_map(|&l| 0..l as u32).collect());
    for (l, layer) in layers.iter().enumerate() {
        let (q, k, v) = (
            matmul(&x, &layer.wq, MODEL),
            matmul(&x, &layer.wk, KV_HEADS * DIM),
            matmul(&x, &layer.wv, KV_HEADS * DIM),
        );
        let row = KV_HEADS * DIM;
        for (b, s) in served.iter_mut().enumerate() {
            let rows = cu[b] as usize * row..cu[b + 1] as usize * row;
            caches[l].append(&gpu, s.id[l], &k[rows.clone()], &v[rows.clone()])?;
            s.k[l].extend_from_slice(&k[rows.clone()]);
            s.v[l].extend_from_slice(&v[rows]);
        }
        // The caches got K unrotated; the packed call takes Q and K turned on the device.
        let turn = |x: &[f32], heads| -> Result<_, wgpu_attention::Error> {
            let t = gpu.upload(x, [1, total, heads, DIM])?;
            wgpu_attention::gpu::rotate(&gpu, &t, Layout::Bshd, &rope, &positions)
        };
        let o = packed
            .run(
                &gpu,
                &turn(&q, HEADS)?,
                &turn(&k, KV_HEADS)?,
                &gpu.upload(&v, [1, total, KV_HEADS, DIM])?,
            )?
            .o
            .download(&gpu)?;
        let host_turn = |x: &[f32], heads| {
            cpu::rotate(x, [1, total, heads, DIM], Layout::Bshd, &rope, &positions)
        };
        let want = cpu::reference(
            &host_turn(&q, HEADS)?,
            &host_turn(&k, KV_HEADS)?,
            &v,
            dims,
            &packed,
        )?;
        worst = worst.max(max_err(&o, &want.o));
        calls += 1;
        let y = matmul(&o, &layer.wo, MODEL);
        x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
    }
    // Each prompt's first new token, from its last row.
    for (b, s) in served.iter_mut().enumerate() {
        let last = &x[(cu[b + 1] as usize - 1) * MODEL..cu[b + 1] as usize * MODEL];
        s.tokens.push(argmax(&matmul(last, &unembed, VOCAB)));
    }
    println!(
        "prefill: {} prompts, {total} tokens, {:.1} ms",
        served.len(),
        start.elapsed().as_secs_f64() * 1e3
    );

    // Decoding: every live sequence one token per step; one joins at step 3, each finishes
    // after its budget (its pages go back to the pools).
    let start = Instant::now();
    let mut generated = 0usize;
    for step in 0.. {
        if step == 3 {
            let id = std::array::from_fn(|l| caches[l].add_sequence());
            served.push(Served {
                id,
                tokens: vec![rng.random_range(0..VOCAB)],
                k: Default::default(),
                v: Default::default(),
                left: 5,
            });
        }
        if served.is_empty() {
            break;
        }
        let n = served.len();
        let mut x: Vec<f32> = served
            .iter()
            .flat_map(|s| {
                let t = *s.tokens.last().unwrap();
                embed[t * MODEL..(t + 1) * MODEL].to_vec()
            })
            .collect();
        for (l, layer) in layers.iter().enumerate() {
            let (q, k, v) = (
                matmul(&x, &layer.wq, MODEL),
                matmul(&x, &layer.wk, KV_HEADS * DIM),
                matmul(&x, &layer.wv, KV_HEADS * DIM),
            );
            let row = KV_HEADS * DIM;
            for (b, s) in served.iter_mut().enumerate() {
                let r = b * row..(b + 1) * row;
                caches[l].append(&gpu, s.id[l], &k[r.clone()], &v[r.clone()])?;
                s.k[l].extend_from_slice(&k[r.clone()]);
                s.v[l].extend_from_slice(&v[r]);
            }
            // q is [n, HEADS * DIM] = [n, HEADS, 1, DIM] in Bhsd.
            let ids: Vec<SeqId> = served.iter().map(|s| s.id[l]).collect();
            let tq = gpu.upload(&q, [n, HEADS, 1, DIM])?;
            let o = caches[l]
                .attend(&gpu, &tq, &ids, &Attention::new())?
                .o
                .download(&gpu)?;
            worst = worst.max(check_step(&served, l, &q, &o, &rope)?);
            calls += 1;
            let y = matmul(&o, &layer.wo, MODEL);
            x.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
        }
        for (b, s) in served.iter_mut().enumerate() {
            s.tokens.push(argmax(&matmul(
                &x[b * MODEL..(b + 1) * MODEL],
                &unembed,
                VOCAB,
            )));
            s.left -= 1;
        }
        generated += n;
        for s in served.iter().filter(|s| s.left == 0) {
            println!("finished after {} tokens: {:?}", s.tokens.len(), s.tokens);
            for (l, cache) in caches.iter_mut().enumerate() {
                cache.free_sequence(s.id[l])?;
            }
        }
        served.retain(|s| s.left > 0);
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "decoding: {generated} tokens in {:.1} ms, {:.0} tokens/s; {calls} attention calls, \
         worst error against the reference {worst:.1e}; pages free: {}",
        secs * 1e3,
        generated as f64 / secs,
        caches[0].free_pages()
    );
    assert!(worst <= TOL, "an attention call was off by {worst}");
    assert_eq!(
        caches[0].free_pages(),
        caches[0].pages(),
        "every page went back"
    );
    Ok(())
}

/// The reference on one decoding step of layer `l`: each sequence's query against the K and V
/// it has cached, padded to the longest, K turned at positions 0.. and each query at its
/// sequence's last position.
fn check_step(
    served: &[Served],
    l: usize,
    q: &[f32],
    o: &[f32],
    rope: &Rotary,
) -> Result<f32, wgpu_attention::Error> {
    let n = served.len();
    let lens: Vec<usize> = served
        .iter()
        .map(|s| s.k[l].len() / (KV_HEADS * DIM))
        .collect();
    let s_max = *lens.iter().max().unwrap();
    // Bshd K and V: [n, s_max, KV_HEADS, DIM], zero past each length.
    let mut k = vec![0f32; n * s_max * KV_HEADS * DIM];
    let mut v = k.clone();
    for (b, s) in served.iter().enumerate() {
        let at = b * s_max * KV_HEADS * DIM;
        let dims = [1, lens[b], KV_HEADS, DIM];
        let turned = cpu::rotate(
            &s.k[l],
            dims,
            Layout::Bshd,
            rope,
            &Positions::Start(vec![0]),
        )?;
        k[at..at + s.k[l].len()].copy_from_slice(&turned);
        v[at..at + s.v[l].len()].copy_from_slice(&s.v[l]);
    }
    let last = Positions::Start(lens.iter().map(|&len| len as u32 - 1).collect());
    let q = &cpu::rotate(q, [n, HEADS, 1, DIM], Layout::Bhsd, rope, &last)?;
    let dims = Dims {
        batch: n,
        heads: HEADS,
        kv_heads: KV_HEADS,
        q_len: 1,
        kv_len: s_max,
        head_dim: DIM,
        v_head_dim: DIM,
    };
    let opts = Attention::new()
        .layout(Layout::Bshd)
        .causal(Causal::BottomRight)
        .kv_lens(lens.iter().map(|&x| x as u32).collect());
    // With one query, [n, 1, HEADS, DIM] (Bshd) and [n, HEADS, 1, DIM] (Bhsd) are the same.
    let want = cpu::reference(q, &k, &v, dims, &opts)?;
    Ok(max_err(o, &want.o))
}

fn argmax(x: &[f32]) -> usize {
    (0..x.len()).fold(0, |best, i| if x[i] > x[best] { i } else { best })
}
