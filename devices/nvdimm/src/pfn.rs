//! The fsdax ("pfn") info block Linux's libnvdimm keeps at offset 4 KiB of a namespace, so a
//! host can format a backing file that a label-less guest finds in fsdax mode at boot.
//!
//! Layout and rules follow Linux 6.1 `drivers/nvdimm/pfn.h` (`struct nd_pfn_sb`),
//! `pfn_devs.c` (`nd_pfn_init` writes the block, `nd_pfn_validate` accepts it) and `claim.c`
//! (`nd_sb_checksum`). A label-less namespace is an "io" namespace: it covers the whole
//! device, and its `parent_uuid` is the null uuid.
//!
//! Everything here is pure: callers read and write the file.

use std::mem::{offset_of, size_of};

/// Where the info block sits in the namespace.
pub const INFO_BLOCK_OFFSET: u64 = 4096;
/// Size of the info block.
pub const INFO_BLOCK_SIZE: usize = 4096;
/// Bytes Linux reserves at the namespace start before the memmap (`nd_info_block_reserve`):
/// the first 4 KiB are left alone, the info block is the second.
pub const INFO_BLOCK_RESERVE: u64 = 8192;
/// Signature of an fsdax (pfn) info block.
pub const PFN_SIGNATURE: [u8; 16] = *b"NVDIMM_PFN_INFO\0";
/// Signature of a devdax info block: same layout, a different claimant.
pub const DAX_SIGNATURE: [u8; 16] = *b"NVDIMM_DAX_INFO\0";
/// Signature of a BTT (sector mode) arena info block, at the same offset.
pub const BTT_SIGNATURE: [u8; 16] = *b"BTT_ARENA_INFO\0\0";
/// The version Linux 6.1 writes: 1.4 records page_size and page_struct_size.
pub const VERSION_MAJOR: u16 = 1;
pub const VERSION_MINOR: u16 = 4;
/// Room Linux reserves per 4 KiB page for its `struct page` (`MAX_STRUCT_PAGE_SIZE`).
pub const STRUCT_PAGE_SIZE: u64 = 64;
/// The guest's page size.
pub const PAGE_SIZE: u64 = 4096;
/// x86's `memremap_compat_align()`: the namespace start and end, and the data offset, are
/// multiples of this.
pub const COMPAT_ALIGN: u64 = 2 << 20;
/// Alignments x86 Linux supports for a pfn device (`nd_pfn_supported_alignments`).
pub const SUPPORTED_ALIGNS: [u64; 3] = [4096, 2 << 20, 1 << 30];

/// Where the memmap (struct pages) of the namespace lives (`enum nd_pfn_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PfnMode {
    /// In guest RAM (`PFN_MODE_RAM`, ndctl's `--map=mem`).
    Ram = 1,
    /// In the device, between the info block and the data (`PFN_MODE_PMEM`, `--map=dev`).
    Pmem = 2,
}

impl PfnMode {
    fn from_raw(raw: u32) -> Option<PfnMode> {
        match raw {
            1 => Some(PfnMode::Ram),
            2 => Some(PfnMode::Pmem),
            _ => None,
        }
    }
}

/// `struct nd_pfn_sb`, field for field. All fields are little-endian on disk; [`encode`] and
/// [`decode`] convert, so the struct holds native values.
///
/// [`encode`]: PfnInfoBlock::encode
/// [`decode`]: PfnInfoBlock::decode
#[repr(C, packed)]
#[derive(Clone, Copy)]
pub struct PfnInfoBlock {
    pub signature: [u8; 16],
    pub uuid: [u8; 16],
    pub parent_uuid: [u8; 16],
    pub flags: u32,
    pub version_major: u16,
    pub version_minor: u16,
    /// Offset of the data from the namespace start.
    pub dataoff: u64,
    /// 4 KiB pages of data.
    pub npfns: u64,
    pub mode: u32,
    /// Deprecated: the kernel no longer creates padded namespaces.
    pub start_pad: u32,
    /// Bytes at the end of the namespace left out to keep its end aligned.
    pub end_trunc: u32,
    pub align: u32,
    pub page_size: u32,
    pub page_struct_size: u16,
    pub padding: [u8; 3994],
    pub checksum: u64,
}

