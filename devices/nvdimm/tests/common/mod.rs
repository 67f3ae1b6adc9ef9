//! A tiny long-mode guest on real KVM, and the host's view of a file's page cache.
//!
//! Guest RAM is 64 KiB at GPA 0 holding identity page tables (first 1 GiB, 2 MiB pages) and the
//! code; the code stores 8-byte values through general-purpose registers only, which this host's
//! emulator handles, and ends with `hlt` (no irqchip, so HLT exits to us).

#![allow(dead_code)]

use std::fs::File;
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use nvdimm::mmap::Mapping;

pub const RAM_SIZE: u64 = 0x10000;
const GDT: u64 = 0x500;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
pub const CODE: u64 = 0x4000;
/// The pmem range sits in the identity-mapped first GiB, clear of guest RAM.
pub const PMEM_GPA: u64 = 0x20_0000;
/// Guest-physical hint page: in no memslot, so writes to it exit.
pub const HINT_GPA: u64 = 0x10_0000;

/// Device 0 of the tests: slot 1 at `PMEM_GPA`, one hint at `HINT_GPA`.
pub fn device_params(manual_protect: bool) -> nvdimm::NvdimmParams {
    nvdimm::NvdimmParams {
        index: 0,
        slot: 1,
        guest_base: PMEM_GPA,
        hint_page: HINT_GPA,
        default_hints: 1,
        manual_protect,
    }
}

/// Opens /dev/kvm, or prints why the test is skipped.
pub fn kvm_or_skip(test: &str) -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            println!("SKIP: no /dev/kvm ({e}): {test}");
            None
        }
    }
}

/// A VM with guest RAM at 0 (slot 0) and one vCPU in 64-bit mode at `CODE`.
pub struct TinyVm {
    pub vm: Arc<VmFd>,
    vcpu: Option<VcpuFd>,
    /// With the dirty ring on: vCPU 0's ring, for its ring-full exits.
    ring: Option<Box<dyn RingExits>>,
    ram: Mapping,
    _ram_file: File,
    /// What KVM supports, given to every vCPU as its CPUID: hardware KVM refuses 64-bit
    /// registers for a vCPU whose CPUID lacks long mode.
    cpuid: CpuId,
}

/// x86-64 general-purpose register numbers as ModRM encodes them.
#[derive(Clone, Copy)]
pub enum Reg {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsi = 6,
    Rdi = 7,
}

/// Guest code built from a few encodings checked against GNU as.
#[derive(Default)]
pub struct Code(pub Vec<u8>);

