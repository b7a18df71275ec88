//! wgpu's error scopes around the crate's calls, and how what they caught reaches the caller.
//!
//! Every call that reaches wgpu runs inside three scopes (validation, out of memory, internal)
//! so that nothing reaches wgpu's uncaptured-error handler, which panics by default. Popping a
//! scope gives a future. On native backends it is ready at once and is waited for in place:
//! the call that caused an error returns it.
//!
//! In the browser it is a promise that settles only after control returns to the event loop,
//! so it cannot be waited for inside a synchronous call. There each call's verdict is handed
//! to a task of its own ([`Deferred`], one per device): the task records the verdict when it
//! arrives, numbered in the order the calls were made. Every later call first takes an error
//! that has arrived ([`Deferred::take_arrived`]); every `async` call
//! (`Tensor::download_async`, `Gpu::wait_async`) waits until the verdicts of every call made
//! before it started have arrived and takes the first error among them
//! ([`Deferred::settle`]). So a wgpu error of a synchronous call surfaces at the next call on
//! that device or at the next `await` of this crate, once each error, in order; an `async`
//! call dropped half-way loses nothing, and nothing is kept once its verdict has arrived. The
//! crate's own checks (shapes, dtypes, options, limits) run before wgpu is called and return
//! at once on every target.

use std::collections::VecDeque;
use std::sync::Mutex;

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
    /// goes to `deferred` (see the module's docs) and this returns `Ok`.
    pub(crate) fn pop(self, deferred: &std::sync::Arc<Deferred>, what: &str) -> Result<()> {
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
            let _ = deferred;
            verdict(what, pollster::block_on(caught))
        }
        #[cfg(target_arch = "wasm32")]
        {
            let seq = deferred.issue();
            let deferred = std::sync::Arc::clone(deferred);
            let what = what.to_string();
            wasm_bindgen_futures::spawn_local(async move {
                let caught = caught.await;
                deferred.arrive(seq, verdict(&what, caught));
            });
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

/// The verdicts of one device's calls that had to be deferred (the browser); always empty on
/// native backends, which wait in place.
#[derive(Debug, Default)]
pub(crate) struct Deferred {
    state: Mutex<DeferredState>,
}

#[derive(Debug, Default)]
struct DeferredState {
    /// Verdicts handed out so far (the next one's number).
    issued: u64,
    /// How many have arrived.
    arrived: u64,
    /// The errors that arrived and no call has returned yet, with their call's number.
    errors: VecDeque<(u64, Error)>,
    /// Tasks waiting in [`Deferred::settle`].
    wakers: Vec<std::task::Waker>,
}

impl Deferred {
    fn lock(&self) -> std::sync::MutexGuard<'_, DeferredState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of the next deferred verdict.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    fn issue(&self) -> u64 {
        let mut s = self.lock();
        s.issued += 1;
        s.issued - 1
    }

    /// Records verdict `seq`, and wakes the tasks waiting for verdicts.
    #[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
    fn arrive(&self, seq: u64, verdict: Result<()>) {
        let wakers = {
            let mut s = self.lock();
            s.arrived += 1;
            if let Err(e) = verdict {
                // In the order of the calls, whatever order the browser settled them in.
                let at = s.errors.partition_point(|(other, _)| *other < seq);
                s.errors.insert(at, (seq, e));
            }
            std::mem::take(&mut s.wakers)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// The error of the earliest call among those that have arrived and that no call has
    /// returned yet, without waiting.
    pub(crate) fn take_arrived(&self) -> Result<()> {
        match self.lock().errors.pop_front() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    /// Waits until the verdict of every call made before this one was called has arrived;
    /// then the error of the earliest of them (later ones stay for later calls). Dropped
    /// half-way, it takes nothing.
    pub(crate) fn settle(&self) -> impl std::future::Future<Output = Result<()>> + '_ {
        let target = self.lock().issued;
        self.settle_to(target)
    }

    async fn settle_to(&self, target: u64) -> Result<()> {
        std::future::poll_fn(|cx| {
            let mut s = self.lock();
            if s.arrived >= target {
                std::task::Poll::Ready(())
            } else {
                s.wakers.push(cx.waker().clone());
                std::task::Poll::Pending
            }
        })
        .await;
        let mut s = self.lock();
        match s.errors.iter().position(|(seq, _)| *seq < target) {
            Some(i) => Err(s.errors.remove(i).expect("index in range").1),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now<F: std::future::Future>(f: F) -> std::task::Poll<F::Output> {
        let mut f = std::pin::pin!(f);
        f.as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    }

    /// The browser's order of events, replayed on native: two calls deferred, their verdicts
    /// arriving in the other order; an await waits for both, then errors come out in the
    /// order of the calls, once each.
    #[test]
    fn verdicts_in_call_order_once_each() {
        let d = Deferred::default();
        let (a, b) = (d.issue(), d.issue());
        let mut waiting = std::pin::pin!(d.settle());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut cx).is_pending());
        d.arrive(b, Err(Error::Gpu("b".into())));
        assert!(
            waiting.as_mut().poll(&mut cx).is_pending(),
            "a has not arrived"
        );
        d.arrive(a, Err(Error::Gpu("a".into())));
        assert_eq!(
            waiting.as_mut().poll(&mut cx),
            std::task::Poll::Ready(Err(Error::Gpu("a".into())))
        );
        assert_eq!(d.take_arrived(), Err(Error::Gpu("b".into())));
        assert_eq!(d.take_arrived(), Ok(()));
    }

    /// A dropped await takes nothing with it.
    #[test]
    fn a_dropped_await_loses_nothing() {
        let d = Deferred::default();
        let a = d.issue();
        drop(d.settle());
        d.arrive(a, Err(Error::Gpu("a".into())));
        assert_eq!(d.take_arrived(), Err(Error::Gpu("a".into())));
    }

    #[test]
    fn settle_takes_only_its_past() {
        let d = Deferred::default();
        let a = d.issue();
        let waiting = d.settle();
        let b = d.issue();
        d.arrive(b, Err(Error::Gpu("b".into())));
        d.arrive(a, Ok(()));
        assert_eq!(now(waiting), std::task::Poll::Ready(Ok(())));
        assert_eq!(
            now(d.settle()),
            std::task::Poll::Ready(Err(Error::Gpu("b".into())))
        );
        assert_eq!(now(d.settle()), std::task::Poll::Ready(Ok(())));
    }
}
