//! `berth bench serve`: `berth serve` against infinity-emb (when given) under the same HTTP
//! load in one run, both on the same model directory and machine:
//!   1. N single-text embedding requests from C keep-alive clients,
//!   2. M requests of B texts each from the same clients,
//!   3. one short sentence at a time (concurrency 1): the latency floor,
//!   4. berth only: overload — 64 concurrent requests of 32 long texts against
//!      `--max-concurrent-requests 2` (429s expected, no 5xx, no dropped connection).
//! Texts are real and of mixed length: three SST-2 sentences to one book paragraph
//! (../shared/datasets). Each server's peak RSS is read from /proc after its run.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};

use crate::resolve;

/// Arguments of `berth bench serve`.
#[derive(Args)]
pub struct ServeBenchArgs {
    /// Model directory served by every server (default: all-MiniLM-L6-v2).
    #[arg(long)]
    model: Option<String>,
    /// Datasets folder (default: $BERTH_DATASETS or ../shared/datasets).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Single-text requests in load 1.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Concurrent keep-alive clients.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Requests in load 2.
    #[arg(long, default_value_t = 200)]
    batch_requests: usize,
    /// Texts per request in load 2.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// berth precisions to run (bf16: AMX or AVX-512; int8: AMX, AVX-512 VNNI or
    /// AVX2).
    #[arg(long, value_delimiter = ',', default_value = "f32")]
    dtype: Vec<berth_model::Precision>,
    /// infinity-emb's `infinity_emb` executable (in its own virtual environment); it is run
    /// as `infinity_emb v2 --model-id DIR --engine torch --device cpu`.
    #[arg(long, value_name = "PATH")]
    infinity: Option<PathBuf>,
    /// Skip the overload scenario.
    #[arg(long)]
    no_overload: bool,
}

/// A server under test, killed on drop.
struct Target {
    name: String,
    child: Child,
    url: String,
    route: &'static str,
    /// The request body for `texts`.
    body: fn(&[&str]) -> Value,
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Target {
    /// berth: seconds its encoder has run so far (from /metrics); `None` for a peer.
    fn encoder_seconds(&self) -> Option<f64> {
        let text = ureq::get(&format!("{}/metrics", self.url))
            .call()
            .ok()?
            .into_string()
            .ok()?;
        text.lines()
            .filter(|l| l.starts_with("berth_inference_duration_seconds_sum"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .reduce(|a, b| a + b)
    }

    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()?;
        Some(kb / 1024.0)
    }

    /// One request: (status, body, latency); `Err` for a transport failure.
    fn send(&self, agent: &ureq::Agent, texts: &[&str]) -> Result<(u16, String, Duration), String> {
        let t = Instant::now();
        let r = agent
            .post(&format!("{}{}", self.url, self.route))
            .send_json((self.body)(texts));
        let (status, text) = match r {
            Ok(r) => (r.status(), r.into_string().map_err(|e| e.to_string())?),
            Err(ureq::Error::Status(code, r)) => {
                (code, r.into_string().map_err(|e| e.to_string())?)
            }
            Err(e) => return Err(e.to_string()),
        };
        Ok((status, text, t.elapsed()))
    }

    /// The vectors of `texts` (normalised by both servers for this model).
    fn vectors(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        let (status, text, _) = self
            .send(&agent(), texts)
            .map_err(|e| anyhow::anyhow!("{}: {e}", self.name))?;
        anyhow::ensure!(status == 200, "{}: status {status}: {text}", self.name);
        let v: Value = serde_json::from_str(&text)?;
        let rows = if v.is_array() { v } else { v["data"].clone() };
        Ok(rows
            .as_array()
            .context("no vectors")?
            .iter()
            .map(|r| {
                let r = if r.is_array() { r } else { &r["embedding"] };
                r.as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| x.as_f64().unwrap_or(f64::NAN) as f32)
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect())
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .max_idle_connections_per_host(1)
        .build()
}

fn berth_body(texts: &[&str]) -> Value {
    json!({"inputs": texts, "truncate": true})
}

fn openai_body(texts: &[&str]) -> Value {
    json!({"input": texts})
}

/// Starts `berth serve` (this executable) on a free port.
fn start_berth(
    dir: &Path,
    dtype: berth_model::Precision,
    extra: &[&str],
) -> anyhow::Result<Target> {
    let exe = std::env::current_exe()?;
    let dtype_name = format!("{dtype:?}").to_lowercase();
    let mut child = Command::new(exe)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--dtype",
            &dtype_name,
        ])
        .arg("--model")
        .arg(dir)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.split("listening on ").nth(1) {
                    break a.trim().to_string();
                }
            }
            _ => bail!("berth serve exited before listening"),
        }
    };
    // keep draining stderr so the server never blocks on a full pipe
    std::thread::spawn(move || lines.for_each(drop));
    Ok(Target {
        name: format!("berth {dtype_name}"),
        child,
        url,
        route: "/embed",
        body: berth_body,
    })
}

