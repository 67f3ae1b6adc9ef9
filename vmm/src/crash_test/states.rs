//! Crash states at cache-line granularity. A crash after flush epoch N leaves the image as of
//! epoch N plus any subset of the 64-byte lines that epoch N+1 changed: on persistent memory
//! lines reach the media in any order until a flush orders them. A larger atomic unit (say
//! 4096, a device that writes whole blocks or nothing) groups lines into units.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use nvdimm::flush_log::{FileSource, FlushLog, SplitMix64};

/// The unit in which stores reach persistent memory: a cache line.
pub const LINE: usize = 64;
const PAGE: usize = 4096;

/// One changed atomic unit of the data area: its offset there and its contents after the
/// flush.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// Which lines of the next epoch a state keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Subset {
    /// Bit i keeps line i: the exhaustive enumeration of a small epoch.
    Mask(u64),
    /// A pseudo-random subset drawn from this seed.
    Seed(u64),
}

impl Subset {
    /// Whether each of `n` lines is kept.
    pub fn keeps(self, n: usize) -> Vec<bool> {
        match self {
            Subset::Mask(m) => (0..n).map(|i| i < 64 && m >> i & 1 == 1).collect(),
            Subset::Seed(s) => {
                let mut rng = SplitMix64::new(s);
                // Mostly-none and mostly-all subsets find ordering bugs a fair coin rarely hits.
                let threshold = match rng.next_u64() % 3 {
                    0 => u64::MAX / 2,
                    1 => u64::MAX / 16,
                    _ => u64::MAX / 16 * 15,
                };
                (0..n).map(|_| rng.next_u64() < threshold).collect()
            }
        }
    }

    /// `mask:1f` or `seed:9e3779b97f4a7c15`, as `--subset` takes it.
    pub fn parse(text: &str) -> Result<Subset, String> {
        let hex = |h: &str| u64::from_str_radix(h, 16).map_err(|e| format!("{text:?}: {e}"));
        match text.split_once(':') {
            Some(("mask", h)) => Ok(Subset::Mask(hex(h)?)),
            Some(("seed", h)) => Ok(Subset::Seed(hex(h)?)),
            _ => Err(format!(
                "{text:?} is not a subset: use mask:<hex> or seed:<hex>, as a violation names it"
            )),
        }
    }
}

impl fmt::Display for Subset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subset::Mask(m) => write!(f, "mask:{m:x}"),
            Subset::Seed(s) => write!(f, "seed:{s:016x}"),
        }
    }
}

/// One crash state: after epoch `epoch`, with `subset` of the next epoch's changed lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateId {
    pub epoch: u64,
    pub subset: Subset,
}

/// For every epoch N of a log (0 = the base image), the lines epoch N+1 changed in the data
/// area.
#[derive(Debug)]
pub struct Plan {
    pub data_offset: u64,
    /// `lines[n]`: the lines of epoch n+1 that differ from the image as of epoch n.
    pub lines: Vec<Vec<Line>>,
}

impl Plan {
    pub fn last_epoch(&self) -> u64 {
        self.lines.len() as u64
    }

    /// The lines the crash after `epoch` may or may not have written.
    pub fn next_lines(&self, epoch: u64) -> &[Line] {
        usize::try_from(epoch)
            .ok()
            .and_then(|e| self.lines.get(e))
            .map_or(&[], Vec::as_slice)
    }
}

/// Whether `unit` is a power of two from a cache line to a page.
pub fn valid_unit(unit: usize) -> bool {
    unit.is_power_of_two() && (LINE..=PAGE).contains(&unit)
}

/// Replays `log` over `base`, diffing each epoch's pages against the image before it in
/// aligned units of `unit` bytes (see [`valid_unit`]).
pub fn plan(
    src: &FileSource,
    log: &FlushLog,
    base: &File,
    data_offset: u64,
    unit: usize,
) -> io::Result<Plan> {
    if !valid_unit(unit) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("atomic unit {unit} is not a power of two from {LINE} to {PAGE}"),
        ));
    }
    let first_page = data_offset / PAGE as u64;
    let mut image: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut lines = Vec::with_capacity(log.epochs.len());
    let mut new = vec![0u8; PAGE];
    for epoch in &log.epochs {
        let mut changed = Vec::new();
        for (i, &page) in epoch.pages.iter().enumerate() {
            if page < first_page {
                continue;
            }
            log.read_page(src, epoch, i, &mut new)?;
            let old = match image.entry(page) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    let mut buf = vec![0u8; PAGE];
                    base.read_exact_at(&mut buf, page * PAGE as u64)?;
                    v.insert(buf)
                }
            };
            for (at, (o, n)) in old.chunks(unit).zip(new.chunks(unit)).enumerate() {
                if o != n {
                    changed.push(Line {
                        offset: page * PAGE as u64 - data_offset + (at * unit) as u64,
                        bytes: n.to_vec(),
                    });
                }
            }
            old.copy_from_slice(&new);
        }
        lines.push(changed);
    }
    Ok(Plan { data_offset, lines })
}

