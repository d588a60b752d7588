//! Task heads. Each returns logits; softmax belongs to the caller.
//!
//! Shapes: `N` tokens, `S` sequences, `H` hidden, `V` vocabulary, `C` classes.
use berth_kernels::Activation;
use candle_core::Tensor;

use crate::config::{Arch, EncoderConfig};
use crate::error::Result;
use crate::modules::{LayerNorm, Linear};
use crate::names;
use crate::weights::Weights;

/// Which head a checkpoint carries, from the class name in `architectures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// `*ForMaskedLM` (and BERT's `*ForPreTraining`, whose NSP part is not used).
    MaskedLm,
    /// `*ForSequenceClassification`.
    SequenceClassification,
    /// `*ForTokenClassification`.
    TokenClassification,
    /// `*ForQuestionAnswering`.
    QuestionAnswering,
    /// `ElectraForPreTraining`: the discriminator's replaced-token-detection logit per token.
    ReplacedTokenDetection,
}

impl HeadKind {
    /// The head named by a transformers class name; `None` for a bare encoder (`*Model`).
    pub fn from_class_name(class: &str) -> Option<Self> {
        if class == "ElectraForPreTraining" {
            Some(Self::ReplacedTokenDetection)
        } else if class.ends_with("ForMaskedLM") || class.ends_with("ForPreTraining") {
            Some(Self::MaskedLm)
        } else if class.ends_with("ForSequenceClassification") {
            Some(Self::SequenceClassification)
        } else if class.ends_with("ForTokenClassification") {
            Some(Self::TokenClassification)
        } else if class.ends_with("ForQuestionAnswering") {
            Some(Self::QuestionAnswering)
        } else {
            None
        }
    }

    /// Human name used in messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::MaskedLm => "masked-LM",
            Self::SequenceClassification => "sequence-classification",
            Self::TokenClassification => "token-classification",
            Self::QuestionAnswering => "question-answering",
            Self::ReplacedTokenDetection => "replaced-token-detection",
        }
    }
}

/// Masked-LM head: dense → activation → LayerNorm → decoder (tied or not) + bias.
#[derive(Debug, Clone)]
pub struct MaskedLmHead {
    /// Transform `[H, H]`.
    pub dense: Linear,
    /// Transform activation (RoBERTa's head always uses erf GELU).
    pub activation: Activation,
    /// Transform LayerNorm.
    pub layer_norm: LayerNorm,
    /// Decoder `[V, H]`: the word embeddings when tied.
    pub decoder: Tensor,
    /// Decoder bias `[V]`.
    pub bias: Tensor,
    /// The number format of the decoder's products in training (`dense` has its own).
    pub products: berth_kernels::Products,
}

impl MaskedLmHead {
    fn load(w: &Weights, cfg: &EncoderConfig, word_embeddings: &Tensor) -> Result<Self> {
        let [dense, ln, decoder, bias] = names::mlm_head(cfg.arch);
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let decoder = if cfg.tie_word_embeddings {
            // transformers ties even when the file also holds a copy: mark it used.
            if w.contains(decoder) {
                w.mark_used(decoder, &[v, h])?;
            }
            word_embeddings.clone()
        } else {
            w.get(decoder, &[v, h])?
        };
        if let Some(m) = &cfg.modern {
            // ModernBERT: biases as the config says, the classifier activation.
            return Ok(MaskedLmHead {
                dense: Linear::load_with_bias(w, dense, h, h, m.classifier_bias)?,
                activation: m.classifier_activation,
                layer_norm: LayerNorm::load_with_bias(w, ln, h, cfg.layer_norm_eps, m.norm_bias)?,
                bias: if m.decoder_bias {
                    w.get(bias, &[v])?
                } else {
                    Tensor::zeros(v, decoder.dtype(), decoder.device())?
                },
                decoder,
                products: Default::default(),
            });
        }
        Ok(MaskedLmHead {
            dense: Linear::load(w, dense, h, h)?,
            // RoBERTa's head and ELECTRA's generator always use erf GELU.
            activation: if matches!(cfg.arch, Arch::Roberta | Arch::Electra) {
                Activation::Gelu
            } else {
                cfg.activation
            },
            layer_norm: LayerNorm::load(w, ln, h, cfg.layer_norm_eps)?,
            decoder,
            bias: w.get(bias, &[v])?,
            products: Default::default(),
        })
    }

