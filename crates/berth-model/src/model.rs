//! A BERT-family encoder with its optional pooler and head, loaded from a Hugging Face
//! model directory.
//!
//! Shapes: `N` total tokens, `S` sequences, `H` hidden, `V` vocabulary, `C` classes.
//! `forward` is inference; `forward_train` adds transformers' training dropout when given a
//! [`Dropout`], and under autograd runs each encoder layer as one fused op whose weight
//! gradients [`Model::backward`] / [`Model::collect_grads`] gather.
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::batch::Batch;
use crate::config::{Arch, EncoderConfig};
use crate::dropout::Dropout;
use crate::encoder::{Embeddings, Layer};
use crate::error::{ModelError, Result};
use crate::heads::{Head, HeadKind, SequenceClassificationHead};
use crate::modules::{Linear, Precision};
use crate::names;
use crate::weights::{Param, Weights};

/// What loading found besides the model: what transformers would warn about.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Checkpoint keys no module used.
    pub unused: Vec<String>,
    /// The head `architectures` names but the checkpoint lacks, with the first missing key.
    pub missing_head: Option<(HeadKind, String)>,
}

/// Encoder + pooler + head. Cloning is cheap: tensors (and trainable variables) are shared.
#[derive(Clone)]
pub struct Model {
    /// The normalised config.
    pub config: EncoderConfig,
    /// The model directory.
    pub dir: PathBuf,
    /// Embeddings.
    pub embeddings: Embeddings,
    /// Encoder layers (BERT family; empty for ModernBERT).
    pub layers: Vec<Layer>,
    /// ModernBERT's layers, final norm and rotary tables (`None` for the BERT family).
    pub modern: Option<crate::modernbert::ModernStack>,
    /// ModernBERT's prediction head before the token-classification and QA classifiers
    /// (`head.dense` → activation → `head.norm`).
    pub transform: Option<crate::heads::ModernTransform>,
    /// BERT / RoBERTa pooler (`dense` + tanh on the first token), when the checkpoint has it.
    pub pooler: Option<Linear>,
    /// The head named by `architectures`, when the checkpoint has its weights.
    pub head: Option<Head>,
    /// BERT's sentence-pair head on the pooler (`cls.seq_relationship`, `[2, H]`), when the
    /// checkpoint has it (`BertForPreTraining`).
    pub seq_relationship: Option<Linear>,
    /// Trainable parameters by Hugging Face name (empty unless loaded trainable).
    pub params: Vec<Param>,
    /// Where the training path's fused encoder layers leave their weights' gradients
    /// until [`Self::collect_grads`] (shared by clones).
    grad_sink: berth_kernels::GradSink,
}

/// The base-model key prefix: from the class in `architectures` (a bare `*Model` has none,
/// a model with a head has `bert.` / `roberta.` / `distilbert.`); with no `architectures`,
/// from whether the checkpoint's keys carry the prefix, as transformers decides.
fn base_prefix(cfg: &EncoderConfig, w: &Weights) -> String {
    let prefixed = format!("{}.", cfg.arch.base_prefix());
    match cfg.architectures.first() {
        Some(class) if class.ends_with("Model") => String::new(),
        Some(_) => prefixed,
        None if w.keys().any(|k| k.starts_with(&prefixed)) => prefixed,
        None => String::new(),
    }
}

impl Model {
    /// Loads `dir/config.json` and the weights beside it. Missing encoder weights are an
    /// error; a missing head is reported in [`LoadReport`] and only fails when used.
    pub fn load(dir: &Path, trainable: bool) -> Result<(Self, LoadReport)> {
        let config = EncoderConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::from_dir(dir, trainable)?;
        Self::from_weights(config, w, dir)
    }

