//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias correction), with
//! gradient accumulation and global-norm clipping as the Hugging Face Trainer does them.
use std::collections::HashMap;

use berth_model::Param;
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

use rayon::prelude::*;

use crate::error::{Result, TrainError};

/// Elements per parallel chunk of the element-wise loops.
const CHUNK: usize = 1 << 16;

/// AdamW hyper-parameters (torch's defaults; the Trainer's weight decay default is 0).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay for weights (not biases or LayerNorm weights).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Whether `name` is a LayerNorm weight (initialised to one, never weight-decayed): BERT's
/// `LayerNorm`, DistilBERT's `*_layer_norm`, ModernBERT's `norm` / `*_norm`.
pub(crate) fn is_norm_weight(name: &str) -> bool {
    let module = name.strip_suffix(".weight").unwrap_or(name);
    let last = module.rsplit('.').next().unwrap_or(module);
    last.to_ascii_lowercase().ends_with("norm")
}

/// Whether weight decay applies to a parameter, by its Hugging Face name: not to biases
/// nor LayerNorm weights (the Trainer's `get_decay_parameter_names`, which skips every
/// `nn.LayerNorm`: BERT's `LayerNorm`, DistilBERT's `*_layer_norm`, ModernBERT's `norm` and
/// `*_norm`).
pub fn decays(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    !(name.ends_with(".bias")
        || lower.contains("layernorm")
        || lower.contains("layer_norm")
        || is_norm_weight(name))
}

/// A word table's gradient of a backward as the rows the batches used (see
/// `berth_model::Model::set_sparse_word_grads`): `(token ids, [N, H] rows)` per lookup, in
/// the order the backward reached the lookups.
pub struct RowGrads {
    /// The table (a trained variable).
    pub table: Tensor,
    /// The lookups' gradient rows.
    pub rows: Vec<(Vec<u32>, Tensor)>,
}

/// The gradients of one backward: dense ones by variable, and word tables' rows.
pub struct Grads {
    /// Dense gradients.
    pub dense: GradStore,
    /// Row gradients of word tables (empty unless sparse word gradients are on).
    pub rows: Vec<RowGrads>,
}

/// One optimised variable (a fused variable is one slot).
struct Slot {
    /// Name of its first parameter (names optimizer state on disk).
    name: String,
    var: Var,
    decay: bool,
    /// The accumulated gradient; zeros while `lent` holds it or the slot is untouched.
    grad: Vec<f32>,
    /// A dense slot's only gradient since the last step, as the backward's own tensor and
    /// the factor clipping scaled it by: the norm and the step read it where it lies
    /// instead of copying it into `grad`, scaling it there and zeroing it after the step
    /// (up to three passes over every weight's gradient per step).
    lent: Option<(Tensor, f32)>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Whether a gradient arrived since the last step.
    touched: bool,
    /// A word table fed by row gradients: which rows the norm and the step must visit.
    rows: Option<Rows>,
}

/// The rows of a word table fed by [`AdamW::accumulate_rows`] that can hold anything but
/// zeros. A row with no gradient and no moments is left as it is by an AdamW step without
/// weight decay (its moments stay zero, its update is `0 / ε`), and adds nothing to the
/// gradient norm, so the norm and the step visit only the others — the same bits.
struct Rows {
    width: usize,
    /// Rows whose moments may be non-zero.
    live: Vec<bool>,
    /// Rows with a gradient since the last step (`fresh` lists them).
    has_grad: Vec<bool>,
    fresh: Vec<u32>,
    /// A dense gradient arrived since the last step: any row may have one.
    dense: bool,
}

impl Rows {
    /// The rows of `m` and `v` (`width` values each) holding anything but zeros.
    fn scan(m: &[f32], v: &[f32], width: usize) -> Self {
        let nonzero = |x: &[f32]| x.iter().any(|v| v.to_bits() != 0);
        let live: Vec<bool> = m
            .chunks(width)
            .zip(v.chunks(width))
            .map(|(m, v)| nonzero(m) || nonzero(v))
            .collect();
        Rows {
            width,
            has_grad: vec![false; live.len()],
            live,
            fresh: Vec::new(),
            dense: false,
        }
    }

