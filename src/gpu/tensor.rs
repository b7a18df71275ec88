//! Device tensors: a buffer with dims and a storage type.

use crate::error::{Error, Result};
use crate::gpu::context::Gpu;
use crate::gpu::oneshot;
use crate::spec::DType;

/// A row-major tensor of four dims in a device buffer.
///
/// Made by [`Gpu::upload`] / [`Gpu::empty`], or by [`Tensor::from_buffer`] around a buffer the
/// application already has, so data on the GPU never round-trips through the host. A tensor
/// belongs to the [`Gpu`] that made it (and that `Gpu`'s clones and derived contexts): passing
/// it to another is [`Error::WrongDevice`].
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    buffer: wgpu::Buffer,
    dims: [usize; 4],
    /// 4, or 3 for a `[B, L, E]` tensor (kept as `[1, B, L, E]`).
    rank: u8,
    dtype: DType,
    /// The `DeviceState::id` of the context that made it.
    device: u64,
}

/// A tensor's shape: four dims, or three (`[B, L, E]`, as PyTorch's layer takes its inputs),
/// which a tensor keeps as four with a leading 1 (`[1, B, L, E]`): a rank-3 tensor is the
/// rank-4 tensor with one batch wherever four dims are read. Made from `[usize; 4]` or
/// `[usize; 3]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; 4],
    rank: u8,
}

impl From<[usize; 4]> for Shape {
    fn from(dims: [usize; 4]) -> Shape {
        Shape { dims, rank: 4 }
    }
}

impl From<[usize; 3]> for Shape {
    fn from([a, b, c]: [usize; 3]) -> Shape {
        Shape {
            dims: [1, a, b, c],
            rank: 3,
        }
    }
}

impl Shape {
    /// The dims as given (three or four).
    pub fn as_slice(&self) -> &[usize] {
        &self.dims[4 - self.rank as usize..]
    }
}

/// Usages of the buffers this crate allocates: bindable, readable back, writable from the host.
const USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

fn byte_len(gpu: &Gpu, what: &'static str, dims: [usize; 4], dtype: DType) -> Result<u64> {
    if dims.contains(&0) {
        return Err(Error::ZeroSize { what });
    }
    let bytes = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .and_then(|elems| elems.checked_mul(dtype.size() as u64))
        .map_or(u64::MAX, |_| {
            dtype.buffer_bytes(dims.iter().map(|&d| d as u64).product())
        });
    if bytes > gpu.limits.max_buffer_size {
        return Err(Error::TooLarge {
            what,
            requested: bytes,
            max: gpu.limits.max_buffer_size,
            hint: " bytes (max_buffer_size)",
        });
    }
    Ok(bytes)
}

/// Checks a buffer an application hands over (`Tensor::from_buffer`,
/// `DeviceMask::from_buffer`): `STORAGE` usage, a whole number of 4-byte words (kernels bind
/// whole buffers, and a storage binding is a multiple of 4 bytes), at least `needed` bytes.
pub(crate) fn check_wrapped_buffer(
    what: &'static str,
    buffer: &wgpu::Buffer,
    needed: u64,
) -> Result<()> {
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return Err(Error::BufferUsage {
            what,
            needed: "STORAGE",
        });
    }
    if !buffer.size().is_multiple_of(4) {
        return Err(Error::InvalidOption {
            what,
            value: format!("a buffer of {} bytes", buffer.size()),
            why: "buffers are bound whole, and a storage binding is a multiple of 4 bytes",
        });
    }
    if buffer.size() < needed {
        return Err(Error::BufferTooSmall {
            what,
            needed,
            got: buffer.size(),
        });
    }
    Ok(())
}

/// A new buffer holding `contents` (a whole number of 4-byte words), without
/// `create_buffer_init`, which panics where the buffer could not be created (a lost device,
/// no memory). Call inside [`Gpu::guarded`].
pub(crate) fn init_buffer(
    device: &wgpu::Device,
    label: &str,
    contents: &[u8],
    usage: wgpu::BufferUsages,
) -> Result<wgpu::Buffer> {
    let size = (contents.len() as u64).next_multiple_of(wgpu::COPY_BUFFER_ALIGNMENT);
    let buffer = device.create_buffer(&wgpu::BufferDescriptor {
        label: Some(label),
        size: size.max(wgpu::COPY_BUFFER_ALIGNMENT),
        usage,
        mapped_at_creation: true,
    });
    {
        let mut view = buffer
            .get_mapped_range_mut(..)
            .map_err(|e| Error::Gpu(format!("creating {label}: {e}")))?;
        view.slice(..contents.len()).copy_from_slice(contents);
    }
    buffer.unmap();
    Ok(buffer)
}

