//! The real `mkflow` binary in integration tests: a command over a data directory, and a
//! running `mkflow serve` with an HTTP client.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `mkflow` binary over `data_dir`, with the test assets' home.
pub fn mkflow(data_dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mkflow"));
    command
        .arg("--data-dir")
        .arg(data_dir)
        .env("MKFLOW_HOME", super::common::assets_home())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

/// Waits until `ready` or the child exits; then, after `delay`, SIGKILLs it. Returns whether it
/// was killed.
pub fn kill_when(mut child: Child, delay: Duration, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        if ready() {
            std::thread::sleep(delay);
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            return true;
        }
        assert!(Instant::now() < deadline, "ingestion made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Writes to `pipeline` a script loading the JSON Lines `docs` (`doc_id`, `title`) into index
/// `kb`, each title embedded: what `mkflow serve --pipeline` runs in the server tests.
pub fn write_title_pipeline(pipeline: &Path, docs: &Path) {
    std::fs::write(
        pipeline,
        format!(
            "CREATE EXTERNAL TABLE docs (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS JSONL LOCATION '{}';
             CREATE EXTERNAL TABLE IF NOT EXISTS kb (doc_id VARCHAR NOT NULL, title VARCHAR) STORED AS KB LOCATION 'kb';
             INSERT INTO kb SELECT doc_id, title, embed(title) FROM docs;",
            docs.display()
        ),
    )
    .unwrap();
}

/// A free loopback port.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `mkflow serve`, killed on drop if still running.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// A client for it.
    pub client: reqwest::Client,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `mkflow serve <serve_args>` on a free port with `command` (an [`mkflow`] command,
    /// given its environment) and waits until it is healthy.
    pub async fn start(mut command: Command, serve_args: &[&str]) -> Server {
        let port = free_port();
        let child = command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(serve_args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let server = Server {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        };
        server.wait_for("/healthz", Duration::from_secs(30)).await;
        server.wait_until_loaded(Duration::from_secs(60)).await;
        server
    }

    /// Waits until the server has loaded its indexes (it listens, and answers `/healthz`,
    /// before that; SQL meanwhile gets a 503).
    pub async fn wait_until_loaded(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let loading = match self.client.get(format!("{}/readyz", self.base)).send().await {
                // `/readyz` says `"reason": "loading indexes"` until the engine is up.
                Ok(r) => r.text().await.unwrap_or_default().contains("loading indexes"),
                Err(_) => true,
            };
            if !loading {
                return;
            }
            assert!(Instant::now() < deadline, "the server did not load its indexes");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(format!("{}{path}", self.base)).send().await.unwrap()
    }

    /// `POST /v1/sql` with `sql` as the body, with `token` as the bearer token when given.
    pub async fn sql(&self, token: Option<&str>, sql: &str) -> reqwest::Response {
        let mut request = self.client.post(format!("{}/v1/sql", self.base)).body(sql.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Runs `sql` through `POST /v1/sql` as `token`, asking for an Arrow stream: its batches,
    /// or the status and message of the refusal.
    pub async fn sql_arrow(
        &self,
        token: &str,
        sql: &str,
    ) -> Result<Vec<datafusion::arrow::array::RecordBatch>, String> {
        self.arrow_answer(
            self.client.post(format!("{}/v1/sql", self.base)).body(sql.to_string()),
            token,
        )
        .await
    }

    /// Runs the JSON request `body` (`{"sql": …, "params": […]}`) through `POST /v1/sql` as
    /// `token`, asking for an Arrow stream, as [`Server::sql_arrow`] does.
    pub async fn sql_json_arrow(
        &self,
        token: &str,
        body: &serde_json::Value,
    ) -> Result<Vec<datafusion::arrow::array::RecordBatch>, String> {
        self.arrow_answer(self.client.post(format!("{}/v1/sql", self.base)).json(body), token)
            .await
    }

    /// Sends `request` as `token`, asking for an Arrow stream: its batches, or the status and
    /// message of the refusal.
    async fn arrow_answer(
        &self,
        request: reqwest::RequestBuilder,
        token: &str,
    ) -> Result<Vec<datafusion::arrow::array::RecordBatch>, String> {
        let response = request
            .bearer_auth(token)
            .header("accept", "application/vnd.apache.arrow.stream")
            .send()
            .await
            .unwrap();
        let status = response.status();
        let bytes = response.bytes().await.unwrap();
        if !status.is_success() {
            return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
        }
        Ok(
            datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap(),
        )
    }

    /// Waits until `GET path` succeeds.
    pub async fn wait_for(&self, path: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.client.get(format!("{}{path}", self.base)).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(Instant::now() < deadline, "{path} did not become ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
