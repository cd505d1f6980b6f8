use which::which;

/// Makes cargo rebuild the kernel programs when bpf-linker changes (it is a
/// linker cargo does not know about), as aya-template does.
fn main() {
    if let Ok(bpf_linker) = which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", bpf_linker.display());
    }
}