/// Host f32 values as the bytes of `dtype` (rounded to nearest even), padded to whole words.
pub(crate) fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    let mut bytes: Vec<u8> = match dtype {
        DType::F32 => bytemuck::cast_slice(data).to_vec(),
        DType::F16 => data
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        DType::Bf16 => data
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        DType::F8E4M3 => data
            .iter()
            .map(|&x| crate::spec::f8e4m3_from_f32(x))
            .collect(),
    };
    bytes.resize(dtype.buffer_bytes(data.len() as u64) as usize, 0);
    bytes
}

/// The first `n` elements of `dtype` in `bytes`, as f32.
fn decode(bytes: &[u8], n: usize, dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytemuck::cast_slice::<u8, f32>(&bytes[..n * 4]).to_vec(),
        DType::F16 => bytes[..n * 2]
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::Bf16 => bytes[..n * 2]
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::F8E4M3 => bytes[..n]
            .iter()
            .map(|&b| crate::spec::f8e4m3_to_f32(b))
            .collect(),
    }
}

impl Gpu {
    /// Uploads f32 host data as an f32 tensor of `dims`.
    pub fn upload(&self, data: &[f32], dims: impl Into<Shape>) -> Result<Tensor> {
        self.upload_as(data, dims, DType::F32)
    }

    /// Uploads f32 host data as a tensor of `dtype`, rounding to nearest even.
    pub fn upload_as(&self, data: &[f32], dims: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let shape = dims.into();
        let dims = shape.dims;
        byte_len(self, "tensor", dims, dtype)?;
        let expected: usize = dims.iter().product();
        if data.len() != expected {
            return Err(Error::DataLength {
                what: "upload",
                dims: shape.as_slice().to_vec(),
                expected,
                got: data.len(),
            });
        }
        let bytes = encode(data, dtype);
        let buffer = self.guarded("upload", || {
            init_buffer(&self.device, "wgpu-attention tensor", &bytes, USAGE)
        })?;
        Ok(Tensor {
            buffer,
            dims,
            rank: shape.rank,
            dtype,
            device: self.state.id,
        })
    }

    /// Uploads f16 host data as an f16 tensor.
    pub fn upload_f16(&self, data: &[half::f16], dims: impl Into<Shape>) -> Result<Tensor> {
        let wide: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
        self.upload_as(&wide, dims, DType::F16)
    }

    /// Uploads bf16 host data as a bf16 tensor.
    pub fn upload_bf16(&self, data: &[half::bf16], dims: impl Into<Shape>) -> Result<Tensor> {
        let wide: Vec<f32> = data.iter().map(|x| x.to_f32()).collect();
        self.upload_as(&wide, dims, DType::Bf16)
    }

    /// A new f32 tensor of `dims` whose contents are unspecified until written.
    pub fn empty(&self, dims: impl Into<Shape>) -> Result<Tensor> {
        self.empty_as(dims, DType::F32)
    }

    /// A scratch buffer of `size` bytes for one call's kernels (split partials, scores, merge
    /// inputs): storage, plus `extra` usages. The one place calls allocate scratch, so a pool
    /// can replace it. Call inside [`Gpu::guarded`] (as every encoder does).
    pub(crate) fn scratch(
        &self,
        label: &str,
        size: u64,
        extra: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        self.state.pool.for_submission(
            &self.device,
            label,
            size,
            wgpu::BufferUsages::STORAGE | extra,
        )
    }

    /// A buffer holding `contents` (whole 4-byte words) for the submission being encoded, from
    /// the pool (see [`scratch`](Gpu::scratch)); `usage` gains `COPY_DST`, the contents go in
    /// with `write_buffer`, which lands before the submission's commands run.
    pub(crate) fn submission_buffer(
        &self,
        label: &str,
        contents: &[u8],
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        let size = (contents.len() as u64).max(wgpu::COPY_BUFFER_ALIGNMENT);
        let buffer = self.state.pool.for_submission(
            &self.device,
            label,
            size,
            usage | wgpu::BufferUsages::COPY_DST,
        );
        if !contents.is_empty() {
            self.queue.write_buffer(&buffer, 0, contents);
        }
        buffer
    }

