//! The one way pmvm takes a mutex.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, also when a thread panicked holding it: every critical section leaves its data
/// whole, so a panic elsewhere (already being reported) does not make the device unusable.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
