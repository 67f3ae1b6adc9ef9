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
//! recent cost per page of each way for each power of two of k and takes the cheaper; now and
//! then a writeback of a size retries the other way (often at first, rarely while the retries
//! keep confirming the choice), so the choice follows the host.

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
/// Once settled, the other way is retried after this many writebacks of a size; each retry
/// that confirms the choice doubles the wait, up to [`RETRY_MOST`], and one that does not
/// brings it back here. Where one way stays cheaper, the dearer one costs little.
pub const RETRY_FIRST: u64 = 16;
/// The longest wait between retries of the other way.
pub const RETRY_MOST: u64 = 256;
/// Retries that must agree (by their median) before the way switches.
const RETRIES_TO_SWITCH: usize = 5;
/// Sizes of writeback told apart: k in [2^i, 2^(i+1)) pages, the last holding every larger k.
const SIZES: usize = 24;
/// The unmapping way is taken only when it costs at least this much less: besides the flush,
/// it makes the guest's next store to each page take a fuller page fault, which this measure
/// does not see.
const UNMAP_MARGIN: f64 = 0.03;

/// Recent samples of one quantity, oldest overwritten first.
#[derive(Clone, Debug, Default)]
struct Recent {
    samples: Vec<f64>,
    next: usize,
}

impl Recent {
    fn push(&mut self, v: f64) {
        if self.samples.len() < SAMPLES {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % SAMPLES;
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn median(&self) -> f64 {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// The way whose cost makes unmapping `unmap_over_sync` times as dear as syncing alone.
fn cheaper(unmap_over_sync: f64) -> Way {
    if unmap_over_sync < 1.0 - UNMAP_MARGIN {
        Way::UnmapThenSync
    } else {
        Way::Sync
    }
}

#[derive(Clone, Debug, Default)]
struct Size {
    /// Microseconds per page of each way's recent writebacks.
    ways: [Recent; 2],
    /// The way taken, once both are known.
    taken: Option<Way>,
    /// Learning: the cost of the syncing writeback just before, which the next (unmapping)
    /// one is compared with.
    paired_sync: Option<f64>,
    /// Unmapping's cost over syncing's, from writebacks of the same moment, so that a host
    /// that gets slower or faster meanwhile does not tilt the choice (as comparing with a
    /// way's old samples would). Learning: one per pair of writebacks. Then one per retry of
    /// the other way, against the median of the taken way's recent writebacks.
    retries: Recent,
    since_retry: u64,
    retry_every: u64,
}

impl Size {
    /// Learns from a writeback that took `us_per_page` going `way`.
    fn record(&mut self, way: Way, us_per_page: f64) {
        self.ways[way.index()].push(us_per_page);
        let Some(taken) = self.taken else {
            match (way, self.paired_sync.take()) {
                (Way::Sync, _) => self.paired_sync = Some(us_per_page),
                (Way::UnmapThenSync, Some(sync)) => self.retries.push(us_per_page / sync),
                (Way::UnmapThenSync, None) => {}
            }
            if self.retries.len() >= FIRST_TRIES {
                self.settle(cheaper(self.retries.median()));
            }
            return;
        };
        if way == taken {
            return;
        }
        let base = self.ways[taken.index()].median();
        let unmap_over_sync = match way {
            Way::UnmapThenSync => us_per_page / base,
            Way::Sync => base / us_per_page,
        };
        self.retries.push(unmap_over_sync);
        self.retry_every = if cheaper(unmap_over_sync) == taken {
            (self.retry_every * 2).min(RETRY_MOST)
        } else {
            RETRY_FIRST
        };
        if self.retries.len() >= RETRIES_TO_SWITCH && cheaper(self.retries.median()) == way {
            self.settle(way);
        }
    }

    fn settle(&mut self, way: Way) {
        self.taken = Some(way);
        self.retries = Recent::default();
        self.since_retry = 0;
        self.retry_every = RETRY_FIRST;
    }

    fn choose(&mut self) -> Way {
        let Some(taken) = self.taken else {
            // Learning: the two ways in turn, in pairs.
            return if self.paired_sync.is_some() {
                Way::UnmapThenSync
            } else {
                Way::Sync
            };
        };
        self.since_retry += 1;
        if self.since_retry >= self.retry_every {
            self.since_retry = 0;
            taken.other()
        } else {
            taken
        }
    }
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
        lock(&self.sizes)[size_of(pages)].choose()
    }

    /// Records that a writeback of `pages` pages took `took` going `way`.
    pub fn record(&self, pages: u64, way: Way, took: Duration) {
        if pages == 0 {
            return;
        }
        let us_per_page = took.as_secs_f64() * 1e6 / pages as f64;
        lock(&self.sizes)[size_of(pages)].record(way, us_per_page);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `n` writebacks of `pages` pages, each costing what `cost` says for its way; returns
    /// the ways taken.
    fn run(c: &WayChooser, pages: u64, n: usize, mut cost: impl FnMut(Way) -> f64) -> Vec<Way> {
        run_in_time(c, pages, n, |w, _| cost(w))
    }

    /// Like `run`, the cost also depending on the writeback's number from 0.
    fn run_in_time(
        c: &WayChooser,
        pages: u64,
        n: usize,
        mut cost: impl FnMut(Way, usize) -> f64,
    ) -> Vec<Way> {
        (0..n)
            .map(|i| {
                let way = c.choose(pages);
                c.record(pages, way, Duration::from_secs_f64(cost(way, i) * 1e-6));
                way
            })
            .collect()
    }

    /// The positions at which `ways` took `way`.
    fn positions(ways: &[Way], way: Way) -> Vec<usize> {
        (0..ways.len()).filter(|&i| ways[i] == way).collect()
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
        assert_eq!(
            positions(&later, Way::Sync),
            [15, 47, 111],
            "the slower is retried after 16, then 32, then 64 more"
        );
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

    #[test]
    fn retries_grow_rarer_while_they_confirm_the_choice() {
        let c = WayChooser::default();
        let cheap_unmap = |w| if w == Way::UnmapThenSync { 80.0 } else { 100.0 };
        let ways = run(&c, 64, LEARNING_WRITEBACKS as usize + 3000, cheap_unmap);
        let retries = positions(&ways[LEARNING_WRITEBACKS as usize..], Way::Sync);
        let gaps: Vec<usize> = retries.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..5], [32, 64, 128, 256, 256], "{retries:?}");
        assert!(gaps.iter().all(|&g| g <= RETRY_MOST as usize), "{gaps:?}");
        // A retry that finds the other way cheaper makes them frequent again.
        let ways = run(&c, 64, 700, |w| {
            if w == Way::UnmapThenSync {
                100.0
            } else {
                80.0
            }
        });
        let back = positions(&ways, Way::Sync);
        assert!(back.len() > 300, "switched back to Sync: {back:?}");
        assert!(back[0] < RETRY_MOST as usize, "{back:?}");
    }

    #[test]
    fn a_host_growing_slower_does_not_tilt_the_choice() {
        // Unmapping stays 10% cheaper while every writeback costs 0.1% more than the one
        // before (7 times as much after 2000). Comparing the taken way's fresh samples with
        // the other way's, taken hundreds of writebacks earlier, would pick the dearer way.
        let c = WayChooser::default();
        let ways = run_in_time(&c, 16, 2000, |w, i| {
            let host = 100.0 * 1.001f64.powi(i as i32);
            if w == Way::UnmapThenSync {
                0.9 * host
            } else {
                host
            }
        });
        let settled = &ways[LEARNING_WRITEBACKS as usize..];
        assert!(
            share(settled, Way::UnmapThenSync) > settled.len() * 99 / 100,
            "{} of {} unmapped",
            share(settled, Way::UnmapThenSync),
            settled.len()
        );
    }

    #[test]
    fn a_slow_first_writeback_does_not_mislead_the_learning() {
        // Syncing alone is 5% cheaper; the first writeback (which allocates the file's blocks)
        // costs 30 times as much, and each is off by up to 2% either way.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut noise = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            0.98 + 0.04 * (seed % 1000) as f64 / 1000.0
        };
        for trial in 0..50 {
            let c = WayChooser::default();
            run_in_time(&c, 256, LEARNING_WRITEBACKS as usize, |w, i| {
                let first = if i == 0 { 30.0 } else { 1.0 };
                first * noise() * if w == Way::Sync { 95.0 } else { 100.0 }
            });
            assert_eq!(c.choose(256), Way::Sync, "trial {trial}");
        }
    }
}