    /// A new tensor of `dims` and `dtype` whose contents are unspecified until written.
    pub fn empty_as(&self, dims: impl Into<Shape>, dtype: DType) -> Result<Tensor> {
        let shape = dims.into();
        let dims = shape.dims;
        let size = byte_len(self, "tensor", dims, dtype)?;
        let buffer = self.guarded("allocating a tensor", || {
            Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("wgpu-attention tensor"),
                size,
                usage: USAGE,
                mapped_at_creation: false,
            }))
        })?;
        Ok(Tensor {
            buffer,
            dims,
            rank: shape.rank,
            dtype,
            device: self.state.id,
        })
    }
}

/// [`Error::ShapeMismatch`] on the first axis where `got` differs from `expected`, naming
/// `what` and the whole expected shape.
pub(crate) fn expect_dims(what: &str, got: [usize; 4], expected: [usize; 4]) -> Result<()> {
    match (0..4).find(|&axis| got[axis] != expected[axis]) {
        Some(axis) => Err(Error::ShapeMismatch {
            what: format!("{what} dim {axis} (expected dims {expected:?})"),
            got: got[axis],
            expected: expected[axis],
        }),
        None => Ok(()),
    }
}

impl Tensor {
    /// Wraps an existing buffer holding a `dims` tensor of `dtype` from byte 0, as a tensor
    /// of `gpu`.
    ///
    /// The buffer must have been created on `gpu`'s device: wgpu cannot tell which device a
    /// buffer belongs to, so that is the caller's promise, and breaking it is not caught (a
    /// buffer of another device may make wgpu panic, or name one of this device's buffers
    /// whose id it shares). It needs `STORAGE` usage;
    /// [`Tensor::download`] also needs `COPY_SRC` and [`Tensor::write`] `COPY_DST`.
    pub fn from_buffer(
        gpu: &Gpu,
        buffer: wgpu::Buffer,
        dims: impl Into<Shape>,
        dtype: DType,
    ) -> Result<Tensor> {
        let shape = dims.into();
        let dims = shape.dims;
        if dims.contains(&0) {
            return Err(Error::ZeroSize { what: "tensor" });
        }
        let needed = dims
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .map_or(u64::MAX, |bytes| bytes.div_ceil(4) * 4);
        check_wrapped_buffer("tensor", &buffer, needed)?;
        Ok(Tensor {
            buffer,
            dims,
            rank: shape.rank,
            dtype,
            device: gpu.state.id,
        })
    }

    /// The four dims (a rank-3 tensor's with a leading 1).
    pub fn dims(&self) -> [usize; 4] {
        self.dims
    }

    /// The dims as the tensor was made with: three or four.
    pub fn shape(&self) -> &[usize] {
        &self.dims[4 - self.rank as usize..]
    }

    /// 4, or 3 for a tensor made with `[B, L, E]`.
    pub fn rank(&self) -> usize {
        self.rank as usize
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }

    /// Always false: tensors have at least one element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Storage type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes the elements occupy, rounded up to whole 4-byte words (the buffer may be larger).
    pub fn byte_len(&self) -> u64 {
        self.dtype.buffer_bytes(self.len() as u64)
    }

