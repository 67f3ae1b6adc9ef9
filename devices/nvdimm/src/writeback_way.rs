//! Which way a `persist=adr` writeback of k pages goes, chosen per writeback from what this
//! device measured. The `fdatasync` that makes the pages durable can be preceded by two steps,
//! each of which pays off on some hosts for some k and costs on others:
//!
//! - **Unmap.** Writing back a page that is mapped makes the host kernel take it out of every
//!   page table first, KVM's included, page by page inside the `fdatasync`: on a host where
//!   KVM does that slowly (shadow paging) it made pmvm's `fdatasync` of 64 guest-mapped pages
//!   1.12-1.21x the same `fdatasync` of a file no guest maps. Unmapping the dirty spans first
//!   (one `MADV_DONTNEED` per span) does it for a whole span at once: 5-12% faster flushes
//!   from 8 to 64 pages there, but slower for one page (a system call more) and for hundreds
//!   (the unmap walks every page of a span).
//! - **Submit.** `sync_file_range(WRITE)` per run starts each run's I/O as soon as it is
//!   found, where the `fdatasync` collects them all first: 16 scattered pages 5-9% faster on
//!   a slow disk, but from 64 pages on the system call per run costs more than it saves.
//!
//! So the device keeps the recent cost per page of each choice for each power of two of k and
//! takes the cheaper: it learns the unmap first and then, with the unmap settled, the submit,
//! so that the two never vary together. Now and then a writeback of a size retries the other
//! choice of a step (often at first, rarely while the retries keep confirming it), so the
//! choice follows the host.

use std::sync::Mutex;
use std::time::Duration;

use crate::lock::lock;

/// How a `persist=adr` writeback makes its pages durable: an `fdatasync`, after the steps taken.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Way {
    /// Unmap the dirty spans from the guest first.
    pub unmap: bool,
    /// Start each run's I/O (`sync_file_range(WRITE)`) before the `fdatasync`.
    pub submit: bool,
}

impl Way {
    /// The `fdatasync` alone, which takes each mapped page out of the page tables as it goes.
    pub const SYNC: Way = Way {
        unmap: false,
        submit: false,
    };
}

/// Samples kept per choice and size: the median of this many resists one writeback that
/// waited behind the host's own I/O.
const SAMPLES: usize = 15;
/// Learning compares a step's two choices in quads, without-with-with-without or the mirror,
/// so that neither always comes first of a pair and meets what that one meets (a disk left
/// idle, the host writeback the one before started). One writeback's cost is off by up to
/// 20% where the disk also serves the host's own I/O, while the choices can differ by 5-10%:
/// the median of this many quads tells them apart where 5 lone pairs did not (a 64 GiB device
/// settled on the dearer way at 16 pages).
const LEARNING_QUADS: usize = 12;
/// The writebacks of one size in which one step is learnt.
pub const STEP_LEARNING_WRITEBACKS: u64 = 4 * LEARNING_QUADS as u64;
/// The writebacks of one size before the device has settled both steps.
pub const LEARNING_WRITEBACKS: u64 = 2 * STEP_LEARNING_WRITEBACKS;
/// Once settled, the other choice is retried after this many writebacks of a size; each retry
/// that confirms the choice doubles the wait, up to [`RETRY_MOST`], and one that does not
/// brings it back here. Where one choice stays cheaper, the dearer one costs little.
pub const RETRY_FIRST: u64 = 16;
/// The longest wait between retries of the other choice.
pub const RETRY_MOST: u64 = 256;
/// Retries that must agree (by their median) before the choice switches.
const RETRIES_TO_SWITCH: usize = 5;
/// Sizes of writeback told apart: k in [2^i, 2^(i+1)) pages, the last holding every larger k.
const SIZES: usize = 24;
/// Unmapping is taken only when it costs at least this much less: besides the flush, it makes
/// the guest's next store to each page take a fuller page fault, which this measure does not
/// see.
const UNMAP_MARGIN: f64 = 0.03;
/// Submitting costs nothing outside the flush; the margin only keeps near-ties on the plainer
/// way.
const SUBMIT_MARGIN: f64 = 0.01;

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
        let n = v.len();
        // Of an even count, the mean of the middle two: the upper alone tilts a near-tie.
        if n % 2 == 0 {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        } else {
            v[n / 2]
        }
    }
}

