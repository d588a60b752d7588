//! `berth inspect`.
use berth_model::Model;
use berth_text::TextTokenizer;
use clap::Args;

use crate::embed::report_load;
use crate::resolve;

/// Arguments of `berth inspect`.
#[derive(Args)]
pub struct InspectArgs {
    /// Model directory, cached model name, or hub id.
    #[arg(long)]
    model: Option<String>,
}

pub fn run(a: InspectArgs) -> anyhow::Result<()> {
    let dir = resolve::model_dir(a.model.as_deref())?;
    let (model, report) = Model::load(&dir, false)?;
    report_load(&report);
    let c = &model.config;
    let tokenizer = match TextTokenizer::from_dir(&dir) {
        Ok(t) => format!(
            "{:?}, {} tokens, from {}",
            t.kind(),
            t.vocab_size(),
            t.source().display()
        ),
        Err(e) => format!("none ({e})"),
    };
    let mut heads = Vec::new();
    if model.pooler.is_some() {
        heads.push("pooler".to_string());
    }
    if let Some(h) = &model.head {
        heads.push(h.kind().name().to_string());
    }
    let labels = if c.id2label.is_empty() {
        String::new()
    } else {
        format!(" (labels: {})", c.id2label.join(", "))
    };
    println!("model:        {}", dir.display());
    println!(
        "architecture: {} ({:?}), classes {:?}",
        c.model_type, c.arch, c.architectures
    );
    println!(
        "layers:       {} x hidden {} x heads {} (head dim {}), feed-forward {} ({:?})",
        c.num_layers,
        c.hidden_size,
        c.num_heads,
        c.hidden_size / c.num_heads,
        c.intermediate_size,
        c.activation
    );
    println!(
        "vocabulary:   {}; positions {} (max sequence {}); token types {}",
        c.vocab_size,
        c.max_position_embeddings,
        c.max_sequence_length(),
        c.type_vocab_size
    );
    println!(
        "parameters:   {} ({:.1} M)",
        model.num_parameters(),
        model.num_parameters() as f64 / 1e6
    );
    println!("tokenizer:    {tokenizer}");
    println!(
        "heads:        {}{labels}",
        if heads.is_empty() {
            "none".into()
        } else {
            heads.join(", ")
        }
    );
    Ok(())
}
