//! The one mapping table from module to checkpoint key, per architecture.
//!
//! BERT and RoBERTa share transformers' `BertModel` key tree; DistilBERT has its own.
//! `p` is the base-model prefix with its dot (`"bert."`, or `""` for a bare base model).
use crate::config::Arch;

/// Keys of one encoder layer (each a module path; append `.weight` / `.bias`).
pub(crate) struct LayerKeys {
    pub query: String,
    pub key: String,
    pub value: String,
    pub attn_out: String,
    pub attn_ln: String,
    pub inter: String,
    pub out: String,
    pub out_ln: String,
}

pub(crate) fn word_embeddings(p: &str) -> String {
    format!("{p}embeddings.word_embeddings.weight")
}

pub(crate) fn position_embeddings(p: &str) -> String {
    format!("{p}embeddings.position_embeddings.weight")
}

pub(crate) fn token_type_embeddings(p: &str) -> String {
    format!("{p}embeddings.token_type_embeddings.weight")
}

pub(crate) fn embeddings_ln(p: &str) -> String {
    format!("{p}embeddings.LayerNorm")
}

pub(crate) fn pooler(p: &str) -> String {
    format!("{p}pooler.dense")
}

pub(crate) fn layer(arch: Arch, p: &str, i: usize) -> LayerKeys {
    match arch {
        Arch::Bert | Arch::Roberta | Arch::Electra => {
            let l = format!("{p}encoder.layer.{i}");
            LayerKeys {
                query: format!("{l}.attention.self.query"),
                key: format!("{l}.attention.self.key"),
                value: format!("{l}.attention.self.value"),
                attn_out: format!("{l}.attention.output.dense"),
                attn_ln: format!("{l}.attention.output.LayerNorm"),
                inter: format!("{l}.intermediate.dense"),
                out: format!("{l}.output.dense"),
                out_ln: format!("{l}.output.LayerNorm"),
            }
        }
        Arch::DistilBert => {
            let l = format!("{p}transformer.layer.{i}");
            LayerKeys {
                query: format!("{l}.attention.q_lin"),
                key: format!("{l}.attention.k_lin"),
                value: format!("{l}.attention.v_lin"),
                attn_out: format!("{l}.attention.out_lin"),
                attn_ln: format!("{l}.sa_layer_norm"),
                inter: format!("{l}.ffn.lin1"),
                out: format!("{l}.ffn.lin2"),
                out_ln: format!("{l}.output_layer_norm"),
            }
        }
        Arch::ModernBert => {
            unreachable!("ModernBERT layers are loaded by crate::modernbert with their own keys")
        }
    }
}

/// Keys of the masked-LM head: (transform dense, transform LayerNorm, decoder, decoder bias).
pub fn mlm_head(arch: Arch) -> [&'static str; 4] {
    match arch {
        Arch::Bert => [
            "cls.predictions.transform.dense",
            "cls.predictions.transform.LayerNorm",
            "cls.predictions.decoder.weight",
            "cls.predictions.bias",
        ],
        Arch::Roberta => [
            "lm_head.dense",
            "lm_head.layer_norm",
            "lm_head.decoder.weight",
            "lm_head.bias",
        ],
        Arch::Electra => [
            "generator_predictions.dense",
            "generator_predictions.LayerNorm",
            "generator_lm_head.weight",
            "generator_lm_head.bias",
        ],
        Arch::DistilBert => [
            "vocab_transform",
            "vocab_layer_norm",
            "vocab_projector.weight",
            "vocab_projector.bias",
        ],
        Arch::ModernBert => ["head.dense", "head.norm", "decoder.weight", "decoder.bias"],
    }
}
