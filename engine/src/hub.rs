//! Finding a checkpoint's files: a local folder, or a Hugging Face Hub id downloaded into (and
//! then served from) the standard Hub cache through `hf-hub` (resumable `.part` downloads).
//!
//! A checkpoint is `config.json`, the weights (`model.safetensors`, or
//! `model.safetensors.index.json` plus every shard it names), and optionally `tokenizer.json` and
//! `generation_config.json`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

const CONFIG: &str = "config.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const TOKENIZER: &str = "tokenizer.json";
const WEIGHTS: &str = "model.safetensors";
const WEIGHTS_INDEX: &str = "model.safetensors.index.json";

/// How to place a checkpoint by hand, appended to errors about missing files.
const MANUAL_HINT: &str = "to use a model without network access, put config.json, \
model.safetensors (or model.safetensors.index.json and every shard it lists), tokenizer.json and \
generation_config.json from the model's Hub page into one folder and pass that folder's path as \
the model";

/// Errors from resolving or opening a checkpoint. Each names the model and the file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("model folder {dir} has no {file}; {MANUAL_HINT}")]
    MissingLocalFile { dir: PathBuf, file: String },
    #[error("model folder {0} does not exist (or is not a folder)")]
    NoSuchFolder(PathBuf),
    #[error(
        "{0:?} is neither an existing folder nor a Hub model id like \"facebook/musicgen-small\""
    )]
    BadModelId(String),
    #[error("cannot get {file} of {model}: no network connection to {endpoint} ({reason}) and no cached copy in {cache}; {MANUAL_HINT}")]
    Offline {
        model: String,
        file: String,
        endpoint: String,
        cache: PathBuf,
        reason: String,
    },
    #[error("{model} has no {file} on the Hub (is the model id right?)")]
    NotFound { model: String, file: String },
    #[error("{model} refused access to {file} (HTTP {status}): gated or private models need a token (HF_TOKEN or `huggingface-cli login`)")]
    Unauthorized {
        model: String,
        file: String,
        status: u16,
    },
    #[error("downloading {file} of {model} failed: {reason}")]
    Download {
        model: String,
        file: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    InvalidFile { path: PathBuf, reason: String },
}

/// Download progress, for a progress bar. `bytes` counts what has arrived of `file` so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HubProgress {
    Downloading {
        file: String,
        bytes: u64,
        total: Option<u64>,
    },
    Done {
        file: String,
    },
}

/// A MusicGen checkpoint resolved to files on local disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    /// The folder holding `config.json` (a snapshot folder for Hub models).
    pub dir: PathBuf,
    /// `config.json`
    pub config: PathBuf,
    pub generation_config: Option<PathBuf>,
    /// One file, or every shard listed in `model.safetensors.index.json`, in name order.
    pub weights: Vec<PathBuf>,
    /// `tokenizer.json`
    pub tokenizer: Option<PathBuf>,
}

/// Where Hub files come from and go to.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The Hub cache folder (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`).
    pub cache_dir: PathBuf,
    /// The Hub's URL (`HF_ENDPOINT`, default `https://huggingface.co`).
    pub endpoint: String,
    /// Never touch the network (`HF_HUB_OFFLINE=1`): the cache must hold every file.
    pub offline: bool,
}

impl HubOptions {
    /// From the environment like the Python tools: `HF_HOME` (default `~/.cache/huggingface`),
    /// `HF_ENDPOINT`, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        let cache_dir = hf_hub::Cache::from_env().path().clone();
        let endpoint =
            std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".into());
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
            .unwrap_or(false);
        Self {
            cache_dir,
            endpoint,
            offline,
        }
    }
}

/// `model` is a local folder path or a Hub id like "facebook/musicgen-small". Options come from
/// the environment ([`HubOptions::from_env`]).
pub fn resolve(model: &str, progress: &mut dyn FnMut(HubProgress)) -> Result<ModelFiles, HubError> {
    resolve_with(model, &HubOptions::from_env(), progress)
}

/// [`resolve`] with explicit cache, endpoint and offline settings.
pub fn resolve_with(
    model: &str,
    opts: &HubOptions,
    progress: &mut dyn FnMut(HubProgress),
) -> Result<ModelFiles, HubError> {
    let path = Path::new(model);
    if path.is_dir() {
        return local_folder(path);
    }
    if looks_like_path(model) {
        return Err(HubError::NoSuchFolder(path.to_owned()));
    }
    if !is_hub_id(model) {
        return Err(HubError::BadModelId(model.to_string()));
    }
    HubRepo::new(model, opts).resolve(progress)
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with('.')
        || s.starts_with('~')
        || s.contains('\\')
        || s.matches('/').count() > 1
        || Path::new(s).exists()
}

