//! The guest fsync/msync suite for pmvm's NVDIMMs, and the host's half of its protocol.
//!
//! In the guest (`src/bin/pmem-tests.rs`, linked statically and run by the initramfs) the
//! suite makes fsdax namespaces, mounts ext4 and xfs with DAX, and runs every case in
//! [`cases`]: after each sync call returns it reports where the data lives in the NVDIMM
//! ([`protocol::Report`]) and waits for the host. On the host, [`host`] checks each report
//! against pmvm's flush counters and the backing file, and renders the results.

pub mod actions;
pub mod cases;
pub mod console;
pub mod fiemap;
#[cfg(feature = "host")]
pub mod host;
pub mod mapping;
pub mod nd;
pub mod options;
pub mod protocol;
pub mod runner;
