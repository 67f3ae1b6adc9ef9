//! Why a benchmark step failed: each variant names the step and the value that was wrong.

use std::io;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("{what} failed")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the dirty log")]
    Dirty(#[from] nvdimm::dirty::DirtyError),
    #[error("the benchmark NVDIMM")]
    Device(#[from] nvdimm::NvdimmError),
    #[error("{what}")]
    Mmap {
        what: String,
        #[source]
        source: nvdimm::mmap::MmapError,
    },
    #[error("{0}")]
    Check(String),
    #[error("{path}: pmvm {what}: {detail}")]
    Pmvm {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("drawing {path} failed: {detail}")]
    Plot { path: PathBuf, detail: String },
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }

    pub fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BenchError {
        move |source| BenchError::Kvm { what, source }
    }

    pub fn mmap(what: impl Into<String>) -> impl FnOnce(nvdimm::mmap::MmapError) -> BenchError {
        let what = what.into();
        move |source| BenchError::Mmap { what, source }
    }
}
