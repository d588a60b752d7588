//! Mutation fuzzing of every reader of untrusted files (#24), on stable Rust with a fixed
//! seed: the safetensors header, config.json, tokenizer.json, the sharded-weights index, a
//! prepared corpus's manifest and shards, and the CSV / TSV / JSON Lines / CoNLL / SQuAD
//! training-data readers. Each reader gets `BERTH_FUZZ_CASES` mutated inputs (default
//! 10,000; `scripts/fuzz` runs more) derived from a valid file by byte-level mutations
//! (bit flips, interesting bytes and integers, insertions, deletions, duplications,
//! truncation) and, for JSON files, by replacing a random value with a hostile one. Every
//! input must give a result or an error: a panic fails the test, and so does any single
//! input that takes more than 5 seconds. The counts are printed.
mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth_train::data::{Column, Columns};
use serde_json::Value;

/// xorshift64*: a small fixed-seed generator, so every run fuzzes the same inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const TOKENS: [&str; 24] = [
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "-1",
    "0",
    "1e309",
    "-1e309",
    "NaN",
    "null",
    "true",
    "18446744073709551616",
    "4294967295",
    "\\u0000",
    "\u{feff}",
    "\t",
    "\n",
    "\r\n",
    "../",
    "\u{10ffff}",
    "\"\"",
];

fn hostile_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => Value::Null,
        1 => (-1).into(),
        2 => serde_json::json!(1e308),
        3 => serde_json::json!(u64::MAX),
        4 => "".into(),
        5 => "../../../etc/passwd".into(),
        6 => Value::Array(vec![]),
        7 => Value::Object(Default::default()),
        8 => "x".repeat(rng.below(5000)).into(),
        9 => 0.into(),
        10 => serde_json::json!(i64::MIN),
        _ => serde_json::json!([[[[[[[[1]]]]]]]]),
    }
}

/// Replaces one random value inside `v` (objects and arrays are walked at random).
fn mutate_json(rng: &mut Rng, v: &mut Value, depth: usize) {
    let stop = depth > 0 && rng.below(3) == 0;
    match v {
        Value::Object(m) if !m.is_empty() && !stop => {
            let k = m.keys().nth(rng.below(m.len())).unwrap().clone();
            if rng.below(8) == 0 {
                m.remove(&k);
            } else {
                mutate_json(rng, m.get_mut(&k).unwrap(), depth + 1);
            }
        }
        Value::Array(a) if !a.is_empty() && !stop => {
            let i = rng.below(a.len());
            mutate_json(rng, &mut a[i], depth + 1);
        }
        _ => *v = hostile_value(rng),
    }
}

/// One mutated input from `seed`; byte edits favour the first `hot` bytes (headers).
fn mutate(rng: &mut Rng, seed: &[u8], hot: usize) -> Vec<u8> {
    if rng.below(2) == 0 {
        if let Ok(mut v) = serde_json::from_slice::<Value>(seed) {
            mutate_json(rng, &mut v, 0);
            return serde_json::to_vec(&v).unwrap();
        }
    }
    let mut v = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let span = if rng.below(3) > 0 {
            v.len().min(hot)
        } else {
            v.len()
        };
        let at = rng.below(span + 1).min(v.len());
        match rng.below(8) {
            0 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] ^= 1 << rng.below(8);
            }
            1 if !v.is_empty() => {
                let i = at.min(v.len() - 1);
                v[i] = rng.next() as u8;
            }
            2 => {
                let t = TOKENS[rng.below(TOKENS.len())].as_bytes();
                v.splice(at..at, t.iter().copied());
            }
            3 => {
                let end = (at + 1 + rng.below(16)).min(v.len());
                v.drain(at..end);
            }
            4 => {
                let end = (at + 1 + rng.below(64)).min(v.len());
                let piece = v[at..end].to_vec();
                v.splice(at..at, piece);
            }
            5 => v.truncate(at),
            6 => {
                let ints: [u64; 6] = [0, u32::MAX as u64, u64::MAX, 1 << 31, 1 << 63, 7];
                let x = ints[rng.below(ints.len())].to_le_bytes();
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                for (k, b) in x.iter().take(w).enumerate() {
                    if at + k < v.len() {
                        v[at + k] = *b;
                    }
                }
            }
            _ => {
                let b = rng.next() as u8;
                v.insert(at, b);
            }
        }
    }
    v
}

#[derive(Default)]
struct Report {
    cases: usize,
    ok: usize,
    errors: usize,
    panics: Vec<Vec<u8>>,
    slowest: Duration,
}