fn is_hub_id(s: &str) -> bool {
    let ok = |part: &str| {
        !part.is_empty()
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match s.split_once('/') {
        Some((owner, name)) => ok(owner) && ok(name),
        None => ok(s),
    }
}

fn invalid(path: &Path, reason: impl ToString) -> HubError {
    HubError::InvalidFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// The shard file names of a `model.safetensors.index.json`, sorted, without duplicates.
fn shard_names(index: &Path) -> Result<Vec<String>, HubError> {
    let text = std::fs::read_to_string(index).map_err(|e| invalid(index, e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| invalid(index, e))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid(index, "no \"weight_map\" object"))?;
    let mut names = Vec::new();
    for (tensor, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| invalid(index, format!("weight_map[{tensor:?}] is not a file name")))?;
        if file.contains("..") || Path::new(file).is_absolute() {
            return Err(invalid(
                index,
                format!("shard name {file:?} leaves the folder"),
            ));
        }
        names.push(file.to_string());
    }
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Err(invalid(index, "\"weight_map\" lists no shards"));
    }
    Ok(names)
}

fn local_folder(dir: &Path) -> Result<ModelFiles, HubError> {
    let need = |name: &str| -> Result<PathBuf, HubError> {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(HubError::MissingLocalFile {
                dir: dir.to_owned(),
                file: name.to_string(),
            })
        }
    };
    let optional = |name: &str| Some(dir.join(name)).filter(|p| p.is_file());
    let config = need(CONFIG)?;
    let weights = if let Some(index) = optional(WEIGHTS_INDEX) {
        shard_names(&index)?
            .iter()
            .map(|n| need(n))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        vec![need(WEIGHTS)?]
    };
    Ok(ModelFiles {
        dir: dir.to_owned(),
        config,
        generation_config: optional(GENERATION_CONFIG),
        weights,
        tokenizer: optional(TOKENIZER),
    })
}

/// Adapts `hf-hub`'s progress callbacks to [`HubProgress`].
struct ProgressAdapter<'a> {
    file: String,
    bytes: u64,
    total: Option<u64>,
    sink: &'a mut dyn FnMut(HubProgress),
}

impl hf_hub::api::Progress for ProgressAdapter<'_> {
    fn init(&mut self, size: usize, _filename: &str) {
        self.total = Some(size as u64);
        (self.sink)(HubProgress::Downloading {
            file: self.file.clone(),
            bytes: self.bytes,
            total: self.total,
        });
    }
    fn update(&mut self, size: usize) {
        self.bytes += size as u64;
        (self.sink)(HubProgress::Downloading {
            file: self.file.clone(),
            bytes: self.bytes,
            total: self.total,
        });
    }
    fn finish(&mut self) {
        (self.sink)(HubProgress::Done {
            file: self.file.clone(),
        });
    }
}

/// What fetching one file gave.
enum Fetched {
    Path(PathBuf),
    /// The Hub answered that the file does not exist.
    Absent,
}

struct HubRepo<'a> {
    model: String,
    opts: &'a HubOptions,
    cache: hf_hub::CacheRepo,
    /// Built on first use, so a fully cached model never touches the network stack.
    api: Option<hf_hub::api::sync::ApiRepo>,
}

impl<'a> HubRepo<'a> {
    fn new(model: &str, opts: &'a HubOptions) -> Self {
        let cache = hf_hub::Cache::new(opts.cache_dir.clone()).model(model.to_string());
        Self {
            model: model.to_string(),
            opts,
            cache,
            api: None,
        }
    }

    fn offline_error(&self, file: &str, reason: String) -> HubError {
        HubError::Offline {
            model: self.model.clone(),
            file: file.to_string(),
            endpoint: self.opts.endpoint.clone(),
            cache: self.opts.cache_dir.clone(),
            reason,
        }
    }

    fn classify(&self, file: &str, err: hf_hub::api::sync::ApiError) -> HubError {
        use hf_hub::api::sync::ApiError;
        match err {
            ApiError::TooManyRetries(inner) => self.classify(file, *inner),
            ApiError::RequestError(e) => match *e {
                ureq::Error::Status(404, _) => HubError::NotFound {
                    model: self.model.clone(),
                    file: file.to_string(),
                },
                ureq::Error::Status(status @ (401 | 403), _) => HubError::Unauthorized {
                    model: self.model.clone(),
                    file: file.to_string(),
                    status,
                },
                ureq::Error::Status(status, _) => HubError::Download {
                    model: self.model.clone(),
                    file: file.to_string(),
                    reason: format!("HTTP {status}"),
                },
                ureq::Error::Transport(t) => self.offline_error(file, t.to_string()),
            },
            other => HubError::Download {
                model: self.model.clone(),
                file: file.to_string(),
                reason: other.to_string(),
            },
        }
    }