    /// After a step: the rows that had a gradient have moments; none has a gradient.
    fn stepped(&mut self) {
        if self.dense {
            self.live.fill(true);
        }
        for &r in &self.fresh {
            self.live[r as usize] = true;
        }
        self.cleared();
    }

    /// The gradients were cleared.
    fn cleared(&mut self) {
        for &r in &self.fresh {
            self.has_grad[r as usize] = false;
        }
        self.fresh.clear();
        self.dense = false;
    }
}

/// AdamW over a model's parameters, with a gradient accumulator.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Optimizer steps taken.
    pub step: u64,
}

impl AdamW {
    /// An optimizer for `params`; variables shared by several parameters (fused QKV) are
    /// one slot, and decay only when every name they carry decays.
    pub fn new(params: &[Param], cfg: AdamWConfig) -> Self {
        let mut slots: Vec<Slot> = Vec::new();
        let mut index: HashMap<candle_core::TensorId, usize> = HashMap::new();
        for p in params {
            let id = p.var.as_tensor().id();
            match index.get(&id) {
                Some(&i) => slots[i].decay &= decays(&p.name),
                None => {
                    let n = p.var.as_tensor().elem_count();
                    index.insert(id, slots.len());
                    slots.push(Slot {
                        name: p.name.clone(),
                        var: p.var.clone(),
                        decay: decays(&p.name),
                        grad: vec![0.0; n],
                        lent: None,
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                        touched: false,
                        rows: None,
                    });
                }
            }
        }
        AdamW {
            cfg,
            slots,
            step: 0,
        }
    }

