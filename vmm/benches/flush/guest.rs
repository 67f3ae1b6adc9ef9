//! The guest programs of the benchmark, for the 64-bit TinyVm of the nvdimm tests: loops that
//! store to a run of pages, with an MMIO exit after each round.
//!
//! Loop encodings (checked against GNU as): `mov %rdi,(%rax)` 48 89 38,
//! `add $imm32,%rax` 48 05 imm32, `dec %rcx` 48 ff c9, `dec %rdi` 48 ff cf, `jnz rel8` 75 rel8,
//! `jnz rel32` 0f 85 rel32.

use crate::common::{Code, Reg};

/// Guest-physical address of the NVDIMM's flush-hint page, and of the marker of the
/// dirty-tracking bench: in no memslot, so a store there exits.
pub const EXIT_GPA: u64 = 0x10_0000;
/// Guest-physical address of the marker the store loop writes every `MARK_EVERY` pages: in no
/// memslot, so KVM enters the guest again after it, as a real guest's timer interrupts make it.
pub const MARK_GPA: u64 = 0x18_0000;
/// Pages stored between two marker exits: well below a dirty ring's size. An emulating host
/// checks the ring's limit only when it enters the guest (docs/flush-path.md, "Overflow").
pub const MARK_EVERY: u64 = 4096;
/// Guest-physical base of the measured memslot (the NVDIMM or the logged/unlogged slot).
pub const SLOT_GPA: u64 = 0x20_0000;
/// The TinyVm page tables map the first GiB, so every page the guest stores to lies below.
pub const MAPPED_END: u64 = 1 << 30;
/// Dirty pages lie this many pages apart, so each is a run of its own (as the scattered pages of
/// the host-writeback notes are), not one long sequential write.
pub const STRIDE_PAGES: u64 = 2;
pub const PAGE: u64 = 4096;

/// Device offset of the `i`-th page the benchmark dirties.
pub fn page_offset(i: u64) -> u64 {
    i * STRIDE_PAGES * PAGE
}

/// Highest page count whose pages the guest can reach in a slot at `SLOT_GPA`.
pub fn max_pages() -> u64 {
    (MAPPED_END - SLOT_GPA) / (STRIDE_PAGES * PAGE)
}

fn raw(mut code: Code, bytes: &[u8]) -> Code {
    code.0.extend_from_slice(bytes);
    code
}

/// One 8-byte store of %rdi into each of `pages` pages from `base`, `STRIDE_PAGES` apart
/// (clobbers rax, rcx; with `marks`, also rbx and a store to `MARK_GPA` every `MARK_EVERY`
/// pages). Nothing for 0 pages.
fn store_loop(code: Code, base: u64, pages: u64, marks: bool) -> Code {
    if pages == 0 {
        return code;
    }
    let stride = (STRIDE_PAGES * PAGE) as u32;
    let code = code
        .mov_imm(Reg::Rax, base)
        .mov_imm(Reg::Rbx, MARK_GPA)
        .mov_imm(Reg::Rcx, pages)
        .store(Reg::Rax, Reg::Rdi);
    let code = raw(code, &[0x48, 0x05]);
    let mut code = raw(code, &stride.to_le_bytes());
    let mut body = 14i8;
    if marks {
        // test $(MARK_EVERY - 1),%ecx; jnz +3; mov %rdi,(%rbx)
        code = raw(code, &[0xf7, 0xc1]);
        code = raw(code, &((MARK_EVERY - 1) as u32).to_le_bytes());
        code = raw(code, &[0x75, 0x03, 0x48, 0x89, 0x3b]);
        body += 11;
    }
    // dec %rcx; jnz back over the loop body.
    raw(code, &[0x48, 0xff, 0xc9, 0x75, (-body) as u8])
}

/// `body` `rounds` times with %rdi counting down from `rounds` (so every round stores new
/// values), then hlt.
fn repeat(rounds: u64, body: impl FnOnce(Code) -> Code) -> Code {
    let code = Code::default().mov_imm(Reg::Rdi, rounds);
    let top = code.0.len();
    let code = raw(body(code), &[0x48, 0xff, 0xcf, 0x0f, 0x85]);
    let rel = top as i64 - (code.0.len() as i64 + 4);
    raw(code, &(rel as i32).to_le_bytes()).hlt()
}

/// `rounds` times: dirty `pages` pages of the NVDIMM, then write its flush hint as Linux does
/// (`writeq(1, hint)`): one synchronous exit per round.
pub fn dirty_then_flush(pages: u64, rounds: u64) -> Code {
    repeat(rounds, |code| {
        store_loop(code, SLOT_GPA, pages, true).flush_hint(EXIT_GPA)
    })
}

/// `rounds` times: a marker exit, stores to `pages` pages, a marker exit. The time between
/// the vCPU's resuming after the first marker and the second is the stores alone.
pub fn marked_stores(pages: u64, rounds: u64) -> Code {
    repeat(rounds, |code| {
        let code = code.flush_hint(EXIT_GPA);
        // `flush_hint` left the marker address in %rsi and 1 in %rdx: store it again.
        store_loop(code, SLOT_GPA, pages, false).store(Reg::Rsi, Reg::Rdx)
    })
}