    /// `hidden [R, H]` (only the rows that need predictions) → `[R, V]`.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let x = berth_kernels::activation(&self.dense.forward(hidden)?, self.activation)?;
        let x = self.layer_norm.forward(&x)?;
        Ok(berth_kernels::linear_with(
            &x,
            &self.decoder,
            &self.bias,
            self.products,
        )?)
    }
}

/// ModernBERT's prediction head before its classifiers (`head`): dense → activation → norm.
#[derive(Debug, Clone)]
pub struct ModernTransform {
    /// `[H, H]` (bias per `classifier_bias`).
    pub dense: Linear,
    /// `classifier_activation`.
    pub activation: Activation,
    /// LayerNorm (bias per `norm_bias`).
    pub norm: LayerNorm,
}

impl ModernTransform {
    /// Loads `head.dense` and `head.norm`.
    pub(crate) fn load(w: &Weights, cfg: &EncoderConfig) -> Result<Self> {
        let m = cfg.modern.as_ref().expect("a ModernBERT config");
        let h = cfg.hidden_size;
        Ok(ModernTransform {
            dense: Linear::load_with_bias(w, "head.dense", h, h, m.classifier_bias)?,
            activation: m.classifier_activation,
            norm: LayerNorm::load_with_bias(w, "head.norm", h, cfg.layer_norm_eps, m.norm_bias)?,
        })
    }

    /// `x [R, H]` → `[R, H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = berth_kernels::activation(&self.dense.forward(x)?, self.activation)?;
        self.norm.forward(&x)
    }
}

/// Sequence classification on the first token of each sequence.
#[derive(Debug, Clone)]
pub enum SequenceClassificationHead {
    /// BERT: the pooler's output → `classifier`.
    Pooled {
        /// `[C, H]`.
        classifier: Linear,
    },
    /// RoBERTa: first token → `classifier.dense` → tanh → `classifier.out_proj`.
    Roberta {
        /// `[H, H]`.
        dense: Linear,
        /// `[C, H]`.
        out_proj: Linear,
    },
    /// ELECTRA: first token → `classifier.dense` → GELU → `classifier.out_proj`.
    Electra {
        /// `[H, H]`.
        dense: Linear,
        /// `[C, H]`.
        out_proj: Linear,
    },
    /// DistilBERT: first token → `pre_classifier` → ReLU → `classifier`.
    DistilBert {
        /// `[H, H]`.
        pre_classifier: Linear,
        /// `[C, H]`.
        classifier: Linear,
    },
    /// ModernBERT: first token or mean over the sequence (`classifier_pooling`) → `head`
    /// → `classifier`.
    ModernBert {
        /// The prediction head.
        transform: ModernTransform,
        /// `[C, H]`.
        classifier: Linear,
        /// Mean over the sequence's tokens instead of its first token.
        mean_pooling: bool,
    },
}

/// A loaded head.
#[derive(Debug, Clone)]
pub enum Head {
    /// Masked-LM.
    MaskedLm(MaskedLmHead),
    /// Sequence classification / regression.
    SequenceClassification(SequenceClassificationHead),
    /// Per-token classification `[C, H]`.
    TokenClassification(Linear),
    /// Start / end logits `[2, H]`.
    QuestionAnswering(Linear),
    /// ELECTRA's discriminator: `dense` → the config's activation → `dense_prediction`
    /// (one logit per token: replaced or original).
    ReplacedTokenDetection {
        /// `[H, H]`.
        dense: Linear,
        /// The config's `hidden_act`.
        activation: Activation,
        /// `[1, H]`.
        prediction: Linear,
    },
}