// The kernel's BUILD_BUG_ON(sizeof(struct nd_pfn_sb) != SZ_4K), and the field offsets of
// pfn.h, so a field added or resized here cannot go unnoticed.
const _: () = assert!(size_of::<PfnInfoBlock>() == INFO_BLOCK_SIZE);
const _: () = assert!(offset_of!(PfnInfoBlock, uuid) == 16);
const _: () = assert!(offset_of!(PfnInfoBlock, parent_uuid) == 32);
const _: () = assert!(offset_of!(PfnInfoBlock, flags) == 48);
const _: () = assert!(offset_of!(PfnInfoBlock, version_major) == 52);
const _: () = assert!(offset_of!(PfnInfoBlock, version_minor) == 54);
const _: () = assert!(offset_of!(PfnInfoBlock, dataoff) == 56);
const _: () = assert!(offset_of!(PfnInfoBlock, npfns) == 64);
const _: () = assert!(offset_of!(PfnInfoBlock, mode) == 72);
const _: () = assert!(offset_of!(PfnInfoBlock, start_pad) == 76);
const _: () = assert!(offset_of!(PfnInfoBlock, end_trunc) == 80);
const _: () = assert!(offset_of!(PfnInfoBlock, align) == 84);
const _: () = assert!(offset_of!(PfnInfoBlock, page_size) == 88);
const _: () = assert!(offset_of!(PfnInfoBlock, page_struct_size) == 92);
const _: () = assert!(offset_of!(PfnInfoBlock, padding) == 94);
const _: () = assert!(offset_of!(PfnInfoBlock, checksum) == INFO_BLOCK_SIZE - 8);

/// Why a namespace cannot be laid out, or why an info block would be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PfnError {
    #[error("namespace size {size} is not a multiple of 2 MiB ({COMPAT_ALIGN} bytes); Linux maps fsdax namespaces in 2 MiB sections")]
    SizeMisaligned { size: u64 },
    #[error("alignment {align} is not supported; use 4K, 2M or 1G")]
    UnsupportedAlign { align: u64 },
    #[error("namespace size {size} is too small for the info block, the memmap and one {align}-byte aligned data unit: at least {min} bytes are needed")]
    TooSmall { size: u64, align: u64, min: u64 },
    #[error("not an fsdax info block: signature {found:?}")]
    BadSignature { found: String },
    #[error("checksum {stored:#018x} does not match the block's contents ({computed:#018x})")]
    BadChecksum { stored: u64, computed: u64 },
    #[error("parent_uuid is not null: the block belongs to a labelled namespace")]
    LabelledParent,
    #[error("mode {mode} is neither ram (1) nor pmem (2)")]
    BadMode { mode: u32 },
    #[error("page_size {page_size} exceeds the guest's {PAGE_SIZE}-byte pages")]
    PageSize { page_size: u32 },
    #[error("page_struct_size {size} is below the kernel's {STRUCT_PAGE_SIZE}-byte struct page")]
    PageStructSize { size: u16 },
    #[error("alignment {align} exceeds the namespace size {size}")]
    AlignExceedsCapacity { align: u64, size: u64 },
    #[error("dataoff {dataoff:#x} is at or beyond the namespace size {size:#x}")]
    DataoffBeyondEnd { dataoff: u64, size: u64 },
    #[error("dataoff {dataoff:#x} is not aligned to {align:#x} (or to 4 KiB)")]
    DataoffMisaligned { dataoff: u64, align: u64 },
    #[error("start_pad {start_pad:#x} leaves the data start misaligned to 2 MiB")]
    StartMisaligned { start_pad: u32 },
    #[error("end_trunc {end_trunc:#x} leaves the namespace end misaligned to 2 MiB")]
    EndMisaligned { end_trunc: u32 },
    #[error("npfns {npfns} pages do not fit between dataoff {dataoff:#x} and the end {end:#x}")]
    NpfnsBeyondEnd { npfns: u64, dataoff: u64, end: u64 },
}

