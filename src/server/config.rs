//! `mkflow serve` configuration: one TOML file, then environment overrides, then command-line
//! flags.
//!
//! ```toml
//! data_dir = "mkflow-data"          # knowledge indexes (env MKFLOW_DATA_DIR, --data-dir)
//! model = "all-MiniLM-L6-v2"        # embed()'s model (env MKFLOW_MODEL, --model)
//!
//! [server]
//! listen = "127.0.0.1:8080"         # env MKFLOW_LISTEN, --listen
//! flight_listen = "127.0.0.1:50051" # Arrow Flight SQL (off unless set); env MKFLOW_FLIGHT_LISTEN, --flight-listen
//! auth_token_env = "MKFLOW_AUTH_TOKEN"    # variable holding a read token for /v1/sql
//! admin_token_env = "MKFLOW_ADMIN_TOKEN"  # variable holding an admin token
//! max_request_bytes = 1048576       # env MKFLOW_MAX_REQUEST_BYTES
//! query_timeout_secs = 30           # env MKFLOW_QUERY_TIMEOUT_SECS
//! allowed_paths = ["/srv/docs"]     # besides the data directory, for network LOCATIONs
//! max_k = 10000                     # and the other limits of `access::Limits`
//!
//! [[server.tokens]]                 # more tokens, each from its own variable
//! env = "ANALYST_TOKEN"
//! role = "read"
//!
//! [mkflow]                          # Meta-Knowledge settings of every session
//! generator = "openai"
//! llm_base_url = "http://127.0.0.1:8000/v1"
//!
//! [[pipelines]]
//! name = "papers"                   # label in metrics (default: the file name)
//! file = "pipelines/kafka_to_kb.sql"
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::access::{Limits, Role};

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
    /// Meta-Knowledge settings every session starts from (`mkflow.<name>` without the prefix).
    #[serde(default)]
    pub mkflow: BTreeMap<String, toml::Value>,
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
    /// Address to serve Arrow Flight SQL on (none: not served).
    pub flight_listen: Option<String>,
    /// Name of the environment variable holding a bearer token with the read role (the token
    /// itself never goes in the file).
    pub auth_token_env: Option<String>,
    /// Name of the environment variable holding a bearer token with the admin role.
    pub admin_token_env: Option<String>,
    /// More tokens, each with its role.
    #[serde(default)]
    pub tokens: Vec<TokenFile>,
    /// Largest accepted request body.
    pub max_request_bytes: Option<usize>,
    /// Longest a query may run.
    pub query_timeout_secs: Option<u64>,
    /// Directories besides the data directory that network clients' `LOCATION`s may name
    /// (relative to the configuration file).
    #[serde(default)]
    pub allowed_paths: Vec<PathBuf>,
    /// Most rows a search may ask for.
    pub max_k: Option<usize>,
    /// Longest query text a search embeds, in bytes.
    pub max_query_text_bytes: Option<usize>,
    /// Most bytes one growing function call (`repeat`, `lpad`, …) may make.
    pub max_value_bytes: Option<usize>,
    /// Longest string literal of a network statement, in bytes.
    pub max_literal_bytes: Option<usize>,
    /// Deepest expression nesting of a statement.
    pub max_expression_depth: Option<usize>,
    /// Most rows a statement may return.
    pub max_result_rows: Option<usize>,
    /// Most bytes a statement's result may hold.
    pub max_result_bytes: Option<usize>,
    /// Memory a network request's operators may reserve, in bytes.
    pub max_query_memory: Option<usize>,
}

