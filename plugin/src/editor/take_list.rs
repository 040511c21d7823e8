//! The take list's logic: what a row says about its take, which edits become commands, which
//! takes an export covers. The drawing in `mod.rs` calls these and sends the resulting
//! [`Command`]s; it changes nothing itself.

use crate::controller::Command;
use crate::export::{ExportRate, ExportRequest};
use crate::takes::{GenerationInfo, TakeAnchor, TakeId};
use crate::transport::TimeSig;

use super::settings::short_model_name;

/// Longest take name accepted, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// How the settings of a take read in its row: model, seed, sampling and lengths.
pub fn info_line(info: &GenerationInfo) -> String {
    let mut parts = Vec::new();
    if !info.model.is_empty() {
        parts.push(short_model_name(&info.model).to_owned());
    }
    if let Some(seed) = info.seed {
        parts.push(format!("seed {seed}"));
    }
    parts.push(format!("temp {:.2}", info.temperature));
    parts.push(format!("top-k {}", info.top_k));
    if info.top_p > 0.0 && info.top_p < 1.0 {
        parts.push(format!("top-p {:.2}", info.top_p));
    }
    parts.push(format!("guidance {:.1}", info.guidance));
    if info.prompt_bars > 0.0 || info.continuation_bars > 0.0 {
        parts.push(format!(
            "{} + {} bars",
            trim_float(info.prompt_bars),
            trim_float(info.continuation_bars)
        ));
    }
    parts.join(" · ")
}

/// A number without a needless `.0` (`4`, `2.5`).
fn trim_float(x: f32) -> String {
    if x.fract() == 0.0 {
        format!("{x:.0}")
    } else {
        format!("{x}")
    }
}

/// Where and how long a take is: `bar 5 · 4 bars · 0:08.0` on the timeline, `0:08.0` off it.
pub fn place_line(anchor: Option<&TakeAnchor>, frames: usize, sample_rate: f64) -> String {
    let seconds = if sample_rate > 0.0 {
        frames as f64 / sample_rate
    } else {
        0.0
    };
    let clock = format!("{}:{:04.1}", (seconds / 60.0).floor(), seconds % 60.0);
    match anchor {
        Some(a) if a.tempo_bpm > 0.0 => {
            let sig = TimeSig {
                numerator: a.time_sig_numerator,
                denominator: a.time_sig_denominator,
            };
            let bars = seconds / (sig.beats_per_bar() * 60.0 / a.tempo_bpm);
            let bars = if (bars - bars.round()).abs() < 0.01 {
                format!("{:.0}", bars.round())
            } else {
                format!("{bars:.1}")
            };
            let unit = if bars == "1" { "bar" } else { "bars" };
            format!("bar {} · {bars} {unit} · {clock}", a.bar_index + 1)
        }
        _ => clock,
    }
}

/// The rename command for a take named `current` after its name field was edited to
/// `edited`: trimmed and cut to [`MAX_NAME_CHARS`]. `None` when nothing changes or the name is
/// blank (the field then goes back to `current`).
pub fn rename_command(id: TakeId, current: &str, edited: &str) -> Option<Command> {
    let name: String = edited.trim().chars().take(MAX_NAME_CHARS).collect();
    let name = name.trim_end().to_owned();
    (!name.is_empty() && name != current).then_some(Command::Rename(id, name))
}

/// Which takes an export button covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportScope {
    /// One take (its row's button).
    One(TakeId),
    /// The selected take, if any.
    Selected,
    /// Every take, oldest first.
    All,
}

/// The export request for `scope`, given the list's ids (oldest first) and the selection;
/// `None` when it covers no take.
pub fn export_request(
    scope: ExportScope,
    ids: &[TakeId],
    selected: Option<TakeId>,
    folder: &str,
    rate: ExportRate,
) -> Option<ExportRequest> {
    let takes: Vec<TakeId> = match scope {
        ExportScope::One(id) => ids.iter().copied().filter(|i| *i == id).collect(),
        ExportScope::Selected => selected.into_iter().filter(|s| ids.contains(s)).collect(),
        ExportScope::All => ids.to_vec(),
    };
    let folder = folder.trim();
    if takes.is_empty() || folder.is_empty() {
        return None;
    }
    Some(ExportRequest {
        takes,
        folder: expand_home(folder),
        rate,
    })
}

/// `folder` with a leading `~` replaced by the home folder (as shells do).
pub fn expand_home(folder: &str) -> std::path::PathBuf {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty());
    match (folder.strip_prefix('~'), home) {
        (Some(rest), Some(home)) if rest.is_empty() || rest.starts_with(['/', '\\']) => {
            std::path::PathBuf::from(home).join(rest.trim_start_matches(['/', '\\']))
        }
        _ => std::path::PathBuf::from(folder),
    }
}

/// The selection after a row's "play" radio was clicked: the take, or none when the playing
/// take was clicked again.
pub fn select_command(clicked: TakeId, selected: Option<TakeId>) -> Command {
    if selected == Some(clicked) {
        Command::Select(None)
    } else {
        Command::Select(Some(clicked))
    }
}

