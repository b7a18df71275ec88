//! The one error type of the crate.
//!
//! Every failure, on the CPU path and the GPU path alike, is a variant of [`Error`]. Each variant
//! carries what was requested and, where there is one, the limit it broke, so the message alone
//! says what to change.

/// Everything that can go wrong in this crate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No adapter could be found (no driver, or `WGPU_ADAPTER_NAME` matched nothing).
    #[error(
        "no GPU adapter: {reason}. Install a GPU driver with Vulkan, Metal or DX12 support, or \
         Mesa's software Vulkan driver (`apt-get install -y mesa-vulkan-drivers` on Debian/Ubuntu)"
    )]
    NoAdapter {
        /// Why no adapter was chosen.
        reason: String,
    },

    /// The adapter refused to create a device.
    #[error("the adapter refused to create a device: {0}")]
    RequestDevice(String),

    /// The adapter lacks something every kernel of this crate needs.
    #[error("the adapter does not support {what}: needs {needed}, has {available}")]
    Unsupported {
        /// Which capability.
        what: &'static str,
        /// What the kernels need.
        needed: u64,
        /// What the adapter offers.
        available: u64,
    },

    /// A dimension is zero where at least one element is needed.
    #[error("{what} is zero; every dimension must be at least 1")]
    ZeroSize {
        /// Which dimension.
        what: &'static str,
    },

    /// Two tensors disagree on a dimension they must share.
    #[error("shape mismatch: {what} is {got}, expected {expected}")]
    ShapeMismatch {
        /// Which dimension of which tensor.
        what: String,
        /// The size that was passed.
        got: usize,
        /// The size implied by the other tensors.
        expected: usize,
    },

    /// `heads` is not a multiple of `kv_heads` (grouped-query attention needs whole groups).
    #[error("heads ({heads}) must be a multiple of kv_heads ({kv_heads})")]
    HeadsNotDivisible {
        /// Query heads.
        heads: usize,
        /// Key/value heads.
        kv_heads: usize,
    },

    /// A head dimension is above what the kernels support.
    #[error("{what} is {got}, above the supported maximum of {max}")]
    HeadDimTooLarge {
        /// `head_dim` or `v_head_dim`.
        what: &'static str,
        /// The requested size.
        got: usize,
        /// The largest supported size.
        max: usize,
    },

    /// A host slice does not hold the number of elements its dims say.
    #[error("{what} holds {got} elements, but its dims {dims:?} need {expected}")]
    DataLength {
        /// Which tensor.
        what: &'static str,
        /// The dims that were given.
        dims: Vec<usize>,
        /// Elements the dims imply.
        expected: usize,
        /// Elements that were passed.
        got: usize,
    },

    /// A mask or bias cannot be broadcast to `[batch, heads, q_len, kv_len]`.
    #[error(
        "{what} has shape {got:?}, which does not broadcast to {target:?} \
         (each dim must be 1 or equal to the target)"
    )]
    BroadcastShape {
        /// `mask` or `bias`.
        what: &'static str,
        /// Its shape.
        got: [usize; 4],
        /// `[batch, heads, q_len, kv_len]`.
        target: [usize; 4],
    },

    /// A per-sequence length vector has the wrong length or an entry out of range.
    #[error("{what}[{index}] is {value}, above the maximum of {max}")]
    LengthOutOfRange {
        /// `kv_lens` or `q_lens`.
        what: &'static str,
        /// Which batch entry.
        index: usize,
        /// The given length.
        value: usize,
        /// `kv_len` or `q_len`.
        max: usize,
    },

    /// An option has a value that has no meaning (a non-finite scale, a softcap that is not positive).
    #[error("invalid option {what}: {value} ({why})")]
    InvalidOption {
        /// Which option.
        what: &'static str,
        /// The value given, formatted.
        value: String,
        /// What would be valid.
        why: &'static str,
    },

    /// A buffer or dispatch would exceed a limit of the device, even after chunking.
    #[error("{what} needs {requested}, above the device limit of {max}{hint}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// What the problem needs.
        requested: u64,
        /// What the device allows.
        max: u64,
        /// How to get around it, when there is a way (starts with "; ").
        hint: &'static str,
    },

    /// A buffer passed in is smaller than its dims need.
    #[error("{what} buffer holds {got} bytes, but its dims need {needed}")]
    BufferTooSmall {
        /// Which tensor.
        what: &'static str,
        /// Bytes the dims imply.
        needed: u64,
        /// Bytes the buffer has.
        got: u64,
    },

    /// A buffer passed in lacks a usage flag this crate needs.
    #[error("{what} buffer lacks the usage {needed}")]
    BufferUsage {
        /// Which tensor.
        what: &'static str,
        /// The missing usage.
        needed: &'static str,
    },

    /// A paged cache has fewer free pages than an append needs (nothing was written).
    #[error(
        "the paged cache is full: {needed} more page(s) needed, {free} free; free finished \
         sequences or make a larger pool"
    )]
    CacheFull {
        /// Pages the append needs.
        needed: usize,
        /// Pages free in the pool.
        free: usize,
    },

    /// A sequence id that the paged cache does not hold (never added, or freed).
    #[error("sequence {id} is not in the paged cache")]
    UnknownSequence {
        /// The id.
        id: u64,
    },

    /// A weights file could not be read, or lacks a tensor the layer needs.
    #[error("weights: {0}")]
    Weights(String),

    /// The device was lost (destroyed, reset by the driver, unplugged): this call and every
    /// later call on any context of that device fail with this error; open a new [`Gpu`].
    ///
    /// [`Gpu`]: crate::Gpu
    #[error("the GPU device was lost ({reason}); open a new Gpu")]
    DeviceLost {
        /// What wgpu said, e.g. `Destroyed`.
        reason: String,
    },

    /// The device could not allocate memory for a buffer or a pipeline.
    #[error("out of GPU memory during {what}: {detail}")]
    OutOfMemory {
        /// The call that allocated.
        what: String,
        /// What wgpu said.
        detail: String,
    },

    /// A tensor was passed to a [`Gpu`] of another device than the one that made it (its
    /// buffer would name another device's buffer).
    ///
    /// [`Gpu`]: crate::Gpu
    #[error(
        "{what} belongs to another device than this Gpu's; tensors work only with the Gpu that \
         made them (and its clones and derived contexts)"
    )]
    WrongDevice {
        /// Which tensor.
        what: String,
    },

    /// A call that blocks until the GPU is done was made where blocking is impossible (the
    /// browser's main thread, on `wasm32`); its `async` twin does the same without blocking.
    #[error("{what} blocks until the GPU is done, which the browser cannot do: await {instead}")]
    Blocking {
        /// The blocking call.
        what: &'static str,
        /// The call to await instead.
        instead: &'static str,
    },

    /// wgpu reported a validation or internal error while encoding or running. In the browser
    /// such an error reaches the crate only after the call that caused it has returned, so it
    /// is the error of the next call on that device, or of the next `async` call awaited.
    #[error("GPU error: {0}")]
    Gpu(String),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