    /// Builds the model from a parsed config and loaded weights.
    pub fn from_weights(
        config: EncoderConfig,
        w: Weights,
        dir: &Path,
    ) -> Result<(Self, LoadReport)> {
        let p = base_prefix(&config, &w);
        let embeddings = Embeddings::load(&w, &config, &p)?;
        let (layers, modern) = match &config.modern {
            Some(m) => (
                Vec::new(),
                Some(crate::modernbert::ModernStack::load(&w, &config, m, &p)?),
            ),
            None => (
                (0..config.num_layers)
                    .map(|i| Layer::load(&w, &config, &p, i))
                    .collect::<Result<_>>()?,
                None,
            ),
        };
        let pooler_key = names::pooler(&p);
        let pooler = if !matches!(config.arch, Arch::DistilBert | Arch::ModernBert)
            && w.contains(&format!("{pooler_key}.weight"))
        {
            Some(Linear::load(
                &w,
                &pooler_key,
                config.hidden_size,
                config.hidden_size,
            )?)
        } else {
            None
        };
        let mut report = LoadReport::default();
        let kind = config
            .architectures
            .first()
            .and_then(|c| HeadKind::from_class_name(c));
        let head = match kind {
            None => None,
            Some(kind) => match Head::load(&w, &config, kind, &embeddings.word_embeddings) {
                Ok(h) => Some(h),
                Err(ModelError::WeightMissing { name, .. }) => {
                    report.missing_head = Some((kind, name));
                    None
                }
                Err(e) => return Err(e),
            },
        };
        let transform = match kind {
            Some(HeadKind::TokenClassification | HeadKind::QuestionAnswering)
                if config.modern.is_some() && head.is_some() =>
            {
                Some(crate::heads::ModernTransform::load(&w, &config)?)
            }
            _ => None,
        };
        let seq_relationship =
            if config.arch == Arch::Bert && w.contains("cls.seq_relationship.weight") {
                Some(Linear::load(
                    &w,
                    "cls.seq_relationship",
                    config.hidden_size,
                    2,
                )?)
            } else {
                None
            };
        report.unused = w.unused();
        let model = Model {
            params: w.params(),
            config,
            dir: dir.into(),
            embeddings,
            layers,
            modern,
            transform,
            pooler,
            head,
            seq_relationship,
            grad_sink: Default::default(),
        };
        Ok((model, report))
    }

    /// This model with its trainable variables as plain tensors (the same storage, no
    /// copy but the QKV fusion) and the same training products: a forward on it records no
    /// autograd graph. Evaluation during training runs on it — on the variables themselves
    /// every intermediate of a batch stays alive until the batch ends (about 1 GB for a
    /// batch of 8,192 MiniLM tokens), and the memory is faulted in afresh. A model loaded
    /// for inference (no variables) is returned as it is.
    pub fn detached(&self) -> Result<Model> {
        if self.params.is_empty() {
            return Ok(self.clone());
        }
        let mut tensors = std::collections::HashMap::with_capacity(self.params.len());
        for p in &self.params {
            tensors.insert(p.name.clone(), p.view(&p.var.as_tensor().detach())?);
        }
        let w = Weights::in_memory(tensors, self.dir.clone());
        let (mut model, _) = Self::from_weights(self.config.clone(), w, &self.dir)?;
        if let Some(p) = self.layers.first().map(|l| l.qkv.products) {
            model.set_train_products(p)?;
        }
        Ok(model)
    }