/// Where an fsdax namespace keeps what, as `nd_pfn_init` computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PfnLayout {
    /// Namespace size: the whole device for a label-less namespace.
    pub size: u64,
    /// The mapping alignment recorded in the block (`--align`).
    pub align: u64,
    /// Offset of the data (and so of the filesystem) from the namespace start.
    pub dataoff: u64,
    /// 4 KiB pages of data.
    pub npfns: u64,
    /// Bytes cut off the end to keep it aligned.
    pub end_trunc: u64,
}

impl PfnLayout {
    /// Lays out a namespace of `size` bytes in pmem mode (memmap in the device), assuming its
    /// start is aligned to `max(align, 2 MiB)`; pmvm places NVDIMMs 1 GiB-aligned.
    pub fn pmem(size: u64, align: u64) -> Result<PfnLayout, PfnError> {
        if !SUPPORTED_ALIGNS.contains(&align) {
            return Err(PfnError::UnsupportedAlign { align });
        }
        if size == 0 || size % COMPAT_ALIGN != 0 {
            return Err(PfnError::SizeMisaligned { size });
        }
        // nd_pfn_init: the struct page array is sized for every page past the reserve, and the
        // data starts at the next boundary of the larger of the requested and the
        // architecture's alignment.
        let map_align = align.max(COMPAT_ALIGN);
        let initial_pfns = (size - INFO_BLOCK_RESERVE) / PAGE_SIZE;
        let dataoff = align_up(
            INFO_BLOCK_RESERVE + STRUCT_PAGE_SIZE * initial_pfns,
            map_align,
        );
        let end_trunc = size % map_align;
        let min = dataoff + map_align;
        if size - end_trunc < min {
            return Err(PfnError::TooSmall {
                size,
                align: map_align,
                min: Self::min_size(map_align),
            });
        }
        Ok(PfnLayout {
            size,
            align,
            dataoff,
            npfns: (size - dataoff - end_trunc) / PAGE_SIZE,
            end_trunc,
        })
    }

    /// Smallest namespace that holds the reserve, its memmap and one aligned unit of data.
    fn min_size(map_align: u64) -> u64 {
        let mut size = 2 * map_align;
        loop {
            let memmap = STRUCT_PAGE_SIZE * ((size - INFO_BLOCK_RESERVE) / PAGE_SIZE);
            if align_up(INFO_BLOCK_RESERVE + memmap, map_align) + map_align <= size {
                return size;
            }
            size += map_align;
        }
    }

    /// Bytes of data the guest gets.
    pub fn data_size(&self) -> u64 {
        self.npfns * PAGE_SIZE
    }
}

fn align_up(value: u64, align: u64) -> u64 {
    value.div_ceil(align) * align
}

impl PfnInfoBlock {
    /// The block `nd_pfn_init` would write for `layout` in pmem mode, checksum included.
    pub fn fsdax(layout: &PfnLayout, uuid: [u8; 16]) -> PfnInfoBlock {
        let mut block = PfnInfoBlock {
            signature: PFN_SIGNATURE,
            uuid,
            parent_uuid: [0; 16],
            flags: 0,
            version_major: VERSION_MAJOR,
            version_minor: VERSION_MINOR,
            dataoff: layout.dataoff,
            npfns: layout.npfns,
            mode: PfnMode::Pmem as u32,
            start_pad: 0,
            // Below 1 GiB by construction: end_trunc < align <= 1 GiB.
            end_trunc: layout.end_trunc as u32,
            align: layout.align as u32,
            page_size: PAGE_SIZE as u32,
            page_struct_size: STRUCT_PAGE_SIZE as u16,
            padding: [0; 3994],
            checksum: 0,
        };
        block.checksum = sb_checksum(&block.encode());
        block
    }

