//! The OpenAI-compatible generator against an in-process HTTP server that misbehaves on
//! purpose: rate limits, server errors, timeouts, malformed answers, and a persistent cache.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mkflow_udfs::mk::{
    ClusterBrief, Document, GenerationError, Generator, Judged, Judging, LlmSettings, MetadataSchema, OpenAiGenerator,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server answers to one request.
struct Reply {
    status: u16,
    body: String,
    delay: Duration,
    headers: Vec<(&'static str, String)>,
}

impl Reply {
    fn ok(content: &str) -> Reply {
        let body = json!({
            "choices": [{"message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20}
        });
        Reply {
            status: 200,
            body: body.to_string(),
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }

    fn status(status: u16) -> Reply {
        Reply {
            status,
            body: r#"{"error": {"message": "nope"}}"#.into(),
            delay: Duration::ZERO,
            headers: Vec::new(),
        }
    }
}

/// A scripted chat-completions server: `script(n, request)` answers the n-th request.
struct Server {
    url: String,
    requests: Arc<Mutex<Vec<Value>>>,
    peak_in_flight: Arc<AtomicUsize>,
}

async fn serve(script: impl Fn(usize, &Value) -> Reply + Send + Sync + 'static) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let script = Arc::new(script);
    let (log, flight, top) = (requests.clone(), in_flight.clone(), peak.clone());
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = listener.accept().await.unwrap();
            let (log, flight, top, script) = (log.clone(), flight.clone(), top.clone(), script.clone());
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                let body_start = loop {
                    let n = socket.read(&mut buf).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buf[..n]);
                    if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        break p + 4;
                    }
                };
                let head = String::from_utf8_lossy(&raw[..body_start]).to_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                while raw.len() < body_start + length {
                    let n = socket.read(&mut buf).await.unwrap();
                    raw.extend_from_slice(&buf[..n]);
                }
                let request: Value = serde_json::from_slice(&raw[body_start..body_start + length]).unwrap();
                let now = flight.fetch_add(1, Ordering::SeqCst) + 1;
                top.fetch_max(now, Ordering::SeqCst);
                let n = {
                    let mut log = log.lock().unwrap();
                    log.push(request.clone());
                    log.len() - 1
                };
                let reply = script(n, &request);
                tokio::time::sleep(reply.delay).await;
                flight.fetch_sub(1, Ordering::SeqCst);
                let mut response = format!(
                    "HTTP/1.1 {} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
                    reply.status,
                    reply.body.len()
                );
                for (k, v) in &reply.headers {
                    response.push_str(&format!("{k}: {v}\r\n"));
                }
                response.push_str("\r\n");
                response.push_str(&reply.body);
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Server {
        url,
        requests,
        peak_in_flight: peak,
    }
}

fn settings(url: &str) -> LlmSettings {
    LlmSettings {
        base_url: url.to_string(),
        model: "test-model".into(),
        api_key: Some("secret".into()),
        concurrency: 2,
        timeout: Duration::from_millis(500),
        max_retries: 2,
        retry_base: Duration::from_millis(10),
        json_mode: true,
        max_questions: 4,
        rewrite_queries: 3,
        cache_file: None,
    }
}

const VALID: &str = r#"{"metadata": {"research_fields": ["immunology"], "study_type": "applied",
    "keyphrases": ["T cells"], "code_urls": [], "evaluation_metrics": []},
    "qa": [{"question": "Do regulatory T cells suppress autoimmunity?", "answer": "Yes."}]}"#;

fn document() -> Document<'static> {
    Document {
        title: Some("Regulatory T cells"),
        body: "Regulatory T cells suppress autoimmunity in mice.",
    }
}

