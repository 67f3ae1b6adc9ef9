//! Decodes a guest access to a device's flush-hint page. Pure: the device acts on the result.
//!
//! The NFIT advertises hint `i` at `hint_page + 8 * i`. Linux's `generic_nvdimm_flush()` does
//! `writeq(1, hint)` after its stores to the region; any value counts as a flush.

/// Width of a flush-hint register.
pub const HINT_WIDTH: usize = 8;

/// What a guest write to the hint page means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlushHintAccess {
    /// A write to hint number `hint`: flush. `odd` when it is not an aligned 8-byte write (a
    /// guest may still mean it as a flush, so it flushes, and it is counted).
    Flush { hint: u32, odd: bool },
    /// A write past the last hint register: ignored.
    Outside { offset: u64 },
}

/// Decodes a write of `len` bytes at `offset` within the hint page of a device with `hints`
/// hint registers.
pub fn decode_write(offset: u64, len: usize, hints: u32) -> FlushHintAccess {
    let hint_bytes = u64::from(hints) * HINT_WIDTH as u64;
    if offset >= hint_bytes {
        return FlushHintAccess::Outside { offset };
    }
    FlushHintAccess::Flush {
        hint: (offset / HINT_WIDTH as u64) as u32,
        odd: len != HINT_WIDTH || offset % HINT_WIDTH as u64 != 0,
    }
}

/// Guest reads of the hint page return zeros.
pub fn read(data: &mut [u8]) {
    data.fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use FlushHintAccess::*;

    #[test]
    fn eight_byte_aligned_writes_to_hints_flush() {
        assert_eq!(
            decode_write(0, 8, 1),
            Flush {
                hint: 0,
                odd: false
            }
        );
        assert_eq!(
            decode_write(8, 8, 2),
            Flush {
                hint: 1,
                odd: false
            }
        );
        assert_eq!(
            decode_write(15 * 8, 8, 16),
            Flush {
                hint: 15,
                odd: false
            }
        );
    }

    #[test]
    fn any_other_write_to_a_hint_flushes_and_is_odd() {
        for len in [1, 2, 4, 16] {
            assert_eq!(decode_write(0, len, 1), Flush { hint: 0, odd: true });
        }
        assert_eq!(decode_write(4, 4, 1), Flush { hint: 0, odd: true });
        assert_eq!(decode_write(12, 8, 2), Flush { hint: 1, odd: true });
    }

    #[test]
    fn writes_past_the_hints_are_outside() {
        assert_eq!(decode_write(8, 8, 1), Outside { offset: 8 });
        assert_eq!(decode_write(8, 4, 1), Outside { offset: 8 });
        assert_eq!(decode_write(4095, 1, 16), Outside { offset: 4095 });
        assert_eq!(decode_write(u64::MAX, 8, 16), Outside { offset: u64::MAX });
        assert_eq!(decode_write(0, 8, 0), Outside { offset: 0 });
    }

    #[test]
    fn reads_are_zero() {
        let mut d = [0xffu8; 8];
        read(&mut d);
        assert_eq!(d, [0; 8]);
    }
}
