//! `mkflow serve` configuration: one TOML file, then environment overrides, then command-line
//! flags.
//!
//! ```toml
//! data_dir = "mkflow-data"          # knowledge indexes (env MKFLOW_DATA_DIR, --data-dir)
//! model = "all-MiniLM-L6-v2"        # embed()'s model (env MKFLOW_MODEL, --model)
//!
//! [server]
//! listen = "127.0.0.1:8080"         # env MKFLOW_LISTEN, --listen
//! auth_token_env = "MKFLOW_AUTH_TOKEN"  # variable holding the bearer token for /v1/sql
//! max_request_bytes = 1048576       # env MKFLOW_MAX_REQUEST_BYTES
//! query_timeout_secs = 30           # env MKFLOW_QUERY_TIMEOUT_SECS
//!
//! [[pipelines]]
//! name = "papers"                   # label in metrics (default: the file name)
//! file = "pipelines/kafka_to_kb.sql"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

/// The configuration file's contents.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    /// Knowledge indexes live here.
    pub data_dir: Option<PathBuf>,
    /// The model `embed()` uses.
    pub model: Option<String>,
    /// ONNX Runtime threads per embedding call.
    pub threads: Option<usize>,
    /// HTTP settings.
    #[serde(default)]
    pub server: ServerFile,
    /// Pipelines to run.
    #[serde(default)]
    pub pipelines: Vec<PipelineFile>,
}

/// The `[server]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// Address to listen on.
    pub listen: Option<String>,
    /// Name of the environment variable holding the bearer token (the token itself never goes
    /// in the file).
    pub auth_token_env: Option<String>,
    /// Largest accepted request body.
    pub max_request_bytes: Option<usize>,
    /// Longest a query may run.
    pub query_timeout_secs: Option<u64>,
}

/// One `[[pipelines]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Name in metrics and status (default: the file name without extension).
    pub name: Option<String>,
    /// The pipeline's SQL file (relative to the configuration file's directory).
    pub file: PathBuf,
}

/// A pipeline to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineSpec {
    /// Its name in metrics and status.
    pub name: String,
    /// Its SQL file.
    pub file: PathBuf,
}

impl PipelineSpec {
    /// A pipeline named after its file.
    pub fn from_file(file: &Path) -> Self {
        PipelineSpec {
            name: pipeline_name(file),
            file: file.to_path_buf(),
        }
    }
}

/// A pipeline's default name: its file name without extension.
pub fn pipeline_name(file: &Path) -> String {
    file.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "pipeline".into())
}

/// Resolved HTTP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: String,
    /// Bearer token required by `/v1/sql` (none: open).
    pub auth_token: Option<String>,
    /// Largest accepted request body.
    pub max_request_bytes: usize,
    /// Longest a query may run.
    pub query_timeout: Duration,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default environment variable holding the bearer token.
pub const DEFAULT_AUTH_TOKEN_ENV: &str = "MKFLOW_AUTH_TOKEN";

impl ServeFile {
    /// Reads and parses a configuration file; pipeline paths become relative to its directory.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut file: ServeFile =
            toml::from_str(&text).with_context(|| format!("{} is not a valid mkflow configuration", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for pipeline in &mut file.pipelines {
            if pipeline.file.is_relative() {
                pipeline.file = base.join(&pipeline.file);
            }
        }
        if let Some(dir) = &file.data_dir
            && dir.is_relative()
        {
            file.data_dir = Some(base.join(dir));
        }
        Ok(file)
    }

    /// The pipelines, named.
    pub fn pipeline_specs(&self) -> anyhow::Result<Vec<PipelineSpec>> {
        let specs: Vec<PipelineSpec> = self
            .pipelines
            .iter()
            .map(|p| PipelineSpec {
                name: p.name.clone().unwrap_or_else(|| pipeline_name(&p.file)),
                file: p.file.clone(),
            })
            .collect();
        let mut names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
            bail!("two pipelines are named '{}': give each a distinct name", pair[0]);
        }
        Ok(specs)
    }

