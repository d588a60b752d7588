//! `train_vocabulary` against fixtures/vocab (scripts/make_vocab_reference.py): training on
//! the committed corpus reproduces the committed vocabularies, and transformers' fast
//! tokenizers — loading those folders unchanged — encode sample texts to the ids berth does.
use std::path::PathBuf;

use berth_text::train::{train_vocabulary, VocabKind, VocabOptions};
use berth_text::{TextTokenizer, Truncation};
use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vocab")
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(root().join("reference.json")).unwrap()).unwrap()
}

fn opts(kind: &str) -> VocabOptions {
    VocabOptions {
        kind: match kind {
            "wordpiece" => VocabKind::WordPiece,
            "bpe" => VocabKind::Bpe,
            _ => VocabKind::Unigram,
        },
        vocab_size: 2000,
        lowercase: kind == "wordpiece",
        min_frequency: 2,
        model_max_length: 512,
    }
}

fn json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Re-training on the committed corpus gives a folder of the same shape: the same files, the
/// same size, the special tokens at the same ids, the same pipeline around the model; for
/// WordPiece and byte-level BPE the very same vocabulary and ids (see
/// `wordpiece_training_is_reproducible`). Unigram's piece scores come from parallel float
/// sums and can differ in the last digits from run to run, so its model is not compared.
#[test]
fn training_gives_the_committed_layout() {
    for kind in ["wordpiece", "bpe", "unigram"] {
        let tmp = tempfile::tempdir().unwrap();
        let done = train_vocabulary(&[root().join("corpus.txt")], &opts(kind), tmp.path()).unwrap();
        let (ours, committed) = (
            json(&tmp.path().join("tokenizer.json")),
            json(&root().join(kind).join("tokenizer.json")),
        );
        for part in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
        ] {
            assert_eq!(ours[part], committed[part], "{kind}: {part}");
        }
        assert_eq!(ours["model"]["type"], committed["model"]["type"]);
        assert_eq!(
            done.vocab_size,
            reference()["kinds"][kind]["vocab_size"].as_u64().unwrap() as usize
        );
        for f in [
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.txt",
            "vocab.json",
            "merges.txt",
        ] {
            let (a, b) = (tmp.path().join(f), root().join(kind).join(f));
            assert_eq!(a.is_file(), b.is_file(), "{kind}: {f}");
        }
        if kind != "unigram" {
            assert_eq!(
                ours["model"], committed["model"],
                "{kind}: the trained model"
            );
        }
        for f in ["tokenizer_config.json", "special_tokens_map.json"] {
            assert_eq!(
                json(&tmp.path().join(f)),
                json(&root().join(kind).join(f)),
                "{kind}: {f}"
            );
        }
        // vocab.txt lists the vocabulary in id order, as BertTokenizer reads it.
        if kind == "wordpiece" {
            let lines: Vec<String> = std::fs::read_to_string(tmp.path().join("vocab.txt"))
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect();
            assert_eq!(lines.len(), done.vocab_size);
            for (i, t) in lines.iter().enumerate() {
                assert_eq!(
                    ours["model"]["vocab"][t].as_u64(),
                    Some(i as u64),
                    "vocab.txt line {i}: {t}"
                );
            }
        }
        println!(
            "{kind}: {} tokens from {} lines",
            done.vocab_size, done.lines
        );
    }
}