impl Code {
    /// `movabs $imm, %reg`: REX.W B8+r imm64.
    pub fn mov_imm(mut self, reg: Reg, imm: u64) -> Self {
        self.0.extend([0x48, 0xb8 + reg as u8]);
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `mov %src, (%base)`: REX.W 89 /r with mod=00 (base must not be rsp or rbp).
    pub fn store(mut self, base: Reg, src: Reg) -> Self {
        self.0.extend([0x48, 0x89, ((src as u8) << 3) | base as u8]);
        self
    }

    /// Stores the 8-byte `value` at guest address `addr` (clobbers rax, rbx).
    pub fn write_u64(self, addr: u64, value: u64) -> Self {
        self.mov_imm(Reg::Rax, addr)
            .mov_imm(Reg::Rbx, value)
            .store(Reg::Rax, Reg::Rbx)
    }

    /// `writeq(1, addr)`, as Linux writes a flush hint (clobbers rsi, rdx).
    pub fn flush_hint(self, addr: u64) -> Self {
        self.mov_imm(Reg::Rsi, addr)
            .mov_imm(Reg::Rdx, 1)
            .store(Reg::Rsi, Reg::Rdx)
    }

    /// `add $imm32, %reg` (sign-extended): REX.W 81 /0 id.
    pub fn add_imm(mut self, reg: Reg, imm: i32) -> Self {
        self.0.extend([0x48, 0x81, 0xc0 | reg as u8]);
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// Stores `value` at the start of `count` consecutive pages from `addr`, in a loop (clobbers
    /// rax, rbx, rcx): `mov %rbx,(%rax); add $4096,%rax; dec %rcx; jnz` back.
    pub fn write_pages(self, addr: u64, count: u64, value: u64) -> Self {
        let mut code = self
            .mov_imm(Reg::Rax, addr)
            .mov_imm(Reg::Rbx, value)
            .mov_imm(Reg::Rcx, count);
        let top = code.0.len();
        code = code.store(Reg::Rax, Reg::Rbx).add_imm(Reg::Rax, 4096);
        // dec %rcx: REX.W FF /1.
        code.0.extend([0x48, 0xff, 0xc9]);
        // jnz rel8 back to the store.
        let rel = top as i64 - (code.0.len() as i64 + 2);
        code.0.extend([0x75, rel as i8 as u8]);
        code
    }

    pub fn hlt(mut self) -> Self {
        self.0.push(0xf4);
        self
    }
}

/// A vCPU's side of the KVM dirty ring, which a VM that turns the ring on must drive around
/// each `KVM_RUN` as pmvm's vCPU loop does; given by the tests and the bench that use pmvm's
/// rings (the rings are the VMM's, not the device's).
pub trait RingExits: Send {
    /// Read before each `KVM_RUN`.
    fn mark(&self) -> u64;
    /// After `KVM_EXIT_DIRTY_RING_FULL` from the run that began at `mark`: harvests, and frees
    /// what an overflow left counted, so that the vCPU can run again.
    fn ring_full(&self, mark: u64);
    /// After every exit: harvests early if the ring is filling.
    fn collect_if_filling(&self);
}

/// How a run of the guest went, exit by exit.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    MmioWrite(u64, Vec<u8>),
    MmioRead(u64, usize),
    /// KVM_EXIT_DIRTY_RING_FULL: harvest the rings before re-entering.
    DirtyRingFull,
    Hlt,
}

/// KVM_EXIT_DIRTY_RING_FULL, which kvm-ioctls reports as an unsupported exit.
const KVM_EXIT_DIRTY_RING_FULL: u32 = 31;

/// Guest code of vCPU `id` lives in its own 8 KiB at CODE.
const CODE_SLOT: u64 = 0x2000;
/// Most vCPUs [`TinyVm::create_vcpu`] can place in guest RAM.
pub const MAX_VCPUS: u64 = (RAM_SIZE - CODE) / CODE_SLOT;

impl TinyVm {
    pub fn new(kvm: &Kvm) -> TinyVm {
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let ram_file = tempfile::tempfile().unwrap();
        ram_file.set_len(RAM_SIZE).unwrap();
        let ram = Mapping::new(&ram_file, RAM_SIZE, true).unwrap();
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        TinyVm {
            vm,
            cpuid,
            vcpu: None,
            ring: None,
            ram,
            _ram_file: ram_file,
        }
    }

    /// Creates guest RAM and the vCPU. Call after any VM-wide capability is enabled.
    pub fn boot(&mut self, code: &Code) {
        self.setup_ram();
        self.vcpu = Some(self.create_vcpu(0, code));
    }

    /// Like [`TinyVm::boot`] on a VM whose dirty ring is on: `add_vcpu` maps vCPU 0's ring,
    /// and [`TinyVm::run`] handles its ring-full exits as pmvm does.
    pub fn boot_with_ring(
        &mut self,
        code: &Code,
        add_vcpu: impl FnOnce(&VcpuFd) -> Box<dyn RingExits>,
    ) {
        self.boot(code);
        let vcpu = self.vcpu.as_ref().expect("just created");
        self.ring = Some(add_vcpu(vcpu));
    }

    /// Registers guest RAM and writes the page tables: once, before [`TinyVm::create_vcpu`].
    pub fn setup_ram(&self) {
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: RAM_SIZE,
            userspace_addr: self.ram.host_addr(),
        };
        // SAFETY: the range is `self.ram`, mapped for RAM_SIZE bytes; the VM (and so the slot)
        // is dropped with this struct, and `vm` is declared before `ram`, so KVM's reference
        // goes first.
        unsafe { self.vm.set_user_memory_region(region) }.expect("RAM memslot");
        self.write_page_tables();
    }

