//! pmvm's vCPU loop, as far as the KVM dirty ring goes, for the device crate's tiny test guest
//! (`devices/nvdimm/tests/common`): shared by `kvm_dirty_ring.rs` and the flush bench.

use std::sync::Arc;

use pmvm::dirty_ring::{DirtyRings, VcpuRingHandle};

use crate::common::RingExits;

/// A vCPU's ring and the VM's rings it belongs to.
pub struct VcpuRing(pub Arc<DirtyRings>, pub VcpuRingHandle);

impl RingExits for VcpuRing {
    fn mark(&self) -> u64 {
        self.1.mark()
    }

    fn ring_full(&self, mark: u64) {
        self.0
            .ring_full(&self.1, mark)
            .expect("handling a full dirty ring");
    }

    fn collect_if_filling(&self) {
        self.0
            .collect_if_filling(&self.1)
            .expect("an early harvest");
    }
}
