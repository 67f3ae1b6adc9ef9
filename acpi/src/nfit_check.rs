//! An independent NFIT checker: parses raw bytes the way the Linux `nfit` driver does and
//! rejects what would make it fail, plus what would make pmvm's flush-hint trap miss.
//!
//! It shares no structs or constants with the builder on purpose, so a builder bug is not
//! mirrored here. Sources: `drivers/acpi/nfit/core.c` (`add_table`, `add_spa`, `add_memdev`,
//! `add_dcr`, `add_flush`, `add_platform_cap`, `__nfit_mem_init`), `drivers/nvdimm/region_devs.c`
//! (`nd_region_create` 4 KiB checks, `nvdimm_map_flush`) and the 2 MiB fsdax alignment.
//!
//! [`check`] never panics, whatever the bytes: every read is bounds-checked and all address
//! arithmetic is done in `u128`.

/// What the NFIT holds, once every check passed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParsedNfit {
    pub revision: u8,
    pub spas: Vec<Spa>,
    pub memdevs: Vec<Memdev>,
    pub dcrs: Vec<Dcr>,
    pub flushes: Vec<FlushHints>,
    pub capabilities: Option<Capabilities>,
    /// Sub-structure types in table order, e.g. `[0, 1, 4, 6]` per NVDIMM.
    pub order: Vec<u16>,
}

/// Type 0: System Physical Address Range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spa {
    /// Byte offset of the sub-structure in the table.
    pub offset: usize,
    pub range_index: u16,
    pub flags: u16,
    pub base: u64,
    pub length: u64,
    pub attributes: u64,
}

/// Type 1: NVDIMM Region Mapping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Memdev {
    pub offset: usize,
    pub device_handle: u32,
    pub range_index: u16,
    pub region_index: u16,
    pub region_size: u64,
    pub region_offset: u64,
    pub dpa: u64,
    pub interleave_ways: u16,
    pub flags: u16,
}

impl Memdev {
    /// Flags bit 3: Linux makes the region read-only.
    pub fn not_armed(&self) -> bool {
        self.flags & (1 << 3) != 0
    }
}

/// Type 4: NVDIMM Control Region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dcr {
    pub offset: usize,
    pub region_index: u16,
    pub vendor_id: u16,
    pub device_id: u16,
    pub revision_id: u16,
    pub serial_number: u32,
    pub format_code: u16,
    pub windows: u16,
}

/// Type 6: Flush Hint Address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlushHints {
    pub offset: usize,
    pub device_handle: u32,
    pub hints: Vec<u64>,
}

/// Type 7: Platform Capabilities, already masked by the highest valid bit as Linux does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub highest_valid: u8,
    pub capabilities: u32,
}

