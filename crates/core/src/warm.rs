//! Jails built ahead of time: a request takes one instead of waiting for
//! namespaces, mounts and cgroups to be made.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sandgate_jail::{Jail, Spec};

/// Built sandboxes nobody owns yet, refilled in the background.
#[derive(Debug, Default)]
pub(crate) struct WarmPool {
    pub(crate) ready: Mutex<Vec<sandgate_jail::Sandbox>>,
    wanted: tokio::sync::Notify,
    pub(crate) closed: std::sync::atomic::AtomicBool,
}

impl WarmPool {
    /// Stops refilling and tears down what is ready.
    pub(crate) async fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.wanted.notify_one();
        let ready: Vec<_> =
            std::mem::take(&mut *self.ready.lock().unwrap_or_else(|p| p.into_inner()));
        if !ready.is_empty() {
            let _ = tokio::task::spawn_blocking(move || drop(ready)).await;
        }
    }

    pub(crate) fn take(&self) -> Option<sandgate_jail::Sandbox> {
        let s = self.ready.lock().unwrap_or_else(|p| p.into_inner()).pop();
        self.wanted.notify_one();
        s
    }

    /// Keeps `size` sandboxes ready until closed.
    pub(crate) async fn fill(self: Arc<Self>, jail: Arc<Jail>, spec: Spec, size: usize) {
        use std::sync::atomic::Ordering;
        loop {
            while !self.closed.load(Ordering::Relaxed)
                && self.ready.lock().unwrap_or_else(|p| p.into_inner()).len() < size
            {
                let (jail, spec) = (Arc::clone(&jail), spec.clone());
                match tokio::task::spawn_blocking(move || jail.create_sandbox(&spec)).await {
                    Ok(Ok(s)) if self.closed.load(Ordering::Relaxed) => {
                        let _ = tokio::task::spawn_blocking(move || drop(s)).await;
                    }
                    Ok(Ok(s)) => self.ready.lock().unwrap_or_else(|p| p.into_inner()).push(s),
                    other => {
                        tracing::warn!(error = ?other.err(), "could not warm a sandbox");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            if self.closed.load(Ordering::Relaxed) {
                return;
            }
            self.wanted.notified().await;
        }
    }
}