/// The `tokenizers` WordPiece trainer numbers `##` pieces in hash-map order, different in every
/// process and every run (huggingface/tokenizers#1794); berth renumbers the trained pieces
/// canonically, so training twice gives byte-identical files. The corpus is varied enough
/// (the committed one plus accented and non-Latin words) that two hash orders agreeing by
/// chance is out of the question.
#[test]
fn wordpiece_training_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let mut text = std::fs::read_to_string(root().join("corpus.txt")).unwrap();
    for w in [
        "ångström",
        "naïveté",
        "żółć",
        "ĳssel",
        "þorn",
        "ðæt",
        "σοφία",
        "мир",
        "ψυχή",
        "ℵ₀",
    ] {
        text.push_str(&format!("{w} {w}s {w}ed {w}ing\n"));
    }
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, text).unwrap();
    let read = |d: &str, f: &str| std::fs::read(tmp.path().join(d).join(f)).unwrap();
    for run in ["a", "b", "c"] {
        train_vocabulary(&[corpus.clone()], &opts("wordpiece"), &tmp.path().join(run)).unwrap();
    }
    for run in ["b", "c"] {
        for f in ["vocab.txt", "tokenizer.json"] {
            assert!(
                read("a", f) == read(run, f),
                "run {run}: {f} differs from run a"
            );
        }
    }
    // Canonical order: the five special tokens, then single characters before `##` ones.
    let vocab = String::from_utf8(read("a", "vocab.txt")).unwrap();
    let lines: Vec<&str> = vocab.lines().collect();
    assert_eq!(&lines[..5], &["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
    assert!(
        lines[5].chars().count() == 1 && lines.contains(&"##ο"),
        "{:?}",
        &lines[..8]
    );
}

#[test]
fn transformers_and_berth_encode_the_trained_vocabularies_alike() {
    let r = reference();
    let texts = r["texts"].as_array().unwrap();
    let pairs = r["pairs"].as_array().unwrap();
    for kind in ["wordpiece", "bpe", "unigram"] {
        let want = &r["kinds"][kind];
        let tok = TextTokenizer::from_dir(&root().join(kind)).unwrap();
        let inputs: Vec<(&str, Option<&str>)> = texts
            .iter()
            .map(|t| (t.as_str().unwrap(), None))
            .chain(
                pairs
                    .iter()
                    .map(|p| (p[0].as_str().unwrap(), p[1].as_str())),
            )
            .collect();
        for (i, (a, b)) in inputs.iter().enumerate() {
            let enc = tok.encode(a, *b, 512, Truncation::Error, i).unwrap();
            let ids: Vec<u32> = want["ids"][i]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(enc.ids, ids, "{kind} ({}): ids of {a:?}", want["class"]);
            if i < texts.len() {
                assert_eq!(
                    tok.decode(&enc.ids, true).unwrap(),
                    want["decoded"][i].as_str().unwrap(),
                    "{kind}: decode of {a:?}"
                );
            }
        }
        println!(
            "{kind}: {} texts encode as {} does",
            inputs.len(),
            want["class"]
        );
    }
}

#[test]
fn bad_corpora_fail_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, b"fine line\n\xff\xfe broken\n").unwrap();
    let err = train_vocabulary(&[bad.clone()], &opts("bpe"), &tmp.path().join("o")).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("bad.txt") && msg.contains("line 2") && msg.contains("UTF-8"),
        "{msg}"
    );
    let missing = tmp.path().join("missing.txt");
    let msg = train_vocabulary(&[missing], &opts("bpe"), &tmp.path().join("o"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("missing.txt"), "{msg}");
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let msg = train_vocabulary(&[empty], &opts("wordpiece"), &tmp.path().join("o"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("empty"), "{msg}");
    let msg = train_vocabulary(
        &[root().join("corpus.txt")],
        &VocabOptions {
            vocab_size: 3,
            ..opts("bpe")
        },
        &tmp.path().join("o"),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("special tokens"), "{msg}");
}

#[test]
fn gzip_corpora_read_like_plain_text() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read(root().join("corpus.txt")).unwrap();
    let gz = tmp.path().join("corpus.gz");
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    e.write_all(&text).unwrap();
    e.finish().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let from_gz = train_vocabulary(&[gz], &opts("wordpiece"), &a).unwrap();
    let plain = train_vocabulary(&[root().join("corpus.txt")], &opts("wordpiece"), &b).unwrap();
    assert_eq!(
        (from_gz.lines, from_gz.vocab_size),
        (plain.lines, plain.vocab_size)
    );
    // Folders are read recursively.
    let nested = tmp.path().join("nested/deeper");
    std::fs::create_dir_all(&nested).unwrap();
    std::fs::copy(root().join("corpus.txt"), nested.join("part.txt")).unwrap();
    let walked = train_vocabulary(
        &[tmp.path().join("nested")],
        &opts("wordpiece"),
        &tmp.path().join("c"),
    )
    .unwrap();
    assert_eq!(walked.lines, plain.lines);
}
