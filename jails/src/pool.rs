//! The life cycle of images and containers, the same for every backend.
//!
//! An image is made once per toolchain; concurrent requests for one toolchain wait for the
//! first, and other toolchains are not held up. A job checks a container out of its image's
//! pool (a ready one if there is one, a new one if not) and checks it back in when done; the
//! reset then happens on a background task, at most `recyclers` at once (a semaphore, no
//! polling), and the container goes back to the pool or, if its reset fails, is destroyed. An
//! evicted image is destroyed only after the last container made from it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Semaphore;

use crate::{Backend, JailError, Outcome, RunSpec};

struct Entry<B: Backend> {
    image: Arc<B::Image>,
    ready: Vec<Arc<B::Container>>,
    /// Containers checked out or being reset.
    out: usize,
    evicted: bool,
}

struct Shared<B: Backend> {
    backend: B,
    images: Mutex<HashMap<String, Entry<B>>>,
    /// One lock per toolchain being made, so makers of different toolchains run in parallel.
    making: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    recyclers: Arc<Semaphore>,
    recycler_count: u32,
    /// Containers checked in and not yet back in the pool or destroyed, so that shutdown
    /// waits for every one of them, not only for the resets already under way.
    checking_in: tokio::sync::watch::Sender<usize>,
    /// Ready containers kept per image.
    keep: usize,
}

/// Images and their pools of containers.
pub struct Pool<B: Backend> {
    shared: Arc<Shared<B>>,
}

impl<B: Backend> Clone for Pool<B> {
    fn clone(&self) -> Self {
        Pool {
            shared: self.shared.clone(),
        }
    }
}

impl<B: Backend> std::fmt::Debug for Pool<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let images = self.shared.lock().len();
        f.debug_struct("Pool").field("images", &images).finish()
    }
}

/// A container checked out for one job. Give it back with [`Pool::checkin`].
pub struct Lease<B: Backend> {
    key: String,
    container: Arc<B::Container>,
    root: PathBuf,
    outputs: PathBuf,
}

impl<B: Backend> std::fmt::Debug for Lease<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("image", &self.key)
            .field("root", &self.root)
            .finish()
    }
}

impl<B: Backend> Lease<B> {
    /// Where the job's inputs go, seen from the builder ([`Backend::root`]).
    pub fn root(&self) -> &std::path::Path {
        &self.root
    }

    /// Where the job's outputs are read after it ran ([`Backend::outputs`]).
    pub fn outputs(&self) -> &std::path::Path {
        &self.outputs
    }
}

impl<B: Backend> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry<B>>> {
        // A panic while holding this lock leaves plain bookkeeping behind; carry on with it.
        self.images.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One container's check-in, counted until it is over however it ends.
struct CheckingIn<B: Backend>(Arc<Shared<B>>);

impl<B: Backend> Drop for CheckingIn<B> {
    fn drop(&mut self) {
        self.0.checking_in.send_modify(|n| *n -= 1);
    }
}

fn join_error(e: tokio::task::JoinError) -> JailError {
    JailError::Setup(format!("jail task failed: {e}"))
}

impl<B: Backend> Pool<B> {
    /// A pool over `backend` keeping up to `keep` ready containers per image and resetting at
    /// most `recyclers` containers at once.
    pub fn new(backend: B, keep: usize, recyclers: u32) -> Pool<B> {
        let recyclers = recyclers.max(1);
        Pool {
            shared: Arc::new(Shared {
                backend,
                images: Mutex::new(HashMap::new()),
                making: Mutex::new(HashMap::new()),
                recyclers: Arc::new(Semaphore::new(recyclers as usize)),
                recycler_count: recyclers,
                checking_in: tokio::sync::watch::Sender::new(0),
                keep,
            }),
        }
    }

    pub fn backend(&self) -> &B {
        &self.shared.backend
    }

    pub fn has_image(&self, key: &str) -> bool {
        self.shared.lock().get(key).is_some_and(|e| !e.evicted)
    }

