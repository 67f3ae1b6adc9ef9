//! Group commit under concurrent flushes: the stall added to a flush that arrives while
//! another flush's writeback runs. Two host threads call the flush-hint handler as two vCPUs'
//! exits do: A flushes `BIG` dirty pages; B, a little later, flushes one page and must wait
//! for A's writeback to end before its own (which may not have seen B's store) can run.

use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use nvdimm::{Nvdimm, NvdimmParams, PmemConfig};

use crate::error::BenchError;
use crate::stats::{median, micros};

/// Pages A's flush writes back.
pub const BIG: u64 = 4096;
const PAGE: u64 = 4096;

/// Microseconds, per round.
pub struct Stall {
    /// A's flush of `BIG` pages.
    pub big_us: Vec<f64>,
    /// B's 1-page flush alone.
    pub solo_us: Vec<f64>,
    /// B's 1-page flush arriving during A's writeback.
    pub during_us: Vec<f64>,
}

impl Stall {
    /// Added stall per round: B's latency during A's writeback minus B's median alone.
    pub fn added_us(&self) -> Vec<f64> {
        let solo = median(&self.solo_us);
        self.during_us.iter().map(|d| d - solo).collect()
    }
}

fn flush(dev: &Nvdimm, vcpu: nvdimm::VcpuId) -> f64 {
    let start = Instant::now();
    dev.mmio_write(vcpu, 0, &1u64.to_le_bytes())
        .expect("the flush failed");
    micros(start.elapsed())
}

/// Dirties `pages` pages (every other one, so each is its own run) from page `first`.
fn dirty(dev: &Nvdimm, first: u64, pages: u64, stamp: u64) -> Result<(), BenchError> {
    for i in 0..pages {
        dev.write_bytes((first + 2 * i) * PAGE, &stamp.to_le_bytes())?;
    }
    Ok(())
}

/// `rounds` rounds of each, on a sparse 1 GiB device in `dir`.
pub fn measure(dir: &Path, rounds: usize) -> Result<Stall, BenchError> {
    let cfg = PmemConfig::new(dir.join("stall.img"))
        .with_size(1 << 30)
        .with_sparse(true);
    let params = NvdimmParams {
        index: 0,
        slot: 1,
        guest_base: 1 << 32,
        hint_page: 0xd000_0000,
        default_hints: 2,
        manual_protect: false,
    };
    let dev = Arc::new(Nvdimm::open(&cfg, params)?);
    let far = 2 * BIG + 64;
    // Warm-up: allocate the blocks both flushes write.
    dirty(&dev, 0, BIG, 0)?;
    dirty(&dev, far, 1, 0)?;
    flush(&dev, 0);
    let mut out = Stall {
        big_us: Vec::new(),
        solo_us: Vec::new(),
        during_us: Vec::new(),
    };
    for round in 1..=rounds as u64 {
        dirty(&dev, far, 1, round)?;
        out.solo_us.push(flush(&dev, 1));
        dirty(&dev, 0, BIG, round)?;
        // B arrives a third of a typical big flush after A starts.
        let delay = out.big_us.last().map_or(1000.0, |&us| us / 3.0);
        let a_dev = dev.clone();
        let a = thread::spawn(move || flush(&a_dev, 0));
        thread::sleep(Duration::from_micros(delay as u64));
        dirty(&dev, far, 1, round + 1000)?;
        out.during_us.push(flush(&dev, 1));
        let big = a
            .join()
            .map_err(|_| BenchError::Check("the big flush's thread panicked".into()))?;
        out.big_us.push(big);
    }
    let st = dev.stats();
    if st.errors != 0 {
        return Err(BenchError::Check(format!(
            "{} flushes failed in the group-commit run",
            st.errors
        )));
    }
    Ok(out)
}
