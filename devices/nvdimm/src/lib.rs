//! NVDIMM.
