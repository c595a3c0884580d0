//! In-loop evaluation: perplexity on held-out token shards (one label per dataset, as OLMo's LM
//! evaluators and Paloma do), zero-shot multiple-choice tasks scored by continuation
//! log-likelihood (OLMo's `downstream.py` prompts and metrics), and a unigram baseline to read
//! perplexities against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::backend::Backend;
use crate::data::Shards;
use crate::model::Batch;
use crate::ops::IGNORE;

/// One held-out set of token windows.
pub struct LmSet {
    pub label: String,
    pub shards: Shards,
    /// Windows to score (all, or the first `eval_subset_num_batches` batches).
    pub limit: u64,
    /// Attention within documents ending with this token (the evaluator's own
    /// `data.generate_doc_lengths`).
    pub doc_eos: Option<u32>,
}

/// An evaluation cut short because the run was asked to stop (SIGTERM or Ctrl-C): its numbers
/// would be partial, and a scheduler's grace period is better spent saving.
#[derive(Debug)]
pub struct Abandoned;

impl std::fmt::Display for Abandoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "evaluation abandoned: the run was asked to stop")
    }
}

impl std::error::Error for Abandoned {}

/// Between batches: an error once the run has been asked to stop.
fn go_on() -> Result<()> {
    match crate::stop::signalled() {
        Some(_) => Err(Abandoned.into()),
        None => Ok(()),
    }
}

/// Mean cross-entropy (nats per token) of the model over a set's windows.
pub fn lm_loss(
    engine: &mut dyn Backend,
    vocab: usize,
    set: &LmSet,
    batch_size: usize,
) -> Result<f64> {
    let n = set.limit.min(set.shards.len());
    if n == 0 {
        bail!(
            "eval set `{}` has no window of {} tokens",
            set.label,
            set.shards.seq_len
        );
    }
    let vocab = vocab as u64;
    let (mut sum, mut count) = (0.0f64, 0usize);
    let (mut inputs, mut targets, mut starts) = (Vec::new(), Vec::new(), Vec::new());
    let mut start = 0;
    while start < n {
        go_on()?;
        let end = (start + batch_size as u64).min(n);
        let windows: Vec<Vec<u32>> = (start..end)
            .map(|i| set.shards.read(i, Some(vocab)))
            .collect::<Result<_>>()?;
        let batch = Batch::from_windows(&windows, &mut inputs, &mut targets)
            .within_documents(set.doc_eos, &mut starts);
        let s = engine.forward(&batch)?;
        sum += s.ce_sum;
        count += s.count;
        start = end;
    }
    Ok(sum / count as f64)
}

/// Add-one smoothed unigram model over the vocabulary, from token counts.
pub struct Unigram {
    logp: Vec<f64>,
}

impl Unigram {
    /// Counts tokens of `shards`: every window, or an evenly strided sample of windows across
    /// all files when there are more than `max_tokens` tokens.
    pub fn count(shards: &Shards, vocab: usize, max_tokens: u64) -> Result<Unigram> {
        let mut counts = vec![0u64; vocab];
        let n = shards.len();
        let stride = (n * shards.seq_len).div_ceil(max_tokens.max(1)).max(1);
        for i in (0..n).step_by(stride as usize) {
            for t in shards.read(i, Some(vocab as u64))? {
                counts[t as usize] += 1;
            }
        }
        let total = counts.iter().sum::<u64>() as f64 + vocab as f64;
        Ok(Unigram {
            logp: counts
                .iter()
                .map(|&c| ((c as f64 + 1.0) / total).ln())
                .collect(),
        })
    }

    /// Cross-entropy of the unigram model on the set's scored positions (tokens 1.. of each
    /// window, as the model is scored).
    pub fn loss(&self, set: &LmSet) -> Result<f64> {
        let n = set.limit.min(set.shards.len());
        let (mut sum, mut count) = (0.0, 0u64);
        for i in 0..n {
            for &t in &set.shards.read(i, Some(self.logp.len() as u64))?[1..] {
                sum -= self.logp[t as usize];
                count += 1;
            }
        }
        Ok(sum / count.max(1) as f64)
    }
}

