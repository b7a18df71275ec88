//! Batched matrix products on the device: the projections of a multi-head layer.
//!
//! `C[z, m, n] = alpha * sum_k A[z, m, k] * B[z, n, k] + bias[n]`, with B indexed `[n, k]` as
//! PyTorch's `Linear` stores its weight `[out_features, in_features]`, so `X W^T + b` needs no
//! transpose. Every operand is a [`MatView`]: a tensor and the element strides of its three
//! axes, so one kernel also serves strided views (a sum over heads, a transposed operand).

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::kernels::KernelKey;
use crate::gpu::kernels::uniforms::{MatmulParams, TILE, uniform_buffer};
use crate::gpu::limits::{DispatchSize, check_binding};
use crate::gpu::tensor::Tensor;

/// A matrix (or a batch of them) inside a tensor: element `(z, row, col)` is at
/// `z * strides[0] + row * strides[1] + col * strides[2]`.
#[derive(Debug, Clone, Copy)]
pub struct MatView<'a> {
    /// The tensor holding the elements.
    pub tensor: &'a Tensor,
    /// Element strides of the batch, row and column axes.
    pub strides: [usize; 3],
}

impl<'a> MatView<'a> {
    /// A contiguous `[batches, rows, cols]` view.
    pub fn contiguous(tensor: &'a Tensor, rows: usize, cols: usize) -> MatView<'a> {
        MatView {
            tensor,
            // Saturating: a product that overflows is refused when the view is checked.
            strides: [rows.saturating_mul(cols), cols, 1],
        }
    }
}

/// The sizes of a batched product: `batches` products of `[m, k] x [n, k]^T`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatmulShape {
    /// Rows of A and C.
    pub m: usize,
    /// Rows of B, columns of C.
    pub n: usize,
    /// The summed axis.
    pub k: usize,
    /// Independent products.
    pub batches: usize,
    /// Factor on the product (not on the bias).
    pub alpha: f32,
}

/// Checks that every element a view reaches lies inside its tensor, and that its sizes and
/// strides fit the kernel's 32-bit parameters (with checked arithmetic: a product that
/// overflows is refused, never wrapped to a small offset).
fn check_view(what: &'static str, view: &MatView<'_>, dims: [usize; 3]) -> Result<()> {
    if dims.contains(&0) {
        return Err(Error::ZeroSize { what });
    }
    let too_large = |requested: u64| Error::TooLarge {
        what,
        requested,
        max: u32::MAX as u64,
        hint: " (a size, stride or offset); indices are 32-bit",
    };
    for x in dims.iter().chain(&view.strides) {
        if *x > u32::MAX as usize {
            return Err(too_large(*x as u64));
        }
    }
    let last = (0..3)
        .try_fold(0u64, |acc, a| {
            ((dims[a] - 1) as u64)
                .checked_mul(view.strides[a] as u64)
                .and_then(|x| x.checked_add(acc))
        })
        .ok_or_else(|| too_large(u64::MAX))?;
    if last >= view.tensor.len() as u64 {
        return Err(Error::BufferTooSmall {
            what,
            needed: (last + 1) * view.tensor.dtype().size() as u64,
            got: view.tensor.byte_len(),
        });
    }
    if last > u32::MAX as u64 {
        return Err(too_large(last));
    }
    Ok(())
}

/// Records `C = alpha A B^T + bias` into `encoder`.
pub(crate) fn encode_matmul(
    gpu: &Gpu,
    encoder: &mut wgpu::CommandEncoder,
    shape: MatmulShape,
    a: MatView<'_>,
    b: MatView<'_>,
    c: MatView<'_>,
    bias: Option<&Tensor>,
) -> Result<()> {
    let MatmulShape {
        m,
        n,
        k,
        batches,
        alpha,
    } = shape;
    check_view("matmul A", &a, [batches, m, k])?;
    check_view("matmul B", &b, [batches, n, k])?;
    check_view("matmul C", &c, [batches, m, n])?;
    if let Some(bias) = bias {
        if bias.len() != n {
            return Err(Error::ShapeMismatch {
                what: "matmul bias length".into(),
                got: bias.len(),
                expected: n,
            });
        }
        if bias.dtype() != crate::DType::F32 {
            return Err(Error::InvalidOption {
                what: "matmul bias dtype",
                value: format!("{:?}", bias.dtype()),
                why: "biases are f32",
            });
        }
    }
    for (what, t) in [
        ("matmul A", a.tensor),
        ("matmul B", b.tensor),
        ("matmul C", c.tensor),
    ] {
        check_binding(&gpu.limits, what, t.byte_len())?;
    }
    let device = &gpu.device;
    let kernel = gpu.kernels.get(
        device,
        KernelKey::Matmul {
            a: gpu.storage(a.tensor.dtype()),
            b: gpu.storage(b.tensor.dtype()),
            c: gpu.storage(c.tensor.dtype()),
            block: gpu.limits.gemm_block_for(k as u64),
        },
    )?;
    let tiles_m = (m as u32).div_ceil(TILE);
    let tiles_n = (n as u32).div_ceil(TILE);
    let [a_stride_z, a_stride_m, a_stride_k] = a.strides.map(|x| x as u32);
    let [b_stride_z, b_stride_n, b_stride_k] = b.strides.map(|x| x as u32);
    let [c_stride_z, c_stride_m, c_stride_n] = c.strides.map(|x| x as u32);
    let params = MatmulParams {
        m: m as u32,
        n: n as u32,
        k: k as u32,
        batches: batches as u32,
        tiles_m,
        tiles_n,
        has_bias: bias.is_some() as u32,
        alpha,
        a_stride_z,
        a_stride_m,
        a_stride_k,
        b_stride_z,
        b_stride_n,
        b_stride_k,
        c_stride_z,
        c_stride_m,
        c_stride_n,
    };
    let uniform = uniform_buffer(gpu, &params)?;
    let bind = kernel.bind(
        device,
        &[
            &uniform,
            a.tensor.buffer(),
            b.tensor.buffer(),
            c.tensor.buffer(),
            bias.map_or(&gpu.kernels.placeholder, |t| t.buffer()),
        ],
    );
    let groups = batches as u64 * tiles_m as u64 * tiles_n as u64;
    let size = DispatchSize::linear(groups, gpu.limits.max_workgroups_per_dim, "matmul dispatch")?;
    let mut pass = gpu.begin_pass(encoder, "wgpu-attention matmul", false, false);
    kernel.dispatch(&mut pass, &bind, size);
    Ok(())
}

/// `C = alpha A B^T + bias` on the device, in one submit. Any M, N, K; `bias` has N elements.
pub fn matmul(
    gpu: &Gpu,
    shape: MatmulShape,
    a: MatView<'_>,
    b: MatView<'_>,
    c: MatView<'_>,
    bias: Option<&Tensor>,
) -> Result<()> {
    for (what, t) in [
        ("A", Some(a.tensor)),
        ("B", Some(b.tensor)),
        ("C", Some(c.tensor)),
        ("bias", bias),
    ] {
        if let Some(t) = t {
            gpu.expect_own(what, t)?;
        }
    }
    gpu.submit_with("matmul", |encoder| {
        encode_matmul(gpu, encoder, shape, a, b, c, bias)
    })
}
