//! `berth serve` end to end: the server binary on 127.0.0.1 (an ephemeral port), every route
//! against the CLI's output for the same inputs, every bad request's status and error body,
//! concurrent = sequential answers, 429 under saturation, graceful shutdown.
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running `berth serve`, killed on drop.
struct Server {
    child: Child,
    url: String,
    /// stderr lines after the address line.
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .arg("serve")
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("berth serve starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut seen = Vec::new();
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| panic!("no 'listening on' line; stderr: {seen:?}"));
            if let Some(addr) = line.split("listening on ").nth(1) {
                assert!(addr.starts_with("http://127.0.0.1:"), "{addr}");
                return Server {
                    child,
                    url: addr.trim().to_string(),
                    log: rx,
                };
            }
            seen.push(line);
        }
    }

    /// POST JSON: (status, body as JSON).
    fn post(&self, route: &str, body: &Value) -> (u16, Value) {
        self.post_raw(route, body.to_string().as_bytes())
    }

    fn post_raw(&self, route: &str, body: &[u8]) -> (u16, Value) {
        let r = ureq::post(&format!("{}{route}", self.url))
            .set("Content-Type", "application/json")
            .send_bytes(body);
        reply(r)
    }

    fn get(&self, route: &str) -> (u16, String) {
        match ureq::get(&format!("{}{route}", self.url)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {route}: {e}"),
        }
    }

    /// 200 and its body.
    fn ok(&self, route: &str, body: &Value) -> Value {
        let (status, v) = self.post(route, body);
        assert_eq!(status, 200, "{route} {body}: {v}");
        v
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn reply(r: Result<ureq::Response, ureq::Error>) -> (u16, Value) {
    let (status, text) = match r {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
        Err(e) => panic!("request failed: {e}"),
    };
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, v)
}

fn minilm() -> String {
    minilm_dir().to_string_lossy().into_owned()
}

/// One server with a model of every task.
fn all_tasks() -> Server {
    Server::start(&[
        "--model",
        &format!("minilm={}", minilm()),
        "--model",
        &format!("cls={}", task_model("bert-classify")),
        "--model",
        &format!("ner={}", task_model("bert-ner")),
        "--model",
        &format!("qa={}", task_model("bert-qa")),
        "--model",
        &format!("rr={}", task_model("bert-rerank")),
        "--model",
        &format!("mlm={}", tiny("bert-mlm")),
        "--model",
        &format!("tok={}", tiny("bert-base")),
    ])
}

fn close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() <= 1e-5, "{what}: {g} vs {w}");
    }
}

fn close_value(what: &str, got: &Value, want: &Value) {
    match (got, want) {
        (Value::Number(g), Value::Number(w)) => {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!((g - w).abs() <= 1e-5, "{what}: {g} vs {w}");
        }
        (Value::Array(g), Value::Array(w)) => {
            assert_eq!(g.len(), w.len(), "{what}: {got} vs {want}");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                close_value(&format!("{what}[{i}]"), g, w);
            }
        }
        (Value::Object(g), Value::Object(w)) => {
            let mut gk: Vec<_> = g.keys().collect();
            let mut wk: Vec<_> = w.keys().collect();
            gk.sort();
            wk.sort();
            assert_eq!(gk, wk, "{what}: keys");
            for k in g.keys() {
                close_value(&format!("{what}.{k}"), &g[k], &w[k]);
            }
        }
        _ => assert_eq!(got, want, "{what}"),
    }
}

/// The CLI's JSON Lines, `field` of each line.
fn cli(args: &[&str], field: &str) -> Vec<Value> {
    json_lines(&ok(&berth(args)))
        .into_iter()
        .map(|l| l[field].clone())
        .collect()
}

const TEXTS: [&str; 3] = [
    "The quick brown fox jumps over the lazy dog.",
    "berth serves BERT models over HTTP",
    "A longer sentence, with commas, numbers like 12345 and accents: café naïve.",
];

