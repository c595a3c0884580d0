//! Prints fastText predictions for each stdin line: `label prob` pairs, best first.
//! Used to compare against the Python binding: `ft_predict MODEL < lines.txt`.
use std::io::BufRead;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .expect("usage: ft_predict MODEL < lines");
    let model = dolma_taggers::fasttext::FastTextModel::load(std::path::Path::new(&path))?;
    for line in std::io::stdin().lock().lines() {
        let preds = model.predict(&line?, 0.0);
        let top: Vec<String> = preds
            .iter()
            .take(3)
            .map(|p| format!("{} {:.6}", p.label, p.prob))
            .collect();
        println!("{}", top.join(" "));
    }
    Ok(())
}