/// Whether to take one step for one size of writeback.
#[derive(Clone, Debug)]
struct Step {
    /// Take it only when it costs at least this fraction less.
    margin: f64,
    /// Microseconds per page of the recent writebacks without and with the step.
    costs: [Recent; 2],
    /// The choice, once both are known.
    taken: Option<bool>,
    /// Learning: the choice and cost of the first writeback of the pair under way.
    pair_first: Option<(bool, f64)>,
    /// Learning: the cost with the step over without it in the quad's first pair.
    quad_first: Option<f64>,
    /// The cost with the step over without it, from writebacks of the same moment, so that a
    /// host that gets slower or faster meanwhile does not tilt the choice (as comparing with
    /// old samples would). Learning: one per quad of writebacks. Then one per retry of the
    /// other choice, against the median of the taken one's recent writebacks.
    retries: Recent,
    since_retry: u64,
    retry_every: u64,
}

impl Step {
    fn new(margin: f64) -> Step {
        Step {
            margin,
            costs: Default::default(),
            taken: None,
            pair_first: None,
            quad_first: None,
            retries: Recent::default(),
            since_retry: 0,
            retry_every: RETRY_FIRST,
        }
    }

    /// Whether a step that makes a writeback `with_over_without` times as dear is worth it.
    fn cheaper(&self, with_over_without: f64) -> bool {
        with_over_without < 1.0 - self.margin
    }

    /// Learns from a writeback that took `us_per_page` with the step or without.
    fn record(&mut self, with: bool, us_per_page: f64) {
        self.costs[usize::from(with)].push(us_per_page);
        let Some(taken) = self.taken else {
            let pair = match self.pair_first.take() {
                Some((false, without)) if with => us_per_page / without,
                Some((true, with_cost)) if !with => with_cost / us_per_page,
                _ => {
                    self.pair_first = Some((with, us_per_page));
                    return;
                }
            };
            match self.quad_first.take() {
                // The geometric mean: what being first of a pair adds, or takes, cancels.
                Some(first) => self.retries.push((first * pair).sqrt()),
                None => self.quad_first = Some(pair),
            }
            if self.retries.len() >= LEARNING_QUADS {
                self.settle(self.cheaper(self.retries.median()));
            }
            return;
        };
        if with == taken {
            return;
        }
        let base = self.costs[usize::from(taken)].median();
        let with_over_without = if with {
            us_per_page / base
        } else {
            base / us_per_page
        };
        self.retries.push(with_over_without);
        self.retry_every = if self.cheaper(with_over_without) == taken {
            (self.retry_every * 2).min(RETRY_MOST)
        } else {
            RETRY_FIRST
        };
        if self.retries.len() >= RETRIES_TO_SWITCH && self.cheaper(self.retries.median()) == with {
            self.settle(with);
        }
    }

    fn settle(&mut self, with: bool) {
        self.taken = Some(with);
        self.retries = Recent::default();
        self.since_retry = 0;
        self.retry_every = RETRY_FIRST;
    }

    fn choose(&mut self) -> bool {
        let Some(taken) = self.taken else {
            return match (self.pair_first, self.quad_first) {
                (Some((first, _)), _) => !first,
                (None, first_pair) => first_pair.is_some(),
            };
        };
        self.since_retry += 1;
        if self.since_retry >= self.retry_every {
            self.since_retry = 0;
            !taken
        } else {
            taken
        }
    }
}

/// The two steps for one size of writeback.
#[derive(Clone, Debug)]
struct Size {
    unmap: Step,
    submit: Step,
}

impl Size {
    /// Whether the submit step is being chosen: only on writebacks that take the unmap's
    /// settled choice, not while it learns or on its retries.
    fn submit_counts(&self, unmap: bool) -> bool {
        self.unmap.taken == Some(unmap)
    }

    fn choose(&mut self) -> Way {
        let unmap = self.unmap.choose();
        let submit = if self.submit_counts(unmap) {
            self.submit.choose()
        } else {
            self.submit.taken.unwrap_or(false)
        };
        Way { unmap, submit }
    }