    /// HTTP settings: `listen` from the flag, else `MKFLOW_LISTEN`, else the file, else the
    /// default; the others from the environment, else the file, else defaults.
    pub fn server_settings(
        &self,
        listen_flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<ServerSettings> {
        let server = &self.server;
        let listen = listen_flag
            .map(str::to_string)
            .or_else(|| env("MKFLOW_LISTEN"))
            .or_else(|| server.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let token_env = server
            .auth_token_env
            .clone()
            .unwrap_or_else(|| DEFAULT_AUTH_TOKEN_ENV.into());
        let auth_token = env(&token_env).filter(|t| !t.trim().is_empty());
        let number = |name: &str, from_file: Option<u64>, default: u64| -> anyhow::Result<u64> {
            match env(name) {
                Some(v) => v
                    .trim()
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .with_context(|| format!("{name}='{v}' is not a positive integer")),
                None => Ok(from_file.unwrap_or(default)),
            }
        };
        Ok(ServerSettings {
            listen,
            auth_token,
            max_request_bytes: number(
                "MKFLOW_MAX_REQUEST_BYTES",
                server.max_request_bytes.map(|n| n as u64),
                1 << 20,
            )? as usize,
            query_timeout: Duration::from_secs(number("MKFLOW_QUERY_TIMEOUT_SECS", server.query_timeout_secs, 30)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn file_env_and_flags_combine_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mkflow.toml");
        std::fs::write(
            &path,
            r#"
data_dir = "data"
[server]
listen = "0.0.0.0:9000"
auth_token_env = "MY_TOKEN"
query_timeout_secs = 5
[[pipelines]]
file = "pipelines/kafka.sql"
[[pipelines]]
name = "other"
file = "/abs/other.sql"
"#,
        )
        .unwrap();
        let file = ServeFile::read(&path).unwrap();
        assert_eq!(file.data_dir, Some(dir.path().join("data")));
        let specs = file.pipeline_specs().unwrap();
        assert_eq!(specs[0].name, "kafka");
        assert_eq!(specs[0].file, dir.path().join("pipelines/kafka.sql"));
        assert_eq!(specs[1].name, "other");
        let env: HashMap<&str, &str> = [("MY_TOKEN", "s3cret"), ("MKFLOW_MAX_REQUEST_BYTES", "2048")].into();
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let settings = file.server_settings(None, lookup).unwrap();
        assert_eq!(settings.listen, "0.0.0.0:9000");
        assert_eq!(settings.auth_token.as_deref(), Some("s3cret"));
        assert_eq!(settings.max_request_bytes, 2048);
        assert_eq!(settings.query_timeout, Duration::from_secs(5));
        let flagged = file.server_settings(Some("127.0.0.1:1"), lookup).unwrap();
        assert_eq!(flagged.listen, "127.0.0.1:1");
    }

    #[test]
    fn the_shipped_example_configuration_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mkflow.example.toml");
        let file = ServeFile::read(&path).unwrap();
        let specs = file.pipeline_specs().unwrap();
        assert_eq!(specs[0].name, "papers");
        assert!(specs[0].file.is_file(), "{}", specs[0].file.display());
        let settings = file.server_settings(None, |_| None).unwrap();
        assert_eq!(settings.listen, DEFAULT_LISTEN);
        assert_eq!(settings.auth_token, None);
    }

    #[test]
    fn mistakes_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server]\nlisten_on = \"x\"\n").unwrap();
        let err = format!("{:#}", ServeFile::read(&path).unwrap_err());
        assert!(err.contains("listen_on"), "{err}");
        let file = ServeFile::default();
        let err = file
            .server_settings(None, |k| (k == "MKFLOW_QUERY_TIMEOUT_SECS").then(|| "soon".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("MKFLOW_QUERY_TIMEOUT_SECS"), "{err}");
    }
}
