//! Stopping threads with a bounded wait: a thread blocked in the file system (a frozen or
//! hung mount) may never return, and pmvm must still stop and say what it waited for.

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nvdimm::Nvdimm;

/// How long pmvm waits for its vCPU and writeback threads when it stops.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

const POLL: Duration = Duration::from_millis(5);

/// Joins the threads that finish before `deadline`, calling `nudge` while waiting; returns
/// the names of those that did not.
pub fn join_until(
    handles: Vec<JoinHandle<()>>,
    deadline: Instant,
    mut nudge: impl FnMut(),
) -> Vec<String> {
    while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
        nudge();
        std::thread::sleep(POLL);
    }
    let mut stuck = Vec::new();
    for h in handles {
        if !h.is_finished() {
            stuck.push(h.thread().name().unwrap_or("a thread").to_string());
        } else if h.join().is_err() {
            log::error!("a pmvm thread panicked");
        }
    }
    stuck
}

/// The stderr line for threads that did not stop: each with the writeback it is in, if one.
pub fn stuck_line(stuck: &[String], devices: &[std::sync::Arc<Nvdimm>]) -> String {
    let running: Vec<_> = devices
        .iter()
        .filter_map(|d| d.writeback_in_progress())
        .collect();
    let named: Vec<String> = stuck
        .iter()
        .map(|name| {
            let who = thread_role(name);
            match running.iter().find(|w| w.by == who) {
                Some(w) => format!(
                    "{who} (in a writeback of {} for {:.1} s)",
                    w.device,
                    w.running_ms as f64 / 1000.0
                ),
                None => format!("{who} (not in a writeback: blocked in KVM_RUN or the kernel)"),
            }
        })
        .collect();
    format!(
        "gave up waiting after {STOP_TIMEOUT:?} for {}: the file system of a backing file is \
         not answering (frozen, or a hung mount); the flushes they wait for were never \
         acknowledged, nothing more is written back, and the process ends once the file system \
         lets the blocked threads go",
        named.join(", ")
    )
}

/// What `in_flight` calls the thread named `name` (`vcpu0`, `wb-pmem0`).
fn thread_role(name: &str) -> String {
    if let Some(id) = name.strip_prefix("vcpu") {
        format!("vCPU {id}")
    } else if name.starts_with("wb-") {
        "background".into()
    } else {
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_that_finish_are_joined_and_the_others_named() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let done = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(|| {})
            .unwrap();
        let blocked = std::thread::Builder::new()
            .name("vcpu1".into())
            .spawn(move || {
                let _ = rx.recv();
            })
            .unwrap();
        let mut nudged = 0;
        let deadline = Instant::now() + Duration::from_millis(50);
        let stuck = join_until(vec![done, blocked], deadline, || nudged += 1);
        assert_eq!(stuck, vec!["vcpu1".to_string()]);
        assert!(nudged > 0);
        let line = stuck_line(&stuck, &[]);
        assert!(line.contains("vCPU 1 (not in a writeback"), "{line}");
        drop(tx);
    }
}