/// The states to check: for every epoch, all subsets but the full one when there are at most
/// `per_epoch` of them, else the empty subset and `per_epoch - 1` seeded ones. The last epoch
/// has one state, its own image.
pub fn enumerate(plan: &Plan, per_epoch: u32, seed: u64) -> Vec<StateId> {
    let per_epoch = u64::from(per_epoch.max(1));
    let mut states = Vec::new();
    for epoch in 0..=plan.last_epoch() {
        let n = plan.next_lines(epoch).len();
        let all = if n < 63 { (1u64 << n) - 1 } else { u64::MAX };
        if all <= per_epoch {
            states.extend((0..all.max(1)).map(|m| StateId {
                epoch,
                subset: Subset::Mask(m),
            }));
            continue;
        }
        states.push(StateId {
            epoch,
            subset: Subset::Mask(0),
        });
        let mut rng = SplitMix64::new(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        states.extend((1..per_epoch).map(|_| StateId {
            epoch,
            subset: Subset::Seed(rng.next_u64()),
        }));
    }
    states
}

/// Writes the lines of `state` that it keeps into `image` (the data area as of its epoch,
/// starting at offset `at` of the file).
pub fn apply_lines(plan: &Plan, state: StateId, image: &File, at: u64) -> io::Result<usize> {
    let lines = plan.next_lines(state.epoch);
    let mut kept = 0;
    for (line, keep) in lines.iter().zip(state.subset.keeps(lines.len())) {
        if keep {
            image.write_all_at(&line.bytes, at + line.offset)?;
            kept += 1;
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvdimm::flush_log::FlushLogWriter;

    /// A 4-page device whose data area is pages 1..4; epoch 1 changes lines 0 and 5 of page 1
    /// and all of page 0 (outside the data area); epoch 2 changes line 63 of page 3.
    fn fixture() -> (tempfile::TempDir, Plan) {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base");
        std::fs::write(&base, vec![0u8; 4 * PAGE]).unwrap();
        let log = dir.path().join("log");
        let mut w = FlushLogWriter::create(&log, 4 * PAGE as u64).unwrap();
        w.append(0, 1, &[0, 1], |page, buf| {
            buf.fill(0);
            if page == 0 {
                buf.fill(9);
            } else {
                buf[3] = 1;
                buf[5 * LINE] = 2;
            }
            Ok(())
        })
        .unwrap();
        w.append(0, 2, &[3], |_, buf| {
            buf.fill(0);
            buf[PAGE - 1] = 3;
            Ok(())
        })
        .unwrap();
        drop(w);
        let src = FileSource::open(&log).unwrap();
        let parsed = FlushLog::read(&src).unwrap();
        let base = File::open(&base).unwrap();
        let plan = plan(&src, &parsed, &base, PAGE as u64, LINE).unwrap();
        let pages = super::plan(&src, &parsed, &base, PAGE as u64, PAGE).unwrap();
        assert_eq!(pages.next_lines(0).len(), 1, "one 4K unit holds both lines");
        assert_eq!(pages.next_lines(0)[0].bytes.len(), PAGE);
        assert!(super::plan(&src, &parsed, &base, PAGE as u64, 96).is_err());
        (dir, plan)
    }

    #[test]
    fn plan_finds_the_changed_lines_of_the_data_area() {
        let (_dir, plan) = fixture();
        let offsets =
            |e: u64| -> Vec<u64> { plan.next_lines(e).iter().map(|l| l.offset).collect() };
        assert_eq!(offsets(0), vec![0, 5 * LINE as u64]);
        assert_eq!(offsets(1), vec![2 * PAGE as u64 + 63 * LINE as u64]);
        assert_eq!(offsets(2), Vec::<u64>::new());
        assert_eq!(plan.next_lines(0)[1].bytes[0], 2);
    }

    #[test]
    fn small_epochs_are_exhaustive_and_large_ones_bounded_and_repeatable() {
        let (_dir, plan) = fixture();
        let states = enumerate(&plan, 8, 1);
        let masks: Vec<(u64, Subset)> = states.iter().map(|s| (s.epoch, s.subset)).collect();
        assert_eq!(
            masks,
            vec![
                (0, Subset::Mask(0)),
                (0, Subset::Mask(1)),
                (0, Subset::Mask(2)),
                (1, Subset::Mask(0)),
                (2, Subset::Mask(0)),
            ]
        );
        let big = Plan {
            data_offset: 0,
            lines: vec![(0..40)
                .map(|i| Line {
                    offset: i * LINE as u64,
                    bytes: vec![1; LINE],
                })
                .collect()],
        };
        let a = enumerate(&big, 16, 7);
        assert_eq!(a.len(), 16 + 1);
        assert_eq!(a, enumerate(&big, 16, 7));
        assert_ne!(a, enumerate(&big, 16, 8));
        let kept: Vec<usize> = a[1..16]
            .iter()
            .map(|s| s.subset.keeps(40).iter().filter(|&&k| k).count())
            .collect();
        assert!(kept.iter().any(|&k| k > 0 && k < 40), "{kept:?}");
        assert!(kept.windows(2).any(|w| w[0] != w[1]), "{kept:?}");
    }

    #[test]
    fn subsets_print_and_parse_back() {
        for s in [Subset::Mask(0x1f), Subset::Seed(0x9e37_79b9_7f4a_7c15)] {
            assert_eq!(Subset::parse(&s.to_string()), Ok(s));
        }
        assert!(Subset::parse("7").is_err());
        assert!(Subset::parse("mask:xyz").is_err());
        assert_eq!(Subset::Mask(0b101).keeps(3), vec![true, false, true]);
    }
}
