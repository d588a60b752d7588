//! The hardening battery (#24): bad inputs and faults through the real binary, every one
//! generated here (no committed blobs). Each case must end in a one-line `error:` naming
//! the file / flag / input and the problem, or in the correct result — never a panic, a
//! signal death, a hang (each case runs under a time limit) or runaway memory (peak RSS of
//! the child, from wait4, under a stated bound where the case is about memory).
//!
//! The test prints a table per family (cases, clean errors, correct acceptances, panics,
//! hangs, deaths, wrong results) and fails unless the last four are zero.
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{task_model, tiny};
use serde_json::Value;

/// What a case must end in.
enum Want {
    /// Non-zero exit, one `error:` line containing every needle.
    Error(Vec<String>),
    /// Success, and the check passes on (stdout, stderr, the case's folder).
    Ok(Box<dyn Fn(&str, &str) -> Result<(), String>>),
}

/// Where the child's stdout goes.
enum Out {
    File,
    DevFull,
    Closed,
}

struct Case {
    family: u8,
    name: String,
    args: Vec<String>,
    stdin: Option<PathBuf>,
    stdout: Out,
    /// Shell prefix (e.g. `ulimit -f 8`), run as `sh -c 'PREFIX; exec berth ARGS'`.
    shell: Option<String>,
    want: Want,
    timeout: Duration,
    max_rss_mib: Option<u64>,
    /// Checked after the run: nothing under these paths may have changed.
    unchanged: Vec<PathBuf>,
}

fn case<S: AsRef<str>>(family: u8, name: &str, args: &[S], want: Want) -> Case {
    Case {
        family,
        name: name.into(),
        args: args.iter().map(|s| s.as_ref().to_string()).collect(),
        stdin: None,
        stdout: Out::File,
        shell: None,
        want,
        timeout: Duration::from_secs(60),
        max_rss_mib: None,
        unchanged: Vec::new(),
    }
}

/// A command line split on spaces (the paths here have none).
fn argv(line: &str) -> Vec<String> {
    line.split(' ').map(str::to_string).collect()
}

fn err(needles: &[&str]) -> Want {
    Want::Error(needles.iter().map(|s| s.to_string()).collect())
}

fn succeeds() -> Want {
    Want::Ok(Box::new(|_, _| Ok(())))
}

fn succeeds_with(check: impl Fn(&str, &str) -> Result<(), String> + 'static) -> Want {
    Want::Ok(Box::new(check))
}

#[derive(Default, Clone, Copy)]
struct Tally {
    cases: usize,
    clean_errors: usize,
    accepted: usize,
    panics: usize,
    hangs: usize,
    deaths: usize,
    wrong: usize,
}

impl Tally {
    /// Counts one outcome class of [`run`].
    fn count(&mut self, class: &str) {
        self.cases += 1;
        match class {
            "clean error" => self.clean_errors += 1,
            "accepted" => self.accepted += 1,
            "panic" => self.panics += 1,
            "hang" => self.hangs += 1,
            "death" => self.deaths += 1,
            _ => self.wrong += 1,
        }
    }

    fn add(&mut self, t: &Tally) {
        self.cases += t.cases;
        self.clean_errors += t.clean_errors;
        self.accepted += t.accepted;
        self.panics += t.panics;
        self.hangs += t.hangs;
        self.deaths += t.deaths;
        self.wrong += t.wrong;
    }

    /// One table row: `label`, then the counts.
    fn row(&self, label: &str) -> String {
        format!(
            "{label:>6}  {:>5}  {:>12}  {:>8}  {:>6}  {:>5}  {:>14}  {:>5}",
            self.cases,
            self.clean_errors,
            self.accepted,
            self.panics,
            self.hangs,
            self.deaths,
            self.wrong
        )
    }
}

const TABLE_HEADER: &str =
    "family  cases  clean-errors  accepted  panics  hangs  deaths/runaway  wrong";

/// Prints `tally` under the table header and fails with every failure's description.
fn report(title: &str, tally: &Tally, failures: &[String]) {
    println!("{title}\n{TABLE_HEADER}\n{}", tally.row("all"));
    assert!(
        failures.is_empty(),
        "{} failing cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every file under `p` with its bytes (a file: itself).
fn snapshot(p: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    if p.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(p)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for e in entries {
            out.extend(snapshot(&e));
        }
    } else if p.exists() {
        out.push((p.into(), std::fs::read(p).unwrap()));
    }
    out
}

/// Runs one case; returns its outcome class and a description when it is not clean.
fn run(c: &Case, dir: &Path) -> (&'static str, String) {
    let before: Vec<_> = c.unchanged.iter().map(|p| snapshot(p)).collect();
    let bin = env!("CARGO_BIN_EXE_berth");
    let mut cmd = match &c.shell {
        Some(prefix) => {
            let mut k = Command::new("sh");
            k.arg("-c")
                .arg(format!("{prefix}; exec \"$0\" \"$@\""))
                .arg(bin);
            k
        }
        None => Command::new(bin),
    };
    cmd.args(&c.args).current_dir(dir);
    let out_path = dir.join(format!("stdout-{}.txt", c.name.replace(['/', ' '], "_")));
    let err_path = dir.join(format!("stderr-{}.txt", c.name.replace(['/', ' '], "_")));
    cmd.stderr(std::fs::File::create(&err_path).unwrap());
    match c.stdout {
        Out::File => {
            cmd.stdout(std::fs::File::create(&out_path).unwrap());
        }
        Out::DevFull => {
            cmd.stdout(
                std::fs::OpenOptions::new()
                    .write(true)
                    .open("/dev/full")
                    .unwrap(),
            );
        }
        Out::Closed => {
            cmd.stdout(Stdio::piped());
        }
    }
    cmd.stdin(match &c.stdin {
        Some(p) => Stdio::from(std::fs::File::open(p).unwrap()),
        None => Stdio::null(),
    });
    let mut child = cmd.spawn().unwrap();
    drop(child.stdout.take()); // Out::Closed: the reader is gone before berth writes
    let pid = child.id() as libc::pid_t;
    let start = Instant::now();
    let (status, rss_kib) = loop {
        let mut status = 0;
        // SAFETY: plain wait4 on our own child with valid out-parameters.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) };
        if r == pid {
            break (status, usage.ru_maxrss as u64);
        }
        if start.elapsed() > c.timeout {
            let _ = child.kill();
            let _ = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
            return ("hang", format!("still running after {:?}", c.timeout));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    std::mem::forget(child); // reaped by wait4 above
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    if stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
        return ("panic", stderr);
    }
    if libc::WIFSIGNALED(status) {
        return (
            "death",
            format!("signal {}: {stderr}", libc::WTERMSIG(status)),
        );
    }
    if let Some(max) = c.max_rss_mib {
        println!(
            "{}: peak RSS {} MiB (bound {max} MiB)",
            c.name,
            rss_kib / 1024
        );
        if rss_kib / 1024 > max {
            return (
                "death",
                format!("peak RSS {} MiB over the {max} MiB bound", rss_kib / 1024),
            );
        }
    }
    let code = libc::WEXITSTATUS(status);
    let after: Vec<_> = c.unchanged.iter().map(|p| snapshot(p)).collect();
    if before != after {
        return ("wrong", "a path that must not change changed".into());
    }
    match &c.want {
        Want::Error(needles) => {
            if code == 0 {
                return ("wrong", format!("succeeded; stderr: {stderr}"));
            }
            let Some(line) = stderr.lines().find(|l| l.starts_with("error: ")) else {
                return ("wrong", format!("no error line: {stderr}"));
            };
            if stderr.lines().filter(|l| l.starts_with("error: ")).count() != 1 {
                return ("wrong", format!("several error lines: {stderr}"));
            }
            for n in needles {
                // "once:TEXT": TEXT occurs exactly once (a message that repeats itself).
                if let Some(once) = n.strip_prefix("once:") {
                    if line.matches(once).count() != 1 {
                        return ("wrong", format!("{once:?} is not in the line once: {line}"));
                    }
                } else if !line.contains(n.as_str()) {
                    return ("wrong", format!("error line lacks {n:?}: {line}"));
                }
            }
            ("clean error", String::new())
        }
        Want::Ok(check) => {
            if code != 0 {
                return ("wrong", format!("failed: {stderr}"));
            }
            match check(&stdout, &stderr) {
                Ok(()) => ("accepted", String::new()),
                Err(e) => ("wrong", e),
            }
        }
    }
}

/// A copy of the model folder `from` changed by `edit`, at `dir/name`.
fn model_copy(dir: &Path, name: &str, from: &str, edit: impl FnOnce(&Path)) -> String {
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    edit(&dst);
    dst.to_string_lossy().into_owned()
}

/// Rewrites a safetensors file: `edit` gets the header JSON and the data bytes.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut Value, &mut Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    edit(&mut header, &mut data);
    let mut h = serde_json::to_vec(&header).unwrap();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// The (name, start offset) of the first F32 tensor of a safetensors header.
fn first_f32(header: &Value) -> (String, usize) {
    let (name, t) = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, t)| *k != "__metadata__" && t["dtype"] == "F32")
        .min_by_key(|(k, _)| k.to_string())
        .unwrap();
    (
        name.clone(),
        t["data_offsets"][0].as_u64().unwrap() as usize,
    )
}

