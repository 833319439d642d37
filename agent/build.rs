//! Builds the eBPF tracker (src/tracker/ebpf/tracker.bpf.c) with clang and generates its
//! libbpf-rs skeleton. Needs clang (Debian: clang); the set-up in tests/setup.sh installs it.

fn main() {
    let src = "src/tracker/ebpf/tracker.bpf.c";
    println!("cargo:rerun-if-changed={src}");
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default())
        .join("tracker.skel.rs");
    if let Err(e) = libbpf_cargo::SkeletonBuilder::new()
        .source(src)
        .clang_args(["-Wall", "-O2"])
        .build_and_generate(&out)
    {
        eprintln!("error: building {src}: {e:#}");
        eprintln!("(clang and libelf-dev are needed: apt-get install clang libelf-dev zlib1g-dev pkg-config)");
        std::process::exit(1);
    }
}
