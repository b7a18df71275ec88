//! The device context: adapter choice, device creation, the limits every plan is checked against.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::kernels::{Kernels, ParamsIn};
use crate::gpu::limits::{DecodeKernel, GpuLimits, LimitCaps, MmaChoice, TileBlock};
use crate::gpu::pool::{Pool, PoolStats};
use crate::gpu::scopes::{Deferred, Scopes};
use crate::gpu::tuning::{TileConfig, entry_for};

/// A device and queue, with the limits, features and compiled pipelines of this crate.
///
/// Cheap to clone (the device, queue and pipeline cache are shared) and `Send + Sync`: calls
/// from several threads are safe.
#[derive(Debug, Clone)]
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    pub(crate) info: wgpu::AdapterInfo,
    pub(crate) limits: GpuLimits,
    pub(crate) features: wgpu::Features,
    pub(crate) kernels: Arc<Kernels>,
    pub(crate) timer: Option<Arc<Timer>>,
    /// Whether f16 tensors are read as `array<f16>` (else packed in `u32`).
    pub(crate) native_f16: bool,
    /// Shared by every context made from the same `Gpu::new` or `Gpu::from_wgpu`.
    pub(crate) state: Arc<DeviceState>,
}

/// What every context on one device shares: an identity for its tensors, and whether the
/// device was lost.
pub(crate) struct DeviceState {
    /// Unique in the process: tensors carry it, so a tensor of another device (whose buffer ids
    /// may collide with this device's) is refused instead of naming the wrong buffer.
    pub(crate) id: u64,
    /// Why the device was lost, once wgpu said so.
    lost: Mutex<Option<String>>,
    /// The application's own device-lost callback ([`Gpu::on_device_lost`]).
    hook: Mutex<Option<LostHook>>,
    /// Parameter, masking, scratch and readback buffers for reuse (`gpu::pool`).
    pub(crate) pool: Arc<Pool>,
    /// wgpu's verdicts on calls that could not wait for them (the browser; `gpu::scopes`).
    pub(crate) deferred: Arc<Deferred>,
    /// Rotary angle tables by their frequencies' bits, the most recently used last
    /// (`gpu::rotary`).
    pub(crate) rotary_tables: Mutex<Vec<(Vec<u64>, wgpu::Buffer)>>,
}

/// An application's device-lost callback.
type LostHook = Box<dyn Fn(&str) + Send>;

impl std::fmt::Debug for DeviceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceState")
            .field("id", &self.id)
            .field("lost", &self.lost_reason())
            .finish_non_exhaustive()
    }
}

impl DeviceState {
    fn new(pool: bool, deferred: Arc<Deferred>) -> DeviceState {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        DeviceState {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            lost: Mutex::new(None),
            hook: Mutex::new(None),
            pool: Arc::new(Pool::new(pool)),
            deferred,
            rotary_tables: Mutex::new(Vec::new()),
        }
    }

    fn lost_reason(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn mark_lost(&self, reason: String) {
        *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.clone());
        // Taken out before the call: a device is lost once, and a hook that registers another
        // must not find the lock held.
        let hook = self.hook.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(hook) = hook {
            hook(&reason);
        }
    }
}

/// GPU timestamps around each call's passes, for benchmarks (see [`Gpu::with_timer`]).
#[derive(Debug)]
pub(crate) struct Timer {
    queries: wgpu::QuerySet,
    resolved: wgpu::Buffer,
    readback: wgpu::Buffer,
    period_ns: f64,
    /// Held from resolving a call's timestamps to its submission, and while reading them
    /// back: a submission that copies into the readback buffer while another thread has it
    /// mapped would fail validation.
    busy: Mutex<()>,
    /// Whether the submission being encoded wrote timestamps (set by `begin_pass`, read and
    /// cleared by `resolve_timer`, both under `busy`).
    stamped: std::sync::atomic::AtomicBool,
    /// Whether it wrote its start: only its first pass marked `first` does (a prelude's pass
    /// before a call's own first pass, or the first of several chunks, keeps the start).
    begun: std::sync::atomic::AtomicBool,
}

/// A rows-per-workgroup value of the fused kernel: one it is compiled for, else a typed error
/// naming `what` set it.
fn decode_rows(rows: u32, what: &'static str, value: &str) -> Result<u32> {
    if crate::gpu::kernels::FLASH_ROWS.contains(&rows) {
        Ok(rows)
    } else {
        Err(Error::InvalidOption {
            what,
            value: value.to_string(),
            why: "must be one of 4, 8, 16, 32, 64",
        })
    }
}

/// `WGPU_ATTENTION_MMA`, if set: `off`, `emulated` or `cooperative` ([`MmaChoice`]).
fn mma_from_env() -> Result<Option<MmaChoice>> {
    match std::env::var("WGPU_ATTENTION_MMA") {
        Ok(value) => MmaChoice::parse(&value)
            .map(Some)
            .ok_or(Error::InvalidOption {
                what: "WGPU_ATTENTION_MMA",
                value,
                why: "must be off (scalar products), emulated (16-bit products by plain FMAs) or \
                      cooperative (16-bit products on cooperative matrices)",
            }),
        Err(_) => Ok(None),
    }
}