/// A copy of the prepared folder `src` at `dir/name`, its manifest changed by `edit`.
fn prepared_copy(
    dir: &Path,
    name: &str,
    src: &Path,
    edit: impl FnOnce(&Path, &mut Value),
) -> String {
    let dst = dir.join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let mpath = dst.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    edit(&dst, &mut m);
    std::fs::write(&mpath, serde_json::to_string_pretty(&m).unwrap()).unwrap();
    dst.to_string_lossy().into_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

const WORDS: [&str; 12] = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "cat", "mat",
];

fn write_classify(dir: &Path, name: &str, n: usize, label: impl Fn(usize) -> String) -> String {
    let mut text = String::from("sentence\tlabel\n");
    for i in 0..n {
        let words: Vec<&str> = (0..4).map(|j| WORDS[(i * 5 + j * 7) % 12]).collect();
        text.push_str(&format!("{}\t{}\n", words.join(" "), label(i)));
    }
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    s(&p)
}

fn pretrain_args<'a>(
    tokenizer: &'a str,
    data: &'a str,
    out: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "pretrain",
        "--tokenizer",
        tokenizer,
        "--data",
        data,
        "--output",
        out,
    ];
    a.extend_from_slice(extra);
    a
}

fn finetune_args<'a>(train: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let model: &'static str = Box::leak(tiny("bert-base").into_boxed_str());
    let mut a = vec![
        "finetune", "--task", "classify", "--model", model, "--train", train, "--output", out,
    ];
    // Defaults the case's own flags override.
    for (flag, value) in [("--epochs", "1"), ("--batch-size", "8")] {
        if !extra.contains(&flag) {
            a.extend([flag, value]);
        }
    }
    a.extend_from_slice(extra);
    a
}

