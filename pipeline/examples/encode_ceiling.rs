//! The practical ceiling for `dolma tokenize`: the tokenizers crate's raw `encode_batch` speed
//! on the same stripped texts, batches of 10,000, no I/O in the timed part.
//! usage: encode_ceiling TOKENIZER_JSON 'DOCS_GLOB'
use std::time::Instant;

// Same allocator as the `dolma` binary, so the ceiling is measured like for like.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (tok, pattern) = (&args[1], &args[2]);
    let tokenizer = tokenizers::Tokenizer::from_file(tok).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut texts = Vec::new();
    for input in dolma::runner::expand_inputs(std::slice::from_ref(pattern))? {
        let mut r = dolma::io::open_documents(&input.path, dolma::io::DEFAULT_MAX_LINE_BYTES)?;
        while let Some(line) = r.next_line()? {
            if let dolma::io::Line::Text(t, _) = line {
                let v: serde_json::Value = serde_json::from_str(t)?;
                let text =
                    dolma_taggers::text::py_strip(v["text"].as_str().unwrap_or("")).to_string();
                if !text.is_empty() {
                    texts.push(text);
                }
            }
        }
    }
    let docs = texts.len();
    let start = Instant::now();
    let mut tokens = 0usize;
    for chunk in texts.chunks(10_000) {
        let enc = tokenizer
            .encode_batch(chunk.to_vec(), false)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tokens += enc.iter().map(|e| e.get_ids().len()).sum::<usize>();
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "encode_batch: {docs} docs, {tokens} tokens in {secs:.2}s: {:.0} docs/s, {:.0} tokens/s",
        docs as f64 / secs,
        tokens as f64 / secs
    );
    Ok(())
}