/// One multiple-choice question: a context per choice (WinoGrande varies the context) and the
/// continuations, with the index of the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    pub label: usize,
}

/// The zero-shot tasks OLMo's `downstream.py` defines, read from HF-format JSONL rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    ArcEasy,
    ArcChallenge,
    HellaSwag,
    Piqa,
    Sciq,
    WinoGrande,
    BoolQ,
    OpenBookQa,
    Copa,
}

impl Task {
    pub const NAMES: &'static [(&'static str, Task)] = &[
        ("arc_easy", Task::ArcEasy),
        ("arc_challenge", Task::ArcChallenge),
        ("hellaswag", Task::HellaSwag),
        ("piqa", Task::Piqa),
        ("sciq", Task::Sciq),
        ("winogrande", Task::WinoGrande),
        ("boolq", Task::BoolQ),
        ("openbook_qa", Task::OpenBookQa),
        ("copa", Task::Copa),
    ];

    pub fn parse(name: &str) -> Option<Task> {
        Task::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
    }

    /// The metric OLMo reports for the task (`acc` or `len_norm`).
    pub fn metric(self) -> &'static str {
        match self {
            Task::ArcChallenge | Task::HellaSwag | Task::Piqa | Task::OpenBookQa => "len_norm",
            _ => "acc",
        }
    }

    /// Builds the question of one JSONL row.
    pub fn question(self, doc: &Value) -> Result<Question> {
        let s = |k: &str| -> Result<String> {
            doc.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| anyhow!("missing string field `{k}`"))
        };
        let choices_text = || -> Result<Vec<String>> {
            doc.pointer("/choices/text")
                .and_then(Value::as_array)
                .ok_or_else(|| anyhow!("missing field `choices.text`"))?
                .iter()
                .map(|c| {
                    c.as_str()
                        .map(|c| format!(" {c}"))
                        .ok_or_else(|| anyhow!("`choices.text` holds a non-string"))
                })
                .collect()
        };
        let int = |k: &str| -> Result<usize> {
            match doc.get(k) {
                Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
                Some(Value::String(s)) => s.trim().parse().ok(),
                _ => None,
            }
            .ok_or_else(|| anyhow!("missing integer field `{k}`"))
        };
        let letter = |key: &str| -> Result<usize> {
            let k = key.trim();
            let k = match k {
                "1" => "A",
                "2" => "B",
                "3" => "C",
                "4" => "D",
                "5" => "E",
                k => k,
            };
            ["A", "B", "C", "D", "E"]
                .iter()
                .position(|l| *l == k)
                .ok_or_else(|| anyhow!("answerKey `{key}` is not A-E"))
        };
        let one = |ctx: String, conts: Vec<String>, label: usize| Question {
            contexts: vec![ctx; conts.len()],
            continuations: conts,
            label,
        };
        let q = match self {
            Task::ArcEasy | Task::ArcChallenge => one(
                format!("Question: {}\nAnswer:", s("question")?),
                choices_text()?,
                letter(&s("answerKey")?)?,
            ),
            Task::OpenBookQa => one(
                s("question_stem")?,
                choices_text()?,
                letter(&s("answerKey")?)?,
            ),
            Task::HellaSwag => {
                let ctx = format!(
                    "{}: {} {}",
                    s("activity_label")?,
                    s("ctx_a")?,
                    capitalize(&s("ctx_b")?)
                );
                let endings = doc
                    .get("endings")
                    .and_then(Value::as_array)
                    .ok_or_else(|| anyhow!("missing field `endings`"))?
                    .iter()
                    .map(|e| e.as_str().map(|e| format!(" {}", hellaswag_clean(e))))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| anyhow!("`endings` holds a non-string"))?;
                one(hellaswag_clean(&ctx), endings, int("label")?)
            }
            Task::Piqa => one(
                format!("Question: {}\nAnswer:", s("goal")?),
                vec![format!(" {}", s("sol1")?), format!(" {}", s("sol2")?)],
                int("label")?,
            ),
            Task::Sciq => one(
                format!(
                    "{}\nQuestion: {}\nAnswer:",
                    s("support")?.trim(),
                    s("question")?
                ),
                vec![
                    format!(" {}", s("distractor1")?),
                    format!(" {}", s("distractor2")?),
                    format!(" {}", s("distractor3")?),
                    format!(" {}", s("correct_answer")?),
                ],
                3,
            ),
            Task::BoolQ => {
                let answer = doc
                    .get("answer")
                    .and_then(Value::as_bool)
                    .ok_or_else(|| anyhow!("missing boolean field `answer`"))?;
                one(
                    format!("{}\nQuestion: {}?\nAnswer:", s("passage")?, s("question")?),
                    vec![" yes".into(), " no".into()],
                    if answer { 0 } else { 1 },
                )
            }
            Task::Copa => {
                let premise = s("premise")?;
                let premise = premise.trim();
                let mut cut = premise.chars();
                cut.next_back();
                let connector = if s("question")? == "cause" {
                    "because"
                } else {
                    "therefore"
                };
                let lower_first = |c: String| {
                    let mut it = c.chars();
                    match it.next() {
                        Some(f) => f.to_lowercase().chain(it).collect::<String>(),
                        None => c,
                    }
                };
                one(
                    format!("{} {connector}", cut.as_str()),
                    vec![
                        format!(" {}", lower_first(s("choice1")?)),
                        format!(" {}", lower_first(s("choice2")?)),
                    ],
                    int("label")?,
                )
            }
            Task::WinoGrande => {
                let sentence = s("sentence")?;
                let at = sentence
                    .find('_')
                    .ok_or_else(|| anyhow!("`sentence` has no `_` blank"))?;
                let cont = format!(" {}", sentence[at + 1..].trim());
                Question {
                    contexts: vec![
                        format!("{}{}", &sentence[..at], s("option1")?),
                        format!("{}{}", &sentence[..at], s("option2")?),
                    ],
                    continuations: vec![cont.clone(), cont],
                    label: int("answer")?
                        .checked_sub(1)
                        .ok_or_else(|| anyhow!("`answer` must be 1 or 2"))?,
                }
            }
        };
        if q.label >= q.continuations.len() {
            bail!(
                "label {} but only {} choices",
                q.label,
                q.continuations.len()
            );
        }
        Ok(q)
    }
}

