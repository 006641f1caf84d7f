//! Gives memory freed by connections back to the system.
//!
//! A connection that rests or closes frees its buffers (tens of KB each),
//! but glibc's allocator keeps freed memory inside its heaps whenever a
//! live allocation sits above it, so after a burst of requests the
//! process's resident memory stays at the burst's size: about 1 KB more per
//! idle keep-alive connection (`benches/idle_connections.sh`). A small
//! thread asks glibc to return its free pages (`malloc_trim(0)`, which
//! since glibc 2.8 releases whole free pages anywhere in every arena, see
//! malloc_trim(3)) at most once per [`TRIM_INTERVAL`], and only when at
//! least [`TRIM_AFTER`] bytes were freed since the last time (64 client
//! connections' buffers, or two backend connections' large read buffers):
//! a busy proxy whose connections stay busy never trims. Other
//! allocators manage this themselves; this module does nothing there.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Longest time between a burst's end and its memory going back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(1);

/// What one connection's buffers come to when it rests or closes.
const CONNECTION_BUFFERS: usize = 30 << 10;

/// Bytes freed before a trim is worth it: 64 connections' buffers.
pub const TRIM_AFTER: u64 = 64 * CONNECTION_BUFFERS as u64;

/// Bytes freed since the last trim.
static RELEASED: AtomicU64 = AtomicU64::new(0);

/// Notes that a connection freed its buffers (it rested or closed).
pub fn released() {
    released_bytes(CONNECTION_BUFFERS);
}

/// Notes that about `bytes` were freed (a backend connection's large read
/// buffers: two of them make a trim worth it).
pub fn released_bytes(bytes: usize) {
    RELEASED.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Starts the trimming thread (once per process; later calls do nothing).
pub fn start() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        if !TRIMS {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("s3fp-heap-trim".into())
            .spawn(trim_loop);
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the heap trim thread: freed memory stays with the process");
        }
    });
}

/// Whether this build's allocator is glibc's, which this module trims.
const TRIMS: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

fn trim_loop() {
    loop {
        std::thread::sleep(TRIM_INTERVAL);
        let released = RELEASED.load(Ordering::Relaxed);
        if released >= TRIM_AFTER {
            RELEASED.fetch_sub(released, Ordering::Relaxed);
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes no pointer and locks each arena itself
    // while it walks it: any thread may call it at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