/// The first problem found; offsets are bytes from the start of the table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NfitCheckError {
    #[error("buffer is {0} bytes; an NFIT header is 40")]
    ShortHeader(usize),
    #[error("signature is {0:?}, not \"NFIT\"")]
    Signature([u8; 4]),
    #[error("header length {header} does not match the {buffer}-byte buffer")]
    LengthMismatch { header: u32, buffer: usize },
    #[error("bytes sum to {0:#04x}, not 0: bad checksum")]
    Checksum(u8),
    #[error("sub-structure at {offset}: only {remaining} bytes left, a header needs 4")]
    TruncatedSubHeader { offset: usize, remaining: usize },
    #[error("sub-structure type {ty} at {offset} has length {length}, below the 4-byte header (Linux stops parsing at length 0)")]
    SubLengthTooSmall { offset: usize, ty: u16, length: u16 },
    #[error("sub-structure type {ty} at {offset} is {length} bytes but only {remaining} remain")]
    SubOverrunsTable {
        offset: usize,
        ty: u16,
        length: u16,
        remaining: usize,
    },
    #[error("{what} at {offset} has length {length}; Linux requires {expected}")]
    BadLength {
        what: &'static str,
        offset: usize,
        length: u16,
        expected: &'static str,
    },
    #[error("SPA range at {offset} has range index 0; it must be non-zero")]
    SpaZeroIndex { offset: usize },
    #[error("SPA range index {index} used twice (at {first} and {second})")]
    SpaDuplicateIndex {
        index: u16,
        first: usize,
        second: usize,
    },
    #[error("SPA range at {offset} is not of the persistent-memory type")]
    SpaNotPmem { offset: usize },
    #[error("SPA range at {offset} has length 0")]
    SpaEmpty { offset: usize },
    #[error("SPA range at {offset}: base {base:#x} or length {length:#x} is not 2 MiB aligned")]
    SpaMisaligned {
        offset: usize,
        base: u64,
        length: u64,
    },
    #[error("SPA range at {offset}: base {base:#x} + length {length:#x} passes 2^64")]
    SpaOverflow {
        offset: usize,
        base: u64,
        length: u64,
    },
    #[error("SPA ranges at {first} and {second} overlap")]
    SpaOverlap { first: usize, second: usize },
    #[error("control region at {offset} has region index 0; it must be non-zero")]
    DcrZeroIndex { offset: usize },
    #[error("control region index {index} used twice (at {first} and {second})")]
    DcrDuplicateIndex {
        index: u16,
        first: usize,
        second: usize,
    },
    #[error("region mapping at {offset} (handle {handle:#x}) has range index {range_index}, which names no SPA range")]
    MemdevNoSpa {
        offset: usize,
        handle: u32,
        range_index: u16,
    },
    #[error("region mapping at {offset} (handle {handle:#x}) has control region index 0")]
    MemdevZeroDcr { offset: usize, handle: u32 },
    #[error("region mapping at {offset} (handle {handle:#x}) has control region index {region_index}, which names no control region")]
    MemdevNoDcr {
        offset: usize,
        handle: u32,
        region_index: u16,
    },
    #[error("region mapping at {offset}: size {size:#x} or DPA {dpa:#x} is not 4 KiB aligned, or the size is 0")]
    MemdevMisaligned { offset: usize, size: u64, dpa: u64 },
    #[error("region mapping at {offset}: offset {region_offset:#x} + size {size:#x} exceeds its SPA range length {spa_length:#x}")]
    MemdevBeyondSpa {
        offset: usize,
        region_offset: u64,
        size: u64,
        spa_length: u64,
    },
    #[error("flush hint structure at {offset} has 0 hints; Linux needs at least 1")]
    FlushNoHints { offset: usize },
    #[error(
        "flush hint structure at {offset} names handle {handle:#x}, which no region mapping has"
    )]
    FlushNoMemdev { offset: usize, handle: u32 },
    #[error("flush hint structures at {first} and {second} both name handle {handle:#x}")]
    FlushDuplicateHandle {
        handle: u32,
        first: usize,
        second: usize,
    },
    #[error("flush hint {addr:#x} (structure at {offset}) crosses a 4 KiB page")]
    HintCrossesPage { offset: usize, addr: u64 },
    #[error("flush hint {addr:#x} (structure at {offset}) is not 8-byte aligned")]
    HintMisaligned { offset: usize, addr: u64 },
    #[error("flush hint {addr:#x} (structure at {offset}) lies inside the SPA range at {spa}")]
    HintInSpa {
        offset: usize,
        addr: u64,
        spa: usize,
    },
    #[error("platform capabilities at {offset}: highest valid bit {highest} overflows Linux's 32-bit mask")]
    CapabilitiesHighest { offset: usize, highest: u8 },
}

type Result<T> = std::result::Result<T, NfitCheckError>;

const HEADER_LEN: usize = 40;
const PAGE: u128 = 4096;
const TWO_MIB: u64 = 2 << 20;
const HINT_WIDTH: u128 = 8;
/// 66F0D379-B4F3-4074-AC43-0D3318B78CDB as the first three fields little-endian, then bytes.
const PM_GUID: [u8; 16] = guid(
    0x66F0_D379,
    0xB4F3,
    0x4074,
    [0xAC, 0x43, 0x0D, 0x33, 0x18, 0xB7, 0x8C, 0xDB],
);

const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

/// Bounds-checked little-endian reads from one sub-structure.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes<const N: usize>(&self, off: usize) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.0.get(off..off.saturating_add(N)) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u8(&self, off: usize) -> u8 {
        self.0.get(off).copied().unwrap_or(0)
    }
    fn u16(&self, off: usize) -> u16 {
        u16::from_le_bytes(self.bytes(off))
    }
    fn u32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.bytes(off))
    }
    fn u64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.bytes(off))
    }
}

/// Checks a whole NFIT (header included) and returns what it describes.
pub fn check(table: &[u8]) -> Result<ParsedNfit> {
    let parsed = parse(table)?;
    cross_check(&parsed)?;
    Ok(parsed)
}

