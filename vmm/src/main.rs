//! pmvm: a small KVM VMM whose NVDIMM makes guest flushes exact, observable and durable.

fn main() -> std::process::ExitCode {
    pmvm::main()
}
