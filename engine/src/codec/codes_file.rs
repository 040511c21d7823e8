//! The codes JSON file of `segue encode` / `segue decode` / `segue generate --codes-out`:
//! `{"frame_rate": 50, "prompt_frames": 0, "codes": [[...codebook 0...], [...codebook 1...]]}`.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::CodecError;

/// EnCodec codes of one item, one row per codebook (stereo: interleaved, row `2q` = left
/// quantizer `q`, `2q + 1` = right), every row one code per frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodesFile {
    /// Frames per second (50 for MusicGen's 32 kHz codec).
    pub frame_rate: u32,
    /// How many leading frames are the prompt (0 when the codes are not a continuation).
    pub prompt_frames: usize,
    /// `codes[k][t]`: code of codebook `k` at frame `t`.
    pub codes: Vec<Vec<u32>>,
}

impl CodesFile {
    /// From a (1, K, frames) or (K, frames) integer tensor.
    pub fn from_tensor(
        codes: &Tensor,
        frame_rate: u32,
        prompt_frames: usize,
    ) -> Result<Self, CodecError> {
        let codes = match codes.rank() {
            3 if codes.dim(0)? == 1 => codes.squeeze(0)?,
            2 => codes.clone(),
            _ => {
                return Err(CodecError::Input(format!(
                    "codes for a file must be (1, codebooks, frames), got {:?}",
                    codes.dims()
                )))
            }
        };
        let codes = codes
            .to_device(&Device::Cpu)?
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?;
        let file = Self {
            frame_rate,
            prompt_frames,
            codes,
        };
        file.validate()
            .map_err(|reason| CodecError::Input(format!("codes: {reason}")))?;
        Ok(file)
    }

    /// Number of codebook rows.
    pub fn num_codebooks(&self) -> usize {
        self.codes.len()
    }

    /// Number of frames (length of every row).
    pub fn frames(&self) -> usize {
        self.codes.first().map_or(0, Vec::len)
    }

    /// Checks every code is below `codebook_size`; the error names the row and frame of the
    /// first one that is not.
    pub fn check_range(&self, codebook_size: usize) -> Result<(), CodecError> {
        for (k, row) in self.codes.iter().enumerate() {
            if let Some((t, &c)) = row
                .iter()
                .enumerate()
                .find(|(_, &c)| c as usize >= codebook_size)
            {
                return Err(CodecError::CodeOutOfRange {
                    codebook: k,
                    frame: t,
                    code: c,
                    codebook_size,
                });
            }
        }
        Ok(())
    }

    /// (1, K, frames) u32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor, CodecError> {
        let k = self.num_codebooks();
        let t = self.frames();
        let flat: Vec<u32> = self.codes.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (1, k, t), device)?)
    }

    /// Shape invariants: at least one row, at least one frame, equal row lengths, and
    /// `prompt_frames <= frames`.
    fn validate(&self) -> Result<(), String> {
        if self.codes.is_empty() {
            return Err("no codebooks".into());
        }
        let t = self.frames();
        if t == 0 {
            return Err("no frames".into());
        }
        if let Some((k, row)) = self.codes.iter().enumerate().find(|(_, r)| r.len() != t) {
            return Err(format!(
                "codebook {k} has {} frames but codebook 0 has {t}",
                row.len()
            ));
        }
        if self.prompt_frames > t {
            return Err(format!(
                "prompt_frames {} exceeds the {t} frames",
                self.prompt_frames
            ));
        }
        Ok(())
    }

    /// Reads and validates a codes file. Errors name the file.
    pub fn read(path: &Path) -> Result<Self, CodecError> {
        let err = |reason: String| CodecError::CodesFile {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let file: Self =
            serde_json::from_str(&text).map_err(|e| err(format!("not a codes file: {e}")))?;
        file.validate().map_err(err)?;
        Ok(file)
    }

    /// Writes the file atomically: a temporary file in the same folder, renamed over `path`,
    /// so a reader never sees a partial file and a failure leaves `path` as it was.
    pub fn write(&self, path: &Path) -> Result<(), CodecError> {
        let err = |reason: String| CodecError::CodesFile {
            path: path.display().to_string(),
            reason,
        };
        self.validate().map_err(err)?;
        let json = serde_json::to_string(self).map_err(|e| err(e.to_string()))?;
        let tmp = crate::audio::temp_path_for(path);
        let result = (|| -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(json.as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(err(format!("cannot write: {e}")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        let f = CodesFile {
            frame_rate: 50,
            prompt_frames: 1,
            codes: vec![vec![1, 2, 3], vec![2047, 0, 5]],
        };
        f.write(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text.trim(),
            r#"{"frame_rate":50,"prompt_frames":1,"codes":[[1,2,3],[2047,0,5]]}"#
        );
        assert_eq!(CodesFile::read(&path).unwrap(), f);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let t = f.to_tensor(&Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 2, 3]);
        assert_eq!(CodesFile::from_tensor(&t, 50, 1).unwrap(), f);
    }

    #[test]
    fn rejects_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "ragged",
                r#"{"frame_rate":50,"prompt_frames":0,"codes":[[1,2],[3]]}"#,
                "codebook 1 has 1 frames",
            ),
            (
                "empty",
                r#"{"frame_rate":50,"prompt_frames":0,"codes":[]}"#,
                "no codebooks",
            ),
            (
                "noframes",
                r#"{"frame_rate":50,"prompt_frames":0,"codes":[[],[]]}"#,
                "no frames",
            ),
            (
                "negative",
                r#"{"frame_rate":50,"prompt_frames":0,"codes":[[-1]]}"#,
                "not a codes file",
            ),
            (
                "prompt",
                r#"{"frame_rate":50,"prompt_frames":3,"codes":[[1]]}"#,
                "prompt_frames 3",
            ),
            ("garbage", "RIFF....", "not a codes file"),
        ];
        for (name, text, want) in cases {
            let p = dir.path().join(format!("{name}.json"));
            std::fs::write(&p, text).unwrap();
            let e = CodesFile::read(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
        }
        let e = CodesFile::read(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing.json") && e.contains("cannot read"),
            "{e}"
        );
        // A failed write leaves nothing behind.
        let f = CodesFile {
            frame_rate: 50,
            prompt_frames: 0,
            codes: vec![vec![1]],
        };
        let bad = dir.path().join("no-such-dir").join("c.json");
        assert!(f.write(&bad).is_err());
        assert!(!bad.exists());
    }
}