    /// The underlying buffer.
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }

    /// The identity of the device context family that made it.
    pub(crate) fn device_id(&self) -> u64 {
        self.device
    }

    /// Overwrites the tensor with host data, converted to its dtype (queued; visible to the
    /// next submission).
    pub fn write(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        gpu.expect_own("the tensor written", self)?;
        if data.len() != self.len() {
            return Err(Error::DataLength {
                what: "write",
                dims: self.dims.to_vec(),
                expected: self.len(),
                got: data.len(),
            });
        }
        if !self.buffer.usage().contains(wgpu::BufferUsages::COPY_DST) {
            return Err(Error::BufferUsage {
                what: "tensor",
                needed: "COPY_DST",
            });
        }
        let bytes = encode(data, self.dtype);
        gpu.guarded("write", || {
            gpu.queue.write_buffer(&self.buffer, 0, &bytes);
            Ok(())
        })
    }

    /// Copies an f16 tensor back to the host as `half::f16`, bit for bit.
    pub fn download_f16(&self, gpu: &Gpu) -> Result<Vec<half::f16>> {
        self.expect_dtype(DType::F16)?;
        Ok(self
            .download(gpu)?
            .into_iter()
            .map(half::f16::from_f32)
            .collect())
    }

    /// Copies a bf16 tensor back to the host as `half::bf16`, bit for bit.
    pub fn download_bf16(&self, gpu: &Gpu) -> Result<Vec<half::bf16>> {
        self.expect_dtype(DType::Bf16)?;
        Ok(self
            .download(gpu)?
            .into_iter()
            .map(half::bf16::from_f32)
            .collect())
    }

    fn expect_dtype(&self, dtype: DType) -> Result<()> {
        if self.dtype != dtype {
            return Err(Error::InvalidOption {
                what: "download dtype",
                value: format!("{dtype:?} from a {:?} tensor", self.dtype),
                why: "download() converts any dtype to f32",
            });
        }
        Ok(())
    }

    /// Copies the tensor back to the host as f32 (exact for every dtype), waiting for all work
    /// submitted before.
    ///
    /// This blocks, which a browser's main thread cannot do: on `wasm32` it is
    /// [`Error::Blocking`]; use [`Tensor::download_async`] there.
    pub fn download(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Blocking {
                what: "Tensor::download",
                instead: "Tensor::download_async",
            });
        }
        let mut readback = self.start_download(gpu)?;
        gpu.poll_wait(Some(readback.index.clone()))?;
        // The copy is done, but the mapping callback may be running on another thread whose
        // poll collected it: wait for it (it runs, or is dropped, soon after).
        let mapped = pollster::block_on(&mut readback.mapped);
        self.finish_download(gpu, readback, mapped, false)
    }

    /// [`Tensor::download`] as a future: what a browser awaits (on native it blocks inside its
    /// first poll, as `download` does). It also reports any wgpu error of an earlier call
    /// on this device that the browser delivered since (see [`Error::Gpu`]).
    pub async fn download_async(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let mut readback = self.start_download(gpu)?;
        // The verdicts of every call before this one (its copy included), not of later ones.
        let earlier = gpu.state.deferred.settle();
        if cfg!(not(target_arch = "wasm32")) {
            gpu.poll_wait(Some(readback.index.clone()))?;
        }
        let mapped = (&mut readback.mapped).await;
        earlier.await?;
        self.finish_download(gpu, readback, mapped, true)
    }

    /// Checks the call, then submits the copy into a readback buffer and asks for it mapped.
    fn start_download(&self, gpu: &Gpu) -> Result<Readback> {
        gpu.expect_own("the tensor downloaded", self)?;
        if !self.buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::BufferUsage {
                what: "tensor",
                needed: "COPY_SRC",
            });
        }
        let size = self.byte_len();
        gpu.guarded("download", || {
            let staging = gpu.state.pool.borrow(
                &gpu.device,
                "wgpu-attention readback",
                size,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            );
            let mut encoder = gpu
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("readback"),
                });
            encoder.copy_buffer_to_buffer(&self.buffer, 0, &staging.buffer, 0, size);
            let index = gpu.queue.submit([encoder.finish()]);
            let (tx, mapped) = oneshot::channel();
            staging
                .buffer
                .map_async(wgpu::MapMode::Read, ..size, move |r| tx.send(r));
            Ok(Readback {
                staging,
                size,
                index,
                mapped,
            })
        })
    }

    /// Decodes the mapped readback buffer and returns it to the pool; `tail`: the last step of
    /// `download_async` (see [`Gpu::guarded_tail`]).
    fn finish_download(
        &self,
        gpu: &Gpu,
        readback: Readback,
        mapped: Option<std::result::Result<(), wgpu::BufferAsyncError>>,
        tail: bool,
    ) -> Result<Vec<f32>> {
        let finish = || {
            mapped
                .ok_or_else(|| Error::Gpu("readback callback never ran".into()))?
                .map_err(|e| Error::Gpu(format!("mapping readback buffer: {e}")))?;
            let Readback { staging, size, .. } = readback;
            let view = staging
                .buffer
                .get_mapped_range(..size)
                .map_err(|e| Error::Gpu(format!("reading mapped buffer: {e}")))?;
            let out = decode(&view, self.len(), self.dtype);
            drop(view);
            staging.buffer.unmap();
            gpu.state.pool.give_back(staging);
            Ok(out)
        };
        if tail {
            gpu.guarded_tail("download", finish)
        } else {
            gpu.guarded("download", finish)
        }
    }
}

/// A copy of a tensor on its way back to the host.
struct Readback {
    staging: crate::gpu::pool::Borrowed,
    size: u64,
    index: wgpu::SubmissionIndex,
    mapped: oneshot::Receiver<std::result::Result<(), wgpu::BufferAsyncError>>,
}
