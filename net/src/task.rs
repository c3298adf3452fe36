//! The one door to `tokio::spawn`: every long-lived task has a name (a tracing span) and an
//! owner that stops it (issue 18).
//!
//! [`spawn`] returns an [`Owned`] handle that aborts the task when dropped, for a task with one
//! owner. A [`Tracker`] owns many tasks that come and go (one per stream, per upload); a server
//! waits on it at shutdown, and aborts what is left if it must not wait.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tracing::Instrument;

/// A task with one owner: it is aborted when this is dropped, and awaiting this awaits it.
#[derive(Debug)]
pub struct Owned<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for Owned<T> {
    type Output = Result<T, tokio::task::JoinError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Owned<T> {
    /// Stops the task now; awaiting it then says it was cancelled (unless it had finished).
    pub fn abort(&self) {
        self.0.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

/// Runs `future` as a task named `name`, owned by the returned handle.
#[allow(clippy::disallowed_methods)] // This is the door.
pub fn spawn<F>(name: &'static str, future: F) -> Owned<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    Owned(tokio::spawn(
        future.instrument(tracing::info_span!("task", name)),
    ))
}

/// Runs `future` as a task named `name` that nothing owns: for a task whose end is its own
/// business, because it finishes its work or stops when its peer hangs up (an accept loop
/// that ends when its stream is dropped, one connection, a handshake under a timeout). A task
/// that something must be able to stop is [`spawn`]ed or [`Tracker`]ed instead.
#[allow(clippy::disallowed_methods)] // This is the door.
pub fn detach<F>(name: &'static str, future: F)
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    drop(tokio::spawn(
        future.instrument(tracing::info_span!("task", name)),
    ));
}

/// Owns any number of tasks; [`Tracker::wait`] returns once they have all ended, and
/// [`Tracker::abort_all`] stops them. Clones share the same tasks.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    next: AtomicU64,
    ended: tokio::sync::Notify,
}

/// Takes a task off its tracker's list when it ends, however it ends.
struct Listed {
    inner: Arc<Inner>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        tasks.remove(&self.id);
        if tasks.is_empty() {
            self.inner.ended.notify_waiters();
        }
    }
}

impl Tracker {
    pub fn new() -> Tracker {
        Tracker::default()
    }

    /// Runs `future` as a task named `name`, owned by this tracker. The handle may be awaited
    /// for its result; dropping it leaves the task to the tracker (it is not aborted).
    #[allow(clippy::disallowed_methods)] // This is the door.
    pub fn spawn<F>(&self, name: &'static str, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let listed = Listed {
            inner: self.inner.clone(),
            id,
        };
        // Held across the spawn, so the task cannot end (and unlist itself) before it is listed.
        let mut tasks = self.inner.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let handle = tokio::spawn(
            async move {
                let _listed = listed;
                future.await
            }
            .instrument(tracing::info_span!("task", name)),
        );
        tasks.insert(id, handle.abort_handle());
        handle
    }

    /// Tasks running now.
    pub fn len(&self) -> usize {
        self.inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Returns once every task of this tracker has ended.
    pub async fn wait(&self) {
        loop {
            let ended = self.inner.ended.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.is_empty() {
                return;
            }
            ended.await;
        }
    }

    /// Aborts every task of this tracker; [`Tracker::wait`] then returns once they are gone.
    pub fn abort_all(&self) {
        for t in self
            .inner
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dropping_an_owned_task_aborts_it() {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = spawn("waits forever", async move {
            let _tx = tx;
            std::future::pending::<()>().await
        });
        drop(task);
        // The sender inside the task is dropped once the task is aborted.
        assert!(rx.await.is_err());
    }

    #[tokio::test]
    async fn a_tracker_waits_for_its_tasks_and_can_abort_them() {
        let tracker = Tracker::new();
        let (go, gate) = tokio::sync::oneshot::channel::<()>();
        tracker.spawn("gated", async move {
            let _ = gate.await;
        });
        tracker.spawn("forever", std::future::pending::<()>());
        assert_eq!(tracker.len(), 2);
        go.send(()).unwrap();
        tracker.abort_all();
        tracker.wait().await;
        assert!(tracker.is_empty());
    }
}