    /// The cached copy, else a download (unless offline). `Absent` only when the Hub says so.
    fn fetch(
        &mut self,
        file: &str,
        progress: &mut dyn FnMut(HubProgress),
    ) -> Result<Fetched, HubError> {
        if let Some(p) = self.cache.get(file) {
            return Ok(Fetched::Path(p));
        }
        if self.opts.offline {
            return Err(self.offline_error(file, "HF_HUB_OFFLINE is set".into()));
        }
        if self.api.is_none() {
            let api = hf_hub::api::sync::ApiBuilder::from_cache(hf_hub::Cache::new(
                self.opts.cache_dir.clone(),
            ))
            .with_endpoint(self.opts.endpoint.clone())
            .with_progress(false)
            .with_retries(2)
            .build()
            .map_err(|e| HubError::Download {
                model: self.model.clone(),
                file: file.to_string(),
                reason: e.to_string(),
            })?;
            self.api = Some(api.model(self.model.clone()));
        }
        let api = self.api.as_ref().expect("set above");
        let adapter = ProgressAdapter {
            file: file.to_string(),
            bytes: 0,
            total: None,
            sink: progress,
        };
        match api.download_with_progress(file, adapter) {
            Ok(p) => Ok(Fetched::Path(p)),
            Err(e) => match self.classify(file, e) {
                HubError::NotFound { .. } => Ok(Fetched::Absent),
                other => Err(other),
            },
        }
    }

    fn require(
        &mut self,
        file: &str,
        progress: &mut dyn FnMut(HubProgress),
    ) -> Result<PathBuf, HubError> {
        match self.fetch(file, progress)? {
            Fetched::Path(p) => Ok(p),
            Fetched::Absent => Err(HubError::NotFound {
                model: self.model.clone(),
                file: file.to_string(),
            }),
        }
    }

    fn optional(
        &mut self,
        file: &str,
        progress: &mut dyn FnMut(HubProgress),
    ) -> Result<Option<PathBuf>, HubError> {
        // Without network, an optional file that is not cached is simply absent.
        match self.fetch(file, progress) {
            Ok(Fetched::Path(p)) => Ok(Some(p)),
            Ok(Fetched::Absent) | Err(HubError::Offline { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn resolve(mut self, progress: &mut dyn FnMut(HubProgress)) -> Result<ModelFiles, HubError> {
        let config = self.require(CONFIG, progress)?;
        let weights = if let Some(p) = self.cache.get(WEIGHTS) {
            vec![p]
        } else if let Some(index) = self.optional(WEIGHTS_INDEX, progress)? {
            shard_names(&index)?
                .iter()
                .map(|n| self.require(n, progress))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            vec![self.require(WEIGHTS, progress)?]
        };
        let generation_config = self.optional(GENERATION_CONFIG, progress)?;
        let tokenizer = self.optional(TOKENIZER, progress)?;
        let dir = config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Ok(ModelFiles {
            dir,
            config,
            generation_config,
            weights,
            tokenizer,
        })
    }
}

impl ModelFiles {
    /// Parses the whole `config.json` into `T`.
    pub fn read_config<T: serde::de::DeserializeOwned>(&self) -> Result<T, HubError> {
        let text = std::fs::read_to_string(&self.config).map_err(|e| invalid(&self.config, e))?;
        serde_json::from_str(&text).map_err(|e| invalid(&self.config, e))
    }

    /// Memory-maps every weight file (tensors are converted to `dtype` on `device` when read).
    pub fn var_builder(
        &self,
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>, HubError> {
        for p in &self.weights {
            if !p.is_file() {
                return Err(invalid(p, "weight file is missing"));
            }
        }
        // SAFETY: the files are mapped read-only; like every safetensors loader we rely on
        // nobody truncating or rewriting a checkpoint while it is loaded.
        unsafe { VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device) }.map_err(|e| {
            let names: Vec<String> = self
                .weights
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            HubError::InvalidFile {
                path: self.dir.clone(),
                reason: format!("cannot load weights {}: {e}", names.join(", ")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        assert!(is_hub_id("facebook/musicgen-small"));
        assert!(is_hub_id("gpt2"));
        assert!(!is_hub_id("a b/c"));
        assert!(!is_hub_id("/x"));
        assert!(looks_like_path("./model"));
        assert!(looks_like_path("/tmp/x/y"));
        assert!(looks_like_path("a/b/c"));
        assert!(!looks_like_path("facebook/musicgen-small"));
        let e = resolve_with(
            "/definitely/not/here",
            &HubOptions {
                cache_dir: PathBuf::from("/nonexistent"),
                endpoint: "http://127.0.0.1:9".into(),
                offline: true,
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(e, HubError::NoSuchFolder(_)), "{e}");
    }
}