/// `choice` if the device can run it (the emulation needs `SHADER_F16`, the cooperative
/// products a cooperative matrix shape, f16 and subgroups), else the error saying what it lacks.
fn mma_available(
    choice: MmaChoice,
    limits: &GpuLimits,
    features: wgpu::Features,
) -> Result<MmaChoice> {
    let lacking = match choice {
        MmaChoice::Off => None,
        _ if !features.contains(wgpu::Features::SHADER_F16) => Some("f16 in shaders (SHADER_F16)"),
        MmaChoice::Emulated => None,
        MmaChoice::Cooperative if limits.cooperative_matrix == 0 => Some(
            "f16 cooperative matrices (EXPERIMENTAL_COOPERATIVE_MATRIX with a 16x16x16 or 8x8x8 \
             f16 x f16 -> f32 shape, requested by WGPU_ATTENTION_MMA=cooperative when the Gpu \
             is opened)",
        ),
        MmaChoice::Cooperative if limits.subgroup_size == 0 => Some(
            "subgroups of one known size (SUBGROUP, with subgroup_min_size == subgroup_max_size, \
             or an Apple GPU on Metal)",
        ),
        MmaChoice::Cooperative if !limits.tile.subgroups => {
            Some("subgroups turned on (WGPU_ATTENTION_SUBGROUPS=0 or a decode kernel without them)")
        }
        MmaChoice::Cooperative => None,
    };
    match lacking {
        Some(what) => Err(Error::Unsupported {
            what,
            needed: 1,
            available: 0,
        }),
        None => Ok(choice),
    }
}

/// The device's one subgroup size, or 0 where it may vary or is unknown: the adapter's, where
/// its smallest and largest agree (NVIDIA's 32), and 32 on Apple GPUs through Metal, whose
/// SIMD-groups are always 32 wide although wgpu reports 4 to 64 for every Metal adapter.
fn fixed_subgroup_size(info: &wgpu::AdapterInfo, has_subgroups: bool) -> u32 {
    if !has_subgroups {
        0
    } else if info.subgroup_min_size == info.subgroup_max_size {
        info.subgroup_min_size
    } else if info.backend == wgpu::Backend::Metal && info.name.starts_with("Apple") {
        32
    } else {
        0
    }
}

/// The size of the square f16 x f16 -> f32 cooperative matrices `adapter` multiplies (16
/// preferred, else 8), or 0: none the kernels can use, or no f16 or subgroups beside them.
fn cooperative_size(adapter: &wgpu::Adapter) -> u32 {
    let needed = wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX
        | wgpu::Features::SHADER_F16
        | wgpu::Features::SUBGROUP;
    if !adapter.features().contains(needed) {
        return 0;
    }
    let shapes = adapter.cooperative_matrix_properties();
    [16, 8]
        .into_iter()
        .find(|&n| {
            shapes.iter().any(|p| {
                (p.m_size, p.n_size, p.k_size) == (n, n, n)
                    && p.ab_type == wgpu::CooperativeScalarType::F16
                    && p.cr_type == wgpu::CooperativeScalarType::F32
            })
        })
        .unwrap_or(0)
}

/// wgpu's token for experimental features, which cooperative matrices are.
#[allow(unsafe_code)]
fn experimental_on() -> wgpu::ExperimentalFeatures {
    // SAFETY: the token is the caller's acknowledgement that wgpu's experimental APIs may
    // hold bugs. It is taken only when the user asked for cooperative matrices
    // (WGPU_ATTENTION_MMA=cooperative) and the adapter lists a shape the kernels use; the
    // only experimental API the crate then calls is the cooperative matrix one.
    unsafe { wgpu::ExperimentalFeatures::enabled() }
}

/// `true` if the device has subgroup operations, else the error saying it lacks them.
fn subgroups_on(features: wgpu::Features) -> Result<bool> {
    if features.contains(wgpu::Features::SUBGROUP) {
        Ok(true)
    } else {
        Err(Error::Unsupported {
            what: "subgroup operations (Features::SUBGROUP)",
            needed: 1,
            available: 0,
        })
    }
}

/// Runs `f` inside wgpu error scopes on `device` (see `gpu::scopes`): an allocation that
/// failed is [`Error::OutOfMemory`], any other validation or internal error [`Error::Gpu`]
/// naming `what`; wgpu's error outranks one of ours that followed from it. The scopes are per
/// thread.
fn scoped<T>(
    device: &wgpu::Device,
    deferred: &Arc<Deferred>,
    what: &str,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let scopes = Scopes::push(device);
    let out = f();
    scopes.pop(deferred, what)?;
    out
}

fn device_rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 1,
        wgpu::DeviceType::Other => 0,
    }
}

/// `block`, where a kernel is compiled for it ([`TileBlock::ALL`]); else a typed error naming
/// `what`.
fn compiled_block(what: &'static str, block: TileBlock) -> Result<()> {
    if TileBlock::ALL.contains(&block) {
        Ok(())
    } else {
        Err(Error::InvalidOption {
            what,
            value: format!("{block:?}"),
            why: "must be 4x4, 8x4 or 8x8",
        })
    }
}