#[test]
fn every_route_answers_as_the_cli() {
    let s = all_tasks();
    let m = minilm();
    let texts: Vec<&str> = TEXTS.to_vec();

    // /embed (the model's pooling, normalised) = berth embed
    let got = s.ok("/embed", &json!({"inputs": texts}));
    let want = cli(
        &[&["embed", "--model", &m][..], &texts].concat(),
        "embedding",
    );
    for (i, (g, w)) in got.as_array().unwrap().iter().zip(&want).enumerate() {
        close(&format!("/embed {i}"), &floats(g), &floats(w));
    }
    // a single string gives a list of one vector
    let one = s.ok("/embed", &json!({"inputs": texts[1], "model": "minilm"}));
    close("/embed single", &floats(&one[0]), &floats(&want[1]));

    // /v1/embeddings: OpenAI's envelope, floats and base64 float32 of the same vectors
    let oa = s.ok(
        "/v1/embeddings",
        &json!({"input": texts, "model": "minilm"}),
    );
    assert_eq!(oa["object"], "list");
    assert_eq!(oa["model"], "minilm");
    let tokens = oa["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(tokens, oa["usage"]["total_tokens"].as_u64().unwrap());
    let tok = s.ok("/tokenize", &json!({"inputs": texts}));
    let n_tokens: usize = tok
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_array().unwrap().len())
        .sum();
    assert_eq!(
        tokens as usize, n_tokens,
        "usage counts the tokens /tokenize gives"
    );
    let b64 = s.ok(
        "/v1/embeddings",
        &json!({"input": texts, "encoding_format": "base64"}),
    );
    for (i, w) in want.iter().enumerate() {
        let d = &oa["data"][i];
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        close("/v1/embeddings", &floats(&d["embedding"]), &floats(w));
        let bytes = decode_base64(b64["data"][i]["embedding"].as_str().unwrap());
        let v: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        close("/v1/embeddings base64", &v, &floats(w));
    }

    // /embed_all = berth embed --pooling none
    let got = s.ok("/embed_all", &json!({"inputs": texts}));
    let want = cli(
        &[&["embed", "--model", &m, "--pooling", "none"][..], &texts].concat(),
        "hidden",
    );
    close_value("/embed_all", &got, &Value::Array(want));

    // /similarity = berth similarity (row 0)
    let got = s.ok(
        "/similarity",
        &json!({"inputs": {"source_sentence": texts[0], "sentences": texts[1..]}}),
    );
    let want = cli(
        &[&["similarity", "--model", &m][..], &texts].concat(),
        "similarities",
    );
    close("/similarity", &floats(&got), &floats(&want[0])[1..]);

    // /predict = berth classify --top-k 0, single texts and pairs
    let cls = task_model("bert-classify");
    let got = s.ok("/predict", &json!({"inputs": texts, "model": "cls"}));
    let want = cli(
        &[&["classify", "--model", &cls, "--top-k", "0"][..], &texts].concat(),
        "labels",
    );
    close_value("/predict", &got, &Value::Array(want.clone()));
    // two single texts (a two-string list is one pair, as in TEI)
    let got = s.ok(
        "/predict",
        &json!({"inputs": [[texts[0]], [texts[1]]], "model": "cls"}),
    );
    close_value("/predict two", &got, &Value::Array(want[..2].to_vec()));
    let got = s.ok("/predict", &json!({"inputs": texts[0], "model": "cls"}));
    close_value("/predict single", &got, &want[0]);
    let got = s.ok(
        "/predict",
        &json!({"inputs": [[texts[0], texts[1]]], "model": "cls"}),
    );
    let want = cli(
        &[
            "classify", "--model", &cls, "--top-k", "0", "--pair", texts[0], texts[1],
        ],
        "labels",
    );
    close_value("/predict pair", &got, &Value::Array(want));
    let raw = s.ok(
        "/predict",
        &json!({"inputs": texts[0], "model": "cls", "raw_scores": true}),
    );
    let want = cli(
        &[
            "classify",
            "--model",
            &cls,
            "--top-k",
            "0",
            "--function",
            "none",
            texts[0],
        ],
        "labels",
    );
    close_value("/predict raw", &raw, &want[0]);

    // /rerank = berth rerank
    let rr = task_model("bert-rerank");
    let got = s.ok(
        "/rerank",
        &json!({"query": "what is a fox", "texts": texts, "model": "rr", "return_text": true}),
    );
    let want: Vec<Value> = json_lines(&ok(&berth(
        &[
            &["rerank", "--model", &rr, "--query", "what is a fox"][..],
            &texts,
        ]
        .concat(),
    )))
    .into_iter()
    .map(|l| json!({"index": l["index"], "score": l["score"], "text": l["text"]}))
    .collect();
    close_value("/rerank", &got, &Value::Array(want));

    // /ner = berth ner (default aggregation simple, ignoring O)
    let ner = task_model("bert-ner");
    let got = s.ok("/ner", &json!({"inputs": texts, "model": "ner"}));
    let want = cli(
        &[&["ner", "--model", &ner][..], &texts].concat(),
        "entities",
    );
    close_value("/ner", &got, &Value::Array(want.clone()));
    let got = s.ok("/ner", &json!({"inputs": texts[2], "model": "ner"}));
    close_value("/ner single", &got, &want[2]);
    let got = s.ok(
        "/ner",
        &json!({"inputs": [texts[0]], "model": "ner", "aggregation_strategy": "none"}),
    );
    let want = cli(
        &["ner", "--model", &ner, "--aggregation", "none", texts[0]],
        "entities",
    );
    close_value("/ner none", &got, &Value::Array(want));

    // /qa = berth qa, one question (an object) and several (a list; top_k 2 gives lists)
    let qa = task_model("bert-qa");
    let (q, c) = ("Who jumps?", texts[0]);
    let got = s.ok("/qa", &json!({"question": q, "context": c, "model": "qa"}));
    let want = cli(
        &["qa", "--model", &qa, "--question", q, "--context", c],
        "answers",
    );
    close_value("/qa", &got, &want[0][0]);
    let got = s.ok(
        "/qa",
        &json!([{"question": q, "context": c, "model": "qa", "top_k": 2},
                {"question": "What serves?", "context": texts[1], "model": "qa", "top_k": 2}]),
    );
    let w0 = cli(
        &[
            "qa",
            "--model",
            &qa,
            "--question",
            q,
            "--context",
            c,
            "--top-k",
            "2",
        ],
        "answers",
    );
    let w1 = cli(
        &[
            "qa",
            "--model",
            &qa,
            "--question",
            "What serves?",
            "--context",
            texts[1],
            "--top-k",
            "2",
        ],
        "answers",
    );
    close_value("/qa list", &got, &json!([w0[0], w1[0]]));

    // /fill-mask = berth fill-mask
    let mlm = tiny("bert-mlm");
    let masked = [
        "paris is the [MASK] of france.",
        "the [MASK] sat on the [MASK].",
    ];
    let got = s.ok(
        "/fill-mask",
        &json!({"inputs": masked, "model": "mlm", "top_k": 3}),
    );
    let want = cli(
        &[&["fill-mask", "--model", &mlm, "--top-k", "3"][..], &masked].concat(),
        "predictions",
    );
    // one mask: its list; two masks: a list per mask
    close_value("/fill-mask", &got, &Value::Array(want));

    // /tokenize = transformers' fast tokenizer (fixtures/tiny/tokenization.json); /decode
    // turns the ids back into the text
    let refs: Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("tokenization.json")).unwrap()).unwrap();
    let r = &refs["bert"];
    let ref_texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let got = s.ok("/tokenize", &json!({"inputs": ref_texts, "model": "tok"}));
    let ids = r["input_ids"].as_array().unwrap();
    let cu: Vec<usize> = r["cu_seqlens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap() as usize)
        .collect();
    for (i, toks) in got.as_array().unwrap().iter().enumerate() {
        let got_ids: Vec<&Value> = toks.as_array().unwrap().iter().map(|t| &t["id"]).collect();
        let want_ids: Vec<&Value> = ids[cu[i]..cu[i + 1]].iter().collect();
        assert_eq!(got_ids, want_ids, "/tokenize text {i}");
    }
    // the offsets point at each token's characters (ASCII text: characters = bytes)
    for t in got[1]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["special"] == false)
    {
        let (a, b) = (
            t["start"].as_u64().unwrap() as usize,
            t["stop"].as_u64().unwrap() as usize,
        );
        assert_eq!(
            &ref_texts[1][a..b],
            t["text"].as_str().unwrap().trim_start_matches("##")
        );
    }
    let id_lists: Vec<Vec<u64>> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            t.as_array()
                .unwrap()
                .iter()
                .map(|x| x["id"].as_u64().unwrap())
                .collect()
        })
        .collect();
    let decoded = s.ok("/decode", &json!({"ids": id_lists[..2], "model": "tok"}));
    assert_eq!(decoded, json!(ref_texts[..2]));
    let no_special = s.ok(
        "/tokenize",
        &json!({"inputs": "hello world", "add_special_tokens": false, "model": "tok"}),
    );
    assert!(no_special[0]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["special"] == false));

    // /info, /health, /metrics, /openapi.json
    let (status, info) = s.get("/info");
    assert_eq!(status, 200);
    let info: Value = serde_json::from_str(&info).unwrap();
    let tasks: Vec<&str> = info["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["task"].as_str().unwrap())
        .collect();
    assert_eq!(
        tasks,
        [
            "embed",
            "classify",
            "ner",
            "qa",
            "classify",
            "fill-mask",
            "embed"
        ]
    );
    assert_eq!(info["models"][0]["max_input_length"], 256);
    assert_eq!(info["models"][0]["pooling"], "mean");
    assert_eq!(info["max_client_batch_size"], 32);
    assert_eq!(s.get("/health").0, 200);
    let (status, metrics) = s.get("/metrics");
    assert_eq!(status, 200);
    for series in [
        "berth_requests_total{route=\"/embed\",status=\"200\"} 2",
        "berth_batch_tokens_bucket",
        "berth_queue_duration_seconds_bucket",
        "berth_inference_duration_seconds_count{model=\"minilm\"}",
        "berth_tokenization_duration_seconds_count{model=\"ner\"}",
        "berth_queue_depth{model=\"minilm\"} 0",
    ] {
        assert!(metrics.contains(series), "no {series} in\n{metrics}");
    }
    let (status, doc) = s.get("/openapi.json");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&doc).unwrap();
    for route in [
        "/embed",
        "/v1/embeddings",
        "/predict",
        "/rerank",
        "/ner",
        "/qa",
        "/fill-mask",
        "/metrics",
    ] {
        assert!(
            doc["paths"][route].is_object(),
            "{route} not in /openapi.json"
        );
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Status and error type of a failed request; the body names the problem.
fn fails(s: &Server, route: &str, body: &[u8], status: u16, needle: &str) {
    let (got, v) = s.post_raw(route, body);
    assert_eq!(
        got,
        status,
        "{route} {}: {v}",
        String::from_utf8_lossy(body)
    );
    let error = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error field: {v}"));
    assert!(v["error_type"].is_string(), "no error_type: {v}");
    assert!(
        error.contains(needle),
        "{route}: {error:?} does not say {needle:?}"
    );
}

#[test]
fn bad_requests_get_4xx_with_an_error_body() {
    let s = Server::start(&[
        "--model",
        &format!("minilm={}", minilm()),
        "--model",
        &format!("cls={}", task_model("bert-classify")),
        "--model",
        &format!("mlm={}", tiny("bert-mlm")),
        "--max-client-batch-size",
        "4",
        "--payload-limit",
        "20000",
    ]);
    fails(&s, "/embed", b"{\"inputs\": ", 422, "invalid request body");
    fails(&s, "/embed", b"not json", 422, "invalid request body");
    fails(
        &s,
        "/embed",
        b"{\"inputs\": 42}",
        422,
        "invalid request body",
    );
    fails(&s, "/embed", b"{\"input\": \"x\"}", 422, "unknown field");
    fails(
        &s,
        "/embed",
        b"{\"inputs\": \"x\", \"normalize\": \"yes\"}",
        422,
        "invalid request body",
    );
    fails(
        &s,
        "/embed",
        b"{\"inputs\": [\"ok\", \"\xff\xfe\"]}",
        422,
        "invalid request body",
    );
    fails(
        &s,
        "/embed",
        b"{\"inputs\": \"\\ud800\"}",
        422,
        "invalid request body",
    );
    fails(&s, "/embed", b"{\"inputs\": []}", 422, "no inputs");
    fails(
        &s,
        "/embed",
        b"{\"inputs\": [\"fine\", \"  \"]}",
        422,
        "input 1: empty text",
    );
    fails(
        &s,
        "/embed",
        br#"{"inputs": ["a", "b", "c", "d", "e"]}"#,
        413,
        "at most 4",
    );
    fails(
        &s,
        "/embed",
        br#"{"inputs": "x", "model": "nope"}"#,
        404,
        "unknown model \"nope\"",
    );
    fails(
        &s,
        "/predict",
        br#"{"inputs": "x"}"#,
        422,
        "/predict needs a model served for classify",
    );
    fails(
        &s,
        "/ner",
        br#"{"inputs": "x", "model": "cls"}"#,
        422,
        "/ner needs",
    );
    fails(
        &s,
        "/qa",
        br#"{"question": "q", "context": "c"}"#,
        422,
        "/qa needs",
    );
    fails(
        &s,
        "/fill-mask",
        br#"{"inputs": "no mask here", "model": "mlm"}"#,
        422,
        "no [MASK] token",
    );
    fails(
        &s,
        "/fill-mask",
        br#"{"inputs": "a [MASK]", "model": "mlm", "top_k": 0}"#,
        422,
        "top_k",
    );
    fails(
        &s,
        "/rerank",
        br#"{"query": "q", "texts": [], "model": "cls"}"#,
        422,
        "no inputs",
    );
    fails(
        &s,
        "/decode",
        br#"{"ids": [1, 99999999]}"#,
        422,
        "outside the vocabulary",
    );
    fails(
        &s,
        "/v1/embeddings",
        br#"{"input": "x", "encoding_format": "int8"}"#,
        422,
        "unknown variant",
    );
    fails(&s, "/nowhere", b"{}", 404, "no route POST /nowhere");
    // over the token limit: 413 unless the request (or --auto-truncate) asks to truncate
    let long = "word ".repeat(400);
    fails(
        &s,
        "/embed",
        json!({"inputs": [long]}).to_string().as_bytes(),
        413,
        "longer than the model's maximum of 256",
    );
    let (status, v) = s.post("/embed", &json!({"inputs": [long], "truncate": true}));
    assert_eq!(status, 200, "{v}");
    let (_, metrics) = s.get("/metrics");
    assert!(
        metrics.contains("berth_inputs_truncated_total{model=\"minilm\"} 1"),
        "{metrics}"
    );
    // a body over --payload-limit
    let big = json!({"inputs": ["x".repeat(30000)]}).to_string();
    fails(&s, "/embed", big.as_bytes(), 413, "length limit");
    // GET on a POST route: 405
    let (status, _) = s.get("/embed");
    assert_eq!(status, 405);
    // still healthy, and still right
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(
        s.ok("/embed", &json!({"inputs": "still here"}))
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn auto_truncate_and_max_input_length() {
    let s = Server::start(&[
        "--model",
        &minilm(),
        "--auto-truncate",
        "--max-input-length",
        "16",
    ]);
    let long = "word ".repeat(400);
    let got = s.ok("/embed", &json!({"inputs": [long]}));
    let want = cli(
        &["embed", "--model", &minilm(), "--max-length", "16", &long],
        "embedding",
    );
    close("--max-input-length 16", &floats(&got[0]), &floats(&want[0]));
}

/// Requests from 16 threads at once (merged into shared batches) get the answers they get
/// one at a time.
#[test]
fn concurrent_requests_get_the_sequential_answers() {
    let s = Server::start(&["--model", &minilm(), "--max-batch-tokens", "512"]);
    let bodies: Vec<Value> = (0..32)
        .map(|i| {
            let n = 1 + i % 4;
            let texts: Vec<String> = (0..n)
                .map(|k| {
                    format!(
                        "{} request {i} text {k}",
                        TEXTS[(i + k) % 3].repeat(1 + k % 2)
                    )
                })
                .collect();
            json!({"inputs": texts})
        })
        .collect();
    let sequential: Vec<Value> = bodies.iter().map(|b| s.ok("/embed", b)).collect();
    let url = s.url.clone();
    let concurrent: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .map(|b| {
                let url = url.clone();
                scope.spawn(move || {
                    let r = ureq::post(&format!("{url}/embed")).send_json(b.clone());
                    let (status, v) = reply(r);
                    assert_eq!(status, 200, "{v}");
                    v
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (c, q)) in concurrent.iter().zip(&sequential).enumerate() {
        close_value(&format!("request {i}"), c, q);
    }
    // the batches were shared: fewer forward passes than submissions
    let (_, metrics) = s.get("/metrics");
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse().unwrap())
    };
    let passes = count("berth_inference_duration_seconds_count");
    let queued = count("berth_queue_duration_seconds_count");
    assert!(
        passes < queued,
        "{passes} forward passes for {queued} batches: nothing merged"
    );
}

/// Beyond --max-concurrent-requests: 429 with a JSON error, every other request 200 and
/// right, the server healthy afterwards.
#[test]
fn saturation_gets_429_and_the_server_recovers() {
    let s = Server::start(&["--model", &minilm(), "--max-concurrent-requests", "2"]);
    let texts: Vec<String> = (0..32)
        .map(|i| format!("{} {i}", TEXTS[2].repeat(4)))
        .collect();
    let body = json!({"inputs": texts});
    let want = s.ok("/embed", &body);
    let url = s.url.clone();
    let results: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|_| {
                let (url, body) = (url.clone(), body.clone());
                scope.spawn(move || reply(ureq::post(&format!("{url}/embed")).send_json(body)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut rejected = 0;
    for (status, v) in &results {
        match status {
            200 => close_value("under load", v, &want),
            429 => {
                rejected += 1;
                assert_eq!(v["error_type"], "Overloaded", "{v}");
            }
            _ => panic!("status {status}: {v}"),
        }
    }
    assert!(
        rejected > 0,
        "16 concurrent requests against a limit of 2: no 429"
    );
    assert!(rejected < 16, "every request was rejected");
    assert_eq!(s.get("/health").0, 200);
    close_value("after load", &s.ok("/embed", &body), &want);
}

/// SIGTERM: the request in flight is answered, new connections are refused, exit 0.
#[test]
fn sigterm_drains_in_flight_requests() {
    let mut s = Server::start(&["--model", &minilm()]);
    let texts: Vec<String> = (0..32)
        .map(|i| format!("{} {i}", TEXTS[2].repeat(5)))
        .collect();
    let body = json!({"inputs": texts});
    let url = s.url.clone();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(reply(ureq::post(&format!("{url}/embed")).send_json(body)));
    });
    // wait until the request is in the server (its batch queued or running)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, metrics) = s.get("/metrics");
        if metrics.contains("berth_tokenization_duration_seconds_count{model=") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the request never arrived"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let pid = s.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let (status, v) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the in-flight request is answered");
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_array().unwrap().len(), 32);
    let code = s.child.wait().unwrap();
    assert!(code.success(), "exit status {code}");
    let stopped: Vec<String> = s.log.try_iter().collect();
    assert!(
        stopped
            .iter()
            .any(|l| l.contains("every request in flight was answered")),
        "{stopped:?}"
    );
    assert!(
        ureq::get(&format!("{}/health", s.url)).call().is_err(),
        "still accepting after SIGTERM"
    );
}

/// `--task` picks the routes a model serves; a task whose head the model lacks, an unknown
/// task or a model directory that does not load stop the server at start with a message.
#[test]
fn task_flag_and_startup_errors() {
    let cls = task_model("bert-classify");
    let s = Server::start(&["--model", &format!("cls={cls}"), "--task", "cls=embed"]);
    fails(
        &s,
        "/predict",
        br#"{"inputs": "x"}"#,
        422,
        "served for embed",
    );
    assert_eq!(
        s.ok("/embed", &json!({"inputs": "x"}))
            .as_array()
            .unwrap()
            .len(),
        1
    );
    drop(s);
    let start_fails = |args: &[&str], needle: &str| {
        let out = berth(&[&["serve", "--port", "0"][..], args].concat());
        assert!(!out.status.success(), "{args:?} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    start_fails(
        &["--model", &tiny("bert-base"), "--task", "ner"],
        "token-classification",
    );
    start_fails(
        &["--model", &cls, "--task", "translate"],
        "unknown task \"translate\"",
    );
    start_fails(
        &["--model", &cls, "--task", "other=embed"],
        "no model named \"other\"",
    );
    start_fails(
        &[
            "--model",
            &format!("a={cls}"),
            "--model",
            &format!("a={cls}"),
        ],
        "two models are named \"a\"",
    );
    let dir = tempfile::tempdir().unwrap();
    start_fails(&["--model", &dir.path().to_string_lossy()], "config.json");
}

/// ModernBERT models served: fill-mask as transformers' pipeline gave it
/// (fixtures/modernbert/mlm/fill_mask.json), a 1,702-token embedding and sequence
/// classification as the CLI gives them.
#[test]
fn modernbert_models_serve_as_the_cli() {
    let mlm = root().join("fixtures/modernbert/mlm").display().to_string();
    let cls = root()
        .join("fixtures/modernbert/seqcls-mean")
        .display()
        .to_string();
    let s = Server::start(&[
        "--model",
        &format!("mlm={mlm}"),
        "--model",
        &format!("cls={cls}"),
        "--max-input-length",
        "2048",
    ]);
    let r: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/modernbert/mlm/fill_mask.json")).unwrap(),
    )
    .unwrap();
    let got = s.ok(
        "/fill-mask",
        &json!({"inputs": r["text"], "top_k": 5, "model": "mlm"}),
    );
    let got = got.as_array().unwrap();
    let want = r["predictions"].as_array().unwrap();
    assert_eq!(got.len(), want.len(), "{got:?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["token_id"], w["token"]);
        assert_eq!(g["sequence"], w["sequence"]);
        let d = (g["score"].as_f64().unwrap() - w["score"].as_f64().unwrap()).abs();
        assert!(d <= 1e-6, "fill-mask score differs by {d}");
    }
    let long = ["the quick brown fox jumps over the lazy dog."; 100].join(" ");
    let got = s.ok(
        "/embed",
        &json!({"inputs": [long], "model": "mlm", "normalize": false}),
    );
    let want = cli(
        &["embed", "--model", &mlm, "--max-length", "2048", &long],
        "embedding",
    );
    close(
        "long ModernBERT embedding",
        &floats(&got[0]),
        &floats(&want[0]),
    );
    // Two single texts (a two-string list would be one pair, as in TEI).
    let got = s.ok(
        "/predict",
        &json!({"inputs": [["hello world"], [&long]], "model": "cls"}),
    );
    let want = cli(
        &[
            "classify",
            "--model",
            &cls,
            "--top-k",
            "0",
            "--max-length",
            "2048",
            "hello world",
            &long,
        ],
        "labels",
    );
    close_value("/predict", &got, &Value::Array(want));
}