    /// The on-disk bytes, little-endian.
    pub fn encode(&self) -> [u8; INFO_BLOCK_SIZE] {
        let mut out = [0u8; INFO_BLOCK_SIZE];
        let mut put = |offset: usize, bytes: &[u8]| {
            out[offset..offset + bytes.len()].copy_from_slice(bytes);
        };
        // Copies, not references: fields of a packed struct may be unaligned.
        let b = *self;
        put(offset_of!(Self, signature), &b.signature);
        put(offset_of!(Self, uuid), &b.uuid);
        put(offset_of!(Self, parent_uuid), &b.parent_uuid);
        put(offset_of!(Self, flags), &{ b.flags }.to_le_bytes());
        put(
            offset_of!(Self, version_major),
            &{ b.version_major }.to_le_bytes(),
        );
        put(
            offset_of!(Self, version_minor),
            &{ b.version_minor }.to_le_bytes(),
        );
        put(offset_of!(Self, dataoff), &{ b.dataoff }.to_le_bytes());
        put(offset_of!(Self, npfns), &{ b.npfns }.to_le_bytes());
        put(offset_of!(Self, mode), &{ b.mode }.to_le_bytes());
        put(offset_of!(Self, start_pad), &{ b.start_pad }.to_le_bytes());
        put(offset_of!(Self, end_trunc), &{ b.end_trunc }.to_le_bytes());
        put(offset_of!(Self, align), &{ b.align }.to_le_bytes());
        put(offset_of!(Self, page_size), &{ b.page_size }.to_le_bytes());
        put(
            offset_of!(Self, page_struct_size),
            &{ b.page_struct_size }.to_le_bytes(),
        );
        put(offset_of!(Self, padding), &b.padding);
        put(offset_of!(Self, checksum), &{ b.checksum }.to_le_bytes());
        out
    }

    /// Reads the fields of on-disk bytes without judging them; see [`check`](Self::check).
    pub fn decode(bytes: &[u8; INFO_BLOCK_SIZE]) -> PfnInfoBlock {
        fn arr<const N: usize>(bytes: &[u8], offset: usize) -> [u8; N] {
            let mut a = [0u8; N];
            a.copy_from_slice(&bytes[offset..offset + N]);
            a
        }
        PfnInfoBlock {
            signature: arr(bytes, offset_of!(Self, signature)),
            uuid: arr(bytes, offset_of!(Self, uuid)),
            parent_uuid: arr(bytes, offset_of!(Self, parent_uuid)),
            flags: u32::from_le_bytes(arr(bytes, offset_of!(Self, flags))),
            version_major: u16::from_le_bytes(arr(bytes, offset_of!(Self, version_major))),
            version_minor: u16::from_le_bytes(arr(bytes, offset_of!(Self, version_minor))),
            dataoff: u64::from_le_bytes(arr(bytes, offset_of!(Self, dataoff))),
            npfns: u64::from_le_bytes(arr(bytes, offset_of!(Self, npfns))),
            mode: u32::from_le_bytes(arr(bytes, offset_of!(Self, mode))),
            start_pad: u32::from_le_bytes(arr(bytes, offset_of!(Self, start_pad))),
            end_trunc: u32::from_le_bytes(arr(bytes, offset_of!(Self, end_trunc))),
            align: u32::from_le_bytes(arr(bytes, offset_of!(Self, align))),
            page_size: u32::from_le_bytes(arr(bytes, offset_of!(Self, page_size))),
            page_struct_size: u16::from_le_bytes(arr(bytes, offset_of!(Self, page_struct_size))),
            padding: arr(bytes, offset_of!(Self, padding)),
            checksum: u64::from_le_bytes(arr(bytes, offset_of!(Self, checksum))),
        }
    }

    /// The memmap mode, if it is one Linux knows.
    pub fn pfn_mode(&self) -> Option<PfnMode> {
        PfnMode::from_raw(self.mode)
    }

    /// Whether the stored checksum matches the block's contents.
    pub fn checksum_ok(&self) -> bool {
        self.checksum == sb_checksum(&self.encode())
    }