impl Gpu {
    /// Opens the best adapter (discrete GPU first, software last), blocking.
    ///
    /// `WGPU_BACKEND` (e.g. `vulkan`, `metal`, `dx12`) restricts the backends searched and
    /// `WGPU_ADAPTER_NAME` picks the first adapter whose name contains it (case-insensitive).
    /// With no adapter this is [`Error::NoAdapter`], whose message says how to get one.
    ///
    /// In the browser (`wasm32`) this is [`Error::Blocking`]: await [`Gpu::new_async`].
    pub fn new() -> Result<Gpu> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Blocking {
                what: "Gpu::new",
                instead: "Gpu::new_async",
            });
        }
        pollster::block_on(Gpu::new_async())
    }

    /// [`Gpu::new`] as a future: what a browser awaits (WebGPU's adapter, high-performance
    /// preference), and what applications that already run an executor can use anywhere.
    ///
    /// ```no_run
    /// # async fn demo() -> wgpu_attention::Result<()> {
    /// let gpu = wgpu_attention::Gpu::new_async().await?;
    /// println!("{}", gpu.describe());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn new_async() -> Result<Gpu> {
        let instance =
            wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env());
        let backends = wgpu::Backends::from_env().unwrap_or(wgpu::Backends::all());
        let mut adapters = instance.enumerate_adapters(backends).await;
        let wanted = std::env::var("WGPU_ADAPTER_NAME")
            .ok()
            .map(|s| s.to_lowercase());
        if let Some(name) = &wanted {
            let names: Vec<String> = adapters.iter().map(|a| a.get_info().name).collect();
            adapters.retain(|a| a.get_info().name.to_lowercase().contains(name.as_str()));
            if adapters.is_empty() {
                return Err(Error::NoAdapter {
                    reason: format!("WGPU_ADAPTER_NAME={name:?} matches none of {names:?}"),
                });
            }
        }
        // Stable sort: among equals, keep the order wgpu enumerated them in.
        adapters.sort_by_key(|a| std::cmp::Reverse(device_rank(a.get_info().device_type)));
        let adapter = adapters
            .into_iter()
            .next()
            .ok_or_else(|| Error::NoAdapter {
                reason: format!("wgpu found no adapter for backends {backends:?}"),
            })?;
        let info = adapter.get_info();
        log::info!(
            "wgpu-attention: adapter {:?} ({:?}, {:?}, driver {:?} {:?})",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info
        );
        // Ask for the adapter's own limits: WebGPU's defaults would halve the workgroup memory
        // and cap storage bindings at 128 MiB on hardware that has far more.
        let limits = adapter.limits();
        let optional =
            wgpu::Features::SHADER_F16 | wgpu::Features::SUBGROUP | wgpu::Features::TIMESTAMP_QUERY;
        let mut features = adapter.features() & optional;
        // Cooperative matrices are a wgpu experiment: asked for only on the user's word.
        let coop_size = if mma_from_env()? == Some(MmaChoice::Cooperative) {
            cooperative_size(&adapter)
        } else {
            0
        };
        let experimental_features = if coop_size > 0 {
            features |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
            experimental_on()
        } else {
            wgpu::ExperimentalFeatures::disabled()
        };
        let (device, queue) = adapter
            .request_device(&wgpu::DeviceDescriptor {
                label: Some("wgpu-attention"),
                required_features: features,
                required_limits: limits,
                experimental_features,
                memory_hints: wgpu::MemoryHints::Performance,
                trace: wgpu::Trace::Off,
            })
            .await
            .map_err(|e| Error::RequestDevice(e.to_string()))?;
        Gpu::from_parts(device, queue, info, coop_size)
    }

    /// Wraps a device and queue the application already has (a renderer, another ML library):
    /// no second device, and tensors can wrap the application's buffers.
    ///
    /// The limits and features are the ones the device was created with; request the
    /// adapter's own limits when creating it, or large problems are chunked more than needed.
    ///
    /// Installs a device-lost callback on `device`, so that calls after a loss fail with
    /// [`Error::DeviceLost`]. wgpu keeps one such callback per device, so this replaces any the
    /// application set; register the application's with [`Gpu::on_device_lost`] instead.
    /// Make one `Gpu` per device and clone it: tensors work only with the `Gpu` that made
    /// them and its clones and derived contexts.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Result<Gpu> {
        let info = device.adapter_info();
        // A device has no list of its cooperative matrix shapes (only its adapter has), so
        // a wrapped device never takes the cooperative products: see from_wgpu_with_adapter.
        Gpu::from_parts(device, queue, info, 0)
    }

    /// [`Gpu::from_wgpu`] for a device of `adapter`: where the application created the device
    /// with `Features::EXPERIMENTAL_COOPERATIVE_MATRIX` (and `SHADER_F16`, `SUBGROUP`), the
    /// adapter's list of cooperative matrix shapes lets the fused kernel's 16-bit products run
    /// on them ([`MmaChoice::Cooperative`], through [`Gpu::with_mma`] or
    /// `WGPU_ATTENTION_MMA=cooperative`); otherwise the same as [`Gpu::from_wgpu`].
    pub fn from_wgpu_with_adapter(
        adapter: &wgpu::Adapter,
        device: wgpu::Device,
        queue: wgpu::Queue,
    ) -> Result<Gpu> {
        let info = device.adapter_info();
        Gpu::from_parts(device, queue, info, cooperative_size(adapter))
    }

    fn from_parts(
        device: wgpu::Device,
        queue: wgpu::Queue,
        info: wgpu::AdapterInfo,
        coop_size: u32,
    ) -> Result<Gpu> {
        let mut limits = GpuLimits::from_wgpu(&device.limits(), info.device_type);
        let features = device.features();
        // The adapter's tile configuration, then the environment's overrides.
        let has_subgroups = features.contains(wgpu::Features::SUBGROUP);
        if features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
            limits.cooperative_matrix = coop_size;
        }
        limits.subgroup_size = fixed_subgroup_size(&info, has_subgroups);
        let entry = entry_for(&info).config;
        limits.tile = TileConfig {
            subgroups: entry.subgroups && has_subgroups,
            ..entry
        };
        if let Ok(value) = std::env::var("WGPU_ATTENTION_DECODE_ROWS") {
            const WHAT: &str = "WGPU_ATTENTION_DECODE_ROWS";
            let rows = value.trim().parse().unwrap_or(0);
            limits.tile.min_decode_rows = decode_rows(rows, WHAT, &value)?;
        }
        if let Ok(value) = std::env::var("WGPU_ATTENTION_SUBGROUPS") {
            limits.tile.subgroups = match value.trim() {
                "0" => false,
                "1" => subgroups_on(features)?,
                _ => {
                    return Err(Error::InvalidOption {
                        what: "WGPU_ATTENTION_SUBGROUPS",
                        value,
                        why: "must be 0 (workgroup-memory reductions) or 1 (subgroup operations)",
                    });
                }
            };
        }
        if let Ok(value) = std::env::var("WGPU_ATTENTION_DECODE_KERNEL") {
            limits.tile.decode_kernel = DecodeKernel::parse(&value).ok_or(Error::InvalidOption {
                what: "WGPU_ATTENTION_DECODE_KERNEL",
                value,
                why: "must be keys16, keys32 or keys64 (the decode-shaped kernel with that many \
                      invocations) or tiles (the row-tiled fused kernel)",
            })?;
        }
        for (what, slot) in [
            ("WGPU_ATTENTION_FUSED_BLOCK", &mut limits.tile.fused_block),
            ("WGPU_ATTENTION_GEMM_BLOCK", &mut limits.tile.gemm_block),
            (
                "WGPU_ATTENTION_BACKWARD_BLOCK",
                &mut limits.tile.backward_block,
            ),
        ] {
            if let Ok(value) = std::env::var(what) {
                *slot = TileBlock::parse(&value).ok_or(Error::InvalidOption {
                    what,
                    value,
                    why: "must be 4x4, 8x4 or 8x8 (rows x columns of each invocation's block)",
                })?;
            }
        }
        for (what, slot, why) in [
            (
                "WGPU_ATTENTION_RESIDENT_Q",
                &mut limits.tile.resident_q,
                "must be 0 (Q staged with every key tile) or 1 (Q kept in workgroup memory \
                 where it fits)",
            ),
            (
                "WGPU_ATTENTION_DOUBLE_BUFFER",
                &mut limits.tile.double_buffer,
                "must be 0 (one staging buffer) or 1 (the fused kernel's staging double-buffered \
                 where workgroup memory holds it)",
            ),
            (
                "WGPU_ATTENTION_TILED_BACKWARD",
                &mut limits.tile.tiled_backward,
                "must be 0 (the backward one row per invocation) or 1 (in tiles where head_dim \
                 and v_head_dim are at most 256)",
            ),
        ] {
            if let Ok(value) = std::env::var(what) {
                *slot = match value.trim() {
                    "0" => false,
                    "1" => true,
                    _ => return Err(Error::InvalidOption { what, value, why }),
                };
            }
        }
        // After WGPU_ATTENTION_SUBGROUPS: the cooperative products need subgroups on. A
        // preference, not a demand: where the device cannot run it, a warning and the
        // adapter's entry (an application that wraps its own device must not fail because a
        // user exported a tuning variable).
        if let Some(choice) = mma_from_env()? {
            match mma_available(choice, &limits, features) {
                Ok(choice) => limits.tile.mma = choice,
                Err(e) => log::warn!("wgpu-attention: WGPU_ATTENTION_MMA={}: {e}", choice.name()),
            }
        }
        let params = match std::env::var("WGPU_ATTENTION_PARAMS") {
            Ok(value) => ParamsIn::parse(&value).ok_or(Error::InvalidOption {
                what: "WGPU_ATTENTION_PARAMS",
                value,
                why: "must be uniform or storage (how kernels bind their parameter blocks)",
            })?,
            Err(_) => ParamsIn::for_adapter(&info),
        };
        let deferred = Arc::new(Deferred::default());
        let kernels = Arc::new(scoped(&device, &deferred, "opening the device", || {
            Kernels::new(&device, &limits, params, Arc::clone(&deferred))
        })?);
        let pool = match std::env::var("WGPU_ATTENTION_POOL") {
            Ok(value) => match value.trim() {
                "0" => false,
                "1" => true,
                _ => {
                    return Err(Error::InvalidOption {
                        what: "WGPU_ATTENTION_POOL",
                        value,
                        why: "must be 0 (a fresh buffer for everything) or 1 (reuse buffers)",
                    });
                }
            },
            Err(_) => true,
        };
        let state = Arc::new(DeviceState::new(pool, deferred));
        let on_lost = Arc::clone(&state);
        device.set_device_lost_callback(move |reason, message| {
            let reason = if message.is_empty() {
                format!("{reason:?}")
            } else {
                format!("{reason:?}: {message}")
            };
            log::error!("wgpu-attention: device lost ({reason})");
            on_lost.mark_lost(reason);
        });
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            kernels,
            timer: None,
            native_f16: features.contains(wgpu::Features::SHADER_F16),
            state,
        })
    }

    /// A context on the same device that records GPU timestamps at the start of each call's
    /// first pass and the end of its last, read with [`Gpu::last_gpu_seconds`]. `None` if the
    /// adapter lacks `TIMESTAMP_QUERY`. Meant for benchmarks: calls from several threads on one
    /// timing context overwrite each other's timestamps.
    pub fn with_timer(&self) -> Result<Option<Gpu>> {
        if !self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        self.guarded("creating the timer", || Ok(Some(self.timer_context())))
    }

    fn timer_context(&self) -> Gpu {
        let queries = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("wgpu-attention timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |label, usage| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolved = buffer(
            "wgpu-attention timestamps resolved",
            wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
        );
        let readback = buffer(
            "wgpu-attention timestamps readback",
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut gpu = self.clone();
        gpu.timer = Some(Arc::new(Timer {
            queries,
            resolved,
            readback,
            period_ns: self.queue.get_timestamp_period() as f64,
            busy: Mutex::new(()),
            stamped: std::sync::atomic::AtomicBool::new(false),
            begun: std::sync::atomic::AtomicBool::new(false),
        }));
        gpu
    }

    /// Begins a compute pass; on a timing context the first pass of a call writes the start
    /// timestamp and the last the end one.
    pub(crate) fn begin_pass<'e>(
        &self,
        encoder: &'e mut wgpu::CommandEncoder,
        label: &str,
        first: bool,
        last: bool,
    ) -> wgpu::ComputePass<'e> {
        let timestamp_writes = self.timer.as_ref().and_then(|t| {
            let begin = first && !t.begun.swap(true, Ordering::Relaxed);
            if begin || last {
                t.stamped.store(true, Ordering::Relaxed);
            }
            (begin || last).then_some(wgpu::ComputePassTimestampWrites {
                query_set: &t.queries,
                beginning_of_pass_write_index: begin.then_some(0),
                end_of_pass_write_index: last.then_some(1),
            })
        });
        encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(label),
            timestamp_writes,
        })
    }

    /// Encodes one call with `encode` into one command buffer and submits it once, inside
    /// [`guarded`](Gpu::guarded).
    pub(crate) fn submit_with(
        &self,
        what: &str,
        encode: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<()> {
        self.guarded(what, || {
            let _timer = self.timer.as_ref().map(|t| {
                let busy = t.busy.lock().unwrap_or_else(|e| e.into_inner());
                // A submission whose encoding failed left its flags set.
                t.begun.store(false, Ordering::Relaxed);
                t.stamped.store(false, Ordering::Relaxed);
                busy
            });
            let pool = &self.state.pool;
            pool.begin_submission();
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(what) });
            let encoded = encode(&mut encoder);
            if encoded.is_ok() {
                self.resolve_timer(&mut encoder);
                self.queue.submit([encoder.finish()]);
            }
            pool.end_submission(&self.queue, encoded.is_ok());
            encoded
        })
    }

    /// Runs `f`, which calls wgpu, so that nothing it does reaches wgpu's uncaptured-error
    /// handler (which panics by default): a lost device is [`Error::DeviceLost`] (before `f`
    /// and after it, every later call too), an allocation that failed [`Error::OutOfMemory`],
    /// any other validation or internal error [`Error::Gpu`] naming `what`. wgpu's error
    /// scopes are per thread, so calls from several threads each see their own errors.
    ///
    /// Inside another `guarded` of the same device family on the same thread it only runs
    /// `f`: the outer one's scopes catch its errors and the outer one polls, so nesting costs
    /// nothing. A successful call does not poll again at the end; a loss during it is seen by
    /// the next call's poll.
    pub(crate) fn guarded<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.guarded_with(what, true, f)
    }

    /// [`guarded`](Gpu::guarded) for the last step of an `async` call, which has already
    /// awaited the verdicts of its own past (`gpu::scopes`): it leaves a deferred error of a
    /// call made since for that call's successors.
    pub(crate) fn guarded_tail<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.guarded_with(what, false, f)
    }

    fn guarded_with<T>(
        &self,
        what: &str,
        take_deferred: bool,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        thread_local! {
            /// The `DeviceState::id` whose `guarded` this thread is inside (0: none).
            static ACTIVE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
        }
        struct Restore(u64);
        impl Drop for Restore {
            fn drop(&mut self) {
                ACTIVE.with(|a| a.set(self.0));
            }
        }
        let outer = ACTIVE.with(|a| a.get());
        if outer == self.state.id {
            return f();
        }
        if take_deferred {
            self.alive()?;
        } else {
            self.polled_lost()?;
        }
        ACTIVE.with(|a| a.set(self.state.id));
        let restore = Restore(outer);
        let out = scoped(&self.device, &self.state.deferred, what, f);
        drop(restore);
        if out.is_ok() {
            self.check_lost()?;
            return out;
        }
        // A lost device explains whatever else went wrong: on a destroyed device wgpu reports
        // the resources it could not create as invalid. wgpu says the device is lost only
        // once its queue is empty, so after an error wait for the queue before asking.
        let _ = self.device.poll(wgpu::PollType::Wait {
            submission_index: None,
            timeout: None,
        });
        self.check_lost()?;
        out
    }

    /// [`Error::DeviceLost`] once wgpu has said the device is lost. wgpu says so from
    /// `poll`, so this polls first (without blocking).
    ///
    /// In the browser it also returns the first wgpu error of an earlier call that has
    /// arrived since (`gpu::scopes`).
    pub(crate) fn alive(&self) -> Result<()> {
        self.polled_lost()?;
        self.state.deferred.take_arrived()
    }

    /// [`Error::DeviceLost`] once wgpu has said so, after a poll that does not block.
    fn polled_lost(&self) -> Result<()> {
        let _ = self.device.poll(wgpu::PollType::Poll);
        self.check_lost()
    }

    fn check_lost(&self) -> Result<()> {
        match self.state.lost_reason() {
            Some(reason) => Err(Error::DeviceLost { reason }),
            None => Ok(()),
        }
    }

    /// Whether the device is known to be lost (destroyed, reset by the driver): every call on
    /// it then fails with [`Error::DeviceLost`]. wgpu reports a loss once the device's queue
    /// is empty, so this can say `false` while work submitted before the loss is in flight;
    /// [`Gpu::wait`] waits for that.
    pub fn is_lost(&self) -> bool {
        // Not `alive`: that also hands out a deferred wgpu error (the browser), which is not a
        // loss and belongs to the next call.
        self.polled_lost().is_err()
    }

    /// Destroys the device (`wgpu::Device::destroy`) and marks it lost at once: every later
    /// call on any context of it is [`Error::DeviceLost`], even while earlier work is still
    /// in flight (a bare `device().destroy()` is reported only when wgpu reports it).
    pub fn destroy(&self) {
        self.state.mark_lost("Destroyed by Gpu::destroy".into());
        self.device.destroy();
    }

    /// Calls `hook` with wgpu's reason when the device is lost, on whichever thread wgpu
    /// reports it from. Replaces the previous hook; for applications that had their own
    /// device-lost callback before [`Gpu::from_wgpu`] replaced it. The hook must not own a
    /// clone of this `Gpu`: the device would then keep itself alive.
    pub fn on_device_lost(&self, hook: impl Fn(&str) + Send + 'static) {
        *self.state.hook.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
    }

    /// [`Error::WrongDevice`] unless `tensor` was made by a context of this device.
    pub(crate) fn expect_own(&self, what: &str, tensor: &crate::Tensor) -> Result<()> {
        self.expect_device(what, tensor.device_id())
    }

    /// [`Error::WrongDevice`] unless `device` is this context family's identity.
    pub(crate) fn expect_device(&self, what: &str, device: u64) -> Result<()> {
        if device == self.state.id {
            Ok(())
        } else {
            Err(Error::WrongDevice {
                what: what.to_string(),
            })
        }
    }

    /// On a timing context, records the copy of the call's timestamps for reading back.
    pub(crate) fn resolve_timer(&self, encoder: &mut wgpu::CommandEncoder) {
        if let Some(t) = &self.timer {
            t.begun.store(false, Ordering::Relaxed);
            if t.stamped.swap(false, Ordering::Relaxed) {
                encoder.resolve_query_set(&t.queries, 0..2, &t.resolved, 0);
                encoder.copy_buffer_to_buffer(&t.resolved, 0, &t.readback, 0, 16);
            } else {
                // A call with no compute pass (a copy): no figure, rather than the last one.
                encoder.clear_buffer(&t.readback, 0, None);
            }
        }
    }

    /// GPU seconds between the start of the last call's first pass and the end of its last,
    /// waiting for it to finish; `None` on a context without a timer, before any call, and
    /// after a call that ran no compute pass.
    ///
    /// This blocks: in the browser (`wasm32`) it is [`Error::Blocking`].
    pub fn last_gpu_seconds(&self) -> Result<Option<f64>> {
        let Some(t) = &self.timer else {
            return Ok(None);
        };
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Blocking {
                what: "Gpu::last_gpu_seconds",
                instead: "a download_async of the call's output, timed by the page",
            });
        }
        self.guarded("reading timestamps", || {
            let _busy = t.busy.lock().unwrap_or_else(|e| e.into_inner());
            let (tx, rx) = std::sync::mpsc::channel();
            t.readback.map_async(wgpu::MapMode::Read, .., move |r| {
                let _ = tx.send(r);
            });
            self.poll_wait(None)?;
            rx.recv()
                .map_err(|_| Error::Gpu("timestamp readback never completed".into()))?
                .map_err(|e| Error::Gpu(format!("mapping timestamps: {e}")))?;
            let ticks: [u64; 2] = {
                let view = t
                    .readback
                    .get_mapped_range(..)
                    .map_err(|e| Error::Gpu(format!("reading timestamps: {e}")))?;
                bytemuck::pod_read_unaligned(&view[..16])
            };
            t.readback.unmap();
            if ticks == [0, 0] {
                return Ok(None);
            }
            Ok(Some(
                ticks[1].wrapping_sub(ticks[0]) as f64 * t.period_ns * 1e-9,
            ))
        })
    }

    /// A context on the same device with lower limits (see [`LimitCaps`]). Plans made through it
    /// chunk and spill as they would on a device that small.
    pub fn with_caps(&self, caps: LimitCaps) -> Gpu {
        let mut gpu = self.clone();
        gpu.limits = gpu.limits.capped(caps);
        gpu
    }

    /// A context on the same device whose decode path uses at least `rows` rows per fused
    /// workgroup (4, 8, 16, 32 or 64; see [`TileConfig::min_decode_rows`](crate::gpu::tuning::TileConfig::min_decode_rows)): the tile choice,
    /// for tuning and for tests that cover every configuration on one adapter.
    pub fn with_decode_rows(&self, rows: u32) -> Result<Gpu> {
        let mut gpu = self.clone();
        gpu.limits.tile.min_decode_rows =
            decode_rows(rows, "decode rows per workgroup", &rows.to_string())?;
        Ok(gpu)
    }

    /// The tile configuration this context runs (the adapter's entry of
    /// [`TABLE`](crate::gpu::tuning::TABLE), after the environment's and the program's
    /// overrides).
    pub fn tile_config(&self) -> TileConfig {
        self.limits.tile
    }

    /// A context on the same device with tile configuration `config` (for instance a line
    /// `attn-bench --tune` printed): an error if it names a workgroup or row count no kernel is
    /// compiled for, no split target, or subgroups on a device without them.
    pub fn with_tile_config(&self, config: TileConfig) -> Result<Gpu> {
        let mut gpu = self.with_decode_kernel(config.decode_kernel, config.subgroups)?;
        gpu = gpu.with_decode_rows(config.min_decode_rows)?;
        if config.decode_target_workgroups == 0 {
            return Err(Error::InvalidOption {
                what: "decode_target_workgroups",
                value: "0".into(),
                why: "the key splits need a positive target",
            });
        }
        gpu.limits.tile.decode_target_workgroups = config.decode_target_workgroups;
        gpu.limits.tile.resident_q = config.resident_q;
        gpu.limits.tile.double_buffer = config.double_buffer;
        gpu.limits.tile.tiled_backward = config.tiled_backward;
        gpu.with_blocks(config.fused_block, config.gemm_block)?
            .with_backward_block(config.backward_block)?
            .with_mma(config.mma)
    }

    /// A context on the same device whose fused kernel computes S and P V as products of
    /// 16-bit operands where Q, K and V are native f16 (see [`MmaChoice`]): an error where the
    /// device lacks what `choice` needs (`SHADER_F16`; for
    /// [`MmaChoice::Cooperative`] also cooperative matrices, which a [`Gpu`] has only when
    /// opened by [`Gpu::new`] with `WGPU_ATTENTION_MMA=cooperative` on an adapter that lists
    /// them, subgroups of one known size, and subgroups turned on).
    pub fn with_mma(&self, choice: MmaChoice) -> Result<Gpu> {
        let mut gpu = self.clone();
        gpu.limits.tile.mma = mma_available(choice, &self.limits, self.features)?;
        Ok(gpu)
    }

    /// A context on the same device whose fused kernel keeps Q in workgroup memory where it
    /// fits (`resident`), or stages it with every key tile (see
    /// [`TileConfig::resident_q`](crate::gpu::tuning::TileConfig::resident_q)).
    pub fn with_resident_q(&self, resident: bool) -> Gpu {
        let mut gpu = self.clone();
        gpu.limits.tile.resident_q = resident;
        gpu
    }

    /// A context on the same device whose fused kernel double-buffers its staging where it
    /// can (`double`), or stages every step into one buffer (see
    /// [`TileConfig::double_buffer`](crate::gpu::tuning::TileConfig::double_buffer)).
    pub fn with_double_buffer(&self, double: bool) -> Gpu {
        let mut gpu = self.clone();
        gpu.limits.tile.double_buffer = double;
        gpu
    }

    /// A context on the same device whose backward runs in tiles where it can (`tiled`), or
    /// one row per invocation (see
    /// [`TileConfig::tiled_backward`](crate::gpu::tuning::TileConfig::tiled_backward)).
    pub fn with_tiled_backward(&self, tiled: bool) -> Gpu {
        let mut gpu = self.clone();
        gpu.limits.tile.tiled_backward = tiled;
        gpu
    }

    /// A context on the same device whose tiled backward computes `block` blocks per
    /// invocation where its accumulators fit (see
    /// [`TileConfig::backward_block`](crate::gpu::tuning::TileConfig::backward_block)): an
    /// error for a block no kernel is compiled for ([`TileBlock::ALL`]).
    pub fn with_backward_block(&self, block: TileBlock) -> Result<Gpu> {
        compiled_block("backward block", block)?;
        let mut gpu = self.clone();
        gpu.limits.tile.backward_block = block;
        Ok(gpu)
    }

    /// A context on the same device whose fused kernel computes `fused` blocks per invocation
    /// and whose tile products (three-pass, projections) `gemm` blocks: an error for a block no
    /// kernel is compiled for ([`TileBlock::ALL`]).
    pub fn with_blocks(&self, fused: TileBlock, gemm: TileBlock) -> Result<Gpu> {
        compiled_block("fused block", fused)?;
        compiled_block("gemm block", gemm)?;
        let mut gpu = self.clone();
        gpu.limits.tile.fused_block = fused;
        gpu.limits.tile.gemm_block = gemm;
        Ok(gpu)
    }

    /// A context on the same device whose decode path runs `kernel` (see [`DecodeKernel`]),
    /// with subgroup operations where `subgroups` (an error if the device lacks
    /// `Features::SUBGROUP`) or workgroup-memory reductions only: the configurations, for
    /// tuning and for tests that cover every one on one adapter.
    pub fn with_decode_kernel(&self, kernel: DecodeKernel, subgroups: bool) -> Result<Gpu> {
        if DecodeKernel::parse(&kernel.name()) != Some(kernel) {
            return Err(Error::InvalidOption {
                what: "decode kernel",
                value: format!("{kernel:?}"),
                why: "workgroup must be one of 16, 32, 64",
            });
        }
        let mut gpu = self.clone();
        gpu.limits.tile.decode_kernel = kernel;
        gpu.limits.tile.subgroups = subgroups && subgroups_on(gpu.features)?;
        Ok(gpu)
    }

    /// A context on the same device whose kernels bind their parameter blocks as `params` says
    /// (see [`ParamsIn`]), with a pipeline cache of its own: for tests that cover both
    /// bindings on one adapter, and for drivers where the default is the wrong choice.
    pub fn with_params_in(&self, params: ParamsIn) -> Result<Gpu> {
        let mut gpu = self.clone();
        gpu.kernels = Arc::new(self.guarded("a pipeline cache", || {
            Kernels::new(
                &self.device,
                &self.limits,
                params,
                Arc::clone(&self.state.deferred),
            )
        })?);
        Ok(gpu)
    }

    /// What the device's buffer pool has done so far (see `gpu::pool`); `created` counts every
    /// buffer the crate allocated for parameters, masks, scratch and readback.
    pub fn pool_stats(&self) -> PoolStats {
        self.state.pool.stats()
    }

    /// Whether the device reuses buffers (`WGPU_ATTENTION_POOL=0` turns it off).
    pub fn pool_enabled(&self) -> bool {
        self.state.pool.enabled()
    }

    /// How this context's kernels bind their parameter blocks.
    pub fn params_in(&self) -> ParamsIn {
        self.kernels.params
    }

    /// A context on the same device that reads f16 tensors packed in `u32` even where the
    /// adapter has `SHADER_F16`: the path adapters without it take, testable anywhere.
    pub fn with_packed_f16(&self) -> Gpu {
        let mut gpu = self.clone();
        gpu.native_f16 = false;
        gpu
    }

    /// How kernels on this context store tensors of `dtype`.
    pub fn storage(&self, dtype: crate::DType) -> crate::gpu::kernels::Storage {
        crate::gpu::kernels::Storage::of(dtype, self.native_f16)
    }

    /// How many pipelines this device has compiled so far (one per [`KernelKey`] used; shared
    /// by every context on the same device).
    ///
    /// [`KernelKey`]: crate::gpu::kernels::KernelKey
    pub fn pipelines_compiled(&self) -> usize {
        self.kernels.compiled()
    }

    /// The adapter the device was created on.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits plans are checked against.
    pub fn limits(&self) -> &GpuLimits {
        &self.limits
    }

    /// The optional features enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// The underlying device.
    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    /// The underlying queue.
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    /// Blocks until all submitted work has finished; [`Error::DeviceLost`] if the device was
    /// lost. In the browser (`wasm32`) this is [`Error::Blocking`]: await [`Gpu::wait_async`].
    pub fn wait(&self) -> Result<()> {
        if cfg!(target_arch = "wasm32") {
            return Err(Error::Blocking {
                what: "Gpu::wait",
                instead: "Gpu::wait_async",
            });
        }
        self.poll_wait(None)?;
        self.alive()
    }

    /// [`Gpu::wait`] as a future, for the browser: resolves once the queue has finished all
    /// work submitted before, with the first wgpu error any earlier call on this device caused
    /// (in the browser such errors arrive after their calls return; see [`Error::Gpu`]).
    pub async fn wait_async(&self) -> Result<()> {
        self.alive()?;
        let (tx, done) = crate::gpu::oneshot::channel();
        self.guarded("waiting for the device", || {
            self.queue.on_submitted_work_done(move || tx.send(()));
            Ok(())
        })?;
        // The verdicts of every call before this one, not of later ones.
        let earlier = self.state.deferred.settle();
        if cfg!(not(target_arch = "wasm32")) {
            self.poll_wait(None)?;
        }
        // `None`: the callback was dropped unrun, which wgpu does when the device goes away;
        // `alive` below says so.
        let _ = done.await;
        earlier.await?;
        self.polled_lost()
    }

    /// Blocks until submission `index` (all work, for `None`) has finished.
    pub(crate) fn poll_wait(&self, index: Option<wgpu::SubmissionIndex>) -> Result<()> {
        let polled = self.device.poll(wgpu::PollType::Wait {
            submission_index: index,
            timeout: None,
        });
        self.check_lost()?;
        polled
            .map(|_| ())
            .map_err(|e| Error::Gpu(format!("waiting for the device: {e}")))
    }

    /// One-line description of the adapter, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan, Cpu)`,
    /// with `, cooperative matrices 16x16` where the device has them.
    pub fn describe(&self) -> String {
        let coop = match self.limits.cooperative_matrix {
            0 => String::new(),
            n => format!(", cooperative matrices {n}x{n}"),
        };
        format!(
            "{} ({:?}, {:?}{coop})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }
}
