//! The offline tools: subcommands that work on files, with no VM and no running pmvm.
//! `pmvm pmem format|info` prepares and inspects backing files; `pmvm log` reads flush-epoch
//! logs and rebuilds images from them.

pub mod log;
pub mod pmem_format;