/// Python's `str.capitalize()`: first character upper case, the rest lower case.
fn capitalize(s: &str) -> String {
    let mut it = s.chars();
    match it.next() {
        Some(f) => f
            .to_uppercase()
            .chain(it.flat_map(char::to_lowercase))
            .collect(),
        None => String::new(),
    }
}

/// HellaSwag's WikiHow clean-up: strip, ` [title]` → `. `, drop `[...]`, `"  "` → `" "`.
fn hellaswag_clean(text: &str) -> String {
    let text = text.trim().replace(" [title]", ". ");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    // non-greedy `\[.*?\]`, where `.` does not cross a newline
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match after.find([']', '\n']) {
            Some(close) if after.as_bytes()[close] == b']' => rest = &after[close + 1..],
            _ => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

/// One tokenized choice: context tokens, continuation tokens, continuation characters.
pub type Choice = (Vec<u32>, Vec<u32>, usize);

/// A tokenized task ready to score.
pub struct McSet {
    pub label: String,
    pub task: Task,
    /// Per question: its choices and the index of the right one.
    pub items: Vec<(Vec<Choice>, usize)>,
}

/// Reads a task's JSONL (`limit` questions at most) and tokenizes its prompts.
pub fn load_mc(
    label: &str,
    task: Task,
    path: &Path,
    tokenizer: &tokenizers::Tokenizer,
    limit: Option<usize>,
) -> Result<McSet> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut items = Vec::new();
    let encode = |s: &str| -> Result<Vec<u32>> {
        Ok(tokenizer
            .encode(s, false)
            .map_err(|e| anyhow!("tokenizer: {e}"))?
            .get_ids()
            .to_vec())
    };
    for (i, line) in text.lines().enumerate() {
        if limit.is_some_and(|l| items.len() >= l) {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let doc: Value =
            serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let q = task.question(&doc).with_context(at)?;
        let mut choices = Vec::new();
        for (ctx, cont) in q.contexts.iter().zip(&q.continuations) {
            let c = encode(cont)?;
            if c.is_empty() {
                bail!("{}: a continuation encodes to no token", at());
            }
            // OLMo divides by the continuation's characters without its leading space
            choices.push((
                encode(ctx)?,
                c,
                cont.chars().count().saturating_sub(1).max(1),
            ));
        }
        items.push((choices, q.label));
    }
    if items.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(McSet {
        label: label.to_string(),
        task,
        items,
    })
}

/// Accuracy by raw log-likelihood (`acc`) and by log-likelihood per character (`len_norm`).
pub fn mc_accuracy(
    engine: &mut dyn Backend,
    set: &McSet,
    max_seq: usize,
    batch_size: usize,
) -> Result<(f64, f64)> {
    // Every (question, choice) as one query: context + continuation[..-1], cut from the left
    // to the context length; the continuation's tokens are the scored targets.
    let mut queries: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    for (choices, _) in &set.items {
        for (ctx, cont, _) in choices {
            let mut tokens: Vec<u32> = ctx.iter().chain(cont.iter()).copied().collect();
            let cut = tokens.len().saturating_sub(max_seq + 1);
            tokens.drain(..cut);
            let scored = cont.len().min(tokens.len() - 1);
            let inputs = tokens[..tokens.len() - 1].to_vec();
            let mut targets = vec![IGNORE; inputs.len()];
            let n = targets.len();
            targets[n - scored..].copy_from_slice(&tokens[tokens.len() - scored..]);
            queries.push((inputs, targets));
        }
    }
    let mut loglik = Vec::with_capacity(queries.len());
    for chunk in queries.chunks(batch_size) {
        go_on()?;
        let t = chunk.iter().map(|q| q.0.len()).max().unwrap_or(1);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for (i, tg) in chunk {
            // right padding does not change earlier positions of a causal model
            inputs.extend(i.iter().copied().chain(std::iter::repeat_n(0, t - i.len())));
            targets.extend(
                tg.iter()
                    .copied()
                    .chain(std::iter::repeat_n(IGNORE, t - tg.len())),
            );
        }
        let s = engine.forward(&Batch {
            inputs: &inputs,
            targets: &targets,
            b: chunk.len(),
            t,
            doc_starts: None,
        })?;
        for q in s.logprobs.chunks(t) {
            loglik.push(q.iter().map(|&x| x as f64).sum::<f64>());
        }
    }
    let (mut acc, mut norm) = (0usize, 0usize);
    let mut at = 0;
    for (choices, label) in &set.items {
        let ll = &loglik[at..at + choices.len()];
        at += choices.len();
        let argmax = |f: &dyn Fn(usize) -> f64| {
            (0..choices.len()).fold(0, |best, i| if f(i) > f(best) { i } else { best })
        };
        acc += (argmax(&|i| ll[i]) == *label) as usize;
        norm += (argmax(&|i| ll[i] / choices[i].2 as f64) == *label) as usize;
    }
    let n = set.items.len() as f64;
    Ok((acc as f64 / n, norm as f64 / n))
}

/// Resolves the evaluator's JSONL path: `path` as given, else the usual file name of the task
/// under `eval_dir`.
pub fn task_file(task: Task, path: Option<&str>, eval_dir: Option<&str>) -> Result<PathBuf> {
    if let Some(p) = path {
        crate::data::remote_refused(p, "path")?;
        return Ok(PathBuf::from(p));
    }
    let name = match task {
        Task::ArcEasy => "ai2_arc__ARC-Easy__validation.jsonl",
        Task::ArcChallenge => "ai2_arc__ARC-Challenge__validation.jsonl",
        Task::HellaSwag => "hellaswag__none__validation.jsonl",
        Task::Piqa => "piqa__plain_text__validation.jsonl",
        Task::Sciq => "sciq__none__validation.jsonl",
        Task::WinoGrande => "winogrande__winogrande_xl__validation.jsonl",
        Task::BoolQ => "boolq__none__validation.jsonl",
        Task::OpenBookQa => "openbookqa__main__validation.jsonl",
        Task::Copa => "super_glue__copa__validation.jsonl",
    };
    match eval_dir {
        Some(d) => Ok(Path::new(d).join(name)),
        None => bail!(
            "a downstream evaluator needs `path:` (its HF-format JSONL), or a top-level `eval_data_dir:` holding {name} (OLMo's fetches its tasks from the Hub; this trainer reads local files)"
        ),
    }
}

/// Results of one evaluation round, by metric name.
pub type Results = BTreeMap<String, f64>;

#[cfg(test)]
mod tests {
    use super::*;

    fn q(task: Task, line: &str) -> Question {
        task.question(&serde_json::from_str(line).unwrap()).unwrap()
    }

    #[test]
    fn prompts_follow_olmo_downstream() {
        let arc = q(
            Task::ArcEasy,
            r#"{"question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "2"}"#,
        );
        assert_eq!(arc.contexts[0], "Question: Which?\nAnswer:");
        assert_eq!(arc.continuations, vec![" a", " b"]);
        assert_eq!(arc.label, 1);
        let hs = q(
            Task::HellaSwag,
            r#"{"activity_label": "Roof", "ctx_a": "A man [header] sits.", "ctx_b": "he IS", "endings": ["x [title] y", "z"], "label": "1"}"#,
        );
        assert_eq!(hs.contexts[0], "Roof: A man sits. He is");
        assert_eq!(hs.continuations, vec![" x. y", " z"]);
        let copa = q(
            Task::Copa,
            r#"{"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.", "question": "effect", "label": 1}"#,
        );
        assert_eq!(copa.contexts[0], "The man turned on the faucet therefore");
        assert_eq!(copa.continuations[1], " water flowed.");
        let wg = q(
            Task::WinoGrande,
            r#"{"sentence": "Sarah beat Maria so _ won.", "option1": "Sarah", "option2": "Maria", "answer": "1"}"#,
        );
        assert_eq!(
            wg.contexts,
            vec!["Sarah beat Maria so Sarah", "Sarah beat Maria so Maria"]
        );
        assert_eq!(wg.continuations[0], " won.");
        assert_eq!(wg.label, 0);
        let sciq = q(
            Task::Sciq,
            r#"{"question": "Who?", "distractor1": "a", "distractor2": "b", "distractor3": "c", "correct_answer": "d", "support": " s "}"#,
        );
        assert_eq!(sciq.contexts[0], "s\nQuestion: Who?\nAnswer:");
        assert_eq!(sciq.label, 3);
        let boolq = q(
            Task::BoolQ,
            r#"{"question": "is it", "answer": false, "passage": "P"}"#,
        );
        assert_eq!(boolq.contexts[0], "P\nQuestion: is it?\nAnswer:");
        assert_eq!(boolq.label, 1);
        // a row without the task's fields is an error naming the field
        let err = Task::Piqa
            .question(&serde_json::json!({"goal": "g"}))
            .unwrap_err();
        assert!(err.to_string().contains("sol1"), "{err}");
    }
}