    /// Adds `scale ×` the gradients of `grads` to the accumulator. An untouched slot's
    /// accumulator holds zeros (the step and `zero_grad` clear it), so its first gradient
    /// is written rather than added: one pass fewer over the gradient, the same sums. An
    /// untouched dense slot given its gradient at scale 1 keeps the tensor instead
    /// ([`Slot::lent`]): no pass at all until a second gradient arrives.
    pub fn accumulate(&mut self, grads: &GradStore, scale: f32) -> Result<()> {
        for s in &mut self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                if !s.touched && scale == 1.0 && s.rows.is_none() {
                    let g = g.contiguous()?;
                    if g.dtype() != candle_core::DType::F32 || g.elem_count() != s.grad.len() {
                        return Err(TrainError::Config(format!(
                            "{}: a {:?} gradient of {} values for {} weights",
                            s.name,
                            g.dtype(),
                            g.elem_count(),
                            s.grad.len()
                        )));
                    }
                    s.lent = Some((g, 1.0));
                    s.touched = true;
                    continue;
                }
                s.settle()?;
                let how = if s.touched { Store::Add } else { Store::Write };
                add_scaled(&mut s.grad, g, scale, true, how)?;
                s.touched = true;
                if let Some(r) = &mut s.rows {
                    r.dense = true;
                }
            }
        }
        Ok(())
    }

    /// [`Self::accumulate`] of the dense gradients and [`Self::accumulate_rows`] of the
    /// row gradients of one backward.
    pub fn accumulate_grads(&mut self, g: &Grads, scale: f32) -> Result<()> {
        self.accumulate(&g.dense, scale)?;
        for r in &g.rows {
            self.accumulate_rows(r, scale)?;
        }
        Ok(())
    }

    /// Adds `scale ×` a word table's row gradients to its accumulator, with the same bits as
    /// [`Self::accumulate`] of the dense gradient candle's `index_select` backward builds
    /// (each table row: zero, plus every row that looked it up, in lookup and position
    /// order; then stored as a dense gradient is) but touching only those rows — no
    /// table-sized tensor is built, copied or read.
    pub fn accumulate_rows(&mut self, g: &RowGrads, scale: f32) -> Result<()> {
        if g.rows.is_empty() {
            return Ok(());
        }
        let id = g.table.id();
        let Some(s) = self.slots.iter_mut().find(|s| s.var.as_tensor().id() == id) else {
            // A table no optimizer slot holds (frozen): nothing to accumulate.
            return Ok(());
        };
        let (vocab, h) = g.table.dims2()?;
        let mut at: HashMap<u32, usize> = HashMap::new();
        let mut order: Vec<u32> = Vec::new();
        let mut sums: Vec<f32> = Vec::new();
        for (ids, rows) in &g.rows {
            let rows = rows.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
            if rows.len() != ids.len() * h || ids.iter().any(|&i| i as usize >= vocab) {
                return Err(TrainError::Config(format!(
                    "{}: {} gradient values for {} looked-up rows of a {vocab} x {h} table",
                    s.name,
                    rows.len(),
                    ids.len()
                )));
            }
            for (j, &row) in ids.iter().enumerate() {
                let k = *at.entry(row).or_insert_with(|| {
                    sums.resize(sums.len() + h, 0.0);
                    order.push(row);
                    order.len() - 1
                });
                for (a, &b) in sums[k * h..(k + 1) * h].iter_mut().zip(&rows[j * h..]) {
                    *a += b;
                }
            }
        }
        // A dense gradient this step, before the table's first rows: any row may have one.
        let had_dense = s.touched && s.rows.is_none();
        s.settle()?;
        let rows = s.rows.get_or_insert_with(|| Rows::scan(&s.m, &s.v, h));
        rows.dense |= had_dense;
        for &row in &order {
            if !std::mem::replace(&mut rows.has_grad[row as usize], true) {
                rows.fresh.push(row);
            }
        }
        let how = if s.touched { Store::Add } else { Store::Write };
        for (k, &row) in order.iter().enumerate() {
            let dst = &mut s.grad[row as usize * h..(row as usize + 1) * h];
            let src = &sums[k * h..(k + 1) * h];
            match how {
                Store::Add => dst.iter_mut().zip(src).for_each(|(a, &b)| *a += scale * b),
                Store::Write => dst.iter_mut().zip(src).for_each(|(a, &b)| *a = scale * b),
            }
        }
        s.touched = true;
        Ok(())
    }

    /// Sums the accumulated gradients over the ranks of `collective`, slot by slot in a
    /// fixed order (with one process: nothing to do).
    pub fn all_reduce(&mut self, collective: &dyn crate::dist::Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        for s in &mut self.slots {
            s.settle()?;
            collective.all_reduce_sum(&mut s.grad)?;
            // Other ranks' rows arrive with the sum.
            if let Some(r) = &mut s.rows {
                r.dense = true;
            }
        }
        Ok(())
    }

    /// Marks as touched, on every rank, the variables a gradient reached on any rank: a
    /// rank whose share of a batch had nothing to learn from (an empty share, no masked
    /// token) still steps the variables the others' gradients reached — else its weights
    /// would drift from theirs. Variables no rank reached stay untouched (not stepped).
    pub fn touched_anywhere(&mut self, collective: &dyn crate::dist::Collective) -> Result<()> {
        if collective.world_size() == 1 {
            return Ok(());
        }
        let mine: Vec<u8> = self.slots.iter().map(|s| u8::from(s.touched)).collect();
        let all = collective.gather_all(&mine)?;
        for (i, s) in self.slots.iter_mut().enumerate() {
            s.touched = all.iter().any(|flags| flags.get(i) == Some(&1));
        }
        Ok(())
    }

    /// [`Self::accumulate`] (scale 1) of one more backward pass, then [`Self::all_reduce`] —
    /// the sums running on a second thread while the backward goes on. `listen` installs
    /// a listener on the networks' fused layers (see `berth_model::Model::set_grad_listener`)
    /// and `backward` runs the pass (`None`: this rank has no loss to back-propagate); each
    /// layer's gradients go to the summing thread as that layer's backward finishes, the
    /// rest (embeddings, heads) when the pass is done; a fused weight used in `passes`
    /// forward passes gets that many gradients, summed before it is. The thread adds each gradient to its
    /// slot and sums the slots over the ranks in one fixed order — the slots of `early`
    /// (the fused weights, in the order the backward reaches them) first, then every other
    /// slot in slot order — whatever arrives when, so every rank makes the same calls. Each
    /// slot is summed alone as [`Self::all_reduce`] sums it: the same bits. Returns the time
    /// the summing thread spent in sums and the time this thread waited for it after the
    /// backward (the communication the backward did not hide).
    pub fn backward_summed(
        &mut self,
        sum: &dyn crate::dist::BackgroundSum,
        early: &[Tensor],
        passes: usize,
        listen: &dyn Fn(Option<berth_kernels::GradListener>),
        backward: impl FnOnce() -> Result<Option<GradStore>>,
    ) -> Result<(std::time::Duration, std::time::Duration)> {
        use std::sync::mpsc;
        let index: HashMap<candle_core::TensorId, usize> = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.var.as_tensor().id(), i))
            .collect();
        let n = self.slots.len();
        let mut order: Vec<usize> = Vec::with_capacity(n);
        let mut queued = vec![false; n];
        for t in early {
            if let Some(&i) = index.get(&t.id()) {
                if !std::mem::replace(&mut queued[i], true) {
                    order.push(i);
                }
            }
        }
        order.extend((0..n).filter(|&i| !queued[i]));
        // Deliveries a slot waits for: one per pass for the fused weights, one for the rest.
        let mut want: Vec<usize> = queued.iter().map(|&q| if q { passes } else { 1 }).collect();
        for s in &mut self.slots {
            s.settle()?;
        }
        let mut bufs: Vec<Vec<f32>> = self
            .slots
            .iter_mut()
            .map(|s| std::mem::take(&mut s.grad))
            .collect();
        let (tx, rx) = mpsc::channel::<(usize, Tensor)>();
        let index = std::sync::Arc::new(index);
        let (outcome, got, summing, waited, failed) = std::thread::scope(|scope| {
            let worker = scope.spawn(move || {
                let mut arrived: Vec<Option<Tensor>> = vec![None; n];
                let mut count = vec![0usize; n];
                let (mut open, mut failed, mut busy) = (true, None, std::time::Duration::ZERO);
                // A gradient arriving for a slot: added to the slot's earlier ones of this
                // pass (in arrival order, as the sink adds them) until the slot's turn.
                let take = |(j, t): (usize, Tensor),
                            want: &[usize],
                            arrived: &mut Vec<Option<Tensor>>,
                            count: &mut Vec<usize>,
                            failed: &mut Option<TrainError>| {
                    count[j] += 1;
                    if count[j] > want[j] {
                        failed.get_or_insert(TrainError::Config(format!(
                            "a weight received {} gradients in one backward pass, {} expected \
                             (weights shared between layers cannot be summed as the backward goes)",
                            count[j], want[j]
                        )));
                        return;
                    }
                    arrived[j] = Some(match arrived[j].take() {
                        Some(prev) => match prev + t {
                            Ok(g) => g,
                            Err(e) => {
                                failed.get_or_insert(e.into());
                                return;
                            }
                        },
                        None => t,
                    });
                };
                for &i in &order {
                    while open && count[i] < want[i] {
                        match rx.recv() {
                            Ok(m) => take(m, &want, &mut arrived, &mut count, &mut failed),
                            Err(_) => open = false,
                        }
                    }
                    if let Some(t) = arrived[i].take() {
                        if let Err(e) = add_scaled(&mut bufs[i], &t, 1.0, false, Store::Add) {
                            failed.get_or_insert(e);
                        }
                    }
                    // Summed even after a failure: the other ranks wait for this rank's part.
                    let t0 = std::time::Instant::now();
                    if let Err(e) = sum.all_reduce_sum(&mut bufs[i]) {
                        failed.get_or_insert(e);
                    }
                    busy += t0.elapsed();
                    // Whatever comes for this slot now is one gradient too many.
                    want[i] = count[i];
                }
                // Anything after the last sum came too late.
                for m in rx.iter() {
                    take(m, &want, &mut arrived, &mut count, &mut failed);
                }
                let got: Vec<bool> = count.iter().map(|&c| c > 0).collect();
                (bufs, got, busy, failed)
            });
            // Removes the listener (and its sender) however the backward ends, so the
            // worker sees the end of the pass and the scope can join it.
            struct Unlisten<'a>(&'a dyn Fn(Option<berth_kernels::GradListener>));
            impl Drop for Unlisten<'_> {
                fn drop(&mut self) {
                    (self.0)(None);
                }
            }
            let to_worker = tx.clone();
            let ids = index.clone();
            let unlisten = Unlisten(listen);
            listen(Some(std::sync::Arc::new(
                move |pairs: Vec<(Tensor, Tensor)>| {
                    for (var, grad) in pairs {
                        if let Some(&i) = ids.get(&var.id()) {
                            // The worker outlives the backward: a send fails only if it panicked.
                            let _ = to_worker.send((i, grad));
                        }
                    }
                },
            )));
            let outcome = backward();
            drop(unlisten);
            if let Ok(Some(grads)) = &outcome {
                for (i, s) in self.slots.iter().enumerate() {
                    if let Some(g) = grads.get(s.var.as_tensor()) {
                        let _ = tx.send((i, g.clone()));
                    }
                }
            }
            drop(tx);
            let t0 = std::time::Instant::now();
            let (bufs, got, busy, failed) =
                worker.join().expect("gradient summing thread panicked");
            (outcome, got, (bufs, busy), t0.elapsed(), failed)
        });
        let (bufs, busy) = summing;
        for ((s, b), g) in self.slots.iter_mut().zip(bufs).zip(got) {
            s.grad = b;
            s.touched |= g;
        }
        outcome?;
        if let Some(e) = failed {
            return Err(e);
        }
        Ok((busy, waited))
    }

    /// Names of variables that received no gradient since the last step.
    pub fn untouched(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| !s.touched)
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The accumulated gradient of the variable whose first parameter is `name`.
    pub fn grad(&self, name: &str) -> Option<Vec<f32>> {
        let s = self.slots.iter().find(|s| s.name == name)?;
        Some(match &s.lent {
            Some((g, scale)) => {
                berth_kernels::with_values(g, |g| g.iter().map(|&x| x * scale).collect()).ok()?
            }
            None => s.grad.clone(),
        })
    }

    /// Global L2 norm of the accumulated gradients; when above `max_norm`, scales them by
    /// `max_norm / (norm + 1e-6)` (torch's `clip_grad_norm_`). Returns the norm before
    /// clipping.
    pub fn clip(&mut self, max_norm: Option<f64>) -> f64 {
        // A lent gradient clipped before is stored scaled first (a second clip's norm and
        // scaling read the stored products, as they read any accumulator).
        for s in &mut self.slots {
            if matches!(s.lent, Some((_, scale)) if scale != 1.0) {
                s.settle()
                    .expect("lent gradients are contiguous f32 (checked when lent)");
            }
        }
        // Fixed chunks summed in order: the same result on every run (a row-fed table's
        // rows without a gradient are zeros and skipped: the same sums).
        let total: f64 = self
            .slots
            .iter_mut()
            .map(|s| match &mut s.rows {
                Some(r) if !r.dense => {
                    r.fresh.sort_unstable();
                    berth_kernels::sum_of_squares_rows(&s.grad, r.width, &r.fresh)
                }
                // (Unscaled here: see above.)
                _ => match &s.lent {
                    Some((g, _)) => berth_kernels::with_values(g, berth_kernels::sum_of_squares)
                        .expect("lent gradients are contiguous f32 (checked when lent)"),
                    None => berth_kernels::sum_of_squares(&s.grad),
                },
            })
            .sum();
        let norm = total.sqrt();
        if let Some(max) = max_norm {
            let coef = (max / (norm + 1e-6)).min(1.0) as f32;
            if coef < 1.0 {
                for s in &mut self.slots {
                    if let Some((_, scale)) = &mut s.lent {
                        // Applied as the step reads it: `g × coef`, the bits of scaling a
                        // copy (unscaled until now: see above).
                        *scale = coef;
                        continue;
                    }
                    match &s.rows {
                        Some(r) if !r.dense => {
                            for &row in &r.fresh {
                                let at = row as usize * r.width;
                                s.grad[at..at + r.width].iter_mut().for_each(|g| *g *= coef);
                            }
                        }
                        _ => s
                            .grad
                            .par_chunks_mut(CHUNK)
                            .for_each(|c| c.iter_mut().for_each(|g| *g *= coef)),
                    }
                }
            }
        }
        norm
    }

    /// One AdamW update at learning rate `lr` from the accumulated gradients, then clears
    /// them.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let base = berth_kernels::AdamWStep {
            decay: 1.0,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            step_size: (lr / bc1) as f32,
            bias_correction2_sqrt: bc2_sqrt as f32,
        };
        for s in &mut self.slots {
            // As torch.optim.AdamW skips a parameter whose .grad is None: one no loss reached
            // (a BERT pooler under mean pooling) is neither moved nor decayed.
            if !s.touched {
                continue;
            }
            let k = berth_kernels::AdamWStep {
                decay: if s.decay {
                    (1.0 - lr * c.weight_decay) as f32
                } else {
                    1.0
                },
                ..base
            };
            let (g, m, v) = (&mut s.grad, &mut s.m, &mut s.v);
            match &mut s.rows {
                // Without weight decay, rows with neither a gradient nor moments stay.
                Some(r) if !r.dense && k.decay == 1.0 => {
                    let (live, has_grad) = (&r.live, &r.has_grad);
                    let keep = |row: usize| live[row] || has_grad[row];
                    berth_kernels::with_values_mut(s.var.as_tensor(), |p| {
                        berth_kernels::adamw_update_rows(p, g, m, v, r.width, &keep, &k)
                    })?;
                }
                _ => match s.lent.take() {
                    Some((lent, scale)) => berth_kernels::with_values(&lent, |g| {
                        berth_kernels::with_values_mut(s.var.as_tensor(), |p| {
                            berth_kernels::adamw_update_from(p, g, scale, m, v, &k)
                        })
                    })??,
                    None => berth_kernels::with_values_mut(s.var.as_tensor(), |p| {
                        berth_kernels::adamw_update(p, g, m, v, &k)
                    })?,
                },
            }
            if let Some(r) = &mut s.rows {
                r.stepped();
            }
            s.touched = false;
        }
        Ok(())
    }

    /// Clears the accumulated gradients without stepping.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.grad.par_chunks_mut(CHUNK).for_each(|c| c.fill(0.0));
            s.lent = None;
            s.touched = false;
            if let Some(r) = &mut s.rows {
                r.cleared();
            }
        }
    }

    /// The moment estimates by slot name, for checkpoints.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for s in &self.slots {
            let shape = s.var.as_tensor().shape().clone();
            out.insert(
                format!("exp_avg.{}", s.name),
                Tensor::from_vec(s.m.clone(), &shape, &Device::Cpu)?,
            );
            out.insert(
                format!("exp_avg_sq.{}", s.name),
                Tensor::from_vec(s.v.clone(), &shape, &Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Restores moment estimates saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        step: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        for s in &mut self.slots {
            for (key, dst) in [("exp_avg", &mut s.m), ("exp_avg_sq", &mut s.v)] {
                let name = format!("{key}.{}", s.name);
                let t = tensors.get(&name).ok_or_else(|| TrainError::Checkpoint {
                    path: source.into(),
                    message: format!("optimizer state lacks {name}"),
                })?;
                let v = t.flatten_all()?.to_vec1::<f32>()?;
                if v.len() != dst.len() {
                    return Err(TrainError::Checkpoint {
                        path: source.into(),
                        message: format!("{name} has {} values, the model {}", v.len(), dst.len()),
                    });
                }
                *dst = v;
            }
            // Rows with moments are found again from the loaded ones.
            s.rows = None;
        }
        self.step = step;
        Ok(())
    }
}