    /// Creates vCPU `id` in 64-bit mode at its own copy of `code`. Without an irqchip every
    /// vCPU is runnable at once (no INIT/SIPI).
    pub fn create_vcpu(&self, id: u64, code: &Code) -> VcpuFd {
        assert!(id < MAX_VCPUS && code.0.len() as u64 <= CODE_SLOT);
        let entry = CODE + id * CODE_SLOT;
        self.ram.write_at(entry, &code.0).unwrap();
        let vcpu = self.vm.create_vcpu(id).expect("KVM_CREATE_VCPU");
        vcpu.set_cpuid2(&self.cpuid).expect("KVM_SET_CPUID2");
        let mut sregs = vcpu.get_sregs().unwrap();
        let code_seg = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 0x08,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        let data_seg = kvm_segment {
            selector: 0x10,
            type_: 0x3,
            db: 1,
            l: 0,
            ..code_seg
        };
        sregs.cs = code_seg;
        sregs.ds = data_seg;
        sregs.es = data_seg;
        sregs.fs = data_seg;
        sregs.gs = data_seg;
        sregs.ss = data_seg;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 3 * 8 - 1;
        sregs.cr3 = PML4;
        sregs.cr4 |= 1 << 5; // PAE
        sregs.cr0 |= (1 << 31) | (1 << 4) | 1; // PG, ET, PE
        sregs.efer |= (1 << 8) | (1 << 10); // LME, LMA
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = entry;
        regs.rsp = 0x8000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        vcpu
    }

    fn write_page_tables(&self) {
        let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
        for (i, e) in gdt.iter().enumerate() {
            self.ram
                .write_at(GDT + 8 * i as u64, &e.to_le_bytes())
                .unwrap();
        }
        self.ram.write_at(PML4, &(PDPT | 3).to_le_bytes()).unwrap();
        self.ram.write_at(PDPT, &(PD | 3).to_le_bytes()).unwrap();
        for i in 0..512u64 {
            // Present, writable, 2 MiB page.
            let entry = (i << 21) | 0x83;
            self.ram.write_at(PD + 8 * i, &entry.to_le_bytes()).unwrap();
        }
    }

    /// Runs until HLT, calling `on_exit` for each MMIO exit before the vCPU resumes, and
    /// returns the exits in order. Fails the test if the guest does not halt within 60 s.
    pub fn run(&mut self, on_exit: impl FnMut(&Exit) + Send + 'static) -> Vec<Exit> {
        self.run_within(Duration::from_secs(60), on_exit)
    }

    /// [`TinyVm::run`] with a run limit of `limit`.
    pub fn run_within(
        &mut self,
        limit: Duration,
        on_exit: impl FnMut(&Exit) + Send + 'static,
    ) -> Vec<Exit> {
        let vcpu = self.vcpu.take().expect("boot() first");
        spawn_vcpu_with_ring(vcpu, self.ring.take(), on_exit)
            .recv_timeout(limit)
            .unwrap_or_else(|_| {
                panic!(
                    "the guest neither halted nor failed within {} s",
                    limit.as_secs()
                )
            })
    }
}

/// Runs `vcpu` on a thread of its own until HLT, calling `on_exit` for every exit before the
/// vCPU resumes; the exits arrive on the returned channel.
pub fn spawn_vcpu(
    vcpu: VcpuFd,
    on_exit: impl FnMut(&Exit) + Send + 'static,
) -> mpsc::Receiver<Vec<Exit>> {
    spawn_vcpu_with_ring(vcpu, None, on_exit)
}

/// Like [`spawn_vcpu`], handling ring-full exits of a VM with the dirty ring as pmvm does.
pub fn spawn_vcpu_with_ring(
    mut vcpu: VcpuFd,
    ring: Option<Box<dyn RingExits>>,
    mut on_exit: impl FnMut(&Exit) + Send + 'static,
) -> mpsc::Receiver<Vec<Exit>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut exits = Vec::new();
        for _ in 0..100_000 {
            let mark = ring.as_ref().map(|ring| ring.mark());
            let exit = match vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite(addr, data.to_vec()),
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    data.fill(0);
                    Exit::MmioRead(addr, data.len())
                }
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => Exit::DirtyRingFull,
                Ok(other) => panic!("unexpected exit {other:?} after {exits:?}"),
                Err(e) => panic!("KVM_RUN failed: {e} after {exits:?}"),
            };
            if let (Exit::DirtyRingFull, Some(ring), Some(mark)) = (&exit, &ring, mark) {
                ring.ring_full(mark);
            }
            if let Some(ring) = &ring {
                ring.collect_if_filling();
            }
            on_exit(&exit);
            let done = exit == Exit::Hlt;
            exits.push(exit);
            if done {
                break;
            }
        }
        // What the callback holds (a device, say) is gone before the caller hears of the end:
        // the caller may open the same backing file next.
        drop(on_exit);
        let _ = tx.send(exits);
    });
    rx
}
