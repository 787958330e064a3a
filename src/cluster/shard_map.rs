//! The shard map a coordinator reads: for each sharded table, its shards and the worker that
//! serves each one.
//!
//! ```toml
//! token_env = "MKFLOW_CLUSTER_TOKEN"   # variable holding the token sent to workers (optional)
//! allow_partial = false                # answer from the reachable shards when one is not
//!                                      # (flagged partial; a request may say otherwise)
//!
//! [[shards]]
//! table = "kb"                         # the table the coordinator serves
//! worker = "http://10.0.0.1:50051"     # the worker's Flight address (mkflow serve --worker)
//! local_table = "kb"                   # its name on the worker (default: `table`)
//! name = "kb-0"                        # in errors and plans (default: `<table>-<i>`)
//! ```
//!
//! A shard is one knowledge index on one worker, ingesting its own Kafka partitions with its
//! own stored offsets, so ingest stays exactly-once per shard.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use url::Url;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardMapFile {
    token_env: Option<String>,
    #[serde(default)]
    allow_partial: bool,
    #[serde(default)]
    shards: Vec<ShardFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShardFile {
    table: String,
    worker: String,
    local_table: Option<String>,
    name: Option<String>,
}

/// One shard: a knowledge index on one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// Its name in errors and plans.
    pub name: String,
    /// The table's name on its worker.
    pub local_table: String,
    /// The worker's Flight address.
    pub worker: Url,
}

/// The sharded tables and where their shards live.
#[derive(Debug, Clone, Default)]
pub struct ShardMap {
    tables: BTreeMap<String, Vec<Shard>>,
    token: Option<String>,
    allow_partial: bool,
}

impl ShardMap {
    /// Reads the shard map file at `path`; `env` resolves `token_env`.
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read shard map {}", path.display()))?;
        Self::parse(&text, env).with_context(|| format!("shard map {}", path.display()))
    }

    /// Parses a shard map (see the module docs).
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Self> {
        let file: ShardMapFile = toml::from_str(text)?;
        if file.shards.is_empty() {
            bail!("no [[shards]]: a coordinator needs at least one shard");
        }
        let token = match &file.token_env {
            Some(variable) => Some(env(variable).filter(|t| !t.is_empty()).with_context(|| {
                format!("token_env names {variable}, which is not set (hint: export {variable}=<a token the workers accept>)")
            })?),
            None => None,
        };
        let mut tables: BTreeMap<String, Vec<Shard>> = BTreeMap::new();
        for shard in file.shards {
            if shard.table.is_empty() {
                bail!("a shard has an empty table name");
            }
            let worker = worker_url(&shard.worker)?;
            let shards = tables.entry(shard.table.clone()).or_default();
            let local_table = shard.local_table.unwrap_or_else(|| shard.table.clone());
            if shards
                .iter()
                .any(|s| s.worker == worker && s.local_table == local_table)
            {
                bail!("table '{}' names {worker} table '{local_table}' twice", shard.table);
            }
            let name = shard
                .name
                .unwrap_or_else(|| format!("{}-{}", shard.table, shards.len()));
            shards.push(Shard {
                name,
                local_table,
                worker,
            });
        }
        Ok(ShardMap {
            tables,
            token,
            allow_partial: file.allow_partial,
        })
    }

    /// The shards of `table`, if it is sharded.
    pub fn shards(&self, table: &str) -> Option<&[Shard]> {
        self.tables.get(table).map(Vec::as_slice)
    }

    /// The sharded tables' names.
    pub fn tables(&self) -> impl Iterator<Item = &str> {
        self.tables.keys().map(String::as_str)
    }

    /// Every worker the map names, each once, sorted.
    pub fn workers(&self) -> Vec<Url> {
        let workers: BTreeSet<&Url> = self.tables.values().flatten().map(|s| &s.worker).collect();
        workers.into_iter().cloned().collect()
    }

    /// Whether a query whose request says nothing about it answers from the reachable shards
    /// when some are not (flagged partial), rather than failing.
    pub fn allow_partial(&self) -> bool {
        self.allow_partial
    }

    /// The worker serving each shard of every table, as `(table, shard)`.
    pub fn all_shards(&self) -> impl Iterator<Item = (&str, &Shard)> {
        self.tables
            .iter()
            .flat_map(|(table, shards)| shards.iter().map(move |s| (table.as_str(), s)))
    }

    /// The token the coordinator sends to workers (`authorization: Bearer …`), if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }
}

/// A worker address as a URL the gRPC client accepts (`grpc://` and a bare `host:port` become
/// `http://`).
fn worker_url(address: &str) -> anyhow::Result<Url> {
    let address = address.strip_prefix("grpc://").unwrap_or(address);
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let url = Url::parse(&with_scheme).with_context(|| format!("worker '{address}' is not an address"))?;
    if url.scheme() != "http" || url.host().is_none() || url.port().is_none() {
        bail!("worker '{address}' must be host:port or http://host:port (TLS is not served yet)");
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shards_with_defaults_and_refuses_mistakes() {
        let map = ShardMap::parse(
            r#"
            token_env = "T"
            [[shards]]
            table = "kb"
            worker = "127.0.0.1:7001"
            [[shards]]
            table = "kb"
            worker = "grpc://127.0.0.1:7002"
            local_table = "kb_b"
            [[shards]]
            table = "other"
            worker = "http://127.0.0.1:7001"
            name = "o"
            "#,
            |name| (name == "T").then(|| "secret".to_string()),
        )
        .unwrap();
        let kb = map.shards("kb").unwrap();
        assert_eq!(kb.len(), 2);
        assert_eq!((kb[0].name.as_str(), kb[0].local_table.as_str()), ("kb-0", "kb"));
        assert_eq!(kb[1].worker.as_str(), "http://127.0.0.1:7002/");
        assert_eq!(kb[1].local_table, "kb_b");
        assert_eq!(map.shards("other").unwrap()[0].name, "o");
        assert_eq!(map.workers().len(), 2);
        assert_eq!(map.token(), Some("secret"));
        assert!(!map.allow_partial());
        let partial = ShardMap::parse(
            "allow_partial = true\n[[shards]]\ntable = \"kb\"\nworker = \"h:1\"",
            |_| None,
        );
        assert!(partial.unwrap().allow_partial());
        assert!(map.shards("missing").is_none());

        let unset = ShardMap::parse(
            "token_env = \"T\"\n[[shards]]\ntable = \"kb\"\nworker = \"h:1\"",
            |_| None,
        );
        assert!(unset.unwrap_err().to_string().contains("export T="));
        let twice = "[[shards]]\ntable = \"kb\"\nworker = \"h:1\"\n[[shards]]\ntable = \"kb\"\nworker = \"h:1\"";
        assert!(
            ShardMap::parse(twice, |_| None)
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        let no_port = "[[shards]]\ntable = \"kb\"\nworker = \"https://h\"";
        assert!(ShardMap::parse(no_port, |_| None).is_err());
        assert!(
            ShardMap::parse("", |_| None)
                .unwrap_err()
                .to_string()
                .contains("at least one shard")
        );
    }
}