impl Slot {
    /// Moves a lent gradient into the accumulator (which holds zeros meanwhile).
    fn settle(&mut self) -> Result<()> {
        match self.lent.take() {
            Some((g, scale)) => add_scaled(&mut self.grad, &g, scale, true, Store::Write),
            None => Ok(()),
        }
    }
}

/// How [`add_scaled`] stores into its destination.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    /// `dst += scale × g`.
    Add,
    /// `dst = scale × g` (the destination holds zeros: the same values, bar the sign of a
    /// zero, without reading it).
    Write,
}

/// `dst += scale × g` or `dst = scale × g` (`g` any layout, `dst.len()` elements): in
/// parallel chunks, or on the calling thread alone (the summing thread keeps off the pool
/// the backward uses).
fn add_scaled(dst: &mut [f32], g: &Tensor, scale: f32, parallel: bool, how: Store) -> Result<()> {
    let apply = |a: &mut [f32], b: &[f32]| match how {
        Store::Add => a.iter_mut().zip(b).for_each(|(a, &b)| *a += scale * b),
        Store::Write => a.iter_mut().zip(b).for_each(|(a, &b)| *a = scale * b),
    };
    berth_kernels::with_values(g, |src| {
        if !parallel {
            return apply(dst, src);
        }
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(a, b)| apply(a, b));
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_skips_biases_and_layer_norms() {
        assert!(decays("bert.encoder.layer.0.attention.self.query.weight"));
        assert!(!decays("bert.encoder.layer.0.attention.self.query.bias"));
        assert!(!decays("bert.embeddings.LayerNorm.weight"));
        // ModernBERT's norms (as the Trainer's get_decay_parameter_names lists them).
        assert!(!decays("model.layers.1.attn_norm.weight"));
        assert!(!decays("model.embeddings.norm.weight"));
        assert!(!decays("head.norm.weight"));
        assert!(decays("model.layers.1.attn.Wqkv.weight"));
        assert!(decays("model.embeddings.tok_embeddings.weight"));
        assert!(!decays(
            "distilbert.transformer.layer.0.sa_layer_norm.weight"
        ));
        assert!(decays("classifier.weight"));
    }

    /// A gradient kept as the backward's tensor ([`Slot::lent`]) gives the bits of one copied
    /// into the accumulator: steps with and without clipping, clipped twice, and a second
    /// gradient added after a lent one. The copying runs take each gradient as two halves
    /// (`0.5 g + 0.5 g` is `g` exactly), which the optimizer cannot lend.
    #[test]
    fn lent_gradients_step_as_copied_ones() {
        use candle_core::{Device, Var};
        let run = |halves: bool, clip: Option<f64>, twice: bool, clips: usize| {
            let init = |n: usize, k: f32| {
                (0..n)
                    .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * k)
                    .collect::<Vec<f32>>()
            };
            let w = Var::from_vec(init(96, 0.5), (8, 12), &Device::Cpu).unwrap();
            let b = Var::from_vec(init(12, 0.1), 12, &Device::Cpu).unwrap();
            let params = [("layer.weight", &w), ("layer.bias", &b)].map(|(name, v)| Param {
                name: name.into(),
                var: v.clone(),
                rows: None,
            });
            let mut opt = AdamW::new(
                &params,
                AdamWConfig {
                    weight_decay: 0.01,
                    ..Default::default()
                },
            );
            let x = Tensor::from_vec(init(40, 1.0), (5, 8), &Device::Cpu).unwrap();
            let mut out = Vec::new();
            for step in 0..3 {
                for _ in 0..(1 + usize::from(twice)) {
                    let y = x.matmul(w.as_tensor()).unwrap().broadcast_add(&b).unwrap();
                    let loss = (y.sqr().unwrap().sum_all().unwrap() * (step + 1) as f64).unwrap();
                    let grads = loss.backward().unwrap();
                    if halves {
                        opt.accumulate(&grads, 0.5).unwrap();
                        opt.accumulate(&grads, 0.5).unwrap();
                    } else {
                        opt.accumulate(&grads, 1.0).unwrap();
                    }
                }
                assert!(opt.untouched().is_empty());
                out.push(opt.grad("layer.weight").unwrap());
                for _ in 0..clips {
                    out.push(vec![opt.clip(clip) as f32]);
                }
                opt.step(1e-2).unwrap();
            }
            out.push(w.as_tensor().flatten_all().unwrap().to_vec1().unwrap());
            out.push(b.as_tensor().to_vec1().unwrap());
            out.iter()
                .map(|v| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>())
                .collect::<Vec<_>>()
        };
        let cases = [
            (None, false, 1),
            (Some(1e-3), false, 1),
            (Some(1e-3), true, 1),
            (Some(1e-3), false, 2),
        ];
        for (clip, twice, clips) in cases {
            let copied = run(true, clip, twice, clips);
            assert_eq!(
                run(false, clip, twice, clips),
                copied,
                "clip {clip:?}, twice {twice}, {clips} clip(s)"
            );
            // The clipped runs did clip (the norm is far above 1e-3).
            assert!(clip.is_none() || f32::from_bits(copied[1][0]) > 1.0);
        }
    }
}
