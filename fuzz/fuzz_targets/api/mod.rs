//! The server's own framing code and JSON types, compiled here as they are in pmvm (vmm is a
//! binary crate, so they are included by path rather than imported).
#![allow(dead_code, unused_imports)]

#[path = "../../../vmm/src/api/http.rs"]
pub mod http;
#[path = "../../../vmm/src/api/types.rs"]
pub mod types;
