//! Writing takes as WAV files, for the editor's export buttons.
//!
//! Runs on the controller thread ([`crate::controller::Command::Export`]), never on the audio
//! thread: it copies audio, may resample and writes files. Each file is written by
//! `segue_engine::audio::write_wav_f32` (32-bit float, through a temporary file renamed into
//! place), so a failed export leaves no half-written file. Existing files are never
//! overwritten: a name already taken gets a number (`Take 1 (2).wav`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use segue_engine::audio::{write_wav_f32, Audio, AudioError};

use crate::takes::{SourceAudio, Take, TakeId};

/// The sample rate exported files are written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExportRate {
    /// The host's rate: the audio exactly as the plugin plays it.
    #[default]
    Host,
    /// MusicGen's own 32 kHz: the audio exactly as the model made it (and the project saves it).
    Model,
}

/// What to export where.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportRequest {
    /// The takes, in the order their files are written.
    pub takes: Vec<TakeId>,
    /// The folder the files go to (created if missing).
    pub folder: PathBuf,
    /// Their sample rate.
    pub rate: ExportRate,
}

/// Where an export went.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// The folder the files were written to.
    pub folder: PathBuf,
    /// Every file written, in request order.
    pub files: Vec<PathBuf>,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// None of the requested takes exists any more.
    #[error("there is no take to export")]
    NothingToExport,
    /// The folder cannot be made.
    #[error("cannot create the folder {folder}: {error}")]
    Folder {
        /// The folder.
        folder: PathBuf,
        /// What the system said.
        error: std::io::Error,
    },
    /// A file cannot be written (the ones before it were).
    #[error("{0}")]
    Write(#[from] AudioError),
    /// A take's audio is not usable.
    #[error("take \"{name}\": {reason}")]
    Audio {
        /// The take's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// Environment variable naming the folder exports go to by default (a studio's shared folder;
/// the tests' scratch folder).
pub const EXPORT_DIR_ENV: &str = "SEGUE_EXPORT_DIR";

/// The folder exports go to unless the user picks another: `$SEGUE_EXPORT_DIR` when set, else
/// `Music/Segue` in the user's home (`$HOME`, or `%USERPROFILE%` on Windows), or `Segue` in the
/// temporary folder without a home.
pub fn default_export_folder() -> PathBuf {
    if let Some(dir) = std::env::var_os(EXPORT_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var_os("USERPROFILE").filter(|h| !h.is_empty()));
    match home {
        Some(home) => PathBuf::from(home).join("Music").join("Segue"),
        None => std::env::temp_dir().join("Segue"),
    }
}

/// Longest file stem [`file_stem`] makes, in characters.
pub const MAX_STEM_CHARS: usize = 80;

/// A file stem for a take named `name` that every common file system accepts: characters that
/// Windows, macOS or Linux reserve (`<>:"/\|?*`, control characters) become `_`, leading and
/// trailing spaces and dots go, and it is at most [`MAX_STEM_CHARS`] long. An empty result (or a
/// name Windows reserves, like `CON`) becomes `take`-based.
pub fn file_stem(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_control() || matches!(c, '<' | '>' | ':' | '"' | '/' | '\\' | '|' | '?' | '*') {
                '_'
            } else {
                c
            }
        })
        .take(MAX_STEM_CHARS)
        .collect();
    let trimmed = cleaned.trim_matches(|c: char| c == ' ' || c == '.');
    if trimmed.is_empty() {
        return "take".to_owned();
    }
    const RESERVED: [&str; 4] = ["CON", "PRN", "AUX", "NUL"];
    let upper = trimmed.to_ascii_uppercase();
    let reserved = RESERVED.contains(&upper.as_str())
        || ((upper.starts_with("COM") || upper.starts_with("LPT"))
            && upper.len() == 4
            && upper.as_bytes()[3].is_ascii_digit());
    if reserved {
        format!("take {trimmed}")
    } else {
        trimmed.to_owned()
    }
}

/// `folder/stem.wav`, or `folder/stem (n).wav` with the smallest `n >= 2` whose file does not
/// exist (nor is in `taken`, the paths this export already chose).
pub fn unique_path(folder: &Path, stem: &str, taken: &[PathBuf]) -> PathBuf {
    let free = |p: &PathBuf| !p.exists() && !taken.contains(p);
    let first = folder.join(format!("{stem}.wav"));
    if free(&first) {
        return first;
    }
    (2..)
        .map(|n| folder.join(format!("{stem} ({n}).wav")))
        .find(free)
        .expect("an unbounded range always finds a free name")
}

/// The audio a take is exported as: the host-rate take as the plugin plays it, or the saved
/// 32 kHz source.
pub fn export_audio(source: &SourceAudio, take: &Take, rate: ExportRate) -> Audio {
    match rate {
        ExportRate::Host => Audio {
            sample_rate: take.sample_rate().round() as u32,
            channels: take.to_planar(),
        },
        ExportRate::Model => Audio {
            sample_rate: source.sample_rate,
            channels: source.channels.clone(),
        },
    }
}

