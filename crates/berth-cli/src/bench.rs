pub fn run(_a: BenchArgs) -> anyhow::Result<()> { anyhow::bail!("todo") }
#[derive(clap::Args)] pub struct BenchArgs {}
