//! The host's half of the suite: it answers the guest's lines, checks each report against
//! pmvm's flush counters, the NVDIMM's backing file and the host page cache, and renders the
//! results. `tests/guest_suite.rs` drives it with a real pmvm; the unit tests drive it with
//! canned transcripts and real files.

pub mod api;
pub mod session;
pub mod stages;
pub mod table;
pub mod verify;
