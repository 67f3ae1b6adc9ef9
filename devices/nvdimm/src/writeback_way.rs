//! Which way a `persist=adr` writeback of k pages goes, chosen per writeback from what this
//! device measured.
//!
//! Writing back a page that is mapped makes the host kernel take it out of every page table
//! first, KVM's included, page by page inside the `fdatasync`: on a host where KVM does that
//! slowly (shadow paging) it made pmvm's `fdatasync` of 64 guest-mapped pages 1.12-1.21x the
//! same `fdatasync` of a file no guest maps. Unmapping the dirty spans first (one
//! `MADV_DONTNEED` per span) does it for a whole span at once: 5-12% faster flushes from 8 to
//! 64 pages there, but slower for one page (a system call more) and for hundreds (the unmap
//! walks every page of a span). Which way wins depends on the host, so the device keeps the
//! recent cost per page of each way for each power of two of k and takes the cheaper; every
//! [`RETRY_EVERY`]th writeback of a size takes the other way, so the choice follows the host.

use std::sync::Mutex;
use std::time::Duration;

use crate::lock::lock;

/// How a `persist=adr` writeback makes its pages durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Way {
    /// `fdatasync` alone, which takes each mapped page out of the page tables as it goes.
    Sync,
    /// Unmap the dirty spans first, then `fdatasync`.
    UnmapThenSync,
}

impl Way {
    fn index(self) -> usize {
        match self {
            Way::Sync => 0,
            Way::UnmapThenSync => 1,
        }
    }

    fn other(self) -> Way {
        match self {
            Way::Sync => Way::UnmapThenSync,
            Way::UnmapThenSync => Way::Sync,
        }
    }
}

/// Samples kept per way and size: the median of this many resists one writeback that waited
/// behind the host's own I/O.
const SAMPLES: usize = 15;
/// Each way is tried this often in turn before the faster is taken.
const FIRST_TRIES: usize = 5;
/// The writebacks of one size before the device settles on a way.
pub const LEARNING_WRITEBACKS: u64 = 2 * FIRST_TRIES as u64;
/// Once both are known, one writeback in this many of a size takes the slower way.
pub const RETRY_EVERY: u64 = 16;
/// Sizes of writeback told apart: k in [2^i, 2^(i+1)) pages, the last holding every larger k.
const SIZES: usize = 24;
/// The unmapping way is taken only when it costs at least this much less: besides the flush,
/// it makes the guest's next store to each page take a fuller page fault, which this measure
/// does not see.
const UNMAP_MARGIN: f64 = 0.03;

/// Recent microseconds per page of one way at one size, oldest overwritten first.
#[derive(Clone, Debug, Default)]
struct Recent {
    us_per_page: Vec<f64>,
    next: usize,
}

