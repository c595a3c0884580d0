//! Times reading a checkpoint folder's weights (ours, or OLMo's unsharded or sharded) for the
//! model its `config.yaml` describes, as `load_path`, `eval` and `export-hf` read them, and
//! prints GB/s of F32 weights: `bench/checkpoint.sh` runs it.
//!
//!     cargo run --release -p olmo-train --example read_checkpoint -- CHECKPOINT_DIR

use std::path::Path;

use anyhow::{Context, Result};
use olmo_train::{checkpoint, config::TrainConfig, model::Layout};

fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .context("usage: read_checkpoint CHECKPOINT_DIR")?;
    let dir = Path::new(&dir);
    let (cfg, _) = TrainConfig::load(&dir.join("config.yaml"))?;
    let (model, _) = cfg.model_config()?;
    let layout = Layout::new(&model);
    let t = std::time::Instant::now();
    let params = checkpoint::read_weights(dir, &layout)?;
    let s = t.elapsed().as_secs_f64();
    let gb = params.len() as f64 * 4.0 / 1e9;
    println!(
        "olmo-train {}: {} parameters ({gb:.2} GB) in {s:.2} s: {:.2} GB/s",
        dir.display(),
        params.len(),
        gb / s
    );
    Ok(())
}
