//! `berth data prepare`'s library side: shards hold exactly the sequences the text reader
//! packs; duplicates, weights, the held-out split and JSON Lines work; damaged shards, binary
//! input, empty corpora and a different tokenizer are clear errors naming the file.
use std::path::{Path, PathBuf};

use berth_text::TextTokenizer;
use berth_train::corpus::{prepare, CorpusInput, PrepareOptions};
use berth_train::pretrain::{
    read_corpus, read_prepared, read_sequences, PretrainSequence, Sequences,
};
use berth_train::shards::open_prepared;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vocab")
}

fn tokenizer(kind: &str) -> TextTokenizer {
    TextTokenizer::from_dir(&fixtures().join(kind)).unwrap()
}

/// The fixture corpus as documents of 6 lines separated by blank lines.
fn documents(dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(fixtures().join("corpus.txt")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let docs: Vec<String> = lines.chunks(6).map(|c| c.join("\n")).collect();
    let path = dir.join(name);
    std::fs::write(&path, docs.join("\n\n") + "\n").unwrap();
    path
}

fn opts(val_fraction: f64) -> PrepareOptions {
    PrepareOptions {
        max_length: 64,
        val_fraction,
        seed: 7,
        dedup: false,
        json_field: "text".into(),
        shard_tokens: 5000,
    }
}

fn one(path: &Path) -> Vec<CorpusInput> {
    vec![CorpusInput {
        path: path.into(),
        weight: 1.0,
    }]
}

/// Sequences as sortable (ids, word ids) pairs.
fn sorted(examples: &[PretrainSequence]) -> Vec<(Vec<u32>, Vec<Option<u32>>)> {
    let mut v: Vec<_> = examples
        .iter()
        .map(|e| (e.ids.clone(), e.words.clone()))
        .collect();
    v.sort();
    v
}

#[test]
fn shards_hold_the_sequences_the_text_reader_packs() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = documents(tmp.path(), "docs.txt");
    for kind in ["wordpiece", "bpe"] {
        let tok = tokenizer(kind);
        let out = tmp.path().join(format!("prepared-{kind}"));
        let m = prepare(&one(&corpus), &tok, &out, &opts(0.0)).unwrap();
        assert!(m.train.len() > 1, "several shards expected: {:?}", m.train);
        assert!(m.val.is_empty());
        let (train, val) = read_prepared(&out, &tok, 64).unwrap();
        assert!(val.is_empty());
        let direct = read_corpus(&corpus, &tok, 64).unwrap();
        assert_eq!(train.len(), direct.len());
        assert_eq!(sorted(&train), sorted(&direct), "{kind}");
        // Shuffled: not the file order.
        let order: Vec<_> = train.iter().map(|e| e.ids.clone()).collect();
        let file_order: Vec<_> = direct.iter().map(|e| e.ids.clone()).collect();
        assert_ne!(order, file_order);
        println!(
            "{kind}: {} sequences in {} shards",
            train.len(),
            m.train.len()
        );
        // A pretraining run reads the same sequences, in the same order, on demand from the
        // memory-mapped shards (nothing decoded up front).
        let mut data = berth_train::objective::DataConfig::new(out.clone());
        data.max_length = 64;
        // No held-out sequences (prepared with --val-fraction 0) and no --dev: refused,
        // not evaluated as loss 0 / perplexity 1.
        let e = read_sequences(&data, &tok, 42, None, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("held-out split has no sequences"), "{e}");
        data.dev = Some(corpus.clone());
        let (run, _) = read_sequences(&data, &tok, 42, None, None).unwrap();
        let Sequences::Shards(shards) = &run else {
            panic!("{kind}: a prepared corpus should train from its shards");
        };
        assert_eq!(shards.len(), train.len());
        for (i, e) in train.iter().enumerate() {
            assert_eq!(run.get(i).as_ref(), e);
        }
        assert_eq!(
            run.tokens(),
            train.iter().map(|e| e.ids.len()).sum::<usize>()
        );
    }
}

