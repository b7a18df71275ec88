//! Every path with its parameter blocks bound both ways (`ParamsIn`): uniforms, the default on
//! GPUs, and read-only storage, the default on lavapipe. Each adapter runs one by default, so
//! this binary runs the other too.

mod common;

use common::{Case, check, dims};
use wgpu_attention::{Attention, Causal, ParamsIn, Path};

#[test]
fn every_path_under_both_bindings() {
    let Some(gpu) = common::gpu() else { return };
    let cases = [
        (
            Path::ThreePass,
            Case {
                dims: dims(2, 4, 2, 19, 45, 24, 20),
                opts: Attention::new().causal(Causal::BottomRight),
                amp: 2.0,
            },
        ),
        (
            Path::Fused,
            Case {
                dims: dims(1, 3, 3, 70, 133, 40, 36),
                opts: Attention::new().window(20, 5).softcap(8.0),
                amp: 3.0,
            },
        ),
        // Splits over the keys, merged by the combine kernel.
        (
            Path::Decode,
            Case {
                dims: dims(1, 8, 2, 1, 1100, 64, 64),
                opts: Attention::new(),
                amp: 2.0,
            },
        ),
    ];
    for params in [ParamsIn::Uniform, ParamsIn::ReadOnlyStorage] {
        let ctx = gpu.with_params_in(params).unwrap();
        assert_eq!(ctx.params_in(), params);
        for (seed, (path, case)) in cases.iter().enumerate() {
            check(&ctx, *path, case.dims, &case.opts, seed as u64, case.amp);
        }
        assert!(
            ctx.pipelines_compiled() >= 3,
            "{params:?} compiled its own pipelines"
        );
    }
}
