//! A value that one callback hands to one future: how a readback's `map_async` or a queue's
//! "work done" reaches an `async` call. On native backends the callback has run by the time
//! the device has been polled to completion, so the future is ready at its first poll; in the
//! browser it runs from the event loop and wakes the task awaiting it. A callback dropped
//! without running (its device gone) ends the wait with `None` instead of leaving it hanging.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// What the two halves share.
struct Slot<T> {
    value: Option<T>,
    /// The sender is gone (after sending or without).
    closed: bool,
    waker: Option<Waker>,
}

/// The sending half, moved into the callback.
pub(crate) struct Sender<T>(Arc<Mutex<Slot<T>>>);

/// The receiving half: a future of the value, `None` if the sender was dropped without one.
pub(crate) struct Receiver<T>(Arc<Mutex<Slot<T>>>);

pub(crate) fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let slot = Arc::new(Mutex::new(Slot {
        value: None,
        closed: false,
        waker: None,
    }));
    (Sender(Arc::clone(&slot)), Receiver(slot))
}

impl<T> Sender<T> {
    pub(crate) fn send(self, value: T) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).value = Some(value);
        // Drop closes the slot and wakes the receiver.
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
            slot.closed = true;
            slot.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl<T> Future for Receiver<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.closed {
            return Poll::Ready(slot.value.take());
        }
        slot.waker = Some(cx.waker().clone());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once<T>(rx: &mut Receiver<T>) -> Poll<Option<T>> {
        Pin::new(rx).poll(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn sent_dropped_and_pending() {
        let (tx, mut rx) = channel();
        assert!(poll_once(&mut rx).is_pending());
        tx.send(7);
        assert_eq!(poll_once(&mut rx), Poll::Ready(Some(7)));
        let (tx, mut rx) = channel::<u8>();
        drop(tx);
        assert_eq!(poll_once(&mut rx), Poll::Ready(None));
    }
}