/// The audition command after a row's audition button: start it, or stop it when it is the
/// take being auditioned.
pub fn audition_command(clicked: TakeId, auditioning: Option<TakeId>) -> Command {
    if auditioning == Some(clicked) {
        Command::Audition(None)
    } else {
        Command::Audition(Some(clicked))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn info() -> GenerationInfo {
        GenerationInfo {
            model: "facebook/musicgen-small".into(),
            text: "lofi".into(),
            seed: Some(1234),
            temperature: 1.0,
            top_k: 250,
            top_p: 1.0,
            guidance: 3.0,
            prompt_bars: 4.0,
            continuation_bars: 2.0,
        }
    }

    #[test]
    fn rows_show_model_seed_and_settings() {
        assert_eq!(
            info_line(&info()),
            "musicgen-small · seed 1234 · temp 1.00 · top-k 250 · guidance 3.0 · 4 + 2 bars"
        );
        let nucleus = GenerationInfo {
            top_p: 0.9,
            seed: None,
            model: String::new(),
            prompt_bars: 0.0,
            continuation_bars: 0.0,
            ..info()
        };
        assert_eq!(
            info_line(&nucleus),
            "temp 1.00 · top-k 250 · top-p 0.90 · guidance 3.0"
        );
    }

    #[test]
    fn places_read_in_bars_and_time() {
        let anchor = TakeAnchor {
            beats: 16.0,
            tempo_bpm: 120.0,
            time_sig_numerator: 4,
            time_sig_denominator: 4,
            bar_index: 4,
        };
        assert_eq!(
            place_line(Some(&anchor), 192_000, 48_000.0),
            "bar 5 · 2 bars · 0:04.0"
        );
        assert_eq!(
            place_line(Some(&anchor), 96_000, 48_000.0),
            "bar 5 · 1 bar · 0:02.0"
        );
        assert_eq!(
            place_line(Some(&anchor), 120_000, 48_000.0),
            "bar 5 · 1.2 bars · 0:02.5"
        );
        assert_eq!(place_line(None, 48_000 * 75, 48_000.0), "1:15.0");
    }

    #[test]
    fn renames_are_trimmed_and_blank_ones_dropped() {
        let id = TakeId(7);
        assert_eq!(
            rename_command(id, "Take 1", "  Chorus idea "),
            Some(Command::Rename(id, "Chorus idea".into()))
        );
        assert_eq!(rename_command(id, "Take 1", "Take 1"), None);
        assert_eq!(rename_command(id, "Take 1", "   "), None);
        let Some(Command::Rename(_, long)) = rename_command(id, "x", &"y".repeat(100)) else {
            panic!("a long name is cut, not refused");
        };
        assert_eq!(long.chars().count(), MAX_NAME_CHARS);
    }

    #[test]
    fn exports_cover_what_the_button_says() {
        let ids = [TakeId(1), TakeId(2), TakeId(3)];
        let all = export_request(ExportScope::All, &ids, None, "/tmp/x", ExportRate::Host).unwrap();
        assert_eq!(all.takes, ids.to_vec());
        assert_eq!(all.folder, PathBuf::from("/tmp/x"));
        let sel = export_request(
            ExportScope::Selected,
            &ids,
            Some(TakeId(2)),
            " /tmp/y ",
            ExportRate::Model,
        )
        .unwrap();
        assert_eq!(sel.takes, vec![TakeId(2)]);
        assert_eq!(sel.folder, PathBuf::from("/tmp/y"));
        assert_eq!(sel.rate, ExportRate::Model);
        let one = export_request(
            ExportScope::One(TakeId(3)),
            &ids,
            None,
            "/t",
            ExportRate::Host,
        );
        assert_eq!(one.unwrap().takes, vec![TakeId(3)]);
        assert_eq!(
            export_request(ExportScope::Selected, &ids, None, "/t", ExportRate::Host),
            None
        );
        assert_eq!(
            export_request(
                ExportScope::Selected,
                &ids,
                Some(TakeId(9)),
                "/t",
                ExportRate::Host
            ),
            None,
            "a selection that is gone exports nothing"
        );
        assert_eq!(
            export_request(ExportScope::All, &ids, None, "  ", ExportRate::Host),
            None
        );
        assert_eq!(
            export_request(ExportScope::All, &[], None, "/t", ExportRate::Host),
            None
        );
    }

    #[test]
    fn home_is_expanded() {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            assert_eq!(
                expand_home("~/Music/Segue"),
                PathBuf::from(&home).join("Music/Segue")
            );
            assert_eq!(expand_home("~"), PathBuf::from(&home));
        }
        assert_eq!(expand_home("~other/x"), PathBuf::from("~other/x"));
        assert_eq!(expand_home("/abs"), PathBuf::from("/abs"));
    }

    #[test]
    fn clicking_the_playing_take_again_stops_it() {
        assert_eq!(
            select_command(TakeId(1), None),
            Command::Select(Some(TakeId(1)))
        );
        assert_eq!(
            select_command(TakeId(1), Some(TakeId(2))),
            Command::Select(Some(TakeId(1)))
        );
        assert_eq!(
            select_command(TakeId(1), Some(TakeId(1))),
            Command::Select(None)
        );
        assert_eq!(
            audition_command(TakeId(1), Some(TakeId(1))),
            Command::Audition(None)
        );
        assert_eq!(
            audition_command(TakeId(1), None),
            Command::Audition(Some(TakeId(1)))
        );
    }
}
