//! Tokenizers built from vocabulary files, configured as transformers' fast tokenizers
//! build them (BertTokenizerFast from vocab.txt, RobertaTokenizerFast from vocab.json +
//! merges.txt).
use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::{Result, TextError};

/// tokenizer_config.json, the fields that change how the tokenizer is built.
#[derive(Default, serde::Deserialize)]
pub(crate) struct TokenizerConfig {
    do_lower_case: Option<bool>,
    add_prefix_space: Option<bool>,
    tokenize_chinese_chars: Option<bool>,
    strip_accents: Option<bool>,
    pub(crate) clean_up_tokenization_spaces: Option<bool>,
}

pub(crate) fn read_config(dir: &Path) -> Result<TokenizerConfig> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(TokenizerConfig::default());
    }
    let text = crate::limits::read_text(&path, crate::limits::MAX_JSON_BYTES).map_err(|e| {
        TextError::Io {
            path: path.clone(),
            error: e.into(),
        }
    })?;
    serde_json::from_str(&text).map_err(|e| TextError::Invalid {
        path,
        message: e.to_string(),
    })
}

fn special_id(t: &Tokenizer, token: &str, path: &Path) -> Result<u32> {
    t.token_to_id(token).ok_or_else(|| TextError::Invalid {
        path: path.into(),
        message: format!("the vocabulary has no {token} token"),
    })
}

/// BERT's WordPiece tokenizer from `vocab.txt`; lowercasing from `do_lower_case` (default true).
pub(crate) fn wordpiece(dir: &Path) -> Result<Tokenizer> {
    let path = dir.join("vocab.txt");
    let cfg = read_config(dir)?;
    let invalid = |message: String| TextError::Invalid {
        path: path.clone(),
        message,
    };
    let wp = WordPiece::from_file(&path.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| invalid(e.to_string()))?;
    let mut t = Tokenizer::new(wp);
    let lower = cfg.do_lower_case.unwrap_or(true);
    t.with_normalizer(Some(BertNormalizer::new(
        true,
        cfg.tokenize_chinese_chars.unwrap_or(true),
        cfg.strip_accents,
        lower,
    )))
    .map_err(|e| invalid(e.to_string()))?;
    t.with_pre_tokenizer(Some(BertPreTokenizer));
    let (cls, sep) = (
        special_id(&t, "[CLS]", &path)?,
        special_id(&t, "[SEP]", &path)?,
    );
    t.with_post_processor(Some(BertProcessing::new(
        ("[SEP]".into(), sep),
        ("[CLS]".into(), cls),
    )));
    t.with_decoder(Some(WordPieceDecoder::default()));
    let specials: Vec<AddedToken> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        .iter()
        .filter(|s| t.token_to_id(s).is_some())
        .map(|s| AddedToken::from(*s, true))
        .collect();
    t.add_special_tokens(specials)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(t)
}

/// RoBERTa's byte-level BPE tokenizer from `vocab.json` + `merges.txt`.
pub(crate) fn byte_level_bpe(dir: &Path) -> Result<Tokenizer> {
    let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
    let cfg = read_config(dir)?;
    let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
        .build()
        .map_err(|e| TextError::Invalid {
            path: vocab.clone(),
            message: e.to_string(),
        })?;
    let mut t = Tokenizer::new(bpe);
    let prefix = cfg.add_prefix_space.unwrap_or(false);
    t.with_pre_tokenizer(Some(ByteLevel::new(prefix, true, true)));
    let (cls, sep) = (
        special_id(&t, "<s>", &vocab)?,
        special_id(&t, "</s>", &vocab)?,
    );
    t.with_post_processor(Some(
        RobertaProcessing::new(("</s>".into(), sep), ("<s>".into(), cls))
            .trim_offsets(true)
            .add_prefix_space(prefix),
    ));
    t.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        .iter()
        .filter(|s| t.token_to_id(s).is_some())
        // RoBERTa's mask token swallows the space before it.
        .map(|s| AddedToken::from(*s, true).lstrip(*s == "<mask>"))
        .collect();
    t.add_special_tokens(specials)
        .map_err(|e| TextError::Invalid {
            path: vocab.clone(),
            message: e.to_string(),
        })?;
    Ok(t)
}