/// One `[[server.tokens]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    /// The environment variable holding the token.
    pub env: String,
    /// What the token's holder may do.
    pub role: Role,
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
    /// Address to serve Arrow Flight SQL on, if any.
    pub flight_listen: Option<String>,
    /// Bearer tokens `/v1/sql` accepts, each with its role. None: the endpoint is open and
    /// read-only.
    pub tokens: Vec<(String, Role)>,
    /// Largest accepted request body.
    pub max_request_bytes: usize,
    /// Longest a query may run.
    pub query_timeout: Duration,
    /// Whether the Flight address also serves as a cluster worker (see [`crate::cluster`]).
    pub worker: bool,
}

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default environment variable holding a read token.
pub const DEFAULT_AUTH_TOKEN_ENV: &str = "MKFLOW_AUTH_TOKEN";
/// Default environment variable holding an admin token.
pub const DEFAULT_ADMIN_TOKEN_ENV: &str = "MKFLOW_ADMIN_TOKEN";

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
        for dir in &mut file.server.allowed_paths {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        Ok(file)
    }

    /// The `[mkflow]` settings as `SET` would give them (name without the prefix, value as text).
    pub fn mk_settings(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.mkflow
            .iter()
            .map(|(name, value)| {
                let text = match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(i) => i.to_string(),
                    toml::Value::Float(f) => f.to_string(),
                    toml::Value::Boolean(b) => b.to_string(),
                    other => bail!("[mkflow] {name}: {other:?} is not a string, number or boolean"),
                };
                Ok((name.clone(), text))
            })
            .collect()
    }

    /// The query limits: the file's, the defaults for the rest.
    pub fn limits(&self) -> Limits {
        let server = &self.server;
        let defaults = Limits::default();
        Limits {
            max_k: server.max_k.unwrap_or(defaults.max_k),
            max_query_text_bytes: server.max_query_text_bytes.unwrap_or(defaults.max_query_text_bytes),
            max_value_bytes: server.max_value_bytes.unwrap_or(defaults.max_value_bytes),
            max_literal_bytes: server.max_literal_bytes.unwrap_or(defaults.max_literal_bytes),
            max_expression_depth: server.max_expression_depth.unwrap_or(defaults.max_expression_depth),
            max_result_rows: server.max_result_rows.unwrap_or(defaults.max_result_rows),
            max_result_bytes: server.max_result_bytes.unwrap_or(defaults.max_result_bytes),
            max_query_memory: server.max_query_memory.unwrap_or(defaults.max_query_memory),
        }
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
    /// default (and `flight_listen` alike, from `MKFLOW_FLIGHT_LISTEN`, with no default); the
    /// others from the environment, else the file, else defaults.
    pub fn server_settings(
        &self,
        listen_flag: Option<&str>,
        flight_flag: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<ServerSettings> {
        let server = &self.server;
        let listen = listen_flag
            .map(str::to_string)
            .or_else(|| env("MKFLOW_LISTEN"))
            .or_else(|| server.listen.clone())
            .unwrap_or_else(|| DEFAULT_LISTEN.into());
        let flight_listen = flight_flag
            .map(str::to_string)
            .or_else(|| env("MKFLOW_FLIGHT_LISTEN"))
            .or_else(|| server.flight_listen.clone());
        let read_env = server
            .auth_token_env
            .clone()
            .unwrap_or_else(|| DEFAULT_AUTH_TOKEN_ENV.into());
        let admin_env = server
            .admin_token_env
            .clone()
            .unwrap_or_else(|| DEFAULT_ADMIN_TOKEN_ENV.into());
        let mut tokens = Vec::new();
        let named = [(read_env, Role::Read), (admin_env, Role::Admin)];
        let listed = server.tokens.iter().map(|t| (t.env.clone(), t.role));
        for (variable, role) in named.into_iter().chain(listed) {
            if let Some(token) = env(&variable).filter(|t| !t.trim().is_empty()) {
                if let Some((_, other)) = tokens.iter().find(|(t, _)| *t == token) {
                    bail!(
                        "${variable} holds the same token as another variable (role {other}): give each role its own token"
                    );
                }
                tokens.push((token, role));
            }
        }
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
            flight_listen,
            tokens,
            max_request_bytes: number(
                "MKFLOW_MAX_REQUEST_BYTES",
                server.max_request_bytes.map(|n| n as u64),
                1 << 20,
            )? as usize,
            query_timeout: Duration::from_secs(number("MKFLOW_QUERY_TIMEOUT_SECS", server.query_timeout_secs, 30)?),
            worker: false,
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
        let settings = file.server_settings(None, None, lookup).unwrap();
        assert_eq!(settings.listen, "0.0.0.0:9000");
        assert_eq!(settings.tokens, vec![("s3cret".to_string(), Role::Read)]);
        assert_eq!(settings.max_request_bytes, 2048);
        assert_eq!(settings.query_timeout, Duration::from_secs(5));
        assert_eq!(settings.flight_listen, None, "Flight SQL is off unless asked for");
        let flagged = file
            .server_settings(Some("127.0.0.1:1"), Some("127.0.0.1:2"), lookup)
            .unwrap();
        assert_eq!(flagged.listen, "127.0.0.1:1");
        assert_eq!(flagged.flight_listen.as_deref(), Some("127.0.0.1:2"));
        let from_env = |k: &str| (k == "MKFLOW_FLIGHT_LISTEN").then(|| "127.0.0.1:3".to_string());
        let settings = file.server_settings(None, None, from_env).unwrap();
        assert_eq!(settings.flight_listen.as_deref(), Some("127.0.0.1:3"));
    }

    #[test]
    fn the_shipped_example_configuration_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/mkflow.example.toml");
        let file = ServeFile::read(&path).unwrap();
        let specs = file.pipeline_specs().unwrap();
        assert_eq!(specs[0].name, "papers");
        assert!(specs[0].file.is_file(), "{}", specs[0].file.display());
        let settings = file.server_settings(None, None, |_| None).unwrap();
        assert_eq!(settings.listen, DEFAULT_LISTEN);
        assert!(settings.tokens.is_empty());
    }

    #[test]
    fn tokens_roles_limits_and_settings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mkflow.toml");
        std::fs::write(
            &path,
            r#"
[server]
allowed_paths = ["docs"]
max_k = 50
max_query_memory = 1000000
[[server.tokens]]
env = "ANALYST"
role = "read"
[mkflow]
generator = "embedded"
route_clusters = 3
strict_routing = true
"#,
        )
        .unwrap();
        let file = ServeFile::read(&path).unwrap();
        assert_eq!(file.server.allowed_paths, vec![dir.path().join("docs")]);
        let limits = file.limits();
        assert_eq!((limits.max_k, limits.max_query_memory), (50, 1_000_000));
        assert_eq!(limits.max_result_rows, Limits::default().max_result_rows);
        let settings = file.mk_settings().unwrap();
        assert!(settings.contains(&("route_clusters".to_string(), "3".to_string())));
        assert!(settings.contains(&("strict_routing".to_string(), "true".to_string())));
        let env: HashMap<&str, &str> = [("MKFLOW_ADMIN_TOKEN", "root"), ("ANALYST", "reader")].into();
        let settings = file
            .server_settings(None, None, |k| env.get(k).map(|v| v.to_string()))
            .unwrap();
        assert_eq!(
            settings.tokens,
            vec![("root".to_string(), Role::Admin), ("reader".to_string(), Role::Read)]
        );
        // One token for two roles is a mistake.
        let same: HashMap<&str, &str> = [("MKFLOW_ADMIN_TOKEN", "x"), ("MKFLOW_AUTH_TOKEN", "x")].into();
        let error = file
            .server_settings(None, None, |k| same.get(k).map(|v| v.to_string()))
            .unwrap_err();
        assert!(error.to_string().contains("same token"), "{error}");
        std::fs::write(&path, "[server.tokens]\nenv = 1\n").unwrap();
        assert!(ServeFile::read(&path).is_err());
        std::fs::write(&path, "[[server.tokens]]\nenv = \"A\"\nrole = \"owner\"\n").unwrap();
        let error = format!("{:#}", ServeFile::read(&path).unwrap_err());
        assert!(error.contains("owner"), "{error}");
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
            .server_settings(None, None, |k| {
                (k == "MKFLOW_QUERY_TIMEOUT_SECS").then(|| "soon".to_string())
            })
            .unwrap_err();
        assert!(err.to_string().contains("MKFLOW_QUERY_TIMEOUT_SECS"), "{err}");
    }
}
