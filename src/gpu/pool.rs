//! The per-device buffer pool: the parameter blocks, masking buffers, scratch and readback
//! buffers of a call come from it instead of from a fresh allocation each time.
//!
//! **The reuse rule.** Buffers are kept in buckets by usage and size, the size rounded up to a
//! power of two (at least 256 bytes). A buffer taken during a submission
//! ([`Gpu::submit_with`]) goes back to its bucket when the GPU has finished that submission
//! (wgpu's `on_submitted_work_done`, which runs from a later `poll`; every call polls once
//! before it starts). A readback buffer goes back once it has been read and unmapped. A buffer
//! taken outside a submission is an ordinary buffer, dropped with its last handle. So no
//! buffer the GPU may still read is ever handed out twice.
//!
//! A pooled buffer can be larger than asked for and holds whatever its last user wrote; every
//! user writes what it reads (parameters with `write_buffer`, scratch by its kernel), and no
//! kernel relies on the length of a buffer (`arrayLength`). The pool keeps at most
//! [`MAX_FREE_PER_BUCKET`] buffers per bucket, none larger than [`MAX_POOLED_BYTES`], and at
//! most [`MAX_FREE_BYTES`] in all; beyond that buffers are dropped when returned.
//! `WGPU_ATTENTION_POOL=0` turns the pool off for debugging: every buffer is then a fresh
//! allocation, as before the pool existed.
//!
//! [`Gpu::submit_with`]: crate::Gpu

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Buffers larger than this are never pooled.
pub(crate) const MAX_POOLED_BYTES: u64 = 16 << 20;
/// Free buffers kept per bucket.
pub(crate) const MAX_FREE_PER_BUCKET: usize = 8;
/// Free bytes kept in all.
pub(crate) const MAX_FREE_BYTES: u64 = 64 << 20;

/// The smallest bucket.
const MIN_BUCKET: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Bucket {
    usage: u32,
    size: u64,
}

#[derive(Debug, Default)]
struct Free {
    buckets: HashMap<Bucket, Vec<wgpu::Buffer>>,
    bytes: u64,
}

/// Counters of what the pool did, for tests and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Buffers allocated (pooled or not).
    pub created: u64,
    /// Buffers handed out again from a bucket.
    pub reused: u64,
}

/// The pool of one device, shared by every context of it.
#[derive(Debug)]
pub(crate) struct Pool {
    enabled: bool,
    free: Mutex<Free>,
    stats: Mutex<PoolStats>,
}

thread_local! {
    /// The pooled buffers taken by the submission this thread is encoding, if any.
    static IN_FLIGHT: RefCell<Option<Vec<(Bucket, wgpu::Buffer)>>> = const { RefCell::new(None) };
}

impl Pool {
    pub(crate) fn new(enabled: bool) -> Pool {
        Pool {
            enabled,
            free: Mutex::new(Free::default()),
            stats: Mutex::new(PoolStats::default()),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    pub(crate) fn stats(&self) -> PoolStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bucket(&self, size: u64, usage: wgpu::BufferUsages) -> Option<Bucket> {
        let size = size.max(MIN_BUCKET).checked_next_power_of_two()?;
        (self.enabled && size <= MAX_POOLED_BYTES).then_some(Bucket {
            usage: usage.bits(),
            size,
        })
    }

    /// A buffer of at least `size` bytes with `usage`, from its bucket when one is free. When
    /// `submission` is true it is recorded with the submission being encoded on this thread
    /// and returns to the pool when that submission has finished (a buffer taken with no
    /// submission being encoded is not pooled).
    fn take(
        &self,
        device: &wgpu::Device,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
        submission: bool,
    ) -> (Option<Bucket>, wgpu::Buffer) {
        let in_call = IN_FLIGHT.with(|c| c.borrow().is_some());
        let bucket = self.bucket(size, usage).filter(|_| in_call || !submission);
        let reused = bucket.and_then(|b| {
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let buffer = free.buckets.get_mut(&b)?.pop()?;
            free.bytes -= b.size;
            Some(buffer)
        });
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let buffer = match reused {
            Some(buffer) => {
                stats.reused += 1;
                buffer
            }
            None => {
                stats.created += 1;
                device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size: bucket.map_or(size, |b| b.size),
                    usage,
                    mapped_at_creation: false,
                })
            }
        };
        drop(stats);
        if let (Some(b), true) = (bucket, submission) {
            IN_FLIGHT.with(|c| {
                if let Some(list) = c.borrow_mut().as_mut() {
                    list.push((b, buffer.clone()));
                }
            });
        }
        (bucket.filter(|_| !submission), buffer)
    }

    /// A buffer for the submission being encoded on this thread (see [`Pool::take`]).
    pub(crate) fn for_submission(
        &self,
        device: &wgpu::Device,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> wgpu::Buffer {
        self.take(device, label, size, usage, true).1
    }

    /// A buffer the caller returns with [`Pool::give_back`] once the GPU is done with it.
    pub(crate) fn borrow(
        &self,
        device: &wgpu::Device,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Borrowed {
        let (bucket, buffer) = self.take(device, label, size, usage, false);
        Borrowed { bucket, buffer }
    }

    /// Returns a borrowed buffer.
    pub(crate) fn give_back(&self, borrowed: Borrowed) {
        if let Some(bucket) = borrowed.bucket {
            self.put(bucket, borrowed.buffer);
        }
    }

    fn put(&self, bucket: Bucket, buffer: wgpu::Buffer) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.bytes + bucket.size > MAX_FREE_BYTES {
            return;
        }
        let list = free.buckets.entry(bucket).or_default();
        if list.len() < MAX_FREE_PER_BUCKET {
            list.push(buffer);
            free.bytes += bucket.size;
        }
    }

    /// Starts recording the buffers this thread's next submission takes.
    pub(crate) fn begin_submission(&self) {
        IN_FLIGHT.with(|c| *c.borrow_mut() = Some(Vec::new()));
    }

    /// Stops recording and, once `queue` has finished what was submitted so far, returns the
    /// recorded buffers to their buckets. With `submitted` false (encoding failed, nothing was
    /// submitted) they return at once.
    pub(crate) fn end_submission(self: &Arc<Pool>, queue: &wgpu::Queue, submitted: bool) {
        let Some(taken) = IN_FLIGHT.with(|c| c.borrow_mut().take()) else {
            return;
        };
        if taken.is_empty() {
            return;
        }
        if submitted {
            let pool = Arc::clone(self);
            queue.on_submitted_work_done(move || {
                for (bucket, buffer) in taken {
                    pool.put(bucket, buffer);
                }
            });
        } else {
            for (bucket, buffer) in taken {
                self.put(bucket, buffer);
            }
        }
    }
}

/// A buffer from [`Pool::borrow`].
#[derive(Debug)]
pub(crate) struct Borrowed {
    bucket: Option<Bucket>,
    pub(crate) buffer: wgpu::Buffer,
}
