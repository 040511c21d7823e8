//! A small but real CLAP host for testing Segue the way a DAW runs it.
//!
//! The host loads the plugin binary cargo built (the `segue` cdylib, see [`locate`]), instantiates
//! it through its CLAP entry point and drives it through the CLAP ABI only: activation, `process()`
//! with audio, a transport and events, the params, state, audio-ports, note-ports and GUI
//! extensions. Nothing here links to the plugin's Rust code except for documented constants.
//!
//! The pieces, from the bottom up:
//! - [`locate`]: where the plugin binary is.
//! - [`host`]: [`PluginLibrary`] (a loaded binary) and [`PluginInstance`] (one plugin instance with
//!   its host side: callbacks, preallocated audio buffers, event queues, an optional editor).
//! - [`transport`]: the host's transport as test scripts describe it, turned into the CLAP
//!   transport event and advanced block by block (tempo, signature, loop wrap).
//! - [`render`]: running a whole signal through an instance in chosen block splits, with events at
//!   absolute sample positions.
//! - [`gui`]: an X server for tests (the running one, or a private Xvfb), the host window the
//!   editor embeds into, and screenshots.
//! - [`signal`]: test signals and comparisons.
//!
//! Everything returns `anyhow::Result` with context; a failing CLAP call names the call.

pub mod gui;
pub mod host;
pub mod locate;
pub mod render;
pub mod signal;
pub mod transport;

pub use host::{HostEvent, PluginInstance, PluginLibrary, StereoBuffer};
pub use render::{render, BlockSplit, RenderRequest};
pub use transport::Transport;

/// The CLAP id Segue registers (`ClapPlugin::CLAP_ID`).
pub const SEGUE_CLAP_ID: &str = "audio.segue.segue";

/// CLAP parameter id nice-plug derives from a parameter's string id (`#[id = "..."]`).
///
/// This is nice-plug's documented, stable hash (`wrapper::util::hash_param_id`): a Java-style
/// `31 * h + byte` string hash with the top bit cleared (VST3 reserves it for host parameters).
/// Hosts store automation against this number, which is why string ids must never change.
pub fn clap_param_id(id: &str) -> u32 {
    let mut hash: u32 = 0;
    for byte in id.bytes() {
        hash = hash.wrapping_mul(31).wrapping_add(byte as u32);
    }
    hash & !(1 << 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn param_id_hash_known_answers() {
        // Whether the plugin agrees is checked through the params extension in `tests/plugin.rs`.
        assert_eq!(clap_param_id(""), 0);
        assert_eq!(clap_param_id("a"), 97);
        assert_eq!(clap_param_id("ab"), 97 * 31 + 98);
        // Overflowing ids wrap and lose the top bit.
        let long = clap_param_id("a-parameter-id-long-enough-to-overflow");
        assert_eq!(long & (1 << 31), 0);
    }
}