fn generator(settings: LlmSettings) -> OpenAiGenerator {
    OpenAiGenerator::new(settings, Arc::new(MetadataSchema::default())).unwrap()
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retried() {
    let server = serve(|n, _| match n {
        0 => Reply {
            headers: vec![("retry-after", "0".into())],
            ..Reply::status(429)
        },
        1 => Reply::status(503),
        _ => Reply::ok(VALID),
    })
    .await;
    let g = generator(settings(&server.url));
    let result = g.prepare(&[document()]).await.remove(0).unwrap();
    assert_eq!(result.metadata["research_fields"], json!(["Immunology"]));
    assert_eq!(result.qa[0].question, "Do regulatory T cells suppress autoimmunity?");
    let counts = g.stats().counts();
    assert_eq!((counts.requests, counts.retries, counts.errors), (3, 2, 0));
    assert_eq!((counts.prompt_tokens, counts.completion_tokens), (100, 20));
    let first = &server.requests.lock().unwrap()[0];
    assert_eq!(first["model"], "test-model");
    assert_eq!(first["response_format"]["type"], "json_object");
    assert!(
        first["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("Regulatory T cells suppress")
    );
}

#[tokio::test]
async fn an_invalid_answer_gets_one_corrective_retry() {
    let server = serve(|n, _| {
        if n == 0 {
            Reply::ok("Sure! {not json")
        } else {
            Reply::ok(VALID)
        }
    })
    .await;
    let g = generator(settings(&server.url));
    assert!(g.prepare(&[document()]).await.remove(0).is_ok());
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 2);
    let messages = requests[1]["messages"].as_array().unwrap();
    assert_eq!(messages[2]["content"], "Sure! {not json");
    assert!(messages[3]["content"].as_str().unwrap().contains("not valid"));
    assert_eq!(g.stats().counts().invalid_outputs, 1);
}

#[tokio::test]
async fn answers_that_stay_invalid_fail_only_their_document() {
    let bad_label = r#"{"metadata": {"research_fields": ["Alchemy"], "study_type": "applied"}, "qa": []}"#;
    let server = serve(move |_, request| {
        let prompt = request["messages"][1]["content"].as_str().unwrap_or("");
        if prompt.contains("Alchemists") {
            Reply::ok(bad_label)
        } else {
            Reply::ok(VALID)
        }
    })
    .await;
    let g = generator(settings(&server.url));
    let bad = Document {
        title: Some("Alchemists"),
        body: "Lead into gold.",
    };
    let results = g.prepare(&[bad, document()]).await;
    match &results[0] {
        Err(GenerationError::InvalidOutput { message, .. }) => assert!(message.contains("Alchemy"), "{message}"),
        other => panic!("expected an invalid-output error, got {other:?}"),
    }
    assert!(results[1].is_ok());
    assert_eq!(g.stats().counts().errors, 1);
}

#[tokio::test]
async fn timeouts_are_retried_then_reported() {
    let server = serve(|_, _| Reply {
        delay: Duration::from_secs(3),
        ..Reply::ok(VALID)
    })
    .await;
    let mut s = settings(&server.url);
    s.max_retries = 1;
    s.timeout = Duration::from_millis(200);
    let g = generator(s);
    let error = g.prepare(&[document()]).await.remove(0).unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("timed out") && message.contains("2 attempts"),
        "{message}"
    );
    assert_eq!(server.requests.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let server = serve(|_, _| Reply::status(401)).await;
    let g = generator(settings(&server.url));
    let message = g.prepare(&[document()]).await.remove(0).unwrap_err().to_string();
    assert!(message.contains("401"), "{message}");
    assert_eq!(server.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn the_cache_makes_a_rerun_free_and_concurrency_is_bounded() {
    let server = serve(|_, _| Reply {
        delay: Duration::from_millis(50),
        ..Reply::ok(VALID)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&server.url);
    s.cache_file = Some(dir.path().join("generations.jsonl"));
    let bodies: Vec<String> = (0..8).map(|i| format!("Document number {i} about T cells.")).collect();
    let docs: Vec<Document> = bodies.iter().map(|b| Document { title: None, body: b }).collect();
    let first = generator(s.clone());
    assert!(first.prepare(&docs).await.iter().all(Result::is_ok));
    assert_eq!(server.requests.lock().unwrap().len(), 8);
    assert!(server.peak_in_flight.load(Ordering::SeqCst) <= 2);

    // A new process (new generator, same cache file) asks nothing.
    let second = generator(s);
    assert!(second.prepare(&docs).await.iter().all(Result::is_ok));
    assert_eq!(server.requests.lock().unwrap().len(), 8);
    assert_eq!(second.stats().counts().cache_hits, 8);
}

#[tokio::test]
async fn rewrite_and_summary_follow_the_prompts() {
    let server = serve(|_, request| {
        if request.get("response_format").is_some() {
            Reply::ok(r#"{"queries": ["What do regulatory T cells do?", "How is autoimmunity suppressed?"]}"#)
        } else {
            Reply::ok("Regulatory T cells and autoimmunity.")
        }
    })
    .await;
    let g = generator(settings(&server.url));
    let briefs = vec![ClusterBrief {
        cluster: "Immunology".into(),
        summary: "T cells.".into(),
    }];
    let queries = g.rewrite("treg function", &briefs).await.unwrap();
    assert_eq!(queries.len(), 2);
    let digest = mkflow_udfs::mk::ClusterDigest {
        cluster: "Immunology".into(),
        documents: 3,
        questions: vec!["Do regulatory T cells suppress autoimmunity?".into()],
        vectors: Vec::new(),
        previous_summary: None,
    };
    assert_eq!(
        g.summarize(&digest).await.unwrap(),
        "Regulatory T cells and autoimmunity."
    );
    let requests = server.requests.lock().unwrap();
    assert!(
        requests[0]["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("T cells.")
    );
    assert!(
        requests[1]["messages"][1]["content"]
            .as_str()
            .unwrap()
            .contains("suppress autoimmunity")
    );
}

#[tokio::test]
async fn a_judge_scores_answers_and_prefers_one_of_two() {
    let server = serve(|_, request| {
        let prompt = request["messages"][1]["content"].as_str().unwrap_or_default().to_string();
        if prompt.contains("Answer B:") {
            Reply::ok(r#"{"recall": "A", "precision": "tie", "specificity": "A", "breadth": "B", "depth": "A", "relevancy": "A"}"#)
        } else {
            // The first try scores out of range: corrected once, like any JSON answer.
            let corrected = request["messages"].as_array().is_some_and(|m| m.len() > 2);
            Reply::ok(if corrected {
                r#"{"recall": "4", "precision": "5", "specificity": "4", "breadth": "3", "depth": "3", "relevancy": "5"}"#
            } else {
                r#"{"recall": "9", "precision": "5", "specificity": "4", "breadth": "3", "depth": "3", "relevancy": "5"}"#
            })
        }
    })
    .await;
    let g = generator(settings(&server.url));
    let evidence = vec![mkflow_udfs::mk::Evidence {
        question: "Do regulatory T cells suppress autoimmunity?".into(),
        answer: "Yes, in mice.".into(),
        doc_id: "d1".into(),
        title: None,
    }];
    let answer = Judged {
        answer: "Regulatory T cells suppress autoimmunity in mice [1].",
        evidence: &evidence,
    };
    let absolute = g
        .judge(&Judging::Absolute {
            query: "treg function",
            answer,
        })
        .await
        .unwrap();
    assert_eq!(absolute.scores, vec![4.0, 5.0, 4.0, 3.0, 3.0, 5.0]);
    let other = Judged {
        answer: "No idea.",
        evidence: &[],
    };
    let pairwise = g
        .judge(&Judging::Pairwise {
            query: "treg function",
            first: answer,
            second: other,
        })
        .await
        .unwrap();
    assert_eq!(pairwise.scores, vec![-1.0, 0.0, -1.0, 1.0, -1.0, -1.0]);
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), 3, "one corrective retry, then the pairwise judgement");
    let schema = &requests[0]["response_format"];
    assert!(!schema.is_null(), "judgements are asked for as JSON");
    let prompt = requests[0]["messages"][1]["content"].as_str().unwrap();
    assert!(prompt.contains("[1] (d1) Q: Do regulatory T cells") && prompt.contains("specificity"));
}
