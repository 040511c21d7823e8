//! Finding the plugin binary cargo built.
//!
//! This crate depends on the `segue` package, whose library target is both an `rlib` and a
//! `cdylib`; cargo builds every crate type of a dependency's library, so by the time a test of
//! this crate runs, the cdylib of the same profile and the same sources sits next to the test
//! executable (`<target>/<profile>/deps/`). A separately built copy (`cargo build -p segue`) sits
//! one directory up. The newest of these is used, so neither order of builds can leave a stale
//! plugin under test.
//!
//! `SEGUE_PLUGIN` overrides the search with an explicit path: a `.clap` bundle from
//! `cargo xtask bundle`, or any plugin binary.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Environment variable naming the plugin binary or `.clap` bundle to test instead of the one
/// cargo built.
pub const PLUGIN_ENV: &str = "SEGUE_PLUGIN";

/// File name of the plugin's dynamic library on this platform (`libsegue.so`, `segue.dll`,
/// `libsegue.dylib`).
pub fn library_file_name() -> String {
    format!(
        "{}segue{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// The cargo profile directory (`<target>/<profile>`) of the running test executable, which
/// cargo puts in `<target>/<profile>/deps/`. This follows `CARGO_TARGET_DIR`, `--target-dir`
/// and custom profiles without knowing about them.
pub fn profile_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the running test executable")?;
    let deps = exe
        .parent()
        .with_context(|| format!("test executable {} has no parent", exe.display()))?;
    let profile = if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().unwrap_or(deps)
    } else {
        deps
    };
    Ok(profile.to_path_buf())
}

/// The plugin binary to test: `$SEGUE_PLUGIN` if set, else the newest `segue` cdylib in this
/// profile's output directories.
pub fn plugin_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os(PLUGIN_ENV) {
        let path = PathBuf::from(path);
        if !path.exists() {
            bail!("{PLUGIN_ENV}={} does not exist", path.display());
        }
        return Ok(path);
    }
    let profile = profile_dir()?;
    let name = library_file_name();
    let candidates = [profile.join("deps").join(&name), profile.join(&name)];
    newest(&candidates).with_context(|| {
        format!(
            "no plugin binary found (looked for {}); build it with `cargo build -p segue` \
             or set {PLUGIN_ENV}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" and ")
        )
    })
}

/// The most recently modified of `paths` that exists.
fn newest(paths: &[PathBuf]) -> Option<PathBuf> {
    paths
        .iter()
        .filter_map(|p| Some((modified(p)?, p)))
        .max_by_key(|(time, _)| *time)
        .map(|(_, p)| p.clone())
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

/// The workspace's `target/` directory (screenshots and other artefacts go under it): the parent
/// of the profile directory, or of the `<triple>/<profile>` pair when cross-compiling.
pub fn target_dir() -> Result<PathBuf> {
    let profile = profile_dir()?;
    let mut dir = profile
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or(profile.clone());
    // `<target>/<triple>/<profile>`: step over the triple (it has no CACHEDIR.TAG).
    if !dir.join("CACHEDIR.TAG").exists() {
        if let Some(up) = dir.parent() {
            if up.join("CACHEDIR.TAG").exists() {
                dir = up.to_path_buf();
            }
        }
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_name_has_platform_affixes() {
        let name = library_file_name();
        assert!(name.contains("segue"));
        if cfg!(target_os = "linux") {
            assert_eq!(name, "libsegue.so");
        }
    }

    #[test]
    fn newest_picks_latest_existing() {
        let dir = std::env::temp_dir().join(format!("segue-locate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = dir.join("old");
        let new = dir.join("new");
        std::fs::write(&old, b"a").unwrap();
        let t0 = SystemTime::now() - std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(t0)
            .unwrap();
        std::fs::write(&new, b"b").unwrap();
        let missing = dir.join("missing");
        assert_eq!(
            newest(&[old.clone(), missing.clone(), new.clone()]),
            Some(new.clone())
        );
        assert_eq!(newest(std::slice::from_ref(&missing)), None);
        assert_eq!(newest(&[old.clone(), missing]), Some(old));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn target_dir_contains_profile() {
        let profile = profile_dir().unwrap();
        let target = target_dir().unwrap();
        assert!(
            profile.starts_with(&target),
            "{profile:?} not under {target:?}"
        );
    }
}