/// Writes each `(name, source, take)` of `takes` into `request.folder` as `name.wav` (see
/// [`file_stem`], [`unique_path`]) at `request.rate`. `request.takes` is not consulted: the
/// caller has already looked the ids up (takes deleted meanwhile are simply absent).
pub fn export_takes(
    request: &ExportRequest,
    takes: &[(String, SourceAudio, Arc<Take>)],
) -> Result<ExportReport, ExportError> {
    if takes.is_empty() {
        return Err(ExportError::NothingToExport);
    }
    std::fs::create_dir_all(&request.folder).map_err(|error| ExportError::Folder {
        folder: request.folder.clone(),
        error,
    })?;
    let mut files = Vec::with_capacity(takes.len());
    for (name, source, take) in takes {
        let audio = export_audio(source, take, request.rate);
        if audio.frames() == 0 {
            return Err(ExportError::Audio {
                name: name.clone(),
                reason: "it holds no audio yet".to_owned(),
            });
        }
        let path = unique_path(&request.folder, &file_stem(name), &files);
        write_wav_f32(&path, &audio)?;
        files.push(path);
    }
    Ok(ExportReport {
        folder: request.folder.clone(),
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use segue_engine::audio::read_wav;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("segue-export-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn take(frames: usize, rate: f64) -> (SourceAudio, Arc<Take>) {
        let left: Vec<f32> = (0..frames).map(|i| (i as f32 * 0.01).sin() * 0.5).collect();
        let right: Vec<f32> = left.iter().map(|x| -x).collect();
        let planar = [left.clone(), right.clone()];
        let take = Take::complete(TakeId::fresh(), rate, Some(16.0), &planar).unwrap();
        // A made-up 32 kHz source of another length, to tell the two apart in the files.
        let source = SourceAudio {
            sample_rate: 32_000,
            channels: vec![left[..frames / 2].to_vec(), right[..frames / 2].to_vec()],
        };
        (source, take)
    }

    #[test]
    fn stems_are_safe_everywhere() {
        assert_eq!(file_stem("Take 1"), "Take 1");
        assert_eq!(file_stem("a/b\\c:d*e?f\"g<h>i|j"), "a_b_c_d_e_f_g_h_i_j");
        assert_eq!(file_stem("  ..hidden.. "), "hidden");
        assert_eq!(file_stem(""), "take");
        assert_eq!(file_stem("..."), "take");
        assert_eq!(file_stem("tab\there"), "tab_here");
        assert_eq!(file_stem("con"), "take con");
        assert_eq!(file_stem("LPT1"), "take LPT1");
        assert_eq!(file_stem("COMPOSITION"), "COMPOSITION");
        assert_eq!(file_stem(&"x".repeat(200)).chars().count(), MAX_STEM_CHARS);
        assert_eq!(file_stem("Grüße ♪"), "Grüße ♪");
    }

    #[test]
    fn names_never_clobber_files() {
        let dir = scratch("unique");
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(unique_path(&dir, "Take 1", &[]), dir.join("Take 1.wav"));
        std::fs::write(dir.join("Take 1.wav"), b"user file").unwrap();
        assert_eq!(unique_path(&dir, "Take 1", &[]), dir.join("Take 1 (2).wav"));
        let taken = vec![dir.join("Take 1 (2).wav")];
        assert_eq!(
            unique_path(&dir, "Take 1", &taken),
            dir.join("Take 1 (3).wav")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn default_folder_is_music_segue_in_the_home() {
        let folder = default_export_folder();
        if let Some(dir) = std::env::var_os(EXPORT_DIR_ENV).filter(|d| !d.is_empty()) {
            assert_eq!(folder, PathBuf::from(dir));
        } else if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            assert_eq!(folder, PathBuf::from(home).join("Music").join("Segue"));
        }
    }

    #[test]
    fn exported_takes_read_back_at_either_rate() {
        let dir = scratch("read-back").join("nested");
        let (source, take) = take(4_800, 48_000.0);
        let takes = vec![
            ("Take 1".to_owned(), source.clone(), take.clone()),
            ("Take 1".to_owned(), source.clone(), take.clone()),
        ];
        let host = export_takes(
            &ExportRequest {
                takes: vec![],
                folder: dir.clone(),
                rate: ExportRate::Host,
            },
            &takes,
        )
        .unwrap();
        assert_eq!(host.folder, dir);
        assert_eq!(
            host.files,
            vec![dir.join("Take 1.wav"), dir.join("Take 1 (2).wav")]
        );
        let planar = take.to_planar();
        for file in &host.files {
            let back = read_wav(file).unwrap();
            assert_eq!(back.sample_rate, 48_000);
            assert_eq!(back.channels.len(), 2);
            assert_eq!(back.frames(), 4_800);
            assert_eq!(back.channels, planar, "32-bit float keeps every sample");
        }

        let model = export_takes(
            &ExportRequest {
                takes: vec![],
                folder: dir.clone(),
                rate: ExportRate::Model,
            },
            &takes[..1],
        )
        .unwrap();
        assert_eq!(model.files, vec![dir.join("Take 1 (3).wav")]);
        let back = read_wav(&model.files[0]).unwrap();
        assert_eq!(back.sample_rate, 32_000);
        assert_eq!(back.frames(), 2_400);
        assert_eq!(back.channels, source.channels);
        // Nothing else (no temporary files) is left in the folder.
        let names = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(names, 3);
        std::fs::remove_dir_all(dir.parent().unwrap()).unwrap();
    }

    #[test]
    fn nothing_to_export_and_unwritable_folders_are_errors() {
        let dir = scratch("errors");
        let request = ExportRequest {
            takes: vec![],
            folder: dir.clone(),
            rate: ExportRate::Host,
        };
        let err = export_takes(&request, &[]).unwrap_err();
        assert_eq!(err.to_string(), "there is no take to export");
        // A file where the folder should be.
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(&dir, b"not a folder").unwrap();
        let (source, take) = take(100, 44_100.0);
        let err = export_takes(&request, &[("t".into(), source, take)]).unwrap_err();
        assert!(
            err.to_string().starts_with("cannot create the folder"),
            "{err}"
        );
        std::fs::remove_file(&dir).unwrap();
    }
}