#[test]
fn held_out_split_duplicates_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let a = documents(tmp.path(), "a.txt");
    let b = documents(tmp.path(), "b.txt"); // the same documents again
    let tok = tokenizer("wordpiece");
    let mut o = opts(0.2);
    o.dedup = true;
    let both = vec![
        CorpusInput {
            path: a.clone(),
            weight: 1.0,
        },
        CorpusInput {
            path: b,
            weight: 1.0,
        },
    ];
    let m = prepare(&both, &tok, &tmp.path().join("dedup"), &o).unwrap();
    let docs = m.corpora[0].documents;
    assert_eq!(
        m.corpora[1].duplicates, docs,
        "every document of b.txt is a duplicate"
    );
    assert_eq!(m.corpora[1].documents, 0);
    let held = m.corpora[0].val_documents as f64 / docs as f64;
    assert!((held - 0.2).abs() < 0.1, "held out {held}");
    let (train, val) = read_prepared(&tmp.path().join("dedup"), &tok, 64).unwrap();
    assert_eq!(train.len(), m.corpora[0].train_sequences);
    assert_eq!(val.len(), m.corpora[0].val_sequences);
    // No held-out sequence is in training (split by document).
    let train_set: std::collections::HashSet<_> = train.iter().map(|e| e.ids.clone()).collect();
    assert!(val.iter().all(|e| !train_set.contains(&e.ids)));

    // Weight 2.5: every training sequence two or three times, about 2.5 on average.
    let w = vec![CorpusInput {
        path: a,
        weight: 2.5,
    }];
    let m2 = prepare(&w, &tok, &tmp.path().join("weighted"), &opts(0.0)).unwrap();
    let (train2, _) = read_prepared(&tmp.path().join("weighted"), &tok, 64).unwrap();
    let base = read_corpus(&tmp.path().join("a.txt"), &tok, 64)
        .unwrap()
        .len();
    let ratio = train2.len() as f64 / base as f64;
    assert_eq!(train2.len(), m2.corpora[0].train_sequences);
    assert!((2.3..2.7).contains(&ratio), "up-sampling ratio {ratio}");
}

#[test]
fn json_lines_documents_use_the_chosen_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("docs.jsonl");
    std::fs::write(
        &path,
        "{\"body\": \"The knight rode out.\\nHe came back.\", \"id\": 1}\n\n{\"body\": \"A second document.\"}\n",
    )
    .unwrap();
    let tok = tokenizer("wordpiece");
    let mut o = opts(0.0);
    let err = prepare(&one(&path), &tok, &tmp.path().join("x"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("docs.jsonl:1") && err.contains("\"text\""),
        "{err}"
    );
    o.json_field = "body".into();
    let m = prepare(&one(&path), &tok, &tmp.path().join("y"), &o).unwrap();
    assert_eq!(m.corpora[0].documents, 2);
    assert_eq!(m.corpora[0].train_sequences, 2);
}

#[test]
fn damaged_shards_binary_input_empty_corpora_and_other_tokenizers_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = documents(tmp.path(), "docs.txt");
    let tok = tokenizer("wordpiece");
    let out = tmp.path().join("prepared");
    let m = prepare(&one(&corpus), &tok, &out, &opts(0.1)).unwrap();
    open_prepared(&out, &tok, 64).unwrap();

    // Preparing into the same folder again is refused.
    let again = prepare(&one(&corpus), &tok, &out, &opts(0.1))
        .unwrap_err()
        .to_string();
    assert!(again.contains("already holds prepared data"), "{again}");

    // Another tokenizer, or a shorter --max-length than the data was packed to.
    let other = open_prepared(&out, &tokenizer("bpe"), 64)
        .err()
        .unwrap()
        .to_string();
    assert!(
        other.contains("manifest.json") && other.contains("another tokenizer"),
        "{other}"
    );
    let short = open_prepared(&out, &tok, 32).err().unwrap().to_string();
    assert!(
        short.contains("longer than this run's --max-length 32"),
        "{short}"
    );

    // One flipped byte: checksum. A cut file: size.
    let shard = out.join(&m.train[0].file);
    let good = std::fs::read(&shard).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    std::fs::write(&shard, &flipped).unwrap();
    let err = open_prepared(&out, &tok, 64).err().unwrap().to_string();
    assert!(
        err.contains("train-00000.bin") && err.contains("checksum"),
        "{err}"
    );
    std::fs::write(&shard, &good[..good.len() - 10]).unwrap();
    let err = open_prepared(&out, &tok, 64).err().unwrap().to_string();
    assert!(
        err.contains("train-00000.bin") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&shard, b"not a shard at all, just some text").unwrap();
    let err = open_prepared(&out, &tok, 64).err().unwrap().to_string();
    assert!(err.contains("not a berth shard"), "{err}");

    // A binary file given as text; an empty corpus.
    let binary = tmp.path().join("model.bin");
    std::fs::write(
        &binary,
        [0x7fu8, b'E', b'L', b'F', 0, 1, 2, 0xff, 0xfe, b'\n'],
    )
    .unwrap();
    let err = prepare(&one(&binary), &tok, &tmp.path().join("b"), &opts(0.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.bin:1") && err.contains("binary"),
        "{err}"
    );
    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "\n  \n\n").unwrap();
    let err = prepare(&one(&empty), &tok, &tmp.path().join("e"), &opts(0.0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty.txt") && err.contains("no text"),
        "{err}"
    );
}