    /// The checks `nd_pfn_validate` makes when a label-less guest probes a namespace of
    /// `size` bytes whose start is 2 MiB aligned (and aligned to `align`): the first failure.
    pub fn check(&self, size: u64) -> Result<(), PfnError> {
        let b = *self;
        if b.signature != PFN_SIGNATURE {
            return Err(PfnError::BadSignature {
                found: String::from_utf8_lossy(&b.signature)
                    .trim_end_matches('\0')
                    .to_string(),
            });
        }
        let computed = sb_checksum(&b.encode());
        if b.checksum != computed {
            return Err(PfnError::BadChecksum {
                stored: b.checksum,
                computed,
            });
        }
        if b.parent_uuid != [0; 16] {
            return Err(PfnError::LabelledParent);
        }
        // Older minor versions lack fields; the kernel substitutes these values.
        let (start_pad, end_trunc) = if b.version_minor < 1 {
            (0, 0)
        } else {
            (b.start_pad, b.end_trunc)
        };
        let recorded_align = if b.version_minor < 2 { 0 } else { b.align };
        let (page_size, page_struct_size) = if b.version_minor < 4 {
            (PAGE_SIZE as u32, STRUCT_PAGE_SIZE as u16)
        } else {
            (b.page_size, b.page_struct_size)
        };
        let mode = PfnMode::from_raw(b.mode).ok_or(PfnError::BadMode { mode: b.mode })?;
        let dataoff = b.dataoff;
        let align = if recorded_align == 0 {
            // 1 << ilog2(dataoff), as the kernel guesses for version 1.0 and 1.1 blocks.
            if dataoff == 0 {
                0
            } else {
                1u64 << dataoff.ilog2()
            }
        } else {
            u64::from(recorded_align)
        };
        if mode == PfnMode::Pmem {
            if u64::from(page_size) > PAGE_SIZE {
                return Err(PfnError::PageSize { page_size });
            }
            if u64::from(page_struct_size) < STRUCT_PAGE_SIZE {
                return Err(PfnError::PageStructSize {
                    size: page_struct_size,
                });
            }
        }
        if align > size {
            return Err(PfnError::AlignExceedsCapacity { align, size });
        }
        if dataoff >= size {
            return Err(PfnError::DataoffBeyondEnd { dataoff, size });
        }
        let data_start = dataoff + u64::from(start_pad);
        if (align != 0 && data_start % align != 0) || dataoff % PAGE_SIZE != 0 {
            return Err(PfnError::DataoffMisaligned { dataoff, align });
        }
        if u64::from(start_pad) % COMPAT_ALIGN != 0 {
            return Err(PfnError::StartMisaligned { start_pad });
        }
        if size < u64::from(end_trunc) || (size - u64::from(end_trunc)) % COMPAT_ALIGN != 0 {
            return Err(PfnError::EndMisaligned { end_trunc });
        }
        // Not checked by nd_pfn_validate, but the data would run past the device otherwise.
        let end = size - u64::from(end_trunc);
        let npfns = b.npfns;
        if npfns
            .checked_mul(PAGE_SIZE)
            .and_then(|bytes| bytes.checked_add(data_start))
            .is_none_or(|data_end| data_end > end)
        {
            return Err(PfnError::NpfnsBeyondEnd {
                npfns,
                dataoff,
                end,
            });
        }
        Ok(())
    }
}

/// The kernel's `nd_fletcher64(addr, len, true)`: a Fletcher-64 over little-endian 32-bit words.
pub fn fletcher64(bytes: &[u8]) -> u64 {
    let mut lo: u32 = 0;
    let mut hi: u64 = 0;
    for word in bytes.chunks_exact(4) {
        lo = lo.wrapping_add(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
        hi = hi.wrapping_add(u64::from(lo));
    }
    (hi << 32) | u64::from(lo)
}

/// The kernel's `nd_sb_checksum`: [`fletcher64`] over the 4 KiB block with its last 8 bytes
/// (the checksum field) taken as zero.
pub fn sb_checksum(block: &[u8; INFO_BLOCK_SIZE]) -> u64 {
    let mut copy = *block;
    copy[INFO_BLOCK_SIZE - 8..].fill(0);
    fletcher64(&copy)
}

/// What signature, if any, a namespace's 4 KiB block at [`INFO_BLOCK_OFFSET`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoKind {
    /// fsdax (pfn).
    Pfn,
    /// devdax.
    Dax,
    /// sector mode (BTT).
    Btt,
}