    /// Sets the number format of the encoder layers' matrix products (inference only: the
    /// bf16 copies of the weights do not follow training updates).
    pub fn set_precision(&mut self, p: Precision) -> Result<()> {
        if let Some(m) = &mut self.modern {
            m.set_precision(p)?;
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.set_precision(p)?;
            }
        }
        Ok(())
    }

    /// Sets the number format of the training path's matrix products (forward and
    /// backward) in the encoder layers and every head: [`berth_kernels::Products::Bf16`]
    /// is mixed-precision training — the weights, gradients and optimizer state stay f32.
    /// Refused for ModernBERT (its training path has no bf16 products yet) and on a CPU
    /// without a bf16 product.
    pub fn set_train_products(&mut self, p: berth_kernels::Products) -> Result<()> {
        if p == berth_kernels::Products::Bf16 {
            if self.modern.is_some() {
                return Err(ModelError::Input(
                    "bf16 training runs BERT, RoBERTa, DistilBERT and ELECTRA encoders; \
                     ModernBERT trains in f32 only (use --dtype f32)"
                        .into(),
                ));
            }
            if !berth_kernels::amx::bf16_available() {
                return Err(ModelError::Input(
                    "--dtype bf16 training needs a CPU with AMX bf16 tiles (and Linux 5.16+) \
                     or AVX-512; this machine has neither: use --dtype f32"
                        .into(),
                ));
            }
        }
        for layer in &mut self.layers {
            for lin in layer.linears_mut() {
                lin.products = p;
            }
        }
        for lin in [&mut self.pooler, &mut self.seq_relationship]
            .into_iter()
            .flatten()
        {
            lin.products = p;
        }
        if let Some(t) = &mut self.transform {
            t.dense.products = p;
        }
        if let Some(head) = &mut self.head {
            head.set_train_products(p);
        }
        Ok(())
    }

    /// The linear layers [`Self::set_precision`] packs, in order (what `berth quantize`
    /// stores in the lower precision).
    pub fn packed_linears(&self) -> Vec<&Linear> {
        if let Some(m) = &self.modern {
            return m.packed_linears();
        }
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.attn_out, &l.inter, &l.out])
            .collect()
    }

    /// Last hidden state `[N, H]` of a packed batch.
    pub fn forward(&self, batch: &Batch) -> Result<Tensor> {
        self.encode(batch, None, None)
    }

    /// [`Self::forward`] with transformers' training dropout when `d` is given.
    pub fn forward_train(&self, batch: &Batch, d: Option<&Dropout>) -> Result<Tensor> {
        self.encode(batch, d, None)
    }

    /// Rows `rows` of [`Self::forward_train`]'s output, `[rows.len(), H]`, for a loss that
    /// reads only those positions (first tokens, masked tokens). Under autograd the last
    /// layer computes only those rows (keys and values still over every token): the same
    /// values and gradients, about three quarters of the last layer's work saved.
    pub fn forward_train_rows(
        &self,
        batch: &Batch,
        d: Option<&Dropout>,
        rows: &[u32],
    ) -> Result<Tensor> {
        self.encode(batch, d, Some(rows))
    }

    /// Embeddings and encoder layers; with `rows`, only those rows of the output. Under
    /// autograd each layer is one fused op (no per-op gradient bookkeeping; its weights'
    /// gradients wait in the sink for `collect_grads`), the last computing only `rows`.
    fn encode(&self, batch: &Batch, d: Option<&Dropout>, rows: Option<&[u32]>) -> Result<Tensor> {
        // On a pool worker: short batches spend most of their time waking threads otherwise
        // (see `on_pool`). Training steps move there whole, dropout included.
        berth_kernels::on_pool(|| self.encode_on_worker(batch, d, rows))
    }

    fn encode_on_worker(
        &self,
        batch: &Batch,
        d: Option<&Dropout>,
        rows: Option<&[u32]>,
    ) -> Result<Tensor> {
        if batch.num_tokens() == 0 {
            return Err(ModelError::Input("empty batch".into()));
        }
        if let (Some(m), Some(settings)) = (&self.modern, &self.config.modern) {
            if d.is_some() && self.config.dropout.attention > 0.0 {
                return Err(ModelError::Input(format!(
                    "{}: attention_dropout {} — berth trains ModernBERT without attention \
                     dropout (its sliding-window kernel has none); set attention_dropout to 0 \
                     in config.json or pass --no-dropout",
                    self.config.path.display(),
                    self.config.dropout.attention
                )));
            }
            let x = self
                .embeddings
                .forward_train(batch, d, settings.embedding_dropout)?;
            let x = m.forward_train(x, batch, d)?;
            return match rows {
                Some(rows) => Self::select_rows(&x, rows),
                None => Ok(x),
            };
        }
        let mut x = self
            .embeddings
            .forward_train(batch, d, self.config.dropout.hidden)?;
        let fused = x.track_op();
        let cu = &batch.cu_seqlens;
        // A layer's Q, K, V projection when the previous layer's tail computed it.
        let mut qkv = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let last = i + 1 == self.layers.len();
            x = match (fused && layer.fusable(), rows) {
                (true, Some(rows)) if last => {
                    let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                    return layer.forward_fused_rows(&x, cu, d, &self.grad_sink, &rows);
                }
                (true, _) => layer.forward_fused(&x, cu, d, &self.grad_sink)?,
                (false, _) => {
                    let next = self.layers.get(i + 1);
                    let (y, next_qkv) = layer.forward_chained(&x, cu, d, qkv.take(), next)?;
                    qkv = next_qkv;
                    y
                }
            };
        }
        match rows {
            Some(rows) => Self::select_rows(&x, rows),
            None => Ok(x),
        }
    }

    /// The first token of each sequence of `batch` as row indices.
    pub fn first_token_rows(batch: &Batch) -> Vec<u32> {
        batch.cu_seqlens[..batch.num_sequences()]
            .iter()
            .map(|&i| i as u32)
            .collect()
    }

    /// Training: whether the word table's gradient leaves each backward as the rows the
    /// batch used ([`Self::take_word_grads`]) rather than as a dense `[V, H]` tensor in the
    /// `GradStore`. Returns whether it is on: it is refused (`false`) for a masked-LM head,
    /// whose decoder may share the table (its gradient is dense anyway).
    pub fn set_sparse_word_grads(&mut self, on: bool) -> bool {
        let on = on && !matches!(self.head, Some(Head::MaskedLm(_)));
        self.embeddings.row_grads = on.then(Default::default);
        on
    }

    /// The word table and the gradient rows of the backward passes since the last call
    /// (empty unless [`Self::set_sparse_word_grads`] is on).
    pub fn take_word_grads(&self) -> (Tensor, Vec<(Vec<u32>, Tensor)>) {
        let rows = match &self.embeddings.row_grads {
            Some(sink) => std::mem::take(&mut *sink.lock().expect("word-gradient sink poisoned")),
            None => Vec::new(),
        };
        (self.embeddings.word_embeddings.clone(), rows)
    }

    /// Moves the encoder weights' gradients left by the fused layers of a `backward()`
    /// into `grads`. Call after every backward through [`Self::forward_train`].
    pub fn collect_grads(&self, grads: &mut candle_core::backprop::GradStore) -> Result<()> {
        Ok(self.grad_sink.drain_into(grads)?)
    }

    /// Hands the fused layers' weight gradients of later backward passes to `listener`,
    /// one layer at a time as its backward finishes, instead of collecting them into the
    /// `GradStore` (`None`: collect them again). See [`Self::fused_weights`].
    pub fn set_grad_listener(&self, listener: Option<berth_kernels::GradListener>) {
        self.grad_sink.set_listener(listener);
    }

    /// The weights whose gradients a training backward hands to the grad listener: every
    /// fused layer's, last layer first (the order the backward reaches them), each layer's
    /// in [`berth_kernels::LayerWeights::tensors`] order.
    pub fn fused_weights(&self) -> Vec<Tensor> {
        self.layers
            .iter()
            .rev()
            .filter(|l| l.fusable())
            .flat_map(|l| l.fused_weights())
            .collect()
    }

    /// `loss.backward()` with this model's encoder gradients collected.
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = loss.backward()?;
        self.collect_grads(&mut grads)?;
        Ok(grads)
    }

    /// Rows `rows` of `hidden` (e.g. masked positions, or first tokens).
    pub fn select_rows(hidden: &Tensor, rows: &[u32]) -> Result<Tensor> {
        Ok(hidden.index_select(&Tensor::new(rows, &Device::Cpu)?, 0)?)
    }

    /// The first token of each sequence, `[S, H]`.
    pub fn first_tokens(hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        Self::select_rows(hidden, &Self::first_token_rows(batch))
    }

    /// Whether the checkpoint carries the weights of `head`.
    pub fn has_head(&self, head: HeadKind) -> bool {
        matches!(
            (&self.head, head),
            (Some(Head::MaskedLm(_)), HeadKind::MaskedLm)
                | (
                    Some(Head::SequenceClassification(_)),
                    HeadKind::SequenceClassification
                )
                | (
                    Some(Head::TokenClassification(_)),
                    HeadKind::TokenClassification
                )
                | (
                    Some(Head::QuestionAnswering(_)),
                    HeadKind::QuestionAnswering
                )
                | (
                    Some(Head::ReplacedTokenDetection { .. }),
                    HeadKind::ReplacedTokenDetection
                )
        )
    }

    /// The error for a task that needs `head`, which this model lacks.
    pub fn missing_head(&self, head: HeadKind) -> ModelError {
        self.missing(head.name())
    }

    fn missing(&self, head: &str) -> ModelError {
        ModelError::HeadMissing {
            dir: self.dir.clone(),
            head: head.into(),
            architectures: self.config.architectures.clone(),
        }
    }

    /// The pooler output `[S, H]` (tanh of a dense layer on each first token).
    pub fn pooler_output(&self, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        self.pool_first(&Self::first_tokens(hidden, batch)?)
    }

    /// The pooler on first-token states `[S, H]`.
    fn pool_first(&self, first: &Tensor) -> Result<Tensor> {
        let pooler = self.pooler.as_ref().ok_or_else(|| self.missing("pooler"))?;
        Ok(pooler.forward(first)?.tanh()?)
    }

    /// BERT's sentence-pair logits `[S, 2]` (`BertForPreTraining`'s `seq_relationship`
    /// on the pooled first token; class 0: B continues A / in order).
    pub fn sentence_pair_logits(&self, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        let head = self
            .seq_relationship
            .as_ref()
            .ok_or_else(|| self.missing("sentence-pair (cls.seq_relationship)"))?;
        head.forward(&self.pooler_output(hidden, batch)?)
    }

    /// Masked-LM logits `[R, V]` for `hidden [R, H]` (select the rows first: the vocabulary
    /// projection is the most expensive matmul, and only masked positions need it).
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(Head::MaskedLm(h)) => h.forward(hidden),
            _ => Err(self.missing(HeadKind::MaskedLm.name())),
        }
    }

    /// Sequence-classification logits `[S, C]`.
    pub fn sequence_logits(&self, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        self.sequence_logits_train(hidden, batch, None)
    }

    /// [`Self::sequence_logits`] with the head's training dropout when `d` is given.
    pub fn sequence_logits_train(
        &self,
        hidden: &Tensor,
        batch: &Batch,
        d: Option<&Dropout>,
    ) -> Result<Tensor> {
        self.sequence_logits_first(&self.sequence_states(hidden, batch)?, d)
    }

    /// Whether the sequence classifier reads the mean over each sequence (ModernBERT's
    /// `classifier_pooling: mean`) rather than its first token.
    fn mean_pooling(&self) -> bool {
        matches!(
            &self.head,
            Some(Head::SequenceClassification(
                SequenceClassificationHead::ModernBert {
                    mean_pooling: true,
                    ..
                }
            ))
        )
    }

    /// What the sequence classifier reads from `hidden [N, H]`: each sequence's first token,
    /// or its mean (ModernBERT's `classifier_pooling: mean`), `[S, H]`.
    pub fn sequence_states(&self, hidden: &Tensor, batch: &Batch) -> Result<Tensor> {
        if !self.mean_pooling() {
            return Self::first_tokens(hidden, batch);
        }
        let means = (0..batch.num_sequences())
            .map(|s| {
                let r = batch.range(s);
                hidden.narrow(0, r.start, r.len())?.mean_keepdim(0)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&means, 0)?)
    }

    /// [`Self::sequence_states`] of a training forward: with first-token pooling the last
    /// layer computes only the first tokens ([`Self::forward_train_rows`]).
    pub fn forward_train_sequences(&self, batch: &Batch, d: Option<&Dropout>) -> Result<Tensor> {
        if self.mean_pooling() {
            return self.sequence_states(&self.forward_train(batch, d)?, batch);
        }
        self.forward_train_rows(batch, d, &Self::first_token_rows(batch))
    }

    /// [`Self::sequence_logits_train`] from the pooled states `[S, H]` of
    /// [`Self::sequence_states`] or [`Self::forward_train_sequences`].
    pub fn sequence_logits_first(&self, first: &Tensor, d: Option<&Dropout>) -> Result<Tensor> {
        let p = self.config.dropout.sequence_classifier;
        let drop = |t: Tensor| match d {
            Some(d) => d.apply_sequences(&t, p),
            None => Ok(t),
        };
        let Some(Head::SequenceClassification(head)) = &self.head else {
            return Err(self.missing(HeadKind::SequenceClassification.name()));
        };
        match head {
            SequenceClassificationHead::Pooled { classifier } => {
                classifier.forward(&drop(self.pool_first(first)?)?)
            }
            SequenceClassificationHead::Roberta { dense, out_proj } => {
                let x = dense.forward(&drop(first.clone())?)?.tanh()?;
                out_proj.forward(&drop(x)?)
            }
            SequenceClassificationHead::Electra { dense, out_proj } => {
                let x = berth_kernels::activation(
                    &dense.forward(&drop(first.clone())?)?,
                    berth_kernels::Activation::Gelu,
                )?;
                out_proj.forward(&drop(x)?)
            }
            SequenceClassificationHead::DistilBert {
                pre_classifier,
                classifier,
            } => classifier.forward(&drop(pre_classifier.forward(first)?.relu()?)?),
            SequenceClassificationHead::ModernBert {
                transform,
                classifier,
                ..
            } => classifier.forward(&drop(transform.forward(first)?)?),
        }
    }

    /// Token-classification logits `[N, C]`.
    pub fn token_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.token_logits_train(hidden, None)
    }

    /// [`Self::token_logits`] with the head's training dropout when `d` is given (`hidden`:
    /// the selected token rows the loss reads, keyed as such; see [`Dropout::apply_selected`]).
    pub fn token_logits_train(&self, hidden: &Tensor, d: Option<&Dropout>) -> Result<Tensor> {
        let hidden = &self.classifier_input(hidden)?;
        match &self.head {
            Some(Head::TokenClassification(l)) => match d {
                Some(d) => {
                    l.forward(&d.apply_selected(hidden, self.config.dropout.token_classifier)?)
                }
                None => l.forward(hidden),
            },
            _ => Err(self.missing(HeadKind::TokenClassification.name())),
        }
    }

    /// What the token-classification and QA classifiers read: `hidden`, or ModernBERT's
    /// prediction head of it.
    fn classifier_input(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.transform {
            Some(t) => t.forward(hidden),
            None => Ok(hidden.clone()),
        }
    }

    /// Question-answering start and end logits, each `[N]`.
    pub fn qa_logits(&self, hidden: &Tensor) -> Result<(Tensor, Tensor)> {
        self.qa_logits_train(hidden, None)
    }

    /// [`Self::qa_logits`] with the head's training dropout (DistilBERT only) when `d` is given.
    pub fn qa_logits_train(
        &self,
        hidden: &Tensor,
        d: Option<&Dropout>,
    ) -> Result<(Tensor, Tensor)> {
        let hidden = &self.classifier_input(hidden)?;
        match &self.head {
            Some(Head::QuestionAnswering(l)) => {
                let hidden = match d {
                    Some(d) => d.apply(hidden, self.config.dropout.question_answering)?,
                    None => hidden.clone(),
                };
                let x = l.forward(&hidden)?; // [N, 2]
                Ok((
                    x.narrow(1, 0, 1)?.squeeze(1)?,
                    x.narrow(1, 1, 1)?.squeeze(1)?,
                ))
            }
            _ => Err(self.missing(HeadKind::QuestionAnswering.name())),
        }
    }

    /// ELECTRA discriminator logits `[N]` for `hidden [N, H]` (positive: replaced).
    pub fn replaced_token_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.head {
            Some(Head::ReplacedTokenDetection {
                dense,
                activation,
                prediction,
            }) => {
                let x = berth_kernels::activation(&dense.forward(hidden)?, *activation)?;
                Ok(prediction.forward(&x)?.squeeze(1)?)
            }
            _ => Err(self.missing(HeadKind::ReplacedTokenDetection.name())),
        }
    }

    /// Number of distinct parameters (the tied decoder counted once).
    pub fn num_parameters(&self) -> usize {
        if let (Some(stack), Some(m)) = (&self.modern, &self.config.modern) {
            // Bias-free modules hold zero biases that are not parameters.
            let norm = |n: &crate::modules::LayerNorm| {
                n.weight.elem_count() + if m.norm_bias { n.bias.elem_count() } else { 0 }
            };
            let dense = |l: &Linear| {
                l.weight.elem_count()
                    + if m.classifier_bias {
                        l.bias.elem_count()
                    } else {
                        0
                    }
            };
            let transform = |t: &crate::heads::ModernTransform| dense(&t.dense) + norm(&t.norm);
            let lin = |l: &Linear| l.weight.elem_count() + l.bias.elem_count();
            let head = match &self.head {
                Some(Head::MaskedLm(h)) => {
                    dense(&h.dense)
                        + norm(&h.layer_norm)
                        + if m.decoder_bias {
                            h.bias.elem_count()
                        } else {
                            0
                        }
                        + if self.config.tie_word_embeddings {
                            0
                        } else {
                            h.decoder.elem_count()
                        }
                }
                Some(Head::SequenceClassification(SequenceClassificationHead::ModernBert {
                    transform: t,
                    classifier,
                    ..
                })) => transform(t) + lin(classifier),
                Some(Head::TokenClassification(l) | Head::QuestionAnswering(l)) => {
                    self.transform.as_ref().map_or(0, transform) + lin(l)
                }
                _ => 0,
            };
            return self.embeddings.word_embeddings.elem_count()
                + norm(&self.embeddings.layer_norm)
                + stack.num_parameters(m)
                + head;
        }
        let lin = |l: &Linear| l.weight.elem_count() + l.bias.elem_count();
        let ln = |l: &crate::modules::LayerNorm| l.weight.elem_count() + l.bias.elem_count();
        let e = &self.embeddings;
        let mut n = e.word_embeddings.elem_count()
            + e.position_embeddings.as_ref().map_or(0, |t| t.elem_count())
            + ln(&e.layer_norm);
        n += e
            .token_type_embeddings
            .as_ref()
            .map_or(0, |t| t.elem_count());
        for l in &self.layers {
            n += lin(&l.qkv)
                + lin(&l.attn_out)
                + ln(&l.attn_ln)
                + lin(&l.inter)
                + lin(&l.out)
                + ln(&l.out_ln);
        }
        n += self.pooler.as_ref().map_or(0, lin);
        n += match &self.head {
            None => 0,
            Some(Head::MaskedLm(h)) => {
                let dec = if self.config.tie_word_embeddings {
                    0
                } else {
                    h.decoder.elem_count()
                };
                lin(&h.dense) + ln(&h.layer_norm) + dec + h.bias.elem_count()
            }
            Some(Head::SequenceClassification(SequenceClassificationHead::Pooled {
                classifier,
            })) => lin(classifier),
            Some(Head::SequenceClassification(
                SequenceClassificationHead::Roberta { dense, out_proj }
                | SequenceClassificationHead::Electra { dense, out_proj },
            )) => lin(dense) + lin(out_proj),
            Some(Head::ReplacedTokenDetection {
                dense, prediction, ..
            }) => lin(dense) + lin(prediction),
            Some(Head::SequenceClassification(SequenceClassificationHead::DistilBert {
                pre_classifier,
                classifier,
            })) => lin(pre_classifier) + lin(classifier),
            // Counted by the ModernBERT branch above.
            Some(Head::SequenceClassification(SequenceClassificationHead::ModernBert {
                ..
            })) => 0,
            Some(Head::TokenClassification(l)) | Some(Head::QuestionAnswering(l)) => lin(l),
        };
        n
    }
}
