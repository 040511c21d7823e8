//! A host thread that called into Segue may outlive the loaded plugin.
//!
//! The standard library registers a pthread-key destructor, living in the plugin binary, on
//! every thread that calls into it. glibc runs those destructors when the thread exits; if a
//! host closed the library's last handle before that, the code is gone and the host crashes
//! (rust-lang/rust#91979; seen here as a test binary dying with SIGSEGV in
//! `__nptl_deallocate_tsd` while another test thread closed the library). `plugin/build.rs`
//! therefore links the plugin with `-z nodelete`; this checks the built binary carries the flag.

#![cfg(target_os = "linux")]

use anyhow::{ensure, Context, Result};
use segue_host_tests::locate;

#[test]
fn the_plugin_binary_stays_mapped_when_a_host_unloads_it() -> Result<()> {
    let path = locate::plugin_path()?;
    let out = std::process::Command::new("readelf")
        .arg("--dynamic")
        .arg(&path)
        .output()
        .context("readelf (binutils) is needed to inspect the plugin binary")?;
    ensure!(out.status.success(), "readelf failed on {}", path.display());
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let flags = dynamic
        .lines()
        .find(|l| l.contains("FLAGS_1"))
        .with_context(|| format!("{} has no FLAGS_1 entry:\n{dynamic}", path.display()))?;
    ensure!(
        flags.contains("NODELETE"),
        "{} can be unmapped by dlclose: {flags}",
        path.display()
    );
    Ok(())
}