impl InfoKind {
    /// Recognises the signature at the start of an info block.
    pub fn of(block: &[u8]) -> Option<InfoKind> {
        let sig = block.get(..16)?;
        if sig == PFN_SIGNATURE {
            Some(InfoKind::Pfn)
        } else if sig == DAX_SIGNATURE {
            Some(InfoKind::Dax)
        } else if sig == BTT_SIGNATURE {
            Some(InfoKind::Btt)
        } else {
            None
        }
    }

    /// The mode name ndctl uses for it.
    pub fn mode_name(self) -> &'static str {
        match self {
            InfoKind::Pfn => "fsdax",
            InfoKind::Dax => "devdax",
            InfoKind::Btt => "sector",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const UUID: [u8; 16] = [
        0x6b, 0x1e, 0x0c, 0x4a, 0x92, 0x5d, 0x4f, 0x0e, 0x8a, 0x53, 0x3d, 0x2a, 0x71, 0x11, 0x90,
        0xcd,
    ];

    fn le_u64(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }
    fn le_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }
    fn le_u16(bytes: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
    }

    #[test]
    fn layout_of_a_64m_namespace_matches_nd_pfn_init() {
        // By hand: (64 MiB - 8 KiB) / 4 KiB = 16382 pages, 64 bytes each = 1048448 bytes of
        // memmap after the 8 KiB reserve, which ends just below 1 MiB + 8 KiB; the next 2 MiB
        // boundary is 2 MiB. 62 MiB of data remain.
        let l = PfnLayout::pmem(64 * MIB, 2 * MIB).unwrap();
        assert_eq!(l.dataoff, 2 * MIB);
        assert_eq!(l.end_trunc, 0);
        assert_eq!(l.npfns, (62 * MIB) / 4096);
        assert_eq!(l.data_size(), 62 * MIB);
    }

    #[test]
    fn layout_of_a_1g_namespace() {
        // (1 GiB - 8 KiB) / 4 KiB * 64 = 16 MiB - 128 bytes of memmap, + 8 KiB: past 16 MiB,
        // so the data starts at 18 MiB.
        let l = PfnLayout::pmem(1 << 30, 2 * MIB).unwrap();
        assert_eq!(l.dataoff, 18 * MIB);
        assert_eq!(l.npfns, ((1 << 30) - 18 * MIB) / 4096);
    }

    #[test]
    fn gigabyte_alignment_truncates_the_end() {
        let l = PfnLayout::pmem(3 << 30, 1 << 30).unwrap();
        assert_eq!(l.dataoff, 1 << 30);
        assert_eq!(l.end_trunc, 0);
        let l = PfnLayout::pmem((3 << 30) + 2 * MIB, 1 << 30).unwrap();
        assert_eq!(l.end_trunc, 2 * MIB);
        assert_eq!(l.npfns, (2u64 << 30) / 4096);
        let block = PfnInfoBlock::fsdax(&l, UUID);
        assert_eq!(block.check((3 << 30) + 2 * MIB), Ok(()));
    }

    #[test]
    fn page_alignment_still_starts_data_on_2m() {
        let l = PfnLayout::pmem(64 * MIB, 4096).unwrap();
        assert_eq!(l.dataoff, 2 * MIB);
        let bytes = PfnInfoBlock::fsdax(&l, UUID).encode();
        assert_eq!(
            le_u32(&bytes, 84),
            4096,
            "the requested align is what is recorded"
        );
    }