impl Head {
    /// Sets the number format of every product of the head's training path.
    pub fn set_train_products(&mut self, p: berth_kernels::Products) {
        use SequenceClassificationHead as S;
        let linears: Vec<&mut Linear> = match self {
            Head::MaskedLm(m) => {
                m.products = p;
                vec![&mut m.dense]
            }
            Head::SequenceClassification(s) => match s {
                S::Pooled { classifier } => vec![classifier],
                S::Roberta { dense, out_proj } | S::Electra { dense, out_proj } => {
                    vec![dense, out_proj]
                }
                S::DistilBert {
                    pre_classifier,
                    classifier,
                } => vec![pre_classifier, classifier],
                S::ModernBert {
                    transform,
                    classifier,
                    ..
                } => vec![&mut transform.dense, classifier],
            },
            Head::TokenClassification(l) | Head::QuestionAnswering(l) => vec![l],
            Head::ReplacedTokenDetection {
                dense, prediction, ..
            } => vec![dense, prediction],
        };
        for l in linears {
            l.products = p;
        }
    }

    /// Loads the head of `kind`; `classes` is the label count of classification heads.
    pub(crate) fn load(
        w: &Weights,
        cfg: &EncoderConfig,
        kind: HeadKind,
        word_embeddings: &Tensor,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        // transformers' default is two labels when config.json names none.
        let classes = if cfg.id2label.is_empty() {
            2
        } else {
            cfg.id2label.len()
        };
        if cfg.modern.is_some() && kind == HeadKind::ReplacedTokenDetection {
            return Err(crate::error::ModelError::Config {
                path: cfg.path.clone(),
                message: format!("ModernBERT has no {} head", kind.name()),
            });
        }
        Ok(match kind {
            HeadKind::MaskedLm => Head::MaskedLm(MaskedLmHead::load(w, cfg, word_embeddings)?),
            HeadKind::SequenceClassification => Head::SequenceClassification(match cfg.arch {
                Arch::Bert => SequenceClassificationHead::Pooled {
                    classifier: Linear::load(w, "classifier", h, classes)?,
                },
                Arch::Roberta => SequenceClassificationHead::Roberta {
                    dense: Linear::load(w, "classifier.dense", h, h)?,
                    out_proj: Linear::load(w, "classifier.out_proj", h, classes)?,
                },
                Arch::Electra => SequenceClassificationHead::Electra {
                    dense: Linear::load(w, "classifier.dense", h, h)?,
                    out_proj: Linear::load(w, "classifier.out_proj", h, classes)?,
                },
                Arch::DistilBert => SequenceClassificationHead::DistilBert {
                    pre_classifier: Linear::load(w, "pre_classifier", h, h)?,
                    classifier: Linear::load(w, "classifier", h, classes)?,
                },
                Arch::ModernBert => SequenceClassificationHead::ModernBert {
                    transform: ModernTransform::load(w, cfg)?,
                    classifier: Linear::load(w, "classifier", h, classes)?,
                    mean_pooling: cfg
                        .modern
                        .as_ref()
                        .is_some_and(|m| m.classifier_mean_pooling),
                },
            }),
            HeadKind::TokenClassification => {
                Head::TokenClassification(Linear::load(w, "classifier", h, classes)?)
            }
            // ModernBERT's QA outputs are its `classifier` (after the transform the model
            // keeps, see `Model::transform`).
            HeadKind::QuestionAnswering if cfg.arch == Arch::ModernBert => {
                Head::QuestionAnswering(Linear::load(w, "classifier", h, 2)?)
            }
            HeadKind::QuestionAnswering => {
                Head::QuestionAnswering(Linear::load(w, "qa_outputs", h, 2)?)
            }
            HeadKind::ReplacedTokenDetection => Head::ReplacedTokenDetection {
                dense: Linear::load(w, "discriminator_predictions.dense", h, h)?,
                activation: cfg.activation,
                prediction: Linear::load(w, "discriminator_predictions.dense_prediction", h, 1)?,
            },
        })
    }

    /// Which kind this is.
    pub fn kind(&self) -> HeadKind {
        match self {
            Head::MaskedLm(_) => HeadKind::MaskedLm,
            Head::SequenceClassification(_) => HeadKind::SequenceClassification,
            Head::TokenClassification(_) => HeadKind::TokenClassification,
            Head::QuestionAnswering(_) => HeadKind::QuestionAnswering,
            Head::ReplacedTokenDetection { .. } => HeadKind::ReplacedTokenDetection,
        }
    }
}
