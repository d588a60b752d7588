//! Reading a prepared corpus (`berth data prepare`, [`crate::corpus`]): each shard is
//! memory-mapped and checked on open (magic, version, size, checksum, offsets, token ids
//! against the vocabulary), and a training run reads sequences from the shards on demand.
use std::path::{Path, PathBuf};

use berth_text::TextTokenizer;

use crate::corpus::*;
use crate::dist::Share;
use crate::error::{Result, TrainError};

/// A memory-mapped shard, checked on open (magic, version, size, checksum, offsets).
pub struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
    sequences: usize,
    tokens_at: usize,
}

impl Shard {
    /// Opens and checks `path`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens `path`, checking its header, size and offsets, and with `checksum` its
    /// checksum (which reads every byte).
    fn open_with(path: &Path, checksum: bool) -> Result<Self> {
        let bad = |message: String| TrainError::Data {
            path: path.into(),
            line: 0,
            message,
        };
        berth_text::limits::regular_file(path, u64::MAX).map_err(|e| bad(e.to_string()))?;
        let file = std::fs::File::open(path).map_err(|e| TrainError::Io {
            path: path.into(),
            error: e,
        })?;
        // SAFETY: the map is read-only; a shard modified while it is mapped would change
        // what is read (shards are written once, to a temporary name, and never rewritten).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| TrainError::Io {
            path: path.into(),
            error: e,
        })?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(bad(
                "not a berth shard (bad magic or shorter than its header)".into(),
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(map[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(map[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(bad(format!(
                "shard format version {} (this berth reads {VERSION})",
                u32_at(8)
            )));
        }
        let (n, t) = (u64_at(16), u64_at(24));
        let want = (HEADER as u64)
            .checked_add(n.saturating_add(1).saturating_mul(8))
            .and_then(|v| v.checked_add(t.saturating_mul(4)));
        if want != Some(map.len() as u64) {
            return Err(bad(format!(
                "{} bytes, but its header describes {n} sequences of {t} tokens ({} bytes): truncated or corrupted",
                map.len(),
                want.map_or("too many".into(), |w| w.to_string())
            )));
        }
        if checksum && crc32fast::hash(&map[HEADER..]) != u32_at(32) {
            return Err(bad("checksum mismatch: the shard is corrupted".into()));
        }
        let (n, t) = (n as usize, t as usize);
        let shard = Shard {
            path: path.into(),
            sequences: n,
            tokens_at: HEADER + 8 * (n + 1),
            map,
        };
        let mut prev = 0;
        for i in 0..=n {
            let o = shard.offset(i);
            if o < prev || o > t || (i == 0 && o != 0) || (i == n && o != t) {
                return Err(bad(format!("offset {i} out of order: corrupted")));
            }
            prev = o;
        }
        Ok(shard)
    }

    /// Checks what the header cannot: every sequence at most `max_length` tokens and every
    /// token id inside a vocabulary of `vocab` (a shard from another tokenizer, or one
    /// corrupted in a way that kept its checksum, would otherwise index past the
    /// embeddings).
    fn check_contents(&self, max_length: usize, vocab: usize) -> Result<()> {
        let bad = |message: String| TrainError::Data {
            path: self.path.clone(),
            line: 0,
            message,
        };
        for i in 0..self.sequences {
            let len = self.offset(i + 1) - self.offset(i);
            if len > max_length {
                return Err(bad(format!(
                    "sequence {i} has {len} tokens, more than the manifest's max_length {max_length}"
                )));
            }
        }
        let tokens = &self.map[self.tokens_at..];
        if let Some(c) = tokens
            .chunks_exact(4)
            .find(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & ID_MASK) as usize >= vocab)
        {
            return Err(bad(format!(
                "token id {} is outside the vocabulary of {vocab}",
                u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & ID_MASK
            )));
        }
        Ok(())
    }

    fn offset(&self, i: usize) -> usize {
        let o = HEADER + 8 * i;
        u64::from_le_bytes(self.map[o..o + 8].try_into().expect("8 bytes")) as usize
    }

    /// Sequences in the shard.
    pub fn len(&self) -> usize {
        self.sequences
    }

    /// Whether the shard holds no sequence.
    pub fn is_empty(&self) -> bool {
        self.sequences == 0
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence `i`.
    pub fn sequence(&self, i: usize) -> Sequence {
        let (a, b) = (self.offset(i), self.offset(i + 1));
        let bytes = &self.map[self.tokens_at + 4 * a..self.tokens_at + 4 * b];
        let tokens: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        Sequence::decode(&tokens)
    }
}

/// Shards addressed as one list of sequences, decoded on demand: a run over a prepared
/// corpus keeps only the memory maps (the pages a batch touches are read in by the OS and
/// can be dropped again), never the decoded corpus.
pub struct Shards {
    shards: Vec<Shard>,
    /// Index of each shard's first sequence, and the total at the end.
    starts: Vec<usize>,
}

impl Shards {
    /// The sequences of `shards`, in order.
    pub fn new(shards: Vec<Shard>) -> Self {
        let mut starts = vec![0];
        for s in &shards {
            starts.push(starts.last().expect("non-empty") + s.len());
        }
        Shards { shards, starts }
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        *self.starts.last().expect("non-empty")
    }

    /// Whether there is no sequence.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence `i` of the concatenation.
    pub fn sequence(&self, i: usize) -> Sequence {
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        self.shards[s].sequence(i - self.starts[s])
    }

    /// Tokens of sequence `i` (from the offsets: its tokens are not read).
    pub fn sequence_len(&self, i: usize) -> usize {
        let s = self.starts.partition_point(|&start| start <= i) - 1;
        let (shard, j) = (&self.shards[s], i - self.starts[s]);
        shard.offset(j + 1) - shard.offset(j)
    }

    /// Tokens over all sequences (special tokens included).
    pub fn tokens(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.offset(s.len()) - s.offset(0))
            .sum()
    }
}

/// A prepared folder: its manifest and shards, opened and checked.
pub struct PreparedCorpus {
    /// `manifest.json`.
    pub manifest: Manifest,
    /// Training shards.
    pub train: Vec<Shard>,
    /// Held-out shards.
    pub val: Vec<Shard>,
}

/// Whether `dir` is a prepared folder (has `manifest.json`).
pub fn is_prepared(dir: &Path) -> bool {
    dir.join("manifest.json").is_file()
}

/// Opens a prepared folder for a run with `tok` and sequences of at most `max_length`.
pub fn open_prepared(dir: &Path, tok: &TextTokenizer, max_length: usize) -> Result<PreparedCorpus> {
    open_prepared_share(dir, tok, max_length, Share::default())
}

/// [`open_prepared`] for one rank of several: every shard's header, size and offsets are
/// checked, but the reads of every byte (checksum, token ids) only for the training shards
/// that are `share`'s (the others check the rest), and the held-out shards are opened by
/// the evaluating rank alone (`val` is empty on the others).
pub fn open_prepared_share(
    dir: &Path,
    tok: &TextTokenizer,
    max_length: usize,
    share: Share,
) -> Result<PreparedCorpus> {
    let path = dir.join("manifest.json");
    let text =
        berth_text::limits::read_text(&path, berth_text::limits::MAX_JSON_BYTES).map_err(|e| {
            TrainError::Io {
                path: path.clone(),
                error: e.into(),
            }
        })?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: path.clone(),
        line: 0,
        message: format!("not a berth manifest: {e}"),
    })?;
    let bad = |message: String| TrainError::Data {
        path: path.clone(),
        line: 0,
        message,
    };
    if manifest.format_version != MANIFEST_VERSION {
        return Err(bad(format!(
            "manifest version {} (this berth reads {MANIFEST_VERSION})",
            manifest.format_version
        )));
    }
    let fingerprint = tokenizer_fingerprint(tok);
    if manifest.vocab_size != tok.vocab_size() || manifest.tokenizer_fingerprint != fingerprint {
        return Err(bad(format!(
            "prepared with another tokenizer ({}, {} tokens) than this run's ({}, {} tokens): \
             prepare the data again with this tokenizer",
            manifest.tokenizer.display(),
            manifest.vocab_size,
            tok.source().display(),
            tok.vocab_size()
        )));
    }
    if manifest.max_length > max_length {
        return Err(bad(format!(
            "sequences were packed to {} tokens, longer than this run's --max-length {max_length}",
            manifest.max_length
        )));
    }
    // Shard names are plain file names inside the folder, each listed once.
    let mut seen = std::collections::HashSet::new();
    for s in manifest.train.iter().chain(&manifest.val) {
        let plain = Path::new(&s.file)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
        if s.file.is_empty() || !plain {
            return Err(bad(format!(
                "shard {:?} is outside the data folder",
                s.file
            )));
        }
        if !seen.insert(s.file.as_str()) {
            return Err(bad(format!("shard {:?} is listed twice", s.file)));
        }
    }
    let open = |list: &[ShardInfo], mine: &dyn Fn(usize) -> bool| -> Result<Vec<Shard>> {
        list.iter()
            .enumerate()
            .map(|(k, s)| {
                let read_all = mine(k);
                let shard = Shard::open_with(&dir.join(&s.file), read_all)?;
                let tokens = shard.offset(shard.len());
                let crc = u32::from_le_bytes(shard.map[32..36].try_into().expect("4 bytes"));
                let mismatch = if shard.len() != s.sequences {
                    Some(format!("{} sequences", shard.len()))
                } else if tokens != s.tokens {
                    Some(format!("{tokens} tokens"))
                } else if crc != s.crc32 {
                    Some(format!("checksum {crc:#010x}"))
                } else {
                    None
                };
                if let Some(m) = mismatch {
                    return Err(TrainError::Data {
                        path: dir.join(&s.file),
                        line: 0,
                        message: format!(
                            "{m}, not what the manifest says (another shard's manifest?)"
                        ),
                    });
                }
                if read_all {
                    shard.check_contents(manifest.max_length, manifest.vocab_size)?;
                }
                Ok(shard)
            })
            .collect()
    };
    let train = open(&manifest.train, &|k| share.takes(k))?;
    let val = if share.evaluates() {
        open(&manifest.val, &|_| true)?
    } else {
        Vec::new()
    };
    Ok(PreparedCorpus {
        train,
        val,
        manifest,
    })
}