    #[test]
    fn rejects_sizes_and_alignments_linux_would() {
        assert_eq!(
            PfnLayout::pmem(64 * MIB + 4096, 2 * MIB),
            Err(PfnError::SizeMisaligned {
                size: 64 * MIB + 4096
            })
        );
        assert_eq!(
            PfnLayout::pmem(0, 2 * MIB),
            Err(PfnError::SizeMisaligned { size: 0 })
        );
        assert_eq!(
            PfnLayout::pmem(64 * MIB, 8192),
            Err(PfnError::UnsupportedAlign { align: 8192 })
        );
        // 2 MiB: the reserve and memmap take the first 2 MiB, nothing is left.
        let err = PfnLayout::pmem(2 * MIB, 2 * MIB).unwrap_err();
        assert_eq!(
            err,
            PfnError::TooSmall {
                size: 2 * MIB,
                align: 2 * MIB,
                min: 4 * MIB
            }
        );
        assert!(err.to_string().contains("at least 4194304 bytes"), "{err}");
        assert!(PfnLayout::pmem(4 * MIB, 2 * MIB).is_ok());
        assert!(matches!(
            PfnLayout::pmem(1 << 30, 1 << 30),
            Err(PfnError::TooSmall { min, .. }) if min == 2 << 30
        ));
    }

    #[test]
    fn encoded_fields_sit_where_pfn_h_puts_them() {
        let l = PfnLayout::pmem(64 * MIB, 2 * MIB).unwrap();
        let bytes = PfnInfoBlock::fsdax(&l, UUID).encode();
        assert_eq!(&bytes[0..16], b"NVDIMM_PFN_INFO\0");
        assert_eq!(&bytes[16..32], &UUID);
        assert_eq!(
            &bytes[32..48],
            &[0; 16],
            "parent_uuid of an io namespace is null"
        );
        assert_eq!(le_u32(&bytes, 48), 0, "flags");
        assert_eq!(le_u16(&bytes, 52), 1, "version_major");
        assert_eq!(le_u16(&bytes, 54), 4, "version_minor");
        assert_eq!(le_u64(&bytes, 56), 2 * MIB, "dataoff");
        assert_eq!(le_u64(&bytes, 64), 62 * MIB / 4096, "npfns");
        assert_eq!(le_u32(&bytes, 72), 2, "mode PFN_MODE_PMEM");
        assert_eq!(le_u32(&bytes, 76), 0, "start_pad");
        assert_eq!(le_u32(&bytes, 80), 0, "end_trunc");
        assert_eq!(le_u32(&bytes, 84), 2 << 20, "align");
        assert_eq!(le_u32(&bytes, 88), 4096, "page_size");
        assert_eq!(le_u16(&bytes, 92), 64, "page_struct_size");
        assert!(bytes[94..4088].iter().all(|&b| b == 0), "padding");
        // The checksum, recomputed independently of sb_checksum: all 1024 words, the
        // checksum's own two taken as zero.
        let mut lo: u64 = 0;
        let mut hi: u64 = 0;
        for i in (0..4096).step_by(4) {
            let word = if i < 4088 { le_u32(&bytes, i) } else { 0 };
            lo = (lo + u64::from(word)) & 0xffff_ffff;
            hi = (hi + lo) & 0xffff_ffff;
        }
        assert_eq!(le_u64(&bytes, 4088), (hi << 32) | lo);
    }