/// Starts infinity-emb on a free port and waits until it answers /health.
fn start_infinity(exe: &Path, dir: &Path) -> anyhow::Result<Target> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(exe)
        .args([
            "v2",
            "--engine",
            "torch",
            "--device",
            "cpu",
            "--host",
            "127.0.0.1",
        ])
        .arg("--model-id")
        .arg(dir)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("{}: cannot start", exe.display()))?;
    let t = Target {
        name: "infinity-emb torch".into(),
        child,
        url: format!("http://127.0.0.1:{port}"),
        route: "/embeddings",
        body: openai_body,
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while ureq::get(&format!("{}/health", t.url)).call().is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "infinity-emb did not come up in 300 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Ok(t)
}

/// Result of one load.
struct Load {
    texts_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    statuses: std::collections::BTreeMap<u16, usize>,
    transport_errors: usize,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// `n` requests of `per` texts (consecutive texts of `pool`, cycled) from `clients` threads.
fn load(t: &Target, pool: &[String], n: usize, per: usize, clients: usize) -> Load {
    let next = AtomicUsize::new(0);
    let start = Instant::now();
    let per_client: Vec<(Vec<f64>, Vec<u16>, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let next = &next;
                s.spawn(move || {
                    let agent = agent();
                    let (mut lat, mut statuses, mut errors) = (Vec::new(), Vec::new(), 0);
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        let texts: Vec<&str> = (0..per)
                            .map(|k| pool[(i * per + k) % pool.len()].as_str())
                            .collect();
                        match t.send(&agent, &texts) {
                            Ok((status, _, d)) => {
                                statuses.push(status);
                                if status == 200 {
                                    lat.push(d.as_secs_f64() * 1e3);
                                }
                            }
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, statuses, errors)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    let mut lat: Vec<f64> = per_client.iter().flat_map(|c| c.0.clone()).collect();
    lat.sort_by(f64::total_cmp);
    let mut statuses = std::collections::BTreeMap::new();
    for s in per_client.iter().flat_map(|c| c.1.iter()) {
        *statuses.entry(*s).or_insert(0) += 1;
    }
    Load {
        texts_per_s: (lat.len() * per) as f64 / wall,
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
        statuses,
        transport_errors: per_client.iter().map(|c| c.2).sum(),
    }
}

/// Three SST-2 sentences to one book paragraph (20..400 words), in file order.
fn texts(data: &Path) -> anyhow::Result<Vec<String>> {
    let sst_path = data.join("sst2/dev.tsv");
    let sst: Vec<String> = std::fs::read_to_string(&sst_path)
        .with_context(|| format!("{}: cannot read", sst_path.display()))?
        .lines()
        .skip(1)
        .filter_map(|l| l.split('\t').next().map(|s| s.trim().to_string()))
        .filter(|s| !s.is_empty())
        .collect();
    let books_path = data.join("pd-books/valid.txt.gz");
    let f = std::fs::File::open(&books_path)
        .with_context(|| format!("{}: cannot open", books_path.display()))?;
    let paragraphs: Vec<String> = BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map_while(Result::ok)
        .filter(|l| (20..400).contains(&l.split_whitespace().count()))
        .take(2000)
        .collect();
    anyhow::ensure!(
        !sst.is_empty() && !paragraphs.is_empty(),
        "no texts in {}",
        data.display()
    );
    let (mut s, mut p) = (sst.iter().cycle(), paragraphs.iter().cycle());
    Ok((0..8000)
        .map(|i| if i % 4 == 3 { p.next() } else { s.next() })
        .map(|t| t.expect("cycled; this is a bug").clone())
        .collect())
}

struct Row {
    name: String,
    /// berth: the share of load 1's wall time its encoder was running.
    busy: Option<f64>,
    single: Load,
    batched: Load,
    floor: Load,
    rss: Option<f64>,
}

fn run_target(t: &Target, a: &ServeBenchArgs, pool: &[String]) -> Row {
    eprintln!("{}: warm-up", t.name);
    let _ = load(t, pool, 64, 4, 4);
    eprintln!(
        "{}: {} single-text requests from {} clients",
        t.name, a.requests, a.clients
    );
    let (busy0, t0) = (t.encoder_seconds(), Instant::now());
    let single = load(t, pool, a.requests, 1, a.clients);
    let busy = t
        .encoder_seconds()
        .map(|b| (b - busy0.unwrap_or(0.0)) / t0.elapsed().as_secs_f64());
    eprintln!(
        "{}: {} requests of {} texts",
        t.name, a.batch_requests, a.batch_size
    );
    let batched = load(t, &pool[1000..], a.batch_requests, a.batch_size, a.clients);
    eprintln!("{}: one short sentence at a time", t.name);
    let short = vec!["The movie was surprisingly good.".to_string()];
    let floor = load(t, &short, 200, 1, 1);
    Row {
        name: t.name.clone(),
        busy,
        single,
        batched,
        floor,
        rss: t.peak_rss_mib(),
    }
}

pub fn run(a: ServeBenchArgs) -> anyhow::Result<()> {
    let dir = resolve::model_dir(a.model.as_deref())?;
    let data = a
        .data
        .clone()
        .or_else(|| std::env::var_os("BERTH_DATASETS").map(PathBuf::from))
        .unwrap_or_else(|| "../shared/datasets".into());
    let pool = texts(&data)?;
    let mut rows = Vec::new();
    let mut reference: Option<Vec<Vec<f32>>> = None;
    let probe: Vec<&str> = pool[..16].iter().map(String::as_str).collect();
    let mut agreement = Vec::new();
    for &dtype in &a.dtype {
        let t = start_berth(&dir, dtype, &["--auto-truncate"])?;
        let v = t.vectors(&probe)?;
        if let Some(r) = &reference {
            agreement.push((t.name.clone(), min_cosine(r, &v)));
        } else {
            reference = Some(v);
        }
        rows.push(run_target(&t, &a, &pool));
    }
    if let Some(exe) = &a.infinity {
        let t = start_infinity(exe, &dir)?;
        if let Some(r) = &reference {
            agreement.push((t.name.clone(), min_cosine(r, &t.vectors(&probe)?)));
        }
        rows.push(run_target(&t, &a, &pool));
    }
    println!(
        "model {} | texts: 3 SST-2 sentences : 1 book paragraph | {} clients | {} threads on this machine",
        dir.display(),
        a.clients,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<20} {:>28} {:>28} {:>20} {:>10}",
        "server",
        format!("{}x1 text: texts/s p50 p99", a.requests),
        format!(
            "{}x{} texts: texts/s p50 p99",
            a.batch_requests, a.batch_size
        ),
        "1 at a time: p50 p99",
        "peak RSS"
    );
    for r in &rows {
        println!(
            "{:<20} {:>10.1} {:>7.1}ms {:>7.1}ms {:>10.1} {:>7.0}ms {:>7.0}ms {:>9.2}ms {:>8.2}ms {:>8.0}MiB",
            r.name,
            r.single.texts_per_s,
            r.single.p50_ms,
            r.single.p99_ms,
            r.batched.texts_per_s,
            r.batched.p50_ms,
            r.batched.p99_ms,
            r.floor.p50_ms,
            r.floor.p99_ms,
            r.rss.unwrap_or(f64::NAN)
        );
        for (what, l) in [
            ("single", &r.single),
            ("batched", &r.batched),
            ("1 at a time", &r.floor),
        ] {
            let bad: Vec<String> = l
                .statuses
                .iter()
                .filter(|(s, _)| **s != 200)
                .map(|(s, n)| format!("{n} x {s}"))
                .collect();
            if !bad.is_empty() || l.transport_errors > 0 {
                println!(
                    "  {what}: {} transport errors, {}",
                    l.transport_errors,
                    bad.join(", ")
                );
            }
        }
    }
    for r in &rows {
        if let Some(b) = r.busy {
            println!(
                "{}: the encoder ran {:.0} % of the single-text load's wall time",
                r.name,
                b * 100.0
            );
        }
    }
    for (name, cos) in &agreement {
        println!(
            "min cosine of {name}'s vectors to {}'s on 16 texts: {cos:.6}",
            rows[0].name
        );
    }
    if let Some(peer) = rows.iter().find(|r| r.name.starts_with("infinity")) {
        for r in rows.iter().filter(|r| r.name.starts_with("berth")) {
            println!(
                "{} / {}: single-text texts/s x{:.2}, p99 x{:.2} lower; batched texts/s x{:.2}, p99 x{:.2} lower; 1-at-a-time p50 x{:.2} lower",
                r.name,
                peer.name,
                r.single.texts_per_s / peer.single.texts_per_s,
                peer.single.p99_ms / r.single.p99_ms,
                r.batched.texts_per_s / peer.batched.texts_per_s,
                peer.batched.p99_ms / r.batched.p99_ms,
                peer.floor.p50_ms / r.floor.p50_ms,
            );
        }
    }
    if !a.no_overload {
        overload(&dir, &pool)?;
    }
    Ok(())
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| berth_tasks::cosine(x, y) as f64)
        .fold(f64::INFINITY, f64::min)
}

/// 64 concurrent requests of 32 long texts against `--max-concurrent-requests 2`.
fn overload(dir: &Path, pool: &[String]) -> anyhow::Result<()> {
    let t = start_berth(
        dir,
        berth_model::Precision::F32,
        &["--auto-truncate", "--max-concurrent-requests", "2"],
    )?;
    let long: Vec<String> = pool
        .iter()
        .filter(|p| p.split_whitespace().count() > 150)
        .take(32)
        .cloned()
        .collect();
    let texts: Vec<&str> = long.iter().map(String::as_str).collect();
    let want = t.vectors(&texts)?;
    let results: Vec<Result<(u16, String, Duration), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..64)
            .map(|_| {
                let (t, texts) = (&t, &texts);
                s.spawn(move || t.send(&agent(), texts))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let (mut ok, mut rejected, mut other, mut dropped, mut wrong) = (0, 0, 0, 0, 0);
    for r in &results {
        match r {
            Ok((200, body, _)) => {
                ok += 1;
                let got: Vec<Vec<f32>> = serde_json::from_str(body)?;
                if min_cosine(&want, &got) < 0.99999 {
                    wrong += 1;
                }
            }
            Ok((429, _, _)) => rejected += 1,
            Ok(_) => other += 1,
            Err(_) => dropped += 1,
        }
    }
    let healthy = ureq::get(&format!("{}/health", t.url)).call().is_ok();
    println!(
        "overload (64 concurrent x 32 long texts, --max-concurrent-requests 2): {ok} x 200 ({wrong} wrong), {rejected} x 429, {other} other statuses, {dropped} dropped connections; healthy afterwards: {healthy}; peak RSS {:.0} MiB",
        t.peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