/// Header, then each sub-structure's own checks (the part `add_table` does).
fn parse(table: &[u8]) -> Result<ParsedNfit> {
    if table.len() < HEADER_LEN {
        return Err(NfitCheckError::ShortHeader(table.len()));
    }
    let header = Reader(table);
    let signature: [u8; 4] = header.bytes(0);
    if &signature != b"NFIT" {
        return Err(NfitCheckError::Signature(signature));
    }
    let length = header.u32(4);
    if usize::try_from(length).ok() != Some(table.len()) {
        return Err(NfitCheckError::LengthMismatch {
            header: length,
            buffer: table.len(),
        });
    }
    let total = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    if total != 0 {
        return Err(NfitCheckError::Checksum(total));
    }
    let mut parsed = ParsedNfit {
        revision: header.u8(8),
        ..ParsedNfit::default()
    };
    let mut offset = HEADER_LEN;
    while offset < table.len() {
        let remaining = table.len() - offset;
        if remaining < 4 {
            return Err(NfitCheckError::TruncatedSubHeader { offset, remaining });
        }
        let head = Reader(&table[offset..]);
        let (ty, length) = (head.u16(0), head.u16(2));
        if length < 4 {
            return Err(NfitCheckError::SubLengthTooSmall { offset, ty, length });
        }
        if usize::from(length) > remaining {
            return Err(NfitCheckError::SubOverrunsTable {
                offset,
                ty,
                length,
                remaining,
            });
        }
        let sub = Reader(&table[offset..offset + usize::from(length)]);
        match ty {
            0 => parsed.spas.push(spa(offset, &sub, length)?),
            1 => parsed.memdevs.push(memdev(offset, &sub, length)?),
            4 => parsed.dcrs.push(dcr(offset, &sub, length)?),
            6 => parsed.flushes.push(flush(offset, &sub, length)?),
            7 => parsed.capabilities = Some(capabilities(offset, &sub, length)?),
            // Linux logs other types and skips them; so does this checker.
            _ => {}
        }
        parsed.order.push(ty);
        offset += usize::from(length);
    }
    Ok(parsed)
}

fn spa(offset: usize, s: &Reader, length: u16) -> Result<Spa> {
    let flags = s.u16(6);
    // ACPI 6.4 location cookie (flags bit 2) adds 8 bytes; Linux before 5.13 knows only 56.
    let (expected, text) = if flags & (1 << 2) != 0 {
        (64, "64 (location cookie flag set)")
    } else {
        (56, "56")
    };
    if length != expected {
        return Err(NfitCheckError::BadLength {
            what: "SPA range",
            offset,
            length,
            expected: text,
        });
    }
    let spa = Spa {
        offset,
        range_index: s.u16(4),
        flags,
        base: s.u64(32),
        length: s.u64(40),
        attributes: s.u64(48),
    };
    if spa.range_index == 0 {
        return Err(NfitCheckError::SpaZeroIndex { offset });
    }
    if s.bytes::<16>(16) != PM_GUID {
        return Err(NfitCheckError::SpaNotPmem { offset });
    }
    if spa.length == 0 {
        return Err(NfitCheckError::SpaEmpty { offset });
    }
    if spa.base % TWO_MIB != 0 || spa.length % TWO_MIB != 0 {
        return Err(NfitCheckError::SpaMisaligned {
            offset,
            base: spa.base,
            length: spa.length,
        });
    }
    if spa.base.checked_add(spa.length).is_none() {
        return Err(NfitCheckError::SpaOverflow {
            offset,
            base: spa.base,
            length: spa.length,
        });
    }
    Ok(spa)
}

fn memdev(offset: usize, s: &Reader, length: u16) -> Result<Memdev> {
    if length != 48 {
        return Err(NfitCheckError::BadLength {
            what: "region mapping",
            offset,
            length,
            expected: "48",
        });
    }
    let m = Memdev {
        offset,
        device_handle: s.u32(4),
        range_index: s.u16(12),
        region_index: s.u16(14),
        region_size: s.u64(16),
        region_offset: s.u64(24),
        dpa: s.u64(32),
        interleave_ways: s.u16(42),
        flags: s.u16(44),
    };
    // nd_region_create: "mapping%d is not 4096 aligned".
    if m.region_size == 0 || m.region_size % 4096 != 0 || m.dpa % 4096 != 0 {
        return Err(NfitCheckError::MemdevMisaligned {
            offset,
            size: m.region_size,
            dpa: m.dpa,
        });
    }
    Ok(m)
}

fn dcr(offset: usize, s: &Reader, length: u16) -> Result<Dcr> {
    let windows = s.u16(30);
    // sizeof_dcr: the full 80 bytes, or the 32-byte short form when there are no windows.
    if !(length == 80 || (length == 32 && windows == 0)) {
        return Err(NfitCheckError::BadLength {
            what: "control region",
            offset,
            length,
            expected: "80, or 32 with no block windows",
        });
    }
    let d = Dcr {
        offset,
        region_index: s.u16(4),
        vendor_id: s.u16(6),
        device_id: s.u16(8),
        revision_id: s.u16(10),
        serial_number: s.u32(24),
        format_code: s.u16(28),
        windows,
    };
    if d.region_index == 0 {
        return Err(NfitCheckError::DcrZeroIndex { offset });
    }
    Ok(d)
}