fn cases() -> usize {
    std::env::var("BERTH_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

/// Runs `read` on `cases()` mutations of `seed`; `read` returns whether it accepted the input.
fn fuzz(
    name: &str,
    seed: &[u8],
    hot: usize,
    salt: u64,
    mut read: impl FnMut(&[u8]) -> bool,
) -> Report {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ salt);
    let mut r = Report::default();
    assert!(read(seed), "{name}: the unmutated seed must be accepted");
    for _ in 0..cases() {
        let input = mutate(&mut rng, seed, hot);
        let t = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| read(&input)));
        r.slowest = r.slowest.max(t.elapsed());
        r.cases += 1;
        match outcome {
            Ok(true) => r.ok += 1,
            Ok(false) => r.errors += 1,
            Err(_) => r.panics.push(input),
        }
    }
    println!(
        "{name:<22} {:>7} inputs {:>7} accepted {:>7} errors {:>3} panics  slowest {:>6.1} ms",
        r.cases,
        r.ok,
        r.errors,
        r.panics.len(),
        r.slowest.as_secs_f64() * 1e3
    );
    r
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn every_reader_survives_mutated_inputs() {
    // Panics are counted, not printed.
    std::panic::set_hook(Box::new(|_| {}));
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let tiny = PathBuf::from(common::tiny("bert-base"));
    let mut reports: Vec<(&str, Report)> = Vec::new();

    // safetensors (header and tensors, then berth's own checks of dtypes and values).
    let st = std::fs::read(tiny.join("model.safetensors")).unwrap();
    let src = Path::new("model.safetensors");
    reports.push((
        "safetensors",
        fuzz("safetensors", &st, 2048, 1, |b| {
            berth_model::Weights::parse_safetensors(b, src)
                .and_then(|t| berth_model::Weights::from_tensors(t, src.into(), false))
                .is_ok()
        }),
    ));

    // config.json.
    let cfg = std::fs::read(tiny.join("config.json")).unwrap();
    reports.push((
        "config.json",
        fuzz("config.json", &cfg, 4096, 2, |b| {
            let text = String::from_utf8_lossy(b);
            berth_model::EncoderConfig::from_json(&text, Path::new("config.json")).is_ok()
        }),
    ));

    // tokenizer.json (with the model folder's tokenizer_config.json beside it).
    let tok_dir = d.join("tok");
    std::fs::create_dir(&tok_dir).unwrap();
    std::fs::copy(
        tiny.join("tokenizer_config.json"),
        tok_dir.join("tokenizer_config.json"),
    )
    .unwrap();
    let tok_json = std::fs::read(tiny.join("tokenizer.json")).unwrap();
    reports.push((
        "tokenizer.json",
        fuzz("tokenizer.json", &tok_json, 8192, 3, |b| {
            write(&tok_dir.join("tokenizer.json"), b);
            berth_text::TextTokenizer::from_dir(&tok_dir)
                .and_then(|t| {
                    t.encode(
                        "hello world",
                        Some("the fox"),
                        16,
                        berth_text::Truncation::Truncate,
                        0,
                    )
                })
                .is_ok()
        }),
    ));

    // model.safetensors.index.json (shards copied once).
    let sharded = PathBuf::from(common::tiny("bert-base-sharded"));
    let idx_dir = d.join("sharded");
    std::fs::create_dir(&idx_dir).unwrap();
    for e in std::fs::read_dir(&sharded).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), idx_dir.join(e.file_name())).unwrap();
    }
    let index = std::fs::read(sharded.join("model.safetensors.index.json")).unwrap();
    reports.push((
        "index.json",
        fuzz("index.json", &index, 4096, 4, |b| {
            write(&idx_dir.join("model.safetensors.index.json"), b);
            berth_model::Weights::from_dir(&idx_dir, false).is_ok()
        }),
    ));

    // A prepared corpus: its manifest, then its shard.
    let corpus = d.join("corpus.txt");
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog",
    ];
    let text: Vec<String> = (0..120)
        .map(|i| {
            (0..12)
                .map(|j| words[(i * 3 + j * 5) % 8])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    write(&corpus, text.join("\n").as_bytes());
    let prepared = d.join("prepared");
    common::prepare(&tiny.to_string_lossy(), &corpus, &prepared, "0.2");
    let tok = berth_text::TextTokenizer::from_dir(&tiny).unwrap();
    let manifest = std::fs::read(prepared.join("manifest.json")).unwrap();
    reports.push((
        "manifest.json",
        fuzz("manifest.json", &manifest, 4096, 5, |b| {
            write(&prepared.join("manifest.json"), b);
            berth_train::shards::open_prepared(&prepared, &tok, 32).is_ok()
        }),
    ));
    write(&prepared.join("manifest.json"), &manifest);
    let shard_path = prepared.join("train-00000.bin");
    let shard = std::fs::read(&shard_path).unwrap();
    let scratch = d.join("shard.bin");
    reports.push((
        "shard",
        fuzz("shard", &shard, 512, 6, |b| {
            // Half the inputs carry a correct checksum, so the checks behind it are reached.
            let mut b = b.to_vec();
            if b.len() >= 40 && b.len() % 2 == 0 {
                let crc = crc32fast::hash(&b[40..]);
                b[32..36].copy_from_slice(&crc.to_le_bytes());
            }
            write(&scratch, &b);
            match berth_train::shards::Shard::open(&scratch) {
                Ok(s) => {
                    // Reading every sequence of an accepted shard must not panic either.
                    (0..s.len()).for_each(|i| drop(s.sequence(i)));
                    true
                }
                Err(_) => false,
            }
        }),
    ));

    // Training data readers.
    let cols = Columns {
        text: Column::Name("sentence".into()),
        pair: Some(Column::Name("pair".into())),
        label: Some(Column::Name("label".into())),
        extra: None,
    };
    let rows: Vec<(String, String, String)> = (0..20)
        .map(|i| {
            (
                format!("the {} fox", words[i % 8]),
                format!("a {} dog", words[(i + 3) % 8]),
                ["yes", "no"][i % 2].into(),
            )
        })
        .collect();
    let tsv: String = std::iter::once("sentence\tpair\tlabel".to_string())
        .chain(rows.iter().map(|(a, b, l)| format!("{a}\t{b}\t{l}")))
        .collect::<Vec<_>>()
        .join("\n");
    let csv: String = std::iter::once("sentence,pair,label".to_string())
        .chain(
            rows.iter()
                .map(|(a, b, l)| format!("\"{a}, really\",\"{b} \"\"q\"\"\",{l}")),
        )
        .collect::<Vec<_>>()
        .join("\r\n");
    let jsonl: String = rows
        .iter()
        .map(|(a, b, l)| serde_json::json!({"sentence": a, "pair": b, "label": l}).to_string())
        .collect::<Vec<_>>()
        .join("\n");
    for (name, ext, seed) in [
        ("TSV", "tsv", tsv),
        ("CSV", "csv", csv),
        ("JSON Lines", "jsonl", jsonl),
    ] {
        let path = d.join(format!("data.{ext}"));
        let salt = 7 + ext.len() as u64;
        let r = fuzz(name, seed.as_bytes(), 256, salt, |b| {
            write(&path, b);
            berth_train::data::read_text_examples(&path, &cols, false).is_ok()
        });
        reports.push((name, r));
    }
    let conll: String = (0..10)
        .map(|i| format!("EU NNP B-ORG\nrejects VBZ O\n{} NN B-MISC\n", words[i % 8]))
        .collect::<Vec<_>>()
        .join("\n");
    let conll_path = d.join("data.conll");
    reports.push((
        "CoNLL",
        fuzz("CoNLL", conll.as_bytes(), 256, 11, |b| {
            write(&conll_path, b);
            berth_train::data::read_conll(&conll_path, None, false).is_ok()
        }),
    ));
    let squad = serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "The quick brown fox jumps over the lazy dog.", "qas": [
        {"id": "q1", "question": "What jumps?", "answers": [{"text": "fox", "answer_start": 16}]},
        {"id": "q2", "question": "Over what?", "answers": [{"text": "the lazy dog", "answer_start": 31}]}
    ]}]}]});
    let squad_path = d.join("squad.json");
    reports.push((
        "SQuAD",
        fuzz("SQuAD", squad.to_string().as_bytes(), 512, 12, |b| {
            write(&squad_path, b);
            berth_train::data::read_squad(&squad_path, false).is_ok()
        }),
    ));

    let _ = std::panic::take_hook();
    let mut failures = Vec::new();
    // BERTH_FUZZ_DUMP=DIR keeps the inputs that panicked, to reproduce them.
    if let Some(dump) = std::env::var_os("BERTH_FUZZ_DUMP") {
        std::fs::create_dir_all(&dump).unwrap();
        for (name, r) in &reports {
            for (i, p) in r.panics.iter().enumerate() {
                let file = format!("{}-{i}", name.replace([' ', '.'], "_"));
                std::fs::write(Path::new(&dump).join(file), p).unwrap();
            }
        }
    }
    for (name, r) in &reports {
        if let Some(p) = r.panics.first() {
            failures.push(format!(
                "{name}: {} panics, first on {:?}",
                r.panics.len(),
                String::from_utf8_lossy(&p[..p.len().min(300)])
            ));
        }
        if r.slowest > Duration::from_secs(5) {
            failures.push(format!("{name}: an input took {:?}", r.slowest));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