    #[test]
    fn fletcher64_matches_known_values() {
        assert_eq!(fletcher64(&[]), 0);
        // Words 1, 2: lo = 1 then 3; hi = 1 then 4.
        assert_eq!(fletcher64(&[1, 0, 0, 0, 2, 0, 0, 0]), (4 << 32) | 3);
        // lo wraps at 32 bits; hi is shifted out past 32 bits: lo = 0xffffffff then 1,
        // hi = 0xffffffff then 0x1_0000_0000, whose low half is 0.
        let max = [0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0];
        assert_eq!(fletcher64(&max), 1);
        let three = [0xff, 0xff, 0xff, 0xff, 0x02, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(fletcher64(&three), (1 << 32) | 1);
    }

    #[test]
    fn decode_inverts_encode_and_checks_pass() {
        let l = PfnLayout::pmem(128 * MIB, 2 * MIB).unwrap();
        let block = PfnInfoBlock::fsdax(&l, UUID);
        let bytes = block.encode();
        let back = PfnInfoBlock::decode(&bytes);
        assert_eq!(back.encode(), bytes);
        assert!(back.checksum_ok());
        assert_eq!(back.pfn_mode(), Some(PfnMode::Pmem));
        assert_eq!(back.check(128 * MIB), Ok(()));
        assert_eq!(InfoKind::of(&bytes), Some(InfoKind::Pfn));
    }

    #[test]
    fn check_finds_what_the_kernel_refuses() {
        let l = PfnLayout::pmem(64 * MIB, 2 * MIB).unwrap();
        let good = PfnInfoBlock::fsdax(&l, UUID);
        let mut flipped = good.encode();
        flipped[200] ^= 1;
        assert!(matches!(
            PfnInfoBlock::decode(&flipped).check(64 * MIB),
            Err(PfnError::BadChecksum { .. })
        ));
        let resealed = |mut b: PfnInfoBlock| {
            b.checksum = sb_checksum(&b.encode());
            b
        };
        let mut b = good;
        b.parent_uuid = UUID;
        assert_eq!(resealed(b).check(64 * MIB), Err(PfnError::LabelledParent));
        let mut b = good;
        b.mode = 0;
        assert_eq!(
            resealed(b).check(64 * MIB),
            Err(PfnError::BadMode { mode: 0 })
        );
        let mut b = good;
        b.page_struct_size = 40;
        assert_eq!(
            resealed(b).check(64 * MIB),
            Err(PfnError::PageStructSize { size: 40 })
        );
        let mut b = good;
        b.dataoff = 3 * MIB;
        assert!(matches!(
            resealed(b).check(64 * MIB),
            Err(PfnError::DataoffMisaligned { .. })
        ));
        // The same block on a device too small for its data.
        assert!(matches!(
            good.check(2 * MIB),
            Err(PfnError::DataoffBeyondEnd { .. })
        ));
        assert!(matches!(
            good.check(32 * MIB),
            Err(PfnError::NpfnsBeyondEnd { .. })
        ));
        let mut b = good;
        b.signature = DAX_SIGNATURE;
        assert!(matches!(
            resealed(b).check(64 * MIB),
            Err(PfnError::BadSignature { found }) if found == "NVDIMM_DAX_INFO"
        ));
    }

    #[test]
    fn recognises_other_info_blocks() {
        let mut block = [0u8; 4096];
        assert_eq!(InfoKind::of(&block), None);
        block[..16].copy_from_slice(&BTT_SIGNATURE);
        assert_eq!(
            InfoKind::of(&block).map(InfoKind::mode_name),
            Some("sector")
        );
        block[..16].copy_from_slice(&DAX_SIGNATURE);
        assert_eq!(
            InfoKind::of(&block).map(InfoKind::mode_name),
            Some("devdax")
        );
    }

    proptest! {
        #[test]
        fn every_valid_layout_is_accepted_by_the_kernel_checks(
            units in 2u64..4096,
            align_idx in 0usize..2,
        ) {
            let size = units * COMPAT_ALIGN;
            let align = SUPPORTED_ALIGNS[align_idx];
            if let Ok(l) = PfnLayout::pmem(size, align) {
                let block = PfnInfoBlock::fsdax(&l, UUID);
                prop_assert_eq!(block.check(size), Ok(()));
                // The memmap covers every data page.
                prop_assert!(l.dataoff >= INFO_BLOCK_RESERVE + STRUCT_PAGE_SIZE * l.npfns);
                prop_assert_eq!(l.dataoff % COMPAT_ALIGN, 0);
                prop_assert_eq!(l.dataoff + l.data_size() + l.end_trunc, size);
            } else {
                prop_assert!(size < 8 * MIB, "{} refused", size);
            }
        }
    }
}
