//! Link settings of the plugin binary.
//!
//! On ELF platforms the plugin is linked with `-z nodelete`: a host that unloads it (`dlclose`)
//! keeps its code mapped. Rust's standard library registers a per-thread destructor (a pthread
//! key whose destructor lives in this binary) on every host thread that calls into the plugin;
//! if the code were unmapped, those threads would crash when they exit, long after the plugin
//! was closed (rust-lang/rust#91979). Keeping a few megabytes mapped is the price.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if matches!(
        os.as_str(),
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly"
    ) {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