#[test]
fn the_battery_has_no_panic_hang_death_or_wrong_result() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let base = tiny("bert-base");
    let b = base.as_str();
    let classify_model = task_model("bert-classify");
    let ner_model = task_model("bert-ner");
    let rerank_model = task_model("bert-rerank");
    let qa_model = tiny("bert-qa");
    let mlm_model = tiny("bert-mlm");
    let mut cases: Vec<Case> = Vec::new();

    // Shared inputs.
    let train = write_classify(d, "train.tsv", 24, |i| {
        if i % 2 == 0 { "animal" } else { "other" }.into()
    });
    let corpus = d.join("corpus.txt");
    let mut text = String::new();
    for i in 0..240 {
        let line: Vec<&str> = (0..16).map(|j| WORDS[(i * 3 + j * 5) % 12]).collect();
        text.push_str(&line.join(" "));
        text.push('\n');
        if i % 8 == 7 {
            text.push('\n');
        }
    }
    std::fs::write(&corpus, text).unwrap();
    let corpus = s(&corpus);
    let prepared = d.join("prepared");
    common::prepare(b, Path::new(&corpus), &prepared, "0.2");

    // ---- Family 1: panics ----
    for (i, decoder) in [
        r###"{"type":"WordPiece","prefix":"##" "cleanup":true}"###,
        r#"{"type":"WordPiece","#,
        r#"{"type":"Sequence","decoders":[{"type":}]}"#,
        r#"[1,2"#,
    ]
    .iter()
    .enumerate()
    {
        let m = model_copy(d, &format!("tokdec{i}"), b, |dir| {
            let p = dir.join("tokenizer.json");
            let t = std::fs::read_to_string(&p).unwrap();
            let v: Value = serde_json::from_str(&t).unwrap();
            let compact = serde_json::to_string(&v).unwrap();
            let old = serde_json::to_string(&v["decoder"]).unwrap();
            std::fs::write(&p, compact.replacen(&old, decoder, 1)).unwrap();
        });
        cases.push(case(
            1,
            &format!("tokenizer.json decoder syntax {i}"),
            &["embed", "--model", &m, "hi"],
            err(&["tokenizer.json"]),
        ));
    }
    let p0 = s(&d.join("p-hidden0"));
    cases.push(case(
        1,
        "pretrain --hidden 0",
        &pretrain_args(b, &corpus, &p0, &["--hidden", "0"]),
        err(&["--hidden 0"]),
    ));
    let qrels = d.join("qrels.tsv");
    std::fs::write(&qrels, "query-id\tcorpus-id\tscore\nq1\td1\t1\n").unwrap();
    let runf = d.join("run.tsv");
    std::fs::write(&runf, "q1\td1\t0.9\n").unwrap();
    let (qrels, runf) = (s(&qrels), s(&runf));
    let eval_args = [
        "eval",
        "--task",
        "rerank",
        "--gold",
        &qrels,
        "--predictions",
        &runf,
    ];
    let tok_out = s(&d.join("tok-full"));
    let ft_full = s(&d.join("ft-full"));
    let stdout_cases: Vec<(&str, Vec<&str>)> = vec![
        ("inspect", vec!["inspect", "--model", b]),
        ("eval", eval_args.to_vec()),
        (
            "tokenizer train",
            vec![
                "tokenizer",
                "train",
                "--kind",
                "wordpiece",
                "--vocab-size",
                "60",
                "--output",
                &tok_out,
                &corpus,
            ],
        ),
        ("finetune", finetune_args(&train, &ft_full, &[])),
        ("embed", vec!["embed", "--model", b, "hello", "world"]),
        (
            "classify",
            vec!["classify", "--model", &classify_model, "good", "bad"],
        ),
        (
            "ner",
            vec!["ner", "--model", &ner_model, "Anna lives in Berlin"],
        ),
        (
            "qa",
            vec![
                "qa",
                "--model",
                &qa_model,
                "--question",
                "who",
                "--context",
                "Anna lives in Berlin",
            ],
        ),
        (
            "fill-mask",
            vec!["fill-mask", "--model", &mlm_model, "a [MASK] b"],
        ),
        (
            "rerank",
            vec!["rerank", "--model", &rerank_model, "--query", "q", "a", "b"],
        ),
        ("similarity", vec!["similarity", "--model", b, "a", "b"]),
        ("--help", vec!["--help"]),
    ];
    for (name, args) in &stdout_cases {
        let mut c = case(1, &format!("{name} > /dev/full"), args, err(&["stdout"]));
        c.stdout = Out::DevFull;
        cases.push(c);
    }
    for (name, args) in &stdout_cases {
        // The writing commands get fresh output folders (the /dev/full runs used theirs).
        let args: Vec<String> = args
            .iter()
            .map(|a| match *a {
                x if x == tok_out || x == ft_full => format!("{x}-closed"),
                x => x.to_string(),
            })
            .collect();
        let mut c = case(
            1,
            &format!("{name} | (closed)"),
            &args,
            succeeds_with(|_, e| {
                if e.contains("error") {
                    Err(format!("a closed stdout reported: {e}"))
                } else {
                    Ok(())
                }
            }),
        );
        c.stdout = Out::Closed;
        cases.push(c);
    }

    // ---- Family 2: unbounded memory and time ----
    let long_line = d.join("long-line.txt");
    std::fs::write(
        &long_line,
        "lorem ipsum dolor sit amet ".repeat(20 << 20 >> 5) + "\n",
    )
    .unwrap();
    let long_line = s(&long_line);
    let mut c = case(
        2,
        "20 MB input line",
        &["embed", "--model", b, "--input", &long_line],
        succeeds_with(|out, e| {
            let n = out.lines().count();
            if n != 1 {
                return Err(format!("{n} vectors"));
            }
            if e.matches("truncated").count() != 1 {
                return Err(format!("want one truncation warning: {e}"));
            }
            Ok(())
        }),
    );
    c.max_rss_mib = Some(600);
    cases.push(c);
    let mut c = case(
        2,
        "endless stdin (/dev/zero)",
        &["embed", "--model", b, "--input", "-"],
        err(&["<stdin>:1", "longer than"]),
    );
    c.stdin = Some("/dev/zero".into());
    c.max_rss_mib = Some(600);
    cases.push(c);
    cases.push(case(
        2,
        "--input /dev/zero",
        &["embed", "--model", b, "--input", "/dev/zero"],
        err(&["/dev/zero", "device"]),
    ));
    // A model file that is a FIFO (open would block) or a link to an endless device.
    for (file, fifo, kind) in [
        ("config.json", true, "FIFO"),
        ("config.json", false, "device"),
        ("tokenizer.json", false, "device"),
        ("model.safetensors", true, "FIFO"),
        ("model.safetensors", false, "device"),
    ] {
        let m = model_copy(d, &format!("special-{file}-{fifo}"), b, |dir| {
            let path = dir.join(file);
            std::fs::remove_file(&path).unwrap();
            if fifo {
                assert!(Command::new("mkfifo")
                    .arg(&path)
                    .status()
                    .unwrap()
                    .success());
            } else {
                std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
            }
        });
        cases.push(case(
            2,
            &format!("{file} is a {kind}"),
            &["embed", "--model", &m, "hi"],
            err(&[file, kind]),
        ));
    }
    for (flag, v) in [
        ("--hidden", "1000000000"),
        ("--layers", "1000000"),
        ("--intermediate", "1000000000000"),
        ("--heads", "0"),
        ("--max-length", "0"),
    ] {
        let o = s(&d.join(format!("p{flag}")));
        let mut c = case(
            2,
            &format!("pretrain {flag} {v}"),
            &pretrain_args(b, &corpus, &o, &[flag, v]),
            err(&[flag]),
        );
        c.max_rss_mib = Some(600);
        cases.push(c);
    }
    let o = s(&d.join("p-huge"));
    cases.push(case(
        2,
        "pretrain model larger than memory",
        &pretrain_args(b, &corpus, &o, &["--layers", "1000", "--hidden", "8192"]),
        err(&["parameters", "GiB"]),
    ));
    let tk = s(&d.join("tk-huge"));
    cases.push(case(
        2,
        "tokenizer train --vocab-size 1e9",
        &argv(&format!(
            "tokenizer train --kind wordpiece --vocab-size 1000000000 --output {} {}",
            tk, corpus
        )),
        err(&["--vocab-size"]),
    ));
    let word = d.join("one-word.txt");
    std::fs::write(&word, "a".repeat(5 << 20) + "\nthe quick brown fox\n").unwrap();
    for kind in ["wordpiece", "bpe", "unigram"] {
        let tk = s(&d.join(format!("tk-word-{kind}")));
        let mut c = case(
            2,
            &format!("tokenizer train {kind} on a 5 MB word"),
            &argv(&format!(
                "tokenizer train --kind {} --vocab-size 40 --output {} {}",
                kind,
                tk,
                s(&word)
            )),
            succeeds(),
        );
        c.timeout = Duration::from_secs(30);
        cases.push(c);
    }
    let dp = s(&d.join("dp-mix"));
    let mix = format!("{corpus}=1e12");
    cases.push(case(
        2,
        "data prepare --mix F=1e12",
        &argv(&format!(
            "data prepare --tokenizer {} --output {} {} --mix {}",
            b, dp, corpus, mix
        )),
        err(&["weight", "1000"]),
    ));
    let dp = s(&d.join("dp-shard0"));
    cases.push(case(
        2,
        "data prepare --shard-tokens 0",
        &argv(&format!(
            "data prepare --tokenizer {} --output {} {} --shard-tokens 0",
            b, dp, corpus
        )),
        err(&["--shard-tokens 0"]),
    ));
    cases.push(case(
        2,
        "--threads 100000",
        &["--threads", "100000", "embed", "--model", b, "hi"],
        err(&["--threads 100000"]),
    ));
    cases.push(case(
        2,
        "--threads 0",
        &["--threads", "0", "embed", "--model", b, "hi"],
        err(&["--threads 0"]),
    ));
    let many = d.join("many.txt");
    std::fs::write(&many, "hello world\n".repeat(2000)).unwrap();
    let xfsz = s(&d.join("xfsz.jsonl"));
    let mut c = case(
        2,
        "file-size limit (SIGXFSZ)",
        &[
            "embed",
            "--model",
            b,
            "--input",
            &s(&many),
            "--output",
            &xfsz,
        ],
        err(&["xfsz.jsonl"]),
    );
    c.shell = Some("ulimit -f 8".into());
    cases.push(c);

    // ---- Family 3: silent NaN / Inf ----
    let nan_model = model_copy(d, "nan-weights", b, |dir| {
        edit_safetensors(&dir.join("model.safetensors"), |h, data| {
            let (_, off) = first_f32(h);
            data[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        })
    });
    let mut name = String::new();
    edit_safetensors(
        Path::new(&format!("{nan_model}/model.safetensors")),
        |h, _| name = first_f32(h).0,
    );
    cases.push(case(
        3,
        "NaN weight",
        &["embed", "--model", &nan_model, "hi"],
        err(&["model.safetensors", &name, "NaN"]),
    ));
    let inf_model = model_copy(d, "inf-weights", b, |dir| {
        edit_safetensors(&dir.join("model.safetensors"), |h, data| {
            let (_, off) = first_f32(h);
            data[off + 4..off + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
        })
    });
    cases.push(case(
        3,
        "Inf weight",
        &["embed", "--model", &inf_model, "hi"],
        err(&["model.safetensors", "inf"]),
    ));
    for (flag, v) in [
        ("--lr", "nan"),
        ("--lr=-1", ""),
        ("--lr", "1e6"),
        ("--weight-decay", "nan"),
        ("--max-grad-norm", "nan"),
        ("--max-grad-norm=-1", ""),
        ("--warmup", "nan"),
        ("--warmup=-2", ""),
        ("--warmup", "inf"),
        ("--dev-fraction", "nan"),
        ("--dev-fraction", "1"),
        ("--dev-fraction", "0"),
        ("--log-every", "0"),
        ("--batch-size", "0"),
    ] {
        let o = d.join(format!("ft{flag}{v}"));
        let os = s(&o);
        let mut extra = vec![flag];
        if !v.is_empty() {
            extra.push(v);
        }
        let shown = flag.split('=').next().unwrap();
        let mut c = case(
            3,
            &format!("finetune {flag} {v}"),
            &finetune_args(&train, &os, &extra),
            err(&[shown]),
        );
        c.unchanged = vec![o];
        cases.push(c);
    }
    for (i, label) in ["nan", "inf", "-inf", "1e39", "NaN", ""].iter().enumerate() {
        let f = write_classify(d, &format!("reg{i}.tsv"), 12, |k| {
            if k == 5 {
                label.to_string()
            } else {
                format!("{}", k as f32 / 10.0)
            }
        });
        let o = s(&d.join(format!("reg-run{i}")));
        cases.push(case(
            3,
            &format!("regression label {label:?}"),
            &finetune_args(&f, &o, &["--regression"]),
            err(&[&format!("reg{i}.tsv:7")]),
        ));
    }
    // Divergence: labels of 1e30 square past f32's range at the first step.
    let big = write_classify(d, "diverge.tsv", 16, |_| "1e30".into());
    let div = d.join("diverge-run");
    let divs = s(&div);
    cases.push(case(
        3,
        "a diverging run stops",
        &finetune_args(&big, &divs, &["--regression", "--max-grad-norm", "0"]),
        err(&["diverged", "step 1"]),
    ));

    // ---- Family 4: lost or mixed data ----
    let old = d.join("kept.jsonl");
    std::fs::write(&old, "old results\n").unwrap();
    let mut c = case(
        4,
        "failed embed keeps the old --output",
        &[
            "embed",
            "--model",
            b,
            "--no-truncate",
            "--output",
            &s(&old),
            "ok",
            &"word ".repeat(600),
        ],
        err(&["input 1", "tokens"]),
    );
    c.unchanged = vec![old.clone()];
    cases.push(c);

    let tok_into_model = model_copy(d, "tok-into-model", b, |_| {});
    let mut c = case(
        4,
        "tokenizer train into a model folder",
        &argv(&format!(
            "tokenizer train --kind wordpiece --vocab-size 60 --output {tok_into_model} {corpus}"
        )),
        err(&["--output", "already holds a tokenizer"]),
    );
    c.unchanged = vec![PathBuf::from(&tok_into_model)];
    cases.push(c);
    let no_dir = s(&d.join("no-such-folder/out.jsonl"));
    cases.push(case(
        4,
        "embed --output in a missing folder fails before work",
        &["embed", "--model", b, "--output", &no_dir, "hi"],
        err(&["no-such-folder/out.jsonl", "cannot create"]),
    ));

    // ---- Family 5: silent wrong outputs, lenient loading ----
    let one_row = write_classify(d, "one-row.tsv", 1, |_| "a".into());
    let o = s(&d.join("one-row-run"));
    cases.push(case(
        5,
        "one training row and no --dev",
        &finetune_args(&one_row, &o, &[]),
        err(&["one-row.tsv", "too few to hold out a dev split"]),
    ));
    let two_rows = write_classify(d, "two-rows.tsv", 2, |i| ["a", "b"][i].into());
    let o = s(&d.join("two-rows-run"));
    cases.push(case(
        5,
        "a label only in the held-out rows",
        &finetune_args(&two_rows, &o, &[]),
        err(&["two-rows.tsv", "only in the rows held out for dev"]),
    ));
    let one_seq = d.join("one-sequence.txt");
    std::fs::write(&one_seq, "hello world this is one short document\n").unwrap();
    let o = s(&d.join("one-seq-run"));
    cases.push(case(
        5,
        "pretrain on one sequence",
        &pretrain_args(b, &s(&one_seq), &o, &["--max-steps", "1"]),
        err(&["one-sequence.txt", "too few to hold out a dev split"]),
    ));
    let tiny_dev = d.join("tiny-dev.txt");
    std::fs::write(&tiny_dev, "hello world\n\nthe cat\n").unwrap();
    let o = s(&d.join("tiny-dev-run"));
    cases.push(case(
        5,
        "a held-out split without a masked token",
        &pretrain_args(b, &s(&tiny_dev), &o, &["--max-steps", "1"]),
        err(&["tiny-dev.txt", "no masked token"]),
    ));
    let o = s(&d.join("dev-and-fraction"));
    cases.push(case(
        5,
        "finetune --dev with --dev-fraction",
        &finetune_args(&train, &o, &["--dev", &train, "--dev-fraction", "0.5"]),
        err(&["--dev-fraction", "--dev"]),
    ));
    let o = s(&d.join("val-fraction-prepared"));
    cases.push(case(
        5,
        "pretrain --val-fraction on a prepared folder",
        &pretrain_args(b, &s(&prepared), &o, &["--val-fraction", "0.5"]),
        err(&["--val-fraction", "prepared folder"]),
    ));
    let embed_train = d.join("pairs.tsv");
    let mut t = String::from("anchor\tpositive\n");
    for i in 0..12 {
        t.push_str(&format!(
            "{} {i}\t{} {i}\n",
            WORDS[i % 12],
            WORDS[(i + 3) % 12]
        ));
    }
    std::fs::write(&embed_train, t).unwrap();
    let embed_train = s(&embed_train);
    let squad = d.join("squad.json");
    std::fs::write(
        &squad,
        serde_json::json!({"data": [{"paragraphs": [{"context": "Anna lives in Berlin.",
            "qas": [{"id": "1", "question": "Where?",
                     "answers": [{"text": "Berlin", "answer_start": 14}]}]}]}]})
        .to_string(),
    )
    .unwrap();
    let squad = s(&squad);
    for (name, task, data, flags, needle) in [
        (
            "--label-separator ''",
            "classify",
            &train,
            vec!["--multi-label", "--label-separator", ""],
            "--label-separator",
        ),
        (
            "--similarity-scale 0",
            "embed",
            &embed_train,
            vec!["--similarity-scale", "0"],
            "--similarity-scale",
        ),
        (
            "--similarity-scale nan",
            "embed",
            &embed_train,
            vec!["--similarity-scale", "nan"],
            "--similarity-scale",
        ),
        (
            "--max-answer-len 0",
            "qa",
            &squad,
            vec!["--max-answer-len", "0"],
            "--max-answer-len",
        ),
        (
            "--early-stopping 0",
            "classify",
            &train,
            vec!["--early-stopping", "0"],
            "--early-stopping",
        ),
        (
            "--pair-column = --text-column",
            "classify",
            &train,
            vec!["--text-column", "sentence", "--pair-column", "sentence"],
            "--pair-column",
        ),
    ] {
        let o = d.join(format!("flag-{}", name.replace([' ', '\'', '='], "_")));
        let os = s(&o);
        let mut args = finetune_args(data, &os, &flags);
        args[2] = task;
        let mut c = case(5, &format!("finetune {name}"), &args, err(&[needle]));
        c.unchanged = vec![o];
        cases.push(c);
    }
    for (flag, v) in [("--rtd-weight", "nan"), ("--generator-layers", "0")] {
        let o = s(&d.join(format!("rtd{flag}")));
        cases.push(case(
            5,
            &format!("pretrain --objective rtd {flag} {v}"),
            &pretrain_args(b, &corpus, &o, &["--objective", "rtd", flag, v]),
            err(&[flag]),
        ));
    }
    let pad = model_copy(d, "pad-outside", b, |dir| {
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["pad_token_id"] = 99999.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    cases.push(case(
        5,
        "pad_token_id outside the vocabulary",
        &["embed", "--model", &pad, "hi"],
        err(&["config.json", "pad_token_id 99999"]),
    ));
    let no_types = model_copy(d, "no-token-types", b, |dir| {
        let p = dir.join("config.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["type_vocab_size"] = 0.into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    cases.push(case(
        5,
        "type_vocab_size 0 with trained token types",
        &["embed", "--model", &no_types, "hi"],
        err(&["model.safetensors", "token_type_embeddings"]),
    ));
    let special = model_copy(d, "special-outside", b, |dir| {
        let p = dir.join("tokenizer.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["post_processor"]["special_tokens"]["[CLS]"]["ids"] = serde_json::json!([7000]);
        std::fs::write(&p, v.to_string()).unwrap();
    });
    cases.push(case(
        5,
        "a template special token outside the vocabulary",
        &["embed", "--model", &special, "hi"],
        err(&["tokenizer.json", "special token id 7000"]),
    ));
    let tabs = d.join("three-fields.txt");
    std::fs::write(&tabs, "a\tb\n\none\ttwo\tthree\n".replace("\n\n", "\n")).unwrap();
    cases.push(case(
        5,
        "--pair line with two tabs",
        &[
            "classify",
            "--model",
            &classify_model,
            "--pair",
            "--input",
            &s(&tabs),
        ],
        err(&["three-fields.txt:2", "one tab"]),
    ));
    let bom_txt = d.join("bom.txt");
    std::fs::write(&bom_txt, "\u{feff}hello world\n").unwrap();
    let plain = common::ok(&common::berth(&["embed", "--model", b, "hello world"]));
    cases.push(case(
        5,
        "byte-order mark before a plain-text input",
        &["embed", "--model", b, "--input", &s(&bom_txt)],
        succeeds_with(move |out, _| {
            if out == plain {
                Ok(())
            } else {
                Err("the mark changed the vector".into())
            }
        }),
    ));
    for m in ["0", "1", "2"] {
        cases.push(case(
            5,
            &format!("embed --max-length {m}"),
            &["embed", "--model", b, "--max-length", m, "hello"],
            err(&["--max-length", m]),
        ));
    }
    let o = s(&d.join("ft-maxlen1"));
    cases.push(case(
        5,
        "finetune --max-length 1",
        &finetune_args(&train, &o, &["--max-length", "1"]),
        err(&["--max-length 1"]),
    ));
    for (i, (what, edit)) in [
        (
            "shard path ../",
            Box::new(|_: &Path, m: &mut Value| m["train"][0]["file"] = "../train-00000.bin".into())
                as Box<dyn Fn(&Path, &mut Value)>,
        ),
        (
            "absolute shard path",
            Box::new(|_: &Path, m: &mut Value| m["train"][0]["file"] = "/etc/passwd".into()),
        ),
        (
            "shard listed twice",
            Box::new(|_: &Path, m: &mut Value| {
                let first = m["train"][0].clone();
                m["train"].as_array_mut().unwrap().push(first);
            }),
        ),
        (
            "wrong crc32",
            Box::new(|_: &Path, m: &mut Value| m["train"][0]["crc32"] = 12345.into()),
        ),
        (
            "wrong token count",
            Box::new(|_: &Path, m: &mut Value| m["train"][0]["tokens"] = 17.into()),
        ),
        (
            "sequences past max_length",
            Box::new(|_: &Path, m: &mut Value| m["max_length"] = 8.into()),
        ),
        (
            "token id past the vocabulary",
            Box::new(|dir: &Path, m: &mut Value| {
                let p = dir.join("train-00000.bin");
                let mut bytes = std::fs::read(&p).unwrap();
                let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
                let at = 40 + 8 * (n + 1);
                let t = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
                bytes[at..at + 4].copy_from_slice(&((t & !((1 << 30) - 1)) | 5000).to_le_bytes());
                let crc = crc32fast::hash(&bytes[40..]);
                bytes[32..36].copy_from_slice(&crc.to_le_bytes());
                std::fs::write(&p, bytes).unwrap();
                m["train"][0]["crc32"] = crc.into();
            }),
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let data = prepared_copy(d, &format!("prep{i}"), &prepared, edit);
        let o = s(&d.join(format!("prep-run{i}")));
        let needle = match what {
            "shard path ../" | "absolute shard path" => "outside the data folder",
            "shard listed twice" => "listed twice",
            "wrong crc32" => "checksum",
            "wrong token count" => "tokens",
            "sequences past max_length" => "max_length",
            _ => "outside the vocabulary",
        };
        cases.push(case(
            5,
            &format!("manifest: {what}"),
            &pretrain_args(b, &data, &o, &["--max-length", "32", "--max-steps", "1"]),
            err(&[needle]),
        ));
    }
    let noval = d.join("prepared-noval");
    common::prepare(b, Path::new(&corpus), &noval, "0");
    let o = s(&d.join("noval-run"));
    cases.push(case(
        5,
        "empty held-out split",
        &pretrain_args(
            b,
            &s(&noval),
            &o,
            &["--max-length", "32", "--max-steps", "1"],
        ),
        err(&["held-out split has no sequences"]),
    ));
    let escape = model_copy(d, "index-escape", &tiny("bert-base-sharded"), |dir| {
        let p = dir.join("model.safetensors.index.json");
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        let key = v["weight_map"]
            .as_object()
            .unwrap()
            .keys()
            .next()
            .unwrap()
            .clone();
        v["weight_map"][key] = "../../etc/passwd".into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    cases.push(case(
        5,
        "index.json names a file outside the folder",
        &["embed", "--model", &escape, "hi"],
        err(&["index.json", "outside the model folder"]),
    ));
    let i32m = model_copy(d, "i32-weights", b, |dir| {
        edit_safetensors(&dir.join("model.safetensors"), |h, _| {
            let (name, _) = first_f32(h);
            h[&name]["dtype"] = "I32".into();
        })
    });
    cases.push(case(
        5,
        "F32 bytes declared I32",
        &["embed", "--model", &i32m, "hi"],
        err(&["model.safetensors", "I32", "floating point"]),
    ));
    let empty_label = write_classify(d, "empty-label.tsv", 12, |k| {
        if k == 3 {
            String::new()
        } else {
            "a".into()
        }
    });
    let o = s(&d.join("empty-label-run"));
    cases.push(case(
        5,
        "empty label cell",
        &finetune_args(&empty_label, &o, &[]),
        err(&["empty-label.tsv:5", "empty"]),
    ));
    let bom = d.join("bom.tsv");
    std::fs::write(
        &bom,
        format!("\u{feff}{}", std::fs::read_to_string(&train).unwrap()),
    )
    .unwrap();
    let o = s(&d.join("bom-run"));
    cases.push(case(
        5,
        "byte-order mark before the header",
        &finetune_args(&s(&bom), &o, &[]),
        succeeds(),
    ));
    let dz = s(&d.join("dp-zero"));
    cases.push(case(
        5,
        "data prepare --shard-tokens 1",
        &argv(&format!(
            "data prepare --tokenizer {} --output {} {} --shard-tokens 1",
            b, dz, corpus
        )),
        err(&["--shard-tokens 1"]),
    ));

    // ---- Family 6: messages ----
    let missing = s(&d.join("missing.tsv"));
    let o = s(&d.join("missing-run"));
    cases.push(case(
        6,
        "missing --train names it once",
        &finetune_args(&missing, &o, &[]),
        succeeds_with(|_, _| Ok(())),
    ));
    cases.last_mut().unwrap().want = err(&["missing.tsv: No such file"]);
    let o = s(&d.join("p-missing"));
    cases.push(case(
        6,
        "pretrain errors say pretrain",
        &pretrain_args(b, &missing, &o, &[]),
        err(&["pretrain:", "missing.tsv"]),
    ));
    let dir_weights = model_copy(d, "dir-weights", b, |dir| {
        std::fs::remove_file(dir.join("model.safetensors")).unwrap();
        std::fs::create_dir(dir.join("model.safetensors")).unwrap();
    });
    cases.push(case(
        6,
        "a directory named model.safetensors",
        &["embed", "--model", &dir_weights, "hi"],
        err(&["model.safetensors", "directory"]),
    ));
    let nomani = d.join("no-manifest");
    std::fs::create_dir_all(&nomani).unwrap();
    let o = s(&d.join("nomani-run"));
    cases.push(case(
        6,
        "a folder without manifest or text",
        &pretrain_args(b, &s(&nomani), &o, &[]),
        err(&["no-manifest", "manifest.json"]),
    ));
    let three_long = d.join("three-long.txt");
    std::fs::write(
        &three_long,
        format!("{0}\nshort\n{0}\n{0}\n", "word ".repeat(300)),
    )
    .unwrap();
    cases.push(case(
        6,
        "one truncation warning for many inputs",
        &["embed", "--model", b, "--input", &s(&three_long)],
        succeeds_with(|out, e| {
            let warnings: Vec<&str> = e.lines().filter(|l| l.contains("truncated")).collect();
            if out.lines().count() != 4 {
                return Err("want 4 vectors".into());
            }
            if warnings.len() != 1 || !warnings[0].contains("3 inputs") {
                return Err(format!("want one summary of 3 inputs: {e}"));
            }
            Ok(())
        }),
    ));
    let blank = d.join("blank.txt");
    std::fs::write(&blank, "ok\n\n").unwrap();
    cases.push(case(
        6,
        "classify empty input names the file",
        &[
            "classify",
            "--model",
            &classify_model,
            "--input",
            &s(&blank),
        ],
        err(&["blank.txt:2", "empty line"]),
    ));
    cases.push(case(
        6,
        "ner empty input names the file",
        &["ner", "--model", &ner_model, "--input", &s(&blank)],
        err(&["blank.txt:2", "empty line"]),
    ));
    let o = s(&d.join("teacher-no-head"));
    cases.push(case(
        6,
        "a teacher without the head says so once",
        &finetune_args(&train, &o, &["--teacher", b]),
        err(&["once:sequence-classification head", &format!("once:{b}")]),
    ));
    let jsonl = d.join("wrong-fields.jsonl");
    std::fs::write(&jsonl, "{\"text\": \"a\", \"y\": \"b\"}\n").unwrap();
    let o = s(&d.join("wrong-fields-run"));
    cases.push(case(
        6,
        "missing JSON Lines fields named plainly",
        &finetune_args(&s(&jsonl), &o, &[]),
        err(&[
            "wrong-fields.jsonl:1",
            "needs string fields \"sentence\", \"label\"",
        ]),
    ));
    let latin1 = d.join("latin1.txt");
    std::fs::write(&latin1, b"ok\ncaf\xe9\n").unwrap();
    cases.push(case(
        6,
        "invalid UTF-8 names file and line",
        &["embed", "--model", b, "--input", &s(&latin1)],
        err(&["latin1.txt:2", "UTF-8"]),
    ));

    // Run them all.
    let mut tallies: BTreeMap<u8, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for c in &cases {
        let (class, detail) = run(c, d);
        tallies.entry(c.family).or_default().count(class);
        if !detail.is_empty() {
            failures.push(format!(
                "[family {}] {}: {class}: {detail}",
                c.family, c.name
            ));
        }
    }
    let mut total = Tally::default();
    for (f, t) in &tallies {
        if *f == 1 {
            println!("{TABLE_HEADER}");
        }
        println!("{}", t.row(&f.to_string()));
        total.add(t);
    }
    report("the battery, all families", &total, &failures);
    // The diverged run wrote no checkpoint.
    assert!(
        !div.join("checkpoints").exists()
            || std::fs::read_dir(div.join("checkpoints"))
                .unwrap()
                .next()
                .is_none()
    );
}

/// Family 4 and 5 cases that need a run in progress or a run to resume: a second run into a
/// running run's --output is refused (and changes nothing); a resume that changes what the
/// data position depends on is refused, one that changes the learning rate warns; a
/// checkpoint past the schedule is refused.
#[test]
fn runs_never_mix_and_resumes_check_their_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let train = write_classify(d, "train.tsv", 64, |i| {
        if i % 3 == 0 { "a" } else { "b" }.into()
    });
    let run = d.join("run");
    let runs = s(&run);
    // A long run holds the folder...
    let mut first = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(
            &train,
            &runs,
            &["--max-steps", "1000000", "--batch-size", "2"],
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let lock = run.join(".berth.lock");
    let start = Instant::now();
    while !(lock.is_file() && run.join("metrics.jsonl").is_file()) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the first run did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // ...so a second one, even with --overwrite or --resume, is refused and changes nothing.
    for extra in [&[][..], &["--overwrite"][..], &["--resume"][..]] {
        let config = std::fs::read(run.join("config.json")).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(finetune_args(&train, &runs, extra))
            .output()
            .unwrap();
        common::fails_with(
            &out,
            &["run", "another berth run (pid", &first.id().to_string()],
        );
        assert_eq!(std::fs::read(run.join("config.json")).unwrap(), config);
    }
    first.kill().unwrap();
    first.wait().unwrap();

    // Resume checks. A short run with checkpoints at steps 2 and 4:
    let run2 = s(&d.join("run2"));
    let base = ["--max-steps", "4", "--save-every", "2", "--batch-size", "4"];
    common::ok(
        &Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(finetune_args(&train, &run2, &base))
            .output()
            .unwrap(),
    );
    // The batch size moves the data position: refused, naming the setting.
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(
            &train,
            &run2,
            &[
                "--max-steps",
                "4",
                "--save-every",
                "2",
                "--batch-size",
                "8",
                "--resume",
            ],
        ))
        .output()
        .unwrap();
    common::fails_with(&out, &["loop.batch_size: 4 -> 8", "--overwrite"]);
    // So does the data file.
    let other = write_classify(d, "other.tsv", 64, |i| {
        if i % 2 == 0 { "a" } else { "b" }.into()
    });
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(
            &other,
            &run2,
            &[&base[..], &["--resume"]].concat(),
        ))
        .output()
        .unwrap();
    common::fails_with(&out, &["task.data.train"]);
    // A checkpoint at step 4 is past a 2-step schedule.
    let mut a = vec![
        "--max-steps",
        "2",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--resume",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(&train, &run2, &a))
        .output()
        .unwrap();
    common::fails_with(&out, &["step 4", "past this run's 2 steps"]);
    // metrics.jsonl of the run being resumed: a torn last line (killed while writing) is cut
    // off with a warning; a line of garbage is refused before any training.
    let copy_run = |name: &str| {
        let dst = d.join(name);
        let cp = Command::new("cp")
            .arg("-r")
            .arg(&run2)
            .arg(&dst)
            .status()
            .unwrap();
        assert!(cp.success());
        dst
    };
    let resume6 = [
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--resume",
    ];
    let torn = copy_run("run2-torn");
    let metrics = torn.join("metrics.jsonl");
    let whole = std::fs::read(&metrics).unwrap();
    let mut bytes = whole.clone();
    bytes.extend_from_slice(b"{\"step\": 5, \"lo");
    std::fs::write(&metrics, bytes).unwrap();
    let dir = s(&torn);
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(&train, &dir, &resume6))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("dropped an unfinished last line"), "{err}");
    let after = std::fs::read(&metrics).unwrap();
    assert!(after.starts_with(&whole) && after.len() > whole.len());
    for line in String::from_utf8(after).unwrap().lines() {
        serde_json::from_str::<Value>(line).expect("every metrics line is JSON");
    }
    let garbage = copy_run("run2-garbage");
    let metrics = garbage.join("metrics.jsonl");
    let mut bytes = std::fs::read(&metrics).unwrap();
    bytes.extend_from_slice(b"garbage{\n");
    std::fs::write(&metrics, &bytes).unwrap();
    let dir = s(&garbage);
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(&train, &dir, &resume6))
        .output()
        .unwrap();
    common::fails_with(&out, &["metrics.jsonl", "is not JSON"]);
    assert!(!garbage.join("checkpoints/step-6").exists());
    // A run that never saved a checkpoint has nothing to resume: refused, not restarted
    // into the old run's metrics.
    let unsaved = copy_run("run2-unsaved");
    std::fs::remove_dir_all(unsaved.join("checkpoints")).unwrap();
    let before = std::fs::read(unsaved.join("metrics.jsonl")).unwrap();
    let dir = s(&unsaved);
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(&train, &dir, &resume6))
        .output()
        .unwrap();
    common::fails_with(&out, &["--resume", "without a checkpoint", "--overwrite"]);
    assert_eq!(
        std::fs::read(unsaved.join("metrics.jsonl")).unwrap(),
        before
    );
    // A changed learning rate continues, with a warning naming it.
    a = vec![
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--resume",
        "--lr",
        "1e-4",
    ];
    let out = Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(finetune_args(&train, &run2, &a))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: resumed with a changed setting: loop.lr"),
        "{err}"
    );
    // A resumed run names its best checkpoint, not one rotated away: with --lr 0 the dev
    // score never improves after step 1, so step 1 stays best while step 2 (the newest when
    // the run resumes) is rotated away by step 3.
    let run3 = s(&d.join("run3"));
    let steps = |n: &'static str, resume: bool| {
        let mut a = vec![
            "--lr",
            "0",
            "--max-steps",
            n,
            "--save-every",
            "1",
            "--keep-checkpoints",
            "1",
        ];
        if resume {
            a.push("--resume");
        }
        let out = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(finetune_args(&train, &run3, &a))
            .output()
            .unwrap();
        common::ok(&out).trim().to_string()
    };
    assert!(steps("2", false).ends_with("step-1"));
    let best = steps("4", true);
    assert!(
        best.ends_with("step-1") && Path::new(&best).is_dir(),
        "{best}"
    );
    assert!(!d.join("run3/checkpoints/step-2").exists());
    assert!(
        !d.join("run2").join(".berth.lock").exists(),
        "the lock is removed at the end"
    );
}

/// Family 4: two runs writing one `--output` file at the same time leave one whole output
/// (each writes its own temporary file; the last rename wins), never lines of both.
#[test]
fn two_embeds_into_one_output_file_never_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let b = tiny("bert-base");
    let inputs: Vec<String> = (0..2)
        .map(|k| {
            let p = d.join(format!("in{k}.txt"));
            let lines: Vec<String> = (0..1500)
                .map(|i| format!("{} {} {i}", WORDS[(i + k) % 12], WORDS[(i * 7 + k) % 12]))
                .collect();
            std::fs::write(&p, lines.join("\n") + "\n").unwrap();
            s(&p)
        })
        .collect();
    let shared = s(&d.join("shared.jsonl"));
    let children: Vec<_> = inputs
        .iter()
        .map(|input| {
            Command::new(env!("CARGO_BIN_EXE_berth"))
                .args([
                    "embed", "--model", &b, "--input", input, "--output", &shared,
                ])
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let got = std::fs::read(&shared).unwrap();
    let alone: Vec<Vec<u8>> = inputs
        .iter()
        .map(|input| {
            common::ok(&common::berth(&["embed", "--model", &b, "--input", input])).into_bytes()
        })
        .collect();
    assert!(
        got == alone[0] || got == alone[1],
        "the shared output is neither run's whole output ({} bytes)",
        got.len()
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("partial"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// One way to break a model folder: what is done to the copy, and what the error line must
/// name (the file, and a word of the problem).
type Break = (&'static str, fn(&Path), [&'static str; 2]);

fn set_config(dir: &Path, key: &str, v: Value) {
    let p = dir.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = v;
    std::fs::write(&p, c.to_string()).unwrap();
}

fn truncate_half(p: &Path) {
    let bytes = std::fs::read(p).unwrap();
    std::fs::write(p, &bytes[..bytes.len() / 2]).unwrap();
}

/// Model-folder faults, each generated from a valid fixture.
const BREAKS: [Break; 24] = [
    (
        "config.json missing",
        |d| std::fs::remove_file(d.join("config.json")).unwrap(),
        ["config.json", ""],
    ),
    (
        "config.json empty",
        |d| std::fs::write(d.join("config.json"), "").unwrap(),
        ["config.json", ""],
    ),
    (
        "config.json not JSON",
        |d| std::fs::write(d.join("config.json"), "{\"model_type\": bert").unwrap(),
        ["config.json", ""],
    ),
    (
        "config.json an array",
        |d| std::fs::write(d.join("config.json"), "[1, 2]").unwrap(),
        ["config.json", ""],
    ),
    (
        "model_type unknown",
        |d| set_config(d, "model_type", "gpt9".into()),
        ["config.json", "gpt9"],
    ),
    (
        "hidden_size 0",
        |d| set_config(d, "hidden_size", 0.into()),
        ["config.json", "hidden"],
    ),
    (
        "vocab_size 1e9",
        |d| set_config(d, "vocab_size", 1_000_000_000u64.into()),
        ["config.json", "vocab_size"],
    ),
    (
        "heads do not divide hidden",
        |d| set_config(d, "num_attention_heads", 5.into()),
        ["config.json", "heads"],
    ),
    (
        "layer_norm_eps negative",
        |d| set_config(d, "layer_norm_eps", (-1.0).into()),
        ["config.json", "layer_norm_eps"],
    ),
    (
        "hidden_act unknown",
        |d| set_config(d, "hidden_act", "swishy".into()),
        ["config.json", "swishy"],
    ),
    (
        "layers past the weights",
        |d| set_config(d, "num_hidden_layers", 9.into()),
        ["model.safetensors", "missing"],
    ),
    (
        "vocab_size disagrees with the weights",
        |d| set_config(d, "vocab_size", 100.into()),
        ["model.safetensors", "shape"],
    ),
    (
        "tokenizer files missing",
        |d| {
            for f in ["tokenizer.json", "vocab.txt"] {
                std::fs::remove_file(d.join(f)).unwrap();
            }
        },
        ["tokenizer", ""],
    ),
    (
        "tokenizer.json truncated",
        |d| truncate_half(&d.join("tokenizer.json")),
        ["tokenizer.json", ""],
    ),
    (
        "tokenizer.json model not an object",
        |d| {
            let p = d.join("tokenizer.json");
            let mut t: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            t["model"] = "WordPiece".into();
            std::fs::write(&p, t.to_string()).unwrap();
        },
        ["tokenizer.json", ""],
    ),
    (
        "model.safetensors missing",
        |d| std::fs::remove_file(d.join("model.safetensors")).unwrap(),
        ["model.safetensors", ""],
    ),
    (
        "model.safetensors empty",
        |d| std::fs::write(d.join("model.safetensors"), "").unwrap(),
        ["model.safetensors", ""],
    ),
    (
        "model.safetensors truncated",
        |d| truncate_half(&d.join("model.safetensors")),
        ["model.safetensors", ""],
    ),
    (
        "safetensors header length past the file",
        |d| {
            let p = d.join("model.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
            std::fs::write(&p, bytes).unwrap();
        },
        ["model.safetensors", ""],
    ),
    (
        "safetensors header not JSON",
        |d| {
            let p = d.join("model.safetensors");
            let mut bytes = std::fs::read(&p).unwrap();
            bytes[8] = b'#';
            std::fs::write(&p, bytes).unwrap();
        },
        ["model.safetensors", ""],
    ),
    (
        "a NaN weight",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, data| {
                let (_, off) = first_f32(h);
                data[off..off + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            })
        },
        ["model.safetensors", "NaN"],
    ),
    (
        "a tensor's offsets past the data",
        |d| {
            edit_safetensors(&d.join("model.safetensors"), |h, _| {
                let (name, _) = first_f32(h);
                h[&name]["data_offsets"][1] = (1u64 << 40).into();
            })
        },
        ["model.safetensors", ""],
    ),
    (
        "config.json a FIFO",
        |d| {
            std::fs::remove_file(d.join("config.json")).unwrap();
            assert!(Command::new("mkfifo")
                .arg(d.join("config.json"))
                .status()
                .unwrap()
                .success());
        },
        ["config.json", "FIFO"],
    ),
    (
        "model.safetensors a link to /dev/zero",
        |d| {
            std::fs::remove_file(d.join("model.safetensors")).unwrap();
            std::os::unix::fs::symlink("/dev/zero", d.join("model.safetensors")).unwrap();
        },
        ["model.safetensors", "device"],
    ),
];

/// Every command that loads a model, on every broken folder of [`BREAKS`]: one clean error
/// line naming the file and the problem (the guards live in the shared loaders, and this
/// shows no command goes around them). Prints the tally.
#[test]
fn every_command_refuses_every_broken_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let train = write_classify(d, "train.tsv", 16, |i| ["a", "b"][i % 2].into());
    // (command, fixture, arguments after --model DIR / the model path)
    let commands: Vec<(&str, String, Vec<String>)> = vec![
        ("embed", tiny("bert-base"), argv("hello world")),
        ("similarity", tiny("bert-base"), argv("a b")),
        ("classify", task_model("bert-classify"), argv("good")),
        ("ner", task_model("bert-ner"), argv("Anna in Berlin")),
        ("qa", tiny("bert-qa"), argv("--question who --context Anna")),
        ("fill-mask", tiny("bert-mlm"), vec!["a [MASK] b".into()]),
        ("rerank", task_model("bert-rerank"), argv("--query q a b")),
        ("inspect", tiny("bert-base"), vec![]),
        ("quantize", tiny("bert-base"), vec![]),
        ("finetune", tiny("bert-base"), vec![]),
    ];
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for (i, (what, breaks, needles)) in BREAKS.iter().enumerate() {
        for (command, fixture, rest) in &commands {
            let name = format!("b{i}-{command}");
            let dir = model_copy(d, &name, fixture, |dir| {
                let _ = std::fs::remove_file(dir.join("reference.safetensors"));
                breaks(dir)
            });
            let args: Vec<String> = match *command {
                "quantize" => vec![
                    "quantize".into(),
                    "--dtype".into(),
                    "int8".into(),
                    dir.clone(),
                    s(&d.join(format!("{name}-q"))),
                ],
                "finetune" => finetune_args(&train, &s(&d.join(format!("{name}-ft"))), &[])
                    .iter()
                    .map(|a| {
                        if *a == tiny("bert-base") {
                            dir.clone()
                        } else {
                            a.to_string()
                        }
                    })
                    .collect(),
                _ => [
                    vec![command.to_string(), "--model".into(), dir.clone()],
                    rest.clone(),
                ]
                .concat(),
            };
            let want: Vec<&str> = needles.iter().copied().filter(|n| !n.is_empty()).collect();
            // inspect is the diagnostic: it prints the model and the tokenizer's problem.
            let tokenizer_fault = needles[0].starts_with("tokenizer");
            let want = if *command == "inspect" && tokenizer_fault {
                succeeds_with(
                    |out, _| match out.lines().find(|l| l.starts_with("tokenizer:")) {
                        Some(l) if l.contains("none (") && l.contains("tokenizer") => Ok(()),
                        l => Err(format!(
                            "the tokenizer line does not report the fault: {l:?}"
                        )),
                    },
                )
            } else {
                err(&want)
            };
            let mut c = case(0, &name, &args, want);
            c.timeout = Duration::from_secs(30);
            let (class, detail) = run(&c, d);
            tally.count(class);
            if !detail.is_empty() {
                failures.push(format!("{what} / {command}: {class}: {detail}"));
            }
        }
    }
    report("broken models x commands", &tally, &failures);
}

/// Every command that reads `--input` texts, on every malformed input file: one clean error
/// naming the file (and the line where there is one), or, for a byte-order mark, exactly
/// the output of the file without it. Prints the tally.
#[test]
fn every_input_command_refuses_every_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let commands: Vec<(&str, Vec<String>)> = vec![
        ("embed", vec!["--model".into(), tiny("bert-base")]),
        ("similarity", vec!["--model".into(), tiny("bert-base")]),
        (
            "classify",
            vec!["--model".into(), task_model("bert-classify")],
        ),
        ("ner", vec!["--model".into(), task_model("bert-ner")]),
        ("fill-mask", vec!["--model".into(), tiny("bert-mlm")]),
        (
            "rerank",
            vec![
                "--model".into(),
                task_model("bert-rerank"),
                "--query".into(),
                "q".into(),
            ],
        ),
    ];
    let file = |name: &str, bytes: &[u8]| {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        s(&p)
    };
    // (input path, stdin, needles); "" needles = the BOM case (must equal the clean file).
    let inputs: Vec<(String, Option<PathBuf>, Vec<&str>)> = vec![
        (
            file("nul.txt", b"a [MASK] b\n\0\0\0\n"),
            None,
            vec!["nul.txt", "input 1", "no token"],
        ),
        (
            file(
                "zero-width.txt",
                "a [MASK] b\n\u{200b}\u{200d}\n".as_bytes(),
            ),
            None,
            vec!["zero-width.txt", "input 1", "no token"],
        ),
        (
            file("spaces.txt", b"a [MASK] b\n   \t \n"),
            None,
            vec!["spaces.txt:2", "empty line"],
        ),
        (
            file("blank.txt", b"a [MASK] b\n\nc [MASK]\n"),
            None,
            vec!["blank.txt:2", "empty line"],
        ),
        (
            file("newline.txt", b"\n"),
            None,
            vec!["newline.txt:1", "empty line"],
        ),
        (
            file("empty.txt", b""),
            None,
            vec!["empty.txt", "no input lines"],
        ),
        (
            file("latin1.txt", b"a [MASK] b\ncaf\xe9 [MASK]\n"),
            None,
            vec!["latin1.txt:2", "UTF-8"],
        ),
        (
            file("quote.csv", b"text\n\"a [MASK] b\n"),
            None,
            vec!["quote.csv:2", "unterminated"],
        ),
        (
            file("ragged.csv", b"text,b\nx,y,z\n"),
            None,
            vec!["ragged.csv:2", "fields"],
        ),
        (
            file("bad.jsonl", b"{\"text\": \"a [MASK]\"}\n{\"text\":\n"),
            None,
            vec!["bad.jsonl:2", "invalid JSON"],
        ),
        (
            file("nofield.jsonl", b"{\"body\": \"a [MASK]\"}\n"),
            None,
            vec!["nofield.jsonl:1", "no text in column"],
        ),
        (s(d), None, vec!["is a directory"]),
        (
            s(&d.join("missing.txt")),
            None,
            vec!["missing.txt", "No such file"],
        ),
        ("/dev/zero".into(), None, vec!["/dev/zero", "device"]),
        (
            "-".into(),
            Some("/dev/zero".into()),
            vec!["<stdin>:1", "longer than"],
        ),
        (
            file("bom.txt", "\u{feff}a [MASK] b\nc [MASK] d\n".as_bytes()),
            None,
            vec![],
        ),
    ];
    let clean = file("clean.txt", b"a [MASK] b\nc [MASK] d\n");
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    for (command, model) in &commands {
        let args = |input: &str| {
            [
                vec![command.to_string()],
                model.clone(),
                vec!["--input".into(), input.into()],
            ]
            .concat()
        };
        let want_clean = common::ok(
            &Command::new(env!("CARGO_BIN_EXE_berth"))
                .args(args(&clean))
                .output()
                .unwrap(),
        );
        for (input, stdin, needles) in &inputs {
            let want = if needles.is_empty() {
                let want_clean = want_clean.clone();
                succeeds_with(move |out, _| {
                    if out == want_clean {
                        Ok(())
                    } else {
                        Err("differs from the file without the mark".into())
                    }
                })
            } else {
                err(needles)
            };
            let mut c = case(0, &format!("{command}-{input}"), &args(input), want);
            c.stdin = stdin.clone();
            c.timeout = Duration::from_secs(30);
            if stdin.is_some() {
                c.max_rss_mib = Some(600);
            }
            let (class, detail) = run(&c, d);
            tally.count(class);
            if !detail.is_empty() {
                failures.push(format!("{command} --input {input}: {class}: {detail}"));
            }
        }
    }
    report("bad inputs x commands", &tally, &failures);
}