fn flush(offset: usize, s: &Reader, length: u16) -> Result<FlushHints> {
    let count = s.u16(8);
    // Linux copies hint_count hints whatever the length says, so they must agree exactly.
    if length < 16 {
        return Err(NfitCheckError::BadLength {
            what: "flush hint structure",
            offset,
            length,
            expected: "16 + 8 * hint count",
        });
    }
    if count == 0 {
        return Err(NfitCheckError::FlushNoHints { offset });
    }
    if u32::from(length) != 16 + 8 * u32::from(count) {
        return Err(NfitCheckError::BadLength {
            what: "flush hint structure",
            offset,
            length,
            expected: "16 + 8 * hint count",
        });
    }
    let hints: Vec<u64> = (0..usize::from(count)).map(|i| s.u64(16 + 8 * i)).collect();
    for &addr in &hints {
        // Checked before alignment so that each rule can fail on its own.
        if u128::from(addr) % PAGE + HINT_WIDTH > PAGE {
            return Err(NfitCheckError::HintCrossesPage { offset, addr });
        }
        if addr % 8 != 0 {
            return Err(NfitCheckError::HintMisaligned { offset, addr });
        }
    }
    Ok(FlushHints {
        offset,
        device_handle: s.u32(4),
        hints,
    })
}

fn capabilities(offset: usize, s: &Reader, length: u16) -> Result<Capabilities> {
    if length != 16 {
        return Err(NfitCheckError::BadLength {
            what: "platform capabilities",
            offset,
            length,
            expected: "16",
        });
    }
    let highest = s.u8(4);
    // add_platform_cap computes (1 << (highest + 1)) - 1 in 32 bits.
    if highest >= 31 {
        return Err(NfitCheckError::CapabilitiesHighest { offset, highest });
    }
    let mask = (1u32 << (highest + 1)) - 1;
    Ok(Capabilities {
        highest_valid: highest,
        capabilities: s.u32(8) & mask,
    })
}

/// Links between sub-structures (the part `__nfit_mem_init` and region setup rely on).
fn cross_check(p: &ParsedNfit) -> Result<()> {
    for (i, b) in p.spas.iter().enumerate() {
        for a in &p.spas[..i] {
            if a.range_index == b.range_index {
                return Err(NfitCheckError::SpaDuplicateIndex {
                    index: b.range_index,
                    first: a.offset,
                    second: b.offset,
                });
            }
            let (a_end, b_end) = (end(a.base, a.length), end(b.base, b.length));
            if u128::from(a.base) < b_end && u128::from(b.base) < a_end {
                return Err(NfitCheckError::SpaOverlap {
                    first: a.offset,
                    second: b.offset,
                });
            }
        }
    }
    for (i, b) in p.dcrs.iter().enumerate() {
        if let Some(a) = p.dcrs[..i]
            .iter()
            .find(|a| a.region_index == b.region_index)
        {
            return Err(NfitCheckError::DcrDuplicateIndex {
                index: b.region_index,
                first: a.offset,
                second: b.offset,
            });
        }
    }
    for m in &p.memdevs {
        let Some(spa) = p.spas.iter().find(|s| s.range_index == m.range_index) else {
            return Err(NfitCheckError::MemdevNoSpa {
                offset: m.offset,
                handle: m.device_handle,
                range_index: m.range_index,
            });
        };
        if m.region_index == 0 {
            return Err(NfitCheckError::MemdevZeroDcr {
                offset: m.offset,
                handle: m.device_handle,
            });
        }
        if !p.dcrs.iter().any(|d| d.region_index == m.region_index) {
            return Err(NfitCheckError::MemdevNoDcr {
                offset: m.offset,
                handle: m.device_handle,
                region_index: m.region_index,
            });
        }
        if u128::from(m.region_offset) + u128::from(m.region_size) > u128::from(spa.length) {
            return Err(NfitCheckError::MemdevBeyondSpa {
                offset: m.offset,
                region_offset: m.region_offset,
                size: m.region_size,
                spa_length: spa.length,
            });
        }
    }
    for (i, f) in p.flushes.iter().enumerate() {
        if !p.memdevs.iter().any(|m| m.device_handle == f.device_handle) {
            return Err(NfitCheckError::FlushNoMemdev {
                offset: f.offset,
                handle: f.device_handle,
            });
        }
        if let Some(a) = p.flushes[..i]
            .iter()
            .find(|a| a.device_handle == f.device_handle)
        {
            return Err(NfitCheckError::FlushDuplicateHandle {
                handle: f.device_handle,
                first: a.offset,
                second: f.offset,
            });
        }
        for &addr in &f.hints {
            let hint = u128::from(addr);
            if let Some(spa) = p
                .spas
                .iter()
                .find(|s| u128::from(s.base) < hint + HINT_WIDTH && hint < end(s.base, s.length))
            {
                return Err(NfitCheckError::HintInSpa {
                    offset: f.offset,
                    addr,
                    spa: spa.offset,
                });
            }
        }
    }
    Ok(())
}

fn end(base: u64, length: u64) -> u128 {
    u128::from(base) + u128::from(length)
}

#[cfg(test)]
mod tests;
