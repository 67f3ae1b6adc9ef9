//! pmvm's NVDIMM: a host file mapped into the guest as persistent memory, whose flush hints
//! trap into a synchronous writeback of exactly the pages the guest dirtied.

pub mod stats;