/// A rank of several reads every byte (checksum, token ids) of its own training shards only
/// — shard `k` is rank `k % world`'s — checks the headers, sizes and offsets of all, and only
/// rank 0 opens the held-out shards: the ranks together catch a damaged shard (the rank that
/// reads it fails, naming it), a cut shard fails on every rank, and every rank addresses the
/// same training sequences.
#[test]
fn ranks_check_their_share_of_the_shards() {
    use berth_train::dist::Share;
    use berth_train::objective::TrainSet;
    use berth_train::shards::open_prepared_share;
    let tmp = tempfile::tempdir().unwrap();
    let corpus = documents(tmp.path(), "docs.txt");
    let tok = tokenizer("wordpiece");
    let out = tmp.path().join("prepared");
    let m = prepare(&one(&corpus), &tok, &out, &opts(0.1)).unwrap();
    assert!(m.train.len() >= 2 && !m.val.is_empty(), "{m:?}");
    let share = |rank| Share { rank, world: 2 };
    let whole = open_prepared(&out, &tok, 64).unwrap();
    for rank in 0..2 {
        let c = open_prepared_share(&out, &tok, 64, share(rank)).unwrap();
        assert_eq!(c.train.len(), whole.train.len());
        assert_eq!(c.val.is_empty(), rank == 1, "rank {rank}");
        let mut data = berth_train::objective::DataConfig::new(out.clone());
        data.max_length = 64;
        let (train, dev) = read_sequences(&data, &tok, 42, None, Some(&Rank(rank, 2))).unwrap();
        assert_eq!(dev.is_empty(), rank == 1, "rank {rank}");
        let all = berth_train::shards::Shards::new(
            whole
                .train
                .iter()
                .map(|s| berth_train::shards::Shard::open(s.path()).unwrap())
                .collect(),
        );
        assert_eq!(train.len(), all.len());
        for i in 0..train.len() {
            assert_eq!(train.get(i).ids, all.sequence(i).ids);
            assert_eq!(train.example_tokens(i), all.sequence(i).ids.len());
        }
    }
    // A flipped token byte in shard 1: rank 1 reads it and fails; rank 0 does not read it.
    let shard = out.join(&m.train[1].file);
    let good = std::fs::read(&shard).unwrap();
    let mut flipped = good.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x10;
    std::fs::write(&shard, &flipped).unwrap();
    open_prepared_share(&out, &tok, 64, share(0)).unwrap();
    let err = open_prepared_share(&out, &tok, 64, share(1))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&m.train[1].file) && err.contains("checksum"),
        "{err}"
    );
    // A cut shard: every rank sees its size is wrong.
    std::fs::write(&shard, &good[..good.len() - 10]).unwrap();
    for rank in 0..2 {
        let err = open_prepared_share(&out, &tok, 64, share(rank))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("truncated"), "rank {rank}: {err}");
    }
}

/// Rank `.0` of a pretend world of `.1` that makes no collective call (a prepared corpus's
/// reading needs none).
struct Rank(usize, usize);

impl berth_train::dist::Collective for Rank {
    fn rank(&self) -> usize {
        self.0
    }
    fn world_size(&self) -> usize {
        self.1
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> berth_train::Result<()> {
        unreachable!("no collective call expected")
    }
    fn gather_all(&self, _: &[u8]) -> berth_train::Result<Vec<Vec<u8>>> {
        unreachable!("no collective call expected")
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> berth_train::Result<()> {
        unreachable!("no collective call expected")
    }
}
