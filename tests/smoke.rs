mod common;
use wgpu_attention::*;
#[test]
fn smoke() {
    let Some(gpu) = common::gpu() else { return };
    common::check(gpu, Dims::new(1, 2, 33, 40), &Attention::new(), 1, 1.0);
    common::check(gpu, Dims::new(2, 2, 100, 64), &Attention::new().causal(Causal::TopLeft), 2, 30.0);
}
