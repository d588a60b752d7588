//! berth's tokenizers against transformers' fast tokenizers (fixtures/tiny/tokenization.json,
//! made by scripts/make_reference.py), for tokenizer.json and for both build-from-vocab paths.
use std::path::{Path, PathBuf};

use berth_text::{TextTokenizer, TokenizerKind, Truncation};

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/tiny")
        .join(name)
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(tiny("tokenization.json")).unwrap()).unwrap()
}

fn check(dir: &str, arch: &str, kind: TokenizerKind) {
    let r = &reference()[arch];
    let tok = TextTokenizer::from_dir(&tiny(dir)).unwrap();
    assert_eq!(tok.kind(), kind);
    let mut ids = Vec::new();
    let mut types = Vec::new();
    let texts: Vec<&str> = r["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for (i, t) in texts.iter().enumerate() {
        let e = tok.encode(t, None, 512, Truncation::Error, i).unwrap();
        ids.extend(e.ids);
        types.extend(e.type_ids);
    }
    if let Some(p) = r["pair"].as_array() {
        let e = tok
            .encode(
                p[0].as_str().unwrap(),
                Some(p[1].as_str().unwrap()),
                512,
                Truncation::Error,
                9,
            )
            .unwrap();
        ids.extend(e.ids);
        types.extend(e.type_ids);
    }
    let want = |k: &str| {
        r[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids,
        want("input_ids"),
        "{dir}: token ids differ from transformers"
    );
    assert_eq!(
        types,
        want("token_type_ids"),
        "{dir}: token type ids differ from transformers"
    );
}

#[test]
fn tokenizer_json_matches_transformers() {
    check("bert-mlm", "bert", TokenizerKind::WordPiece);
    check("roberta-base", "roberta", TokenizerKind::Bpe);
}

#[test]
fn built_from_vocab_txt_matches_transformers() {
    check("distilbert-mlm", "distilbert", TokenizerKind::WordPiece);
}

#[test]
fn built_from_vocab_json_and_merges_matches_transformers() {
    check("roberta-mlm", "roberta", TokenizerKind::Bpe);
}

#[test]
fn truncation_keeps_special_tokens_or_errors() {
    let tok = TextTokenizer::from_dir(&tiny("bert-mlm")).unwrap();
    let text = "the quick brown fox jumps over the lazy dog.";
    let full = tok.encode(text, None, 512, Truncation::Error, 0).unwrap();
    let cut = tok.encode(text, None, 5, Truncation::Truncate, 0).unwrap();
    assert!(cut.truncated && cut.full_len == full.ids.len() && cut.ids.len() == 5);
    assert_eq!(
        (cut.ids[0], cut.ids[4]),
        (full.ids[0], *full.ids.last().unwrap())
    );
    assert_eq!(&cut.ids[1..4], &full.ids[1..4]);
    let e = tok
        .encode(text, None, 5, Truncation::Error, 3)
        .unwrap_err()
        .to_string();
    assert!(e.contains("input 3") && e.contains("maximum of 5"), "{e}");
}

#[test]
fn empty_text_and_missing_tokenizer_are_errors() {
    let tok = TextTokenizer::from_dir(&tiny("bert-mlm")).unwrap();
    assert_eq!(
        tok.encode("  ", None, 512, Truncation::Error, 2)
            .unwrap_err()
            .to_string(),
        "input 2: empty text"
    );
    let e = TextTokenizer::from_dir(&tiny("bert-base-sharded"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("bert-base-sharded") && e.contains("no tokenizer"),
        "{e}"
    );
}

/// Pre-split words (CoNLL sentences) encode as transformers encodes them for token
/// classification (`is_split_into_words=True`; byte-level BPE with `add_prefix_space=True`,
/// so every word starts with `Ġ` as in running text), with the same word index per token.
#[test]
fn pre_split_words_match_transformers() {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny("split_words.json")).unwrap()).unwrap();
    for dir in ["bert-tokcls", "roberta-tokcls"] {
        let tok = TextTokenizer::from_dir(&tiny(dir)).unwrap();
        for (i, case) in r[dir].as_array().unwrap().iter().enumerate() {
            let words: Vec<String> = case["words"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w.as_str().unwrap().to_string())
                .collect();
            let e = tok.encode_words(&words, 512, i).unwrap();
            let ids: Vec<u32> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            let word_ids: Vec<Option<u32>> = case["word_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().map(|w| w as u32))
                .collect();
            assert_eq!(e.ids, ids, "{dir} case {i}");
            assert_eq!(e.word_ids, word_ids, "{dir} case {i}");
        }
    }
}
