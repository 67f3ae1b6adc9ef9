//! Group commit: concurrent flushes of one device share writebacks.
//!
//! A flush is satisfied only by a writeback that *started after it arrived*: one already
//! running when it arrives may have harvested the dirty log before the caller's last stores.
//! Arrivals during a running writeback wait for it to end; then either a writeback that started
//! after they arrived has completed (they take its outcome), or one of them becomes the leader
//! and runs the next writeback for all who are waiting.

use std::sync::{Condvar, Mutex, MutexGuard};

/// Serialises a piece of work and shares each run's outcome with everyone who arrived before it
/// started.
#[derive(Debug, Default)]
pub struct GroupCommit<T> {
    state: Mutex<State<T>>,
    finished: Condvar,
}

#[derive(Debug)]
struct State<T> {
    /// Generation of the most recently started run; runs are numbered from 1.
    started: u64,
    /// Generation of the most recently finished run.
    completed: u64,
    running: bool,
    /// Callers waiting for a run to finish: the leader wakes them only if there are any (a
    /// wake is a system call, on the path of every flush).
    waiting: usize,
    /// Outcome of run `completed`.
    last: Option<T>,
}

impl<T> Default for State<T> {
    fn default() -> Self {
        State {
            started: 0,
            completed: 0,
            running: false,
            waiting: 0,
            last: None,
        }
    }
}

/// The outcome a caller got, and whether it ran the work itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed<T> {
    pub outcome: T,
    pub led: bool,
}

impl<T: Clone> GroupCommit<T> {
    pub fn new() -> Self {
        GroupCommit {
            state: Mutex::new(State::default()),
            finished: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panicking leader resets `running` in its guard, so the state is consistent.
        crate::lock::lock(&self.state)
    }

    /// Returns the outcome of a run of `work` that started after this call began, running it on
    /// this thread if no other thread does.
    pub fn commit(&self, work: impl FnOnce() -> T) -> Committed<T> {
        let mut state = self.lock();
        let needed = state.started + 1;
        loop {
            if state.completed >= needed {
                if let Some(outcome) = state.last.clone() {
                    return Committed {
                        outcome,
                        led: false,
                    };
                }
            }
            if !state.running {
                break;
            }
            state.waiting += 1;
            state = self.finished.wait(state).unwrap_or_else(|e| e.into_inner());
            state.waiting -= 1;
        }
        state.started += 1;
        state.running = true;
        let generation = state.started;
        drop(state);

        let leader = Leader { group: self };
        let outcome = work();
        let mut state = self.lock();
        state.completed = generation;
        state.last = Some(outcome.clone());
        drop(state);
        drop(leader);
        Committed { outcome, led: true }
    }
}

/// Ends the leader's run, also when the work panics, and wakes the waiters.
struct Leader<'a, T> {
    group: &'a GroupCommit<T>,
}

impl<T> Drop for Leader<'_, T> {
    fn drop(&mut self) {
        let mut state = crate::lock::lock(&self.group.state);
        state.running = false;
        let waiting = state.waiting > 0;
        drop(state);
        if waiting {
            self.group.finished.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Barrier};
    use std::thread;
    use std::time::Duration;

    #[test]
    fn a_lone_caller_leads() {
        let g = GroupCommit::new();
        assert_eq!(
            g.commit(|| 7),
            Committed {
                outcome: 7,
                led: true
            }
        );
        assert_eq!(
            g.commit(|| 8),
            Committed {
                outcome: 8,
                led: true
            }
        );
    }

    #[test]
    fn arrivals_during_a_run_wait_for_a_later_run() {
        let g = Arc::new(GroupCommit::new());
        let runs = Arc::new(AtomicU64::new(0));
        let in_first = Arc::new(Barrier::new(2));
        let first = {
            let (g, runs, in_first) = (g.clone(), runs.clone(), in_first.clone());
            thread::spawn(move || {
                g.commit(|| {
                    in_first.wait();
                    thread::sleep(Duration::from_millis(100));
                    runs.fetch_add(1, Ordering::SeqCst)
                })
            })
        };
        in_first.wait();
        // These arrive while run 0 is in progress: none may take its outcome.
        let late: Vec<_> = (0..4)
            .map(|_| {
                let (g, runs) = (g.clone(), runs.clone());
                thread::spawn(move || g.commit(|| runs.fetch_add(1, Ordering::SeqCst)))
            })
            .collect();
        assert_eq!(first.join().unwrap().outcome, 0);
        let outcomes: Vec<_> = late.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(outcomes.iter().all(|c| c.outcome >= 1), "{outcomes:?}");
        assert!(outcomes.iter().any(|c| c.led));
        let total = runs.load(Ordering::SeqCst);
        assert!((2..=5).contains(&total), "{total} runs");
    }

    #[test]
    fn a_panicking_leader_does_not_wedge_the_group() {
        let g = Arc::new(GroupCommit::new());
        let g2 = g.clone();
        let r = thread::spawn(move || g2.commit(|| -> u32 { panic!("writeback exploded") })).join();
        assert!(r.is_err());
        assert_eq!(g.commit(|| 3).outcome, 3);
    }
}