impl Recent {
    fn push(&mut self, v: f64) {
        if self.us_per_page.len() < SAMPLES {
            self.us_per_page.push(v);
        } else {
            self.us_per_page[self.next] = v;
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    fn median(&self) -> f64 {
        let mut v = self.us_per_page.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

#[derive(Clone, Debug, Default)]
struct Size {
    ways: [Recent; 2],
    writebacks: u64,
}

/// Picks the way of each writeback and learns from its time. Called only by the writeback
/// running now (the group commit serialises them), so its lock is never contended.
#[derive(Debug)]
pub struct WayChooser {
    sizes: Mutex<Vec<Size>>,
}

impl Default for WayChooser {
    fn default() -> Self {
        WayChooser {
            sizes: Mutex::new(vec![Size::default(); SIZES]),
        }
    }
}

fn size_of(pages: u64) -> usize {
    (63 - pages.max(1).leading_zeros() as usize).min(SIZES - 1)
}

impl WayChooser {
    /// The way for a writeback of `pages` pages (nothing to unmap with none).
    pub fn choose(&self, pages: u64) -> Way {
        if pages == 0 {
            return Way::Sync;
        }
        let mut sizes = lock(&self.sizes);
        let size = &mut sizes[size_of(pages)];
        size.writebacks += 1;
        let [sync, unmap] = &size.ways;
        let tried = |r: &Recent| r.us_per_page.len();
        if tried(sync) < FIRST_TRIES || tried(unmap) < FIRST_TRIES {
            return if tried(sync) <= tried(unmap) {
                Way::Sync
            } else {
                Way::UnmapThenSync
            };
        }
        let faster = if unmap.median() < sync.median() * (1.0 - UNMAP_MARGIN) {
            Way::UnmapThenSync
        } else {
            Way::Sync
        };
        if size.writebacks % RETRY_EVERY == 0 {
            faster.other()
        } else {
            faster
        }
    }

    /// Records that a writeback of `pages` pages took `took` going `way`.
    pub fn record(&self, pages: u64, way: Way, took: Duration) {
        if pages == 0 {
            return;
        }
        let us_per_page = took.as_secs_f64() * 1e6 / pages as f64;
        lock(&self.sizes)[size_of(pages)].ways[way.index()].push(us_per_page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` writebacks of `pages` pages, each costing what `cost` says for its way; returns
    /// the ways taken.
    fn run(c: &WayChooser, pages: u64, n: usize, cost: impl Fn(Way) -> f64) -> Vec<Way> {
        (0..n)
            .map(|_| {
                let way = c.choose(pages);
                c.record(pages, way, Duration::from_secs_f64(cost(way) * 1e-6));
                way
            })
            .collect()
    }

    fn share(ways: &[Way], way: Way) -> usize {
        ways.iter().filter(|&&w| w == way).count()
    }

    #[test]
    fn tries_both_ways_then_takes_the_cheaper_and_retries_the_other_now_and_then() {
        let c = WayChooser::default();
        let cheap_unmap = |w| if w == Way::UnmapThenSync { 80.0 } else { 100.0 };
        let first = run(&c, 16, 2 * FIRST_TRIES, cheap_unmap);
        assert_eq!(share(&first, Way::Sync), FIRST_TRIES, "{first:?}");
        let later = run(&c, 16, 160, cheap_unmap);
        assert_eq!(share(&later, Way::Sync), 10, "one in 16 retries the slower");
        // Another size is learnt on its own, from its own trials.
        let dear_unmap = |w| {
            if w == Way::UnmapThenSync {
                120.0
            } else {
                100.0
            }
        };
        run(&c, 300, 2 * FIRST_TRIES, dear_unmap);
        assert_eq!(c.choose(300), Way::Sync);
        assert_eq!(
            c.choose(31),
            Way::UnmapThenSync,
            "16 to 31 pages are one size"
        );
        assert_eq!(c.choose(0), Way::Sync, "nothing to unmap");
    }

    #[test]
    fn follows_the_host_when_the_cheaper_way_changes() {
        let c = WayChooser::default();
        run(
            &c,
            64,
            40,
            |w| if w == Way::UnmapThenSync { 5.0 } else { 6.0 },
        );
        assert_eq!(c.choose(64), Way::UnmapThenSync);
        // The unmap became dear: the retries of Sync find it cheaper and win it back.
        let ways = run(
            &c,
            64,
            400,
            |w| {
                if w == Way::UnmapThenSync {
                    9.0
                } else {
                    6.0
                }
            },
        );
        assert!(
            ways[ways.len() - 50..]
                .iter()
                .filter(|&&w| w == Way::Sync)
                .count()
                >= 45
        );
    }

    #[test]
    fn one_slow_writeback_or_a_near_tie_does_not_switch_the_way() {
        let c = WayChooser::default();
        run(
            &c,
            8,
            40,
            |w| if w == Way::UnmapThenSync { 9.0 } else { 10.0 },
        );
        assert_eq!(c.choose(8), Way::UnmapThenSync);
        // One unmapping writeback that waited 100 times longer behind other I/O.
        c.record(8, Way::UnmapThenSync, Duration::from_millis(7));
        assert_eq!(c.choose(8), Way::UnmapThenSync);
        // Within the margin the plain sync stays.
        let tie = WayChooser::default();
        run(&tie, 8, 40, |w| {
            if w == Way::UnmapThenSync {
                9.9
            } else {
                10.0
            }
        });
        assert_eq!(tie.choose(8), Way::Sync);
    }
}