    /// Containers ready per image, for status and tests.
    pub fn ready_counts(&self) -> HashMap<String, usize> {
        self.shared
            .lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.ready.len()))
            .collect()
    }

    /// Makes the image for `key` from `archive` unless it exists; one maker per key.
    pub async fn prepare(&self, key: &str, archive: PathBuf) -> Result<(), JailError> {
        if self.has_image(key) {
            return Ok(());
        }
        let lock = {
            let mut making = self.shared.making.lock().unwrap_or_else(|e| e.into_inner());
            making.entry(key.to_string()).or_default().clone()
        };
        let _making = lock.lock().await;
        if self.has_image(key) {
            return Ok(());
        }
        let shared = self.shared.clone();
        let owned_key = key.to_string();
        let image =
            tokio::task::spawn_blocking(move || shared.backend.make_image(&owned_key, &archive))
                .await
                .map_err(join_error)??;
        let mut images = self.shared.lock();
        // An evicted entry still draining its containers keeps its old image until they are
        // gone; the new image replaces it in the map and the drain finishes on its own.
        images.insert(
            key.to_string(),
            Entry {
                image: Arc::new(image),
                ready: Vec::new(),
                out: 0,
                evicted: false,
            },
        );
        Ok(())
    }

    /// A container for a job on `key`'s image: a ready one, or a new one.
    pub async fn checkout(&self, key: &str) -> Result<Lease<B>, JailError> {
        let image = {
            let mut images = self.shared.lock();
            let entry = images
                .get_mut(key)
                .filter(|e| !e.evicted)
                .ok_or_else(|| JailError::Setup(format!("no image for toolchain {key}")))?;
            entry.out += 1;
            if let Some(container) = entry.ready.pop() {
                return Ok(self.lease(key, container));
            }
            entry.image.clone()
        };
        let shared = self.shared.clone();
        let made = tokio::task::spawn_blocking(move || shared.backend.make_container(&image))
            .await
            .map_err(join_error)
            .and_then(|r| r);
        match made {
            Ok(container) => Ok(self.lease(key, Arc::new(container))),
            Err(e) => {
                self.finish_one(key);
                Err(e)
            }
        }
    }

    fn lease(&self, key: &str, container: Arc<B::Container>) -> Lease<B> {
        Lease {
            key: key.to_string(),
            root: self.shared.backend.root(&container),
            outputs: self.shared.backend.outputs(&container),
            container,
        }
    }

    /// Runs a command in a checked-out container.
    pub async fn run(&self, lease: &Lease<B>, spec: RunSpec) -> Result<Outcome, JailError> {
        let shared = self.shared.clone();
        let container = lease.container.clone();
        tokio::task::spawn_blocking(move || shared.backend.run(&container, &spec))
            .await
            .map_err(join_error)?
    }

    /// Gives a container back. It is reset on a background task and returns to the pool, or is
    /// destroyed if the reset fails, the pool is full or the image was evicted.
    pub fn checkin(&self, lease: Lease<B>) {
        let shared = self.shared.clone();
        let pool = self.clone();
        shared.checking_in.send_modify(|n| *n += 1);
        // Made before the task, so a task dropped before it ever runs still uncounts itself.
        let counted = CheckingIn(shared.clone());
        // The pool's one task: owned through `checking_in`, which shutdown waits to reach zero
        // (the jails crate stays free of kiln's server plumbing, so no kiln_net::task here).
        #[allow(clippy::disallowed_methods)]
        tokio::spawn(async move {
            let _counted = counted;
            // The permit bounds concurrent resets and lets shutdown wait for them.
            let Ok(_permit) = shared.recyclers.clone().acquire_owned().await else {
                return;
            };
            let image = shared.lock().get(&lease.key).map(|e| e.image.clone());
            let container = lease.container.clone();
            let worker = shared.clone();
            let kept = tokio::task::spawn_blocking(move || {
                let Some(image) = image else {
                    let _ = worker.backend.destroy_container(&container);
                    return false;
                };
                match worker.backend.reset(&container, &image) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "container reset failed; destroying it");
                        if let Err(e) = worker.backend.destroy_container(&container) {
                            tracing::warn!(error = %e, "destroying a container failed");
                        }
                        false
                    }
                }
            })
            .await
            .unwrap_or(false);
            let surplus = {
                let mut images = shared.lock();
                match images.get_mut(&lease.key) {
                    Some(entry) if kept && !entry.evicted && entry.ready.len() < shared.keep => {
                        entry.ready.push(lease.container.clone());
                        None
                    }
                    _ if kept => Some(lease.container.clone()),
                    _ => None,
                }
            };
            if let Some(container) = surplus {
                let worker = shared.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    worker.backend.destroy_container(&container)
                })
                .await;
            }
            pool.finish_one(&lease.key);
        });
    }

    /// One container of `key` is gone for good or back in the pool; an evicted image with no
    /// containers left is destroyed.
    fn finish_one(&self, key: &str) {
        let drained = {
            let mut images = self.shared.lock();
            let Some(entry) = images.get_mut(key) else {
                return;
            };
            entry.out = entry.out.saturating_sub(1);
            if entry.evicted && entry.out == 0 {
                images.remove(key)
            } else {
                None
            }
        };
        if let Some(entry) = drained {
            let shared = self.shared.clone();
            tokio::task::spawn_blocking(move || shared.backend.destroy_image(&entry.image));
        }
    }

    /// Removes `key`'s image: its ready containers now, the image once no job uses it.
    pub async fn evict(&self, key: &str) -> Result<(), JailError> {
        let (ready, image) = {
            let mut images = self.shared.lock();
            let Some(entry) = images.get_mut(key) else {
                return Ok(());
            };
            entry.evicted = true;
            let ready = std::mem::take(&mut entry.ready);
            let image = if entry.out == 0 {
                images.remove(key).map(|e| e.image)
            } else {
                None
            };
            (ready, image)
        };
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            for container in &ready {
                shared.backend.destroy_container(container)?;
            }
            if let Some(image) = image {
                shared.backend.destroy_image(&image)?;
            }
            Ok(())
        })
        .await
        .map_err(join_error)?
    }

    /// Waits for containers being checked in, then destroys every ready container and every
    /// image.
    pub async fn shutdown(&self) {
        let mut checking_in = self.shared.checking_in.subscribe();
        let _ = checking_in.wait_for(|n| *n == 0).await;
        let _all = self
            .shared
            .recyclers
            .acquire_many(self.shared.recycler_count)
            .await;
        let keys: Vec<String> = self.shared.lock().keys().cloned().collect();
        for key in keys {
            if let Err(e) = self.evict(&key).await {
                tracing::warn!(error = %e, image = %key, "removing an image at shutdown failed");
            }
        }
    }
}
