// Log-sum-exps as f32 bits, where NEG_INF_BITS (-inf) means "no allowed key": WGSL may assume
// there are no infinities, so -inf is only ever written as a bit pattern, never computed.

// The log-sum-exp of a softmax whose running maximum is m and whose sum of exp(s - m) is l
// (l == 0: no allowed key).
fn lse_of(m: f32, l: f32) -> u32 {
    if l > 0.0 {
        return bitcast<u32>(m + log(l));
    }
    return NEG_INF_BITS;
}

// A running log-sum-exp over partial results: top is the largest finite part seen, total the
// sum of exp(part - top); total == 0 until a finite part arrives.
struct LseSum {
    top: f32,
    total: f32,
}

fn lse_add(acc: LseSum, bits: u32) -> LseSum {
    if bits == NEG_INF_BITS {
        return acc;
    }
    let x = bitcast<f32>(bits);
    if acc.total == 0.0 {
        return LseSum(x, 1.0);
    }
    if x > acc.top {
        return LseSum(x, acc.total * exp(acc.top - x) + 1.0);
    }
    return LseSum(acc.top, acc.total + exp(x - acc.top));
}

// The weight of the part with log-sum-exp `bits` in the merge: 0 for a part with no key.
fn lse_weight(acc: LseSum, bits: u32) -> f32 {
    if bits == NEG_INF_BITS || acc.total == 0.0 {
        return 0.0;
    }
    return exp(bitcast<f32>(bits) - acc.top) / acc.total;
}

// The merged log-sum-exp.
fn lse_total(acc: LseSum) -> u32 {
    return lse_of(acc.top, acc.total);
}
