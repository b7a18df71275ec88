//! wgpu's error scopes around the crate's calls, and how what they caught reaches the caller.
//!
//! Every call that reaches wgpu runs inside three scopes (validation, out of memory, internal)
//! so that nothing reaches wgpu's uncaptured-error handler, which panics by default. Popping a
//! scope gives a future. On native backends it is ready at once and is waited for in place:
//! the call that caused an error returns it. In the browser it is a promise that settles only
//! after control returns to the event loop, so it cannot be waited for inside a synchronous
//! call. There the futures are kept per device ([`defer`]): every later call first polls them
//! without waiting ([`settled`]) and returns an error that has arrived, and every `async` call
//! (`Tensor::download_async`, `Gpu::wait_async`) awaits them all ([`settle_all`]) before it
//! returns. So in the browser a wgpu error of a synchronous call surfaces at the next call or
//! at the next `await` of this crate, never silently. The crate's own checks (shapes, dtypes,
//! options, limits) run before wgpu is called and return at once on every target.

use crate::error::{Error, Result};

/// The three scopes of one call, popped in the reverse of the order they were pushed in.
pub(crate) struct Scopes {
    validation: wgpu::ErrorScopeGuard,
    oom: wgpu::ErrorScopeGuard,
    internal: wgpu::ErrorScopeGuard,
}

/// What the scopes of one call caught: an allocation failure, and any other error.
type Caught = (Option<wgpu::Error>, Option<wgpu::Error>);

impl Scopes {
    pub(crate) fn push(device: &wgpu::Device) -> Scopes {
        let validation = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let internal = device.push_error_scope(wgpu::ErrorFilter::Internal);
        Scopes {
            validation,
            oom,
            internal,
        }
    }

    /// Pops the scopes: an allocation that failed is [`Error::OutOfMemory`], any other
    /// validation or internal error [`Error::Gpu`] naming `what`. In the browser the verdict
    /// is kept for a later call (see the module's docs) and this returns `Ok`.
    pub(crate) fn pop(self, device: &wgpu::Device, what: &str) -> Result<()> {
        let internal = self.internal.pop();
        let oom = self.oom.pop();
        let validation = self.validation.pop();
        let caught = async move {
            let internal = internal.await;
            let oom = oom.await;
            let validation = validation.await;
            (oom, validation.or(internal))
        };
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = device;
            verdict(what, pollster::block_on(caught))
        }
        #[cfg(target_arch = "wasm32")]
        {
            web::defer(device, what, Box::pin(caught));
            Ok(())
        }
    }
}

/// The error, if any, that the scopes of the call `what` caught.
fn verdict(what: &str, caught: Caught) -> Result<()> {
    match caught {
        (Some(err), _) => Err(Error::OutOfMemory {
            what: what.to_string(),
            detail: err.to_string(),
        }),
        (None, Some(err)) => Err(Error::Gpu(format!("{what}: {err}"))),
        (None, None) => Ok(()),
    }
}

/// The first error that the kept scopes of `device` have caught by now, without waiting (every
/// scope that has settled is dropped). Always `Ok` on native backends, which keep none.
pub(crate) fn settled(device: &wgpu::Device) -> Result<()> {
    #[cfg(target_arch = "wasm32")]
    {
        web::settled(device)
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = device;
        Ok(())
    }
}

/// Waits for every kept scope of `device`; the first error any of them caught.
pub(crate) async fn settle_all(device: &wgpu::Device) -> Result<()> {
    #[cfg(target_arch = "wasm32")]
    {
        web::settle_all(device).await
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let _ = device;
        Ok(())
    }
}

#[cfg(target_arch = "wasm32")]
mod web {
    use std::cell::RefCell;
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll, Waker};

    use super::{Caught, verdict};
    use crate::error::Result;

    /// The scopes of one call whose verdict has not been read yet.
    struct Kept {
        device: wgpu::Device,
        what: String,
        caught: Pin<Box<dyn Future<Output = Caught>>>,
    }

    thread_local! {
        /// A browser runs the crate on one thread; a worker has its own list.
        static KEPT: RefCell<Vec<Kept>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn defer(
        device: &wgpu::Device,
        what: &str,
        caught: Pin<Box<dyn Future<Output = Caught>>>,
    ) {
        KEPT.with(|k| {
            k.borrow_mut().push(Kept {
                device: device.clone(),
                what: what.to_string(),
                caught,
            })
        });
    }

    /// Takes the kept scopes of `device` out of the list (so that no borrow is held while they
    /// are polled or awaited).
    fn take(device: &wgpu::Device) -> Vec<Kept> {
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            let (mine, others): (Vec<Kept>, Vec<Kept>) =
                k.drain(..).partition(|kept| &kept.device == device);
            *k = others;
            mine
        })
    }

    /// Puts back scopes that have not settled, ahead of any kept since.
    fn put_back(mut pending: Vec<Kept>) {
        if pending.is_empty() {
            return;
        }
        KEPT.with(|k| {
            let mut k = k.borrow_mut();
            pending.append(&mut k);
            *k = pending;
        });
    }

    pub(super) fn settled(device: &wgpu::Device) -> Result<()> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut first = Ok(());
        let mut pending = Vec::new();
        for mut kept in take(device) {
            match kept.caught.as_mut().poll(&mut cx) {
                Poll::Ready(caught) => {
                    if first.is_ok() {
                        first = verdict(&kept.what, caught);
                    }
                }
                Poll::Pending => pending.push(kept),
            }
        }
        put_back(pending);
        first
    }

    pub(super) async fn settle_all(device: &wgpu::Device) -> Result<()> {
        let mut first = Ok(());
        for kept in take(device) {
            let caught = kept.caught.await;
            if first.is_ok() {
                first = verdict(&kept.what, caught);
            }
        }
        first
    }
}
