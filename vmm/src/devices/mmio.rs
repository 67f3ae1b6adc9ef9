//! Guest MMIO outside every memslot: address ranges and the device behind each, which sees
//! only offsets inside its own range.

use std::sync::Arc;

use nvdimm::VcpuId;

use crate::pmem::FlushFailure;

/// A device reached by MMIO exits.
pub trait MmioDevice: Send + Sync {
    fn read(&self, offset: u64, data: &mut [u8]);

    /// `Err` when the write is a flush (or a store) that did not become durable: the vCPU
    /// must not complete it.
    fn write(&self, vcpu: VcpuId, offset: u64, data: &[u8]) -> Result<(), FlushFailure>;
}

/// A range that is empty, wraps, or overlaps one already placed: a layout bug.
#[derive(Debug, thiserror::Error)]
#[error("MMIO range {base:#x} + {size:#x} is empty or overlaps another")]
pub struct MmioOverlap {
    pub base: u64,
    pub size: u64,
}

/// The MMIO ranges, sorted by base; none overlap.
#[derive(Default)]
pub struct MmioRanges(Vec<(u64, u64, Arc<dyn MmioDevice>)>);

impl MmioRanges {
    /// Places `device` at `base..base + size`.
    pub fn insert(
        &mut self,
        base: u64,
        size: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), MmioOverlap> {
        let overlap = MmioOverlap { base, size };
        let Some(end) = base.checked_add(size).filter(|_| size > 0) else {
            return Err(overlap);
        };
        let at = self.0.partition_point(|(b, ..)| *b < base);
        let after_previous = at == 0 || {
            let (b, s, _) = &self.0[at - 1];
            b + s <= base
        };
        let before_next = self.0.get(at).is_none_or(|(b, ..)| end <= *b);
        if !(after_previous && before_next) {
            return Err(overlap);
        }
        self.0.insert(at, (base, size, device));
        Ok(())
    }

    /// The device whose range holds `addr`, and the offset in that range.
    fn find(&self, addr: u64) -> Option<(&dyn MmioDevice, u64)> {
        let at = self.0.partition_point(|(b, ..)| *b <= addr);
        let (base, size, device) = self.0.get(at.checked_sub(1)?)?;
        let offset = addr - base;
        (offset < *size).then_some((&**device, offset))
    }

    /// A read; false if no range holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((device, offset)) = self.find(addr) else {
            return false;
        };
        device.read(offset, data);
        true
    }

    /// A write by vCPU `vcpu`; None if no range holds `addr`.
    pub fn write(&self, vcpu: VcpuId, addr: u64, data: &[u8]) -> Option<Result<(), FlushFailure>> {
        let (device, offset) = self.find(addr)?;
        Some(device.write(vcpu, offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records the offsets it sees; reads return its tag.
    struct Probe {
        tag: u8,
        writes: Mutex<Vec<(VcpuId, u64)>>,
    }

    impl MmioDevice for Probe {
        fn read(&self, _offset: u64, data: &mut [u8]) {
            data.fill(self.tag);
        }

        fn write(&self, vcpu: VcpuId, offset: u64, _data: &[u8]) -> Result<(), FlushFailure> {
            self.writes.lock().unwrap().push((vcpu, offset));
            Ok(())
        }
    }

    fn probe(tag: u8) -> Arc<Probe> {
        Arc::new(Probe {
            tag,
            writes: Mutex::new(Vec::new()),
        })
    }

    #[test]
    fn each_address_reaches_the_range_that_holds_it_at_its_offset() {
        let (a, b) = (probe(1), probe(2));
        let mut ranges = MmioRanges::default();
        ranges.insert(0x2000, 0x1000, b.clone()).unwrap();
        ranges.insert(0x1000, 0x1000, a.clone()).unwrap();
        for (addr, want) in [
            (0xfff, None),
            (0x1000, Some(1)),
            (0x1fff, Some(1)),
            (0x2000, Some(2)),
            (0x2fff, Some(2)),
            (0x3000, None),
        ] {
            let mut byte = [0u8; 1];
            assert_eq!(ranges.read(addr, &mut byte), want.is_some(), "{addr:#x}");
            assert_eq!(byte[0], want.unwrap_or(0), "{addr:#x}");
        }
        assert_eq!(ranges.write(3, 0x1008, &[1; 8]), Some(Ok(())));
        assert_eq!(ranges.write(0, 0x2fff, &[1]), Some(Ok(())));
        assert_eq!(ranges.write(0, 0x3000, &[1]), None);
        assert_eq!(*a.writes.lock().unwrap(), vec![(3, 8)]);
        assert_eq!(*b.writes.lock().unwrap(), vec![(0, 0xfff)]);
    }

    #[test]
    fn empty_wrapping_and_overlapping_ranges_are_refused() {
        let mut ranges = MmioRanges::default();
        ranges.insert(0x1000, 0x1000, probe(1)).unwrap();
        for (base, size) in [
            (0x5000, 0),
            (u64::MAX, 2),
            (0x1800, 0x1000),
            (0x800, 0x1000),
            (0x1000, 0x10),
            (0, 0x10000),
        ] {
            assert!(
                ranges.insert(base, size, probe(2)).is_err(),
                "{base:#x}+{size:#x}"
            );
        }
        ranges.insert(0x2000, 0x1000, probe(2)).unwrap();
        ranges.insert(0, 0x1000, probe(3)).unwrap();
        assert_eq!(ranges.0.len(), 3);
    }
}