    fn record(&mut self, way: Way, us_per_page: f64) {
        if self.submit_counts(way.unmap) {
            self.submit.record(way.submit, us_per_page);
        }
        self.unmap.record(way.unmap, us_per_page);
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
        let size = Size {
            unmap: Step::new(UNMAP_MARGIN),
            submit: Step::new(SUBMIT_MARGIN),
        };
        WayChooser {
            sizes: Mutex::new(vec![size; SIZES]),
        }
    }
}

fn size_of(pages: u64) -> usize {
    (63 - pages.max(1).leading_zeros() as usize).min(SIZES - 1)
}

impl WayChooser {
    /// The way for a writeback of `pages` pages (nothing to unmap or submit with none).
    pub fn choose(&self, pages: u64) -> Way {
        if pages == 0 {
            return Way::SYNC;
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

    const UNMAP: Way = Way {
        unmap: true,
        submit: false,
    };

    /// The positions at which `ways` unmapped first, or did not.
    fn positions(ways: &[Way], unmap: bool) -> Vec<usize> {
        (0..ways.len())
            .filter(|&i| ways[i].unmap == unmap)
            .collect()
    }

    fn share(ways: &[Way], unmap: bool) -> usize {
        ways.iter().filter(|w| w.unmap == unmap).count()
    }

    /// Writebacks enough to learn the unmap step and go on a little.
    const PAST_LEARNING: usize = STEP_LEARNING_WRITEBACKS as usize + 8;

    /// Costs by whether the way unmaps.
    fn by_unmap(with: f64, without: f64) -> impl Fn(Way) -> f64 {
        move |w| if w.unmap { with } else { without }
    }

    /// Repeatable factors within `spread` of 1 either way (xorshift from `seed`).
    fn noise(mut seed: u64, spread: f64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            1.0 - spread + 2.0 * spread * (seed % 1000) as f64 / 1000.0
        }
    }

    #[test]
    fn tries_both_ways_then_takes_the_cheaper_and_retries_the_other_now_and_then() {
        let c = WayChooser::default();
        let cheap_unmap = by_unmap(80.0, 100.0);
        let first = run(&c, 16, STEP_LEARNING_WRITEBACKS as usize, &cheap_unmap);
        assert_eq!(
            share(&first, false),
            STEP_LEARNING_WRITEBACKS as usize / 2,
            "{first:?}"
        );
        assert_eq!(
            first[..4].iter().map(|w| w.unmap).collect::<Vec<_>>(),
            [false, true, true, false]
        );
        let later = run(&c, 16, 160, cheap_unmap);
        assert_eq!(
            positions(&later, false),
            [15, 47, 111],
            "the slower is retried after 16, then 32, then 64 more"
        );
        // Another size is learnt on its own, from its own trials.
        let dear_unmap = by_unmap(120.0, 100.0);
        run(&c, 300, STEP_LEARNING_WRITEBACKS as usize, dear_unmap);
        assert!(!c.choose(300).unmap);
        assert!(c.choose(31).unmap, "16 to 31 pages are one size");
        assert_eq!(c.choose(0), Way::SYNC, "nothing to unmap or submit");
    }

    #[test]
    fn learns_the_submit_once_the_unmap_has_settled() {
        let step = STEP_LEARNING_WRITEBACKS as usize;
        for (submit_cost, unmap_cost, want) in [
            (
                0.8,
                1.0,
                Way {
                    unmap: false,
                    submit: true,
                },
            ),
            (1.2, 1.0, Way::SYNC),
            (
                0.9,
                0.9,
                Way {
                    unmap: true,
                    submit: true,
                },
            ),
            (
                1.1,
                0.9,
                Way {
                    unmap: true,
                    submit: false,
                },
            ),
        ] {
            let c = WayChooser::default();
            let ways = run(&c, 16, 2 * step + 200, |w: Way| {
                let f = |taken, cost| if taken { cost } else { 1.0 };
                100.0 * f(w.submit, submit_cost) * f(w.unmap, unmap_cost)
            });
            assert!(ways[..step].iter().all(|w| !w.submit), "{ways:?}");
            let submits: Vec<bool> = ways[step..step + 4].iter().map(|w| w.submit).collect();
            assert_eq!(
                submits,
                [false, true, true, false],
                "the submit learns in quads"
            );
            // Past the learning, every writeback takes the cheaper way but the rare retries.
            let settled = &ways[2 * step + 8..];
            let right = settled.iter().filter(|&&w| w == want).count();
            assert!(
                right >= settled.len() - 6,
                "{want:?}: {right} of {}",
                settled.len()
            );
        }
    }

    #[test]
    fn follows_the_host_when_the_cheaper_way_changes() {
        let c = WayChooser::default();
        run(&c, 64, PAST_LEARNING, by_unmap(5.0, 6.0));
        assert!(c.choose(64).unmap);
        // The unmap became dear: the retries without it find it cheaper and win it back.
        let ways = run(&c, 64, 400, by_unmap(9.0, 6.0));
        assert!(
            ways[ways.len() - 50..]
                .iter()
                .filter(|&&w| !w.unmap)
                .count()
                >= 45
        );
    }

    #[test]
    fn one_slow_writeback_or_a_near_tie_does_not_switch_the_way() {
        let c = WayChooser::default();
        run(&c, 8, PAST_LEARNING, by_unmap(9.0, 10.0));
        assert!(c.choose(8).unmap);
        // One unmapping writeback that waited 100 times longer behind other I/O.
        c.record(8, UNMAP, Duration::from_millis(7));
        assert!(c.choose(8).unmap);
        // Within the margin the plain sync stays.
        let tie = WayChooser::default();
        run(&tie, 8, PAST_LEARNING, by_unmap(9.9, 10.0));
        assert!(!tie.choose(8).unmap);
    }

    #[test]
    fn retries_grow_rarer_while_they_confirm_the_choice() {
        let c = WayChooser::default();
        let cheap_unmap = by_unmap(80.0, 100.0);
        let ways = run(
            &c,
            64,
            STEP_LEARNING_WRITEBACKS as usize + 3000,
            cheap_unmap,
        );
        let retries = positions(&ways[STEP_LEARNING_WRITEBACKS as usize..], false);
        let gaps: Vec<usize> = retries.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps[..5], [32, 64, 128, 256, 256], "{retries:?}");
        assert!(gaps.iter().all(|&g| g <= RETRY_MOST as usize), "{gaps:?}");
        // A retry that finds the other way cheaper makes them frequent again.
        let ways = run(&c, 64, 700, by_unmap(100.0, 80.0));
        let back = positions(&ways, false);
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
            if w.unmap {
                0.9 * host
            } else {
                host
            }
        });
        let settled = &ways[STEP_LEARNING_WRITEBACKS as usize..];
        assert!(
            share(settled, true) > settled.len() * 99 / 100,
            "{} of {} unmapped",
            share(settled, true),
            settled.len()
        );
    }

    #[test]
    fn noise_and_the_place_in_a_pair_do_not_mislead_the_learning() {
        // Each writeback off by up to 10% either way, and the first of each pair 15% dearer
        // (it meets a disk left idle). Learning from pairs that always put syncing first took
        // unmapping for 0.91 of syncing's cost when it was 5% dearer.
        let mut noise = noise(0x9e37_79b9_7f4a_7c15, 0.1);
        for (sync, unmap, want) in [(100.0, 105.0, false), (100.0, 90.0, true)] {
            let mut right = 0;
            for _ in 0..50 {
                let c = WayChooser::default();
                run_in_time(&c, 16, STEP_LEARNING_WRITEBACKS as usize, |w, i| {
                    let place = if i % 2 == 0 { 1.15 } else { 1.0 };
                    place * noise() * if !w.unmap { sync } else { unmap }
                });
                right += usize::from(c.choose(16).unmap == want);
            }
            assert!(right >= 48, "unmap={want} taken in {right} of 50 learnings");
        }
    }

    #[test]
    fn a_slow_first_writeback_does_not_mislead_the_learning() {
        // Syncing alone is 5% cheaper; the first writeback (which allocates the file's blocks)
        // costs 30 times as much, and each is off by up to 2% either way.
        let mut noise = noise(0x2545_f491_4f6c_dd1d, 0.02);
        for trial in 0..50 {
            let c = WayChooser::default();
            run_in_time(&c, 256, STEP_LEARNING_WRITEBACKS as usize, |w, i| {
                let first = if i == 0 { 30.0 } else { 1.0 };
                first * noise() * if !w.unmap { 95.0 } else { 100.0 }
            });
            assert!(!c.choose(256).unmap, "trial {trial}");
        }
    }
}
