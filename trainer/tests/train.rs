//! `olmo-train train` end to end on synthetic shards: the loss falls, metrics, checkpoints and
//! the plot are written, a stopped run resumes to the same bits, NaN stops the run, bad data
//! and bad configs are explained, and `export-hf` writes a transformers layout.

mod standin;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use olmo_train::pickle::Value;

struct Run {
    dir: tempfile::TempDir,
}

impl Run {
    /// A folder with a periodic token stream (easy to predict once learnt) in two files.
    fn new() -> Run {
        let dir = tempfile::tempdir().unwrap();
        for (name, n) in [("a.npy", 4096u16), ("b.npy", 2048)] {
            let tokens: Vec<u8> = (0..n)
                .map(|i| [3u16, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5][i as usize % 11])
                .flat_map(|t| t.to_le_bytes())
                .collect();
            std::fs::write(dir.path().join(name), tokens).unwrap();
        }
        Run { dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Writes a config (extra YAML lines appended) saving under `out`.
    fn config(&self, name: &str, out: &str, extra: &str) -> PathBuf {
        let cfg = self.path(name);
        std::fs::write(
            &cfg,
            format!(
                "model:\n  d_model: 16\n  n_heads: 2\n  n_layers: 1\n  vocab_size: 16\n  max_sequence_length: 16\n\
                 \x20 rope: true\n  include_bias: false\n  layer_norm_with_affine: false\n\
                 \x20 attention_dropout: 0\n  residual_dropout: 0\n  embedding_dropout: 0\n\
                 optimizer:\n  name: adamw\n  learning_rate: 1.0e-2\n  weight_decay: 0.1\nscheduler:\n  name: cosine_with_warmup\n  t_warmup: 3\n\
                 data:\n  paths: ['{d}/a.npy', '{d}/b.npy']\n\
                 global_train_batch_size: 8\nmax_grad_norm: 1.0\nsave_folder: {d}/{out}\n{extra}\ndevice: cpu\n",
                d = self.dir.path().display(),
            ),
        )
        .unwrap();
        cfg
    }

    fn train(&self, cfg: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_olmo-train"))
            .args(["train", "-c", cfg.to_str().unwrap()])
            .args(args)
            .output()
            .unwrap()
    }

    /// `train -c cfg --device cuda` on the stand-in libraries in `libs`, its temporary files
    /// (NVRTC's) in this run's folder.
    fn train_on_standins(&self, cfg: &Path, libs: &Path) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_olmo-train"));
        c.args(["train", "-c", cfg.to_str().unwrap(), "--device", "cuda"])
            .env("LD_LIBRARY_PATH", standin::library_path(libs))
            .env("TMPDIR", self.path(""));
        c
    }

    /// The steps of the checkpoint folders in `run`, in order.
    fn steps(&self, run: &str) -> Vec<u64> {
        let mut s: Vec<u64> = std::fs::read_dir(self.path(run))
            .unwrap()
            .filter_map(|e| {
                e.unwrap()
                    .file_name()
                    .to_str()?
                    .strip_prefix("step")?
                    .parse()
                    .ok()
            })
            .collect();
        s.sort();
        s
    }

    /// A config that starts from checkpoint `from` (`load_path`) and trains to step 4,
    /// saving under `name`.
    fn continuing(&self, name: &str, from: &Path) -> PathBuf {
        self.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 4\nload_path: {}\n", from.display()),
        )
    }

    /// Asserts that runs `a` and `b` saved the same step-4 checkpoint, byte for byte.
    fn same_step4(&self, a: &str, b: &str) {
        for f in ["model.safetensors", "optim.safetensors", "train.json"] {
            let read = |run: &str| std::fs::read(self.path(run).join("step4").join(f)).unwrap();
            assert!(read(a) == read(b), "{a} and {b}: {f} differs");
        }
    }

    /// `export-hf`'s `model.safetensors` of checkpoint `from`, written under `to`.
    fn hf_weights(&self, from: &Path, to: &str) -> Vec<u8> {
        export_hf(from, &self.path(to));
        std::fs::read(self.path(to).join("model.safetensors")).unwrap()
    }

    /// The bytes of `{dir}/model.safetensors` (a checkpoint's weights).
    fn weights(&self, dir: &str) -> Vec<u8> {
        std::fs::read(self.path(dir).join("model.safetensors")).unwrap()
    }

    fn metrics(&self, out: &str) -> Vec<serde_json::Value> {
        json_lines(&self.path(out).join("metrics.jsonl"))
    }
}

/// A JSON-lines file's records.
fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Rewrites a config file with text replacements, in order.
fn edit(cfg: &Path, replacements: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    for (from, to) in replacements {
        text = text.replace(from, to);
    }
    std::fs::write(cfg, text).unwrap();
}

fn ok(o: &Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{err}");
    err
}

/// The log of a command that failed saying `want`.
fn refused(o: &Output, want: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success() && err.contains(want),
        "want `{want}` in: {err}"
    );
    err
}

/// The log of a run on the CUDA stand-ins that succeeded, or None (saying so) where NVRTC,
/// which the stand-ins do not replace, is not on the library path.
fn ok_on_standins(o: &Output) -> Option<String> {
    if String::from_utf8_lossy(&o.stderr).contains("nvrtc library could not be loaded") {
        eprintln!("skipped: no NVRTC on the library path");
        return None;
    }
    Some(ok(o))
}

/// The log of a run on the CUDA stand-ins, whether it succeeded or not, or None (saying so)
/// where NVRTC is not on the library path.
fn ok_on_standins_or_refused(o: &Output) -> Option<String> {
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    if err.contains("nvrtc library could not be loaded") {
        eprintln!("skipped: no NVRTC on the library path");
        return None;
    }
    Some(err)
}

fn losses(m: &[serde_json::Value]) -> Vec<(u64, f64)> {
    m.iter()
        .filter_map(|m| Some((m["step"].as_u64()?, m["train/CrossEntropyLoss"].as_f64()?)))
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_metrics_checkpoints_and_a_plot() {
    let r = Run::new();
    let cfg = r.config(
        "c.yaml",
        "run",
        "max_duration: 80\nsave_interval: 10\nsave_num_checkpoints_to_keep: 2\n\
         evaluators:\n  - label: held\n    data: {paths: ['HELD']}\neval_interval: 40\n\
         speed_monitor: {window_size: 5, gpu_flops_available: 1.0e+12}\n",
    );
    edit(&cfg, &[("HELD", r.path("b.npy").to_str().unwrap())]);
    let err = ok(&r.train(&cfg, &[]));
    assert!(err.contains("done: 80 steps"), "{err}");
    assert!(!err.contains("ignoring config fields"), "{err}");
    let m = r.metrics("run");
    let l = losses(&m);
    assert_eq!(l.len(), 80);
    // throughput as OLMo's SpeedMonitor: none for the first batch (warm-up), then over the
    // window, per device (8 windows of 16 tokens a batch), with MFU against the given peak
    let train: Vec<&serde_json::Value> = m
        .iter()
        .filter(|m| m.get("train/CrossEntropyLoss").is_some())
        .collect();
    assert!(train[0]
        .get("throughput/device/tokens_per_second")
        .is_none());
    assert!(train[0].get("throughput/device/MFU").is_none());
    for t in &train[1..] {
        let tps = t["throughput/device/tokens_per_second"].as_f64().unwrap();
        let bps = t["throughput/device/batches_per_second"].as_f64().unwrap();
        assert!((tps / bps - 128.0).abs() < 1e-6, "{t}");
        let flops = t["throughput/device/model_flops_per_token"]
            .as_f64()
            .unwrap();
        let mfu = t["throughput/device/MFU"].as_f64().unwrap();
        assert!(
            (mfu - 100.0 * flops * tps / 1e12).abs() <= 1e-9 * mfu,
            "{t}"
        );
    }
    assert!(err.contains("tokens/s  MFU"), "{err}");
    // starts near ln(128) (uniform over the padded vocabulary) times 15/16, OLMo's divisor
    // (the 15 targets of each window of 16 summed, divided by 16 tokens), ends far below
    let start = 128f64.ln() * 15.0 / 16.0;
    assert!((l[0].1 - start).abs() < 0.05, "{} vs {start}", l[0].1);
    assert!(
        l[79].1 < l[0].1 / 2.0,
        "loss went from {} to {}",
        l[0].1,
        l[79].1
    );
    // evals at 0, 40 and 80, with the unigram baseline at step 0
    let evals: Vec<(u64, f64)> = m
        .iter()
        .filter_map(|m| {
            Some((
                m["step"].as_u64()?,
                m["eval/held/CrossEntropyLoss"].as_f64()?,
            ))
        })
        .collect();
    assert_eq!(
        evals.iter().map(|e| e.0).collect::<Vec<_>>(),
        vec![0, 40, 80]
    );
    let uni = m[0]["eval/held/UnigramCrossEntropy"].as_f64().unwrap();
    assert!(uni > evals[2].1, "unigram {uni}, evals {evals:?}");
    // keep-2 pruning, the latest link, a self-describing checkpoint
    let out = r.path("run");
    assert!(!out.join("step10").exists() && !out.join("step60").exists());
    assert!(out.join("step70").exists() && out.join("step80/optim.safetensors").exists());
    assert_eq!(
        std::fs::read_link(out.join("latest")).unwrap(),
        Path::new("step80")
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("step80/train.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 80);
    assert_eq!(state["global_train_tokens_seen"], 80 * 8 * 16);
    // 384 windows / 8 = 48 steps per epoch: step 80 is the 32nd of epoch 1
    assert_eq!(state["epoch"], 1);
    assert_eq!(state["global_train_examples_seen_this_epoch"], 32 * 8);
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    // global_indices.npy: raw uint32, one per instance
    assert_eq!(
        std::fs::metadata(out.join("train_data/global_indices.npy"))
            .unwrap()
            .len(),
        384 * 4
    );
}

#[test]
fn a_stopped_run_resumes_to_the_same_bits_with_any_thread_count() {
    let r = Run::new();
    // 60 steps cross an epoch boundary (48 steps per epoch)
    let whole = r.config(
        "whole.yaml",
        "whole",
        "max_duration: 60\nsave_interval: 25\n",
    );
    ok(&r.train(&whole, &["--threads", "2"]));
    // the first part computes its layer again in the backward pass, which changes no bits
    let parts = r.config(
        "parts.yaml",
        "parts",
        "max_duration: 60\nsave_interval: 25\nstop_at: 37\nactivation_checkpointing: true\n",
    );
    let err = ok(&r.train(&parts, &["--threads", "2"]));
    assert!(err.contains("done: 37 steps"), "{err}");
    assert!(
        err.contains("activation checkpointing whole_layer: 1 of 1 blocks computed again"),
        "{err}"
    );
    // a crash after step 37 left a half-written checkpoint behind: it must be ignored
    std::fs::create_dir_all(r.path("parts/step50.tmp")).unwrap();
    let parts = r.config(
        "parts.yaml",
        "parts",
        "max_duration: 60\nsave_interval: 25\n",
    );
    let err = ok(&r.train(&parts, &["--threads", "1"]));
    assert!(
        err.contains("resuming from") && err.contains("step37"),
        "{err}"
    );
    assert!(err.contains("epoch 1 begins"), "{err}");
    let a = r.weights("whole/step60");
    let b = r.weights("parts/step60");
    assert!(a == b, "resumed weights differ");
    let a = std::fs::read(r.path("whole/step60/optim.safetensors")).unwrap();
    let b = std::fs::read(r.path("parts/step60/optim.safetensors")).unwrap();
    assert!(a == b, "resumed optimizer state differs");
    assert_eq!(losses(&r.metrics("whole")), losses(&r.metrics("parts")));
    // the record of what each step trained on: the same bytes, and epoch 0's steps are
    // consecutive runs of the global order
    let indices = |run: &str| r.path(run).join("data-indices/rank0.tsv.gz");
    assert!(std::fs::read(indices("whole")).unwrap() == std::fs::read(indices("parts")).unwrap());
    let lines = data_index_lines(&indices("parts"));
    assert_eq!(lines.len(), 60);
    let order = global_indices(&r.path("whole/train_data/global_indices.npy"));
    for (k, (step, ids)) in lines.iter().take(48).enumerate() {
        assert_eq!(*step, k as u64 + 1);
        assert_eq!(ids, &order[k * 8..k * 8 + 8]);
    }
}

/// A safetensors file's JSON header: tensor name → dtype, shape, offsets.
fn safetensors_header(path: &Path) -> serde_json::Value {
    let st = std::fs::read(path).unwrap();
    let len = u64::from_le_bytes(st[..8].try_into().unwrap()) as usize;
    serde_json::from_slice(&st[8..8 + len]).unwrap()
}

/// `data-indices/rank{R}.tsv.gz` as (step, indices) lines.
fn data_index_lines(path: &Path) -> Vec<(u64, Vec<u32>)> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    index_lines(&text)
}

/// Data-indices text (OLMo's format: step, then each instance, tab-separated) as (step,
/// indices) lines.
fn index_lines(text: &str) -> Vec<(u64, Vec<u32>)> {
    text.lines()
        .map(|l| {
            let mut f = l.split('\t').map(|x| x.parse::<u64>().unwrap());
            let step = f.next().unwrap();
            (step, f.map(|x| x as u32).collect())
        })
        .collect()
}

/// The instances `batch-at STEP --from-run RUN` lists.
fn batch_at_run(cfg: &Path, step: u64, run: &Path, args: &[&str]) -> Vec<u32> {
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["batch-at", &step.to_string(), "-c"])
        .arg(cfg)
        .arg("--from-run")
        .arg(run)
        .args(args)
        .output()
        .unwrap();
    ok(&o);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect()
}

/// `train_data/global_indices.npy`: raw little-endian uint32.
fn global_indices(path: &Path) -> Vec<u32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn cuda_present() -> bool {
    olmo_train::device::cuda_unavailable().is_ok()
}

#[test]
fn device_auto_falls_back_to_the_cpu_without_a_gpu() {
    let r = Run::new();
    let cfg = r.config("c.yaml", "run", "max_duration: 3\n");
    let err = ok(&r.train(&cfg, &["--device", "auto"]));
    if cuda_present() {
        assert!(err.contains("device cuda:0"), "{err}");
    } else {
        assert!(err.contains("device cpu (auto: no CUDA:"), "{err}");
        assert!(
            err.contains("could not be loaded") || err.contains("no GPU"),
            "{err}"
        );
        let o = r.train(&cfg, &["--device", "cuda:0"]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("device cuda:0 requested, but"), "{err}");
    }
    assert!(err.contains("done: 3 steps"), "{err}");
}

/// Two ranks launched as torchrun launches them (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
/// `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` at a free local port), each `command()` with its rank's
/// environment; their outputs.
fn two_ranks(command: impl Fn() -> Command) -> (Output, Output) {
    let (a, b) = spawn_two_ranks(command);
    (a.wait_with_output().unwrap(), b.wait_with_output().unwrap())
}

fn spawn_two_ranks(command: impl Fn() -> Command) -> (std::process::Child, std::process::Child) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let spawn = |rank: &str| {
        command()
            .envs([
                ("RANK", rank),
                ("WORLD_SIZE", "2"),
                ("LOCAL_RANK", rank),
                ("LOCAL_WORLD_SIZE", "2"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
            ])
            .env_remove("RAYON_NUM_THREADS")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    (spawn("0"), spawn("1"))
}

#[test]
fn two_ranks_train_like_one_process() {
    let r = Run::new();
    let one = r.config("one.yaml", "one", "max_duration: 12\nsave_interval: 6\n");
    ok(&r.train(&one, &[]));
    let two = r.config("two.yaml", "two", "max_duration: 12\nsave_interval: 6\n");
    let (a, b) = two_ranks(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_olmo-train"));
        c.args(["train", "-c", two.to_str().unwrap(), "--device", "cpu"]);
        c
    });
    let err = ok(&a);
    ok(&b);
    assert!(err.contains("2 ranks joined"), "{err}");
    // the two ranks on this host share its cores
    let cores = std::thread::available_parallelism().unwrap().get();
    let threads = format!("cpu, f32, {} threads", (cores / 2).max(1));
    assert!(err.contains(&threads), "{threads} in {err}");
    // rank 1 trains silently and writes only its data indices: every other instance of each
    // batch, rank 0 the others (OLMo's `[rank::world]`)
    assert!(String::from_utf8_lossy(&b.stderr).trim().is_empty());
    let whole = data_index_lines(&r.path("one/data-indices/rank0.tsv.gz"));
    let rank0 = data_index_lines(&r.path("two/data-indices/rank0.tsv.gz"));
    let rank1 = data_index_lines(&r.path("two/data-indices/rank1.tsv.gz"));
    assert_eq!(whole.len(), 12);
    // batch-at puts the ranks' shares back together, or shows one
    assert_eq!(batch_at_run(&two, 4, &r.path("two"), &[]), whole[4].1);
    assert_eq!(
        batch_at_run(&two, 4, &r.path("two"), &["--rank", "1"]),
        rank1[4].1
    );
    for ((w, a), b) in whole.iter().zip(&rank0).zip(&rank1) {
        assert_eq!((w.0, w.0), (a.0, b.0));
        let even: Vec<u32> = w.1.iter().step_by(2).copied().collect();
        let odd: Vec<u32> = w.1.iter().skip(1).step_by(2).copied().collect();
        assert_eq!((&even, &odd), (&a.1, &b.1));
    }
    let (x, y) = (losses(&r.metrics("one")), losses(&r.metrics("two")));
    assert_eq!(x.len(), 12);
    // the device throughput counts this rank's half of each batch of 8 windows of 16
    for t in r.metrics("two").iter().skip(1) {
        let tps = t["throughput/device/tokens_per_second"].as_f64().unwrap();
        let bps = t["throughput/device/batches_per_second"].as_f64().unwrap();
        assert!((tps / bps - 64.0).abs() < 1e-6, "{t}");
    }
    for (p, q) in x.iter().zip(&y) {
        assert!((p.1 - q.1).abs() < 1e-4, "{x:?} vs {y:?}");
    }
    assert!(r.path("two/step12/model.safetensors").exists());
}

/// The CUDA engine's data-parallel path without GPUs: two `--device cuda` ranks on the
/// stand-in libraries (`standin/`), NCCL's id sent over the rendezvous and the gradients
/// all-reduced by the NCCL stand-in, against one CUDA process on the same stand-ins.
#[test]
fn two_cuda_ranks_all_reduce_through_nccl_like_one_process() {
    let Some(libs) = standin::build() else { return };
    let path = standin::library_path(libs.path());
    let r = Run::new();
    // small: every CUDA thread is emulated on the host
    let config = |name: &str| {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            "max_duration: 3
precision: fp32
",
        );
        edit(
            &cfg,
            &[
                ("max_sequence_length: 16", "max_sequence_length: 8"),
                ("global_train_batch_size: 8", "global_train_batch_size: 4"),
            ],
        );
        cfg
    };
    let command = |cfg: &Path| {
        let mut c = r.train_on_standins(cfg, libs.path());
        c.env("CUDA_STANDIN_DEVICES", "2");
        c
    };
    let Some(err) = ok_on_standins(&command(&config("one")).output().unwrap()) else {
        return;
    };
    assert!(
        err.contains("device cuda:0") && err.contains("CUDA stand-in"),
        "{err}"
    );
    let ranks = |name: &str, env: &[(&str, &str)]| {
        let cfg = config(name);
        let (a, b) = two_ranks(|| {
            let mut c = command(&cfg);
            c.envs(env.iter().copied());
            c
        });
        let (ea, eb) = (ok(&a), ok(&b));
        assert!(ea.contains("2 ranks joined"), "{ea}");
        let (x, y) = (losses(&r.metrics("one")), losses(&r.metrics(name)));
        assert_eq!(x.len(), 3);
        for (p, q) in x.iter().zip(&y) {
            assert!((p.1 - q.1).abs() < 1e-5, "{x:?} vs {y:?}");
        }
        (ea, eb)
    };
    let (ea, eb) = ranks("nccl", &[]);
    assert!(!ea.contains("libnccl not found"), "{ea}");
    // the summary's peak is the ranks' largest (rank 0 alone says it)
    assert!(
        ea.contains(" GiB (the largest rank's)") && !eb.contains("olmo-train: done"),
        "{ea}"
    );
    // each rank on its own device, all-reducing once per step
    assert!(
        ea.contains("nccl stand-in: rank 0 of 2, 3 all-reduces"),
        "{ea}"
    );
    assert!(
        eb.contains("nccl stand-in: rank 1 of 2, 3 all-reduces"),
        "{eb}"
    );
    // OLMO_TRAIN_NCCL=0: through the host, with libnccl present (two ranks on one GPU)
    let (ea, _) = ranks("no-nccl", &[("OLMO_TRAIN_NCCL", "0")]);
    assert!(
        ea.contains("OLMO_TRAIN_NCCL=0: gradients are summed through the host"),
        "{ea}"
    );
    assert!(!ea.contains("nccl stand-in: rank"), "{ea}");
    // NCCL refusing the communicator (as it refuses two ranks on one GPU): each rank stops
    // with NCCL's code and what to do, no hang
    let cfg = config("refused");
    let (a, b) = two_ranks(|| {
        let mut c = command(&cfg);
        c.env("NCCL_STANDIN_REFUSE", "1");
        c
    });
    for out in [&a, &b] {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(
            err.contains("creating the NCCL communicator")
                && err.contains("ncclInvalidUsage (nccl stand-in error)")
                && err.contains("OLMO_TRAIN_NCCL=0")
                && !err.contains("panicked"),
            "{err}"
        );
    }
    // without libnccl the gradients go through the host, saying so, to the same losses (unless
    // a real libnccl would load in the stand-in's place)
    std::fs::remove_file(libs.path().join("libnccl.so")).unwrap();
    let real_nccl = path
        .split(':')
        .chain(["/usr/lib", "/usr/lib64", "/usr/lib/x86_64-linux-gnu"])
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .flatten()
        .any(|f| f.file_name().to_string_lossy().starts_with("libnccl.so"));
    if real_nccl {
        eprintln!("skipped the host all-reduce check: a real libnccl is on the library path");
        return;
    }
    let (ea, _) = ranks("host", &[]);
    assert!(ea.contains("libnccl not found"), "{ea}");
    assert!(!ea.contains("nccl stand-in"), "{ea}");
}

#[test]
fn flash_attention_trains_on_the_cuda_engine_and_falls_back_where_it_cannot_run() {
    // d 64 over 2 heads: head size 32, one the flash kernels are built for
    let r = Run::new();
    let flash = |name: &str, extra: &str| {
        let cfg = r.config(&format!("{name}.yaml"), name, extra);
        edit(
            &cfg,
            &[(
                "d_model: 16\n  n_heads: 2\n",
                "d_model: 64\n  n_heads: 2\n  flash_attention: true\n",
            )],
        );
        cfg
    };
    let extra = "max_duration: 5\n";
    let cpu = ok(&r.train(&flash("cpu", extra), &["--device", "cpu"]));
    assert!(cpu.contains("done: 5 steps"), "{cpu}");
    let emu = ok(&r.train(&flash("emu", extra), &["--device", "cuda-emulator"]));
    assert!(emu.contains("flash attention"), "{emu}");
    let (a, b) = (losses(&r.metrics("cpu")), losses(&r.metrics("emu")));
    assert_eq!(a.len(), 5);
    // bf16 q, k, v and probabilities against the CPU's f32 attention
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 2e-2 * x.1, "{a:?} vs {b:?}");
    }
    // fp32 has no flash kernels: the run says so and uses the materialised attention
    let fp32 = ok(&r.train(
        &flash("fp32", "max_duration: 2\nprecision: fp32\n"),
        &["--device", "cuda-emulator"],
    ));
    assert!(
        fp32.contains("flash_attention") && fp32.contains("materialised attention"),
        "{fp32}"
    );
}

/// On a GPU (here the stand-ins) the first step times each flash kernel in both block sizes
/// and keeps the faster; the log says what it chose, once per kernel (sequences of 15 inputs:
/// windows of 16 tokens).
#[test]
fn a_cuda_run_logs_the_flash_block_sizes_timing_chose() {
    let Some(libs) = standin::build() else { return };
    let r = Run::new();
    let cfg = r.config("flash.yaml", "flash", "max_duration: 2\n");
    edit(
        &cfg,
        &[
            (
                "d_model: 16\n  n_heads: 2\n",
                "d_model: 64\n  n_heads: 2\n  flash_attention: true\n",
            ),
            ("global_train_batch_size: 8", "global_train_batch_size: 2"),
        ],
    );
    let out = r.train_on_standins(&cfg, libs.path()).output().unwrap();
    let Some(err) = ok_on_standins(&out) else {
        return;
    };
    assert!(
        err.contains("CUDA stand-in") && err.contains("flash attention"),
        "{err}"
    );
    // what the memory planner foresees, against the stand-in GPU's 16 GiB, 8 of them free
    assert!(
        err.contains("GPU memory (memory planner): state ")
            && err.contains("of the GPU's 16.0 GiB (8.0 GiB free now)"),
        "{err}"
    );
    for kind in ["fwd", "dq", "dkdv"] {
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| l.starts_with(&format!("olmo-train: flash_{kind} (2x15): ")))
            .collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].contains(" blocks (") && lines[0].contains("; wide "),
            "{err}"
        );
    }
    // the device memory peak as OLMo logs it, never falling (it is never reset), and in the
    // summary: at least the weights, gradients and AdamW state (4 f32 copies of the block's
    // 10·64² weights; 7·64² leaves room)
    let peaks: Vec<f64> = r
        .metrics("flash")
        .iter()
        .filter_map(|m| m["System/Peak GPU Memory (MB)"].as_f64())
        .collect();
    assert_eq!(peaks.len(), 2, "{err}");
    assert!(peaks[0] > 16.0 * 7.0 * 64.0 * 64.0 / 1e6, "{peaks:?}");
    assert!(peaks[1] >= peaks[0], "{peaks:?}");
    assert!(err.contains(", peak GPU memory "), "{err}");
}

/// A GPU without memory pools (stream-ordered allocation, absent on some virtualised GPUs):
/// allocations take `cuMemAlloc` (the stand-in refuses `cuMemAllocAsync` there), the run
/// trains, and the memory peak, which only a pool keeps, is left out rather than an error.
#[test]
fn a_gpu_without_memory_pools_trains_without_a_memory_peak() {
    let Some(libs) = standin::build() else { return };
    let r = Run::new();
    let cfg = r.config(
        "nopool.yaml",
        "nopool",
        "max_duration: 2\nprecision: fp32\n",
    );
    let out = r
        .train_on_standins(&cfg, libs.path())
        .env("CUDA_STANDIN_NO_POOLS", "1")
        .output()
        .unwrap();
    let Some(err) = ok_on_standins(&out) else {
        return;
    };
    assert!(
        err.contains("CUDA stand-in") && err.contains("done: 2 steps"),
        "{err}"
    );
    assert!(!err.contains("peak GPU memory"), "{err}");
    let m = r.metrics("nopool");
    assert_eq!(losses(&m).len(), 2);
    assert!(m
        .iter()
        .all(|l| l.get("System/Peak GPU Memory (MB)").is_none()));
}

#[test]
fn a_step_the_gpu_has_no_room_for_is_refused_before_it_starts() {
    let Some(libs) = standin::build() else { return };
    let r = Run::new();
    // a GPU with 64 KiB left once the state is in: the step's activations do not fit
    let cfg = r.config("nofit.yaml", "nofit", "max_duration: 1\n");
    let out = r
        .train_on_standins(&cfg, libs.path())
        .env("CUDA_STANDIN_FREE", "65536")
        .output()
        .unwrap();
    if ok_on_standins_or_refused(&out).is_none() {
        return;
    }
    let err = refused(&out, "a training step of 8 x 16 would need");
    assert!(
        err.contains("the GPU has 64.0 KiB free of 16.0 GiB"),
        "{err}"
    );
    assert!(err.contains("set activation_checkpointing"), "{err}");
    assert!(!r.path("nofit/step1").exists());
}

#[test]
fn the_training_loop_runs_the_cuda_engine_like_the_cpu_engine() {
    // the CUDA engine on its host emulator, in fp32, through train, eval and checkpoints
    let r = Run::new();
    let extra = "max_duration: 6\nsave_interval: 3\nprecision: fp32\n\
                 evaluators:\n  - label: held\n    data: {paths: ['HELD']}\neval_interval: 3\n";
    for (name, dev) in [("cpu", "cpu"), ("emu", "cuda-emulator")] {
        let cfg = r.config(&format!("{name}.yaml"), name, extra);
        edit(&cfg, &[("HELD", r.path("b.npy").to_str().unwrap())]);
        let err = ok(&r.train(&cfg, &["--device", dev]));
        assert!(err.contains("done: 6 steps"), "{err}");
    }
    let (a, b) = (r.metrics("cpu"), r.metrics("emu"));
    let (la, lb) = (losses(&a), losses(&b));
    assert_eq!(la.len(), 6);
    for (x, y) in la.iter().zip(&lb) {
        assert!((x.1 - y.1).abs() < 1e-4, "{la:?} vs {lb:?}");
    }
    let eval = |m: &[serde_json::Value]| {
        m.iter()
            .filter_map(|v| v["eval/held/CrossEntropyLoss"].as_f64())
            .collect::<Vec<_>>()
    };
    let (ea, eb) = (eval(&a), eval(&b));
    assert_eq!(ea.len(), 3);
    for (x, y) in ea.iter().zip(&eb) {
        assert!((x - y).abs() < 1e-4, "{ea:?} vs {eb:?}");
    }
    assert!(r.path("emu/step6/optim.safetensors").exists());
    // `eval` scores the saved checkpoint as the training run's last eval did
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["eval", "-c"])
        .arg(r.path("cpu.yaml"))
        .args(["--checkpoint"])
        .arg(r.path("cpu/step6"))
        .output()
        .unwrap();
    ok(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    let ce: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("eval/held/CrossEntropyLoss "))
        .unwrap()
        .parse()
        .unwrap();
    assert!((ce - ea[2]).abs() < 1e-5, "{ce} vs {}", ea[2]);
    assert!(out.contains("eval/held/UnigramCrossEntropy"), "{out}");
}

#[test]
fn micro_batches_accumulate_to_the_batch_mean() {
    let r = Run::new();
    let one = r.config("one.yaml", "one", "max_duration: 5\n");
    let four = r.config(
        "four.yaml",
        "four",
        "max_duration: 5\ndevice_train_microbatch_size: 2\n",
    );
    ok(&r.train(&one, &[]));
    ok(&r.train(&four, &[]));
    let (a, b) = (losses(&r.metrics("one")), losses(&r.metrics("four")));
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-4, "{a:?} vs {b:?}");
    }
}

#[test]
fn a_nan_loss_stops_the_run_and_names_the_last_checkpoint() {
    let r = Run::new();
    let cfg = r.config("c.yaml", "run", "max_duration: 30\nsave_interval: 1\n");
    // a learning rate that overflows the weights within a few steps
    edit(
        &cfg,
        &[
            ("learning_rate: 1.0e-2", "learning_rate: 1.0e+37"),
            ("max_grad_norm: 1.0", ""),
        ],
    );
    let o = r.train(&cfg, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("loss is NaN") || err.contains("loss is inf"),
        "{err}"
    );
    assert!(
        err.contains("last good checkpoint") && err.contains("/run/step"),
        "{err}"
    );
}

#[test]
fn bad_data_and_configs_are_explained() {
    let r = Run::new();
    let base = r.config("c.yaml", "run", "max_duration: 5\n");
    let text = std::fs::read_to_string(&base).unwrap();
    let fails = |edit: &str, want: &str| {
        let cfg = r.path("bad.yaml");
        std::fs::write(&cfg, edit).unwrap();
        refused(&r.train(&cfg, &[]), want);
    };
    // ids beyond the vocabulary (a tokenizer/vocab mismatch), named with file and position
    fails(
        &text.replace("vocab_size: 16", "vocab_size: 8"),
        "outside the vocabulary",
    );
    // uint16 tokens read as uint32 give huge ids: the up-front check catches it
    fails(
        &text.replace("paths:", "memmap_dtype: uint32\n  paths:"),
        "memmap_dtype",
    );
    std::fs::write(r.path("empty.npy"), b"").unwrap();
    fails(&text.replace("a.npy", "empty.npy"), "empty token file");
    fails(&text.replace("a.npy", "missing.npy"), "matched no file");
    fails(
        &text.replace("include_bias: false", "include_bias: true"),
        "include_bias",
    );
    // OLMo's defaults where a key is absent, so a config means the same model in both: where
    // this engine does not implement the default, leaving the key out is an error saying so
    fails(
        &text.replace("  rope: true\n", ""),
        "rope: false (learned position embeddings; OLMo's default where the key is absent: set rope: true)",
    );
    fails(
        &text.replace("  include_bias: false\n", ""),
        "set include_bias: false",
    );
    fails(
        &text.replace("  residual_dropout: 0\n", ""),
        "OLMo's default is 0.1",
    );
    fails(
        &text.replace("  name: adamw\n", "  name: sgd\n"),
        "optimizer.name `sgd`: adamw and lionw are implemented",
    );
    fails(
        &(text.clone() + "evaluators:\n  - label: mmlu\n    type: downstream\n    path: x.jsonl\n"),
        "unknown task `mmlu`",
    );
    fails(
        &(text.clone() + "evaluators:\n  - label: piqa\n    type: downstream\n    path: https://h/piqa.jsonl\n"),
        "evaluator `piqa`: path `https://h/piqa.jsonl` is a https:// URL",
    );
    if !cuda_present() {
        fails(
            &text.replace("device: cpu", "device: cuda"),
            "requested, but",
        );
    }
    fails(
        &(text.clone() + "speed_monitor: {window_size: 0}\n"),
        "speed_monitor.window_size must be at least 1",
    );
    fails(
        &(text.clone() + "speed_monitor: {gpu_flops_available: -1}\n"),
        "speed_monitor.gpu_flops_available (-1)",
    );
    fails(
        &text.replace(
            "global_train_batch_size: 8",
            "global_train_batch_size: 4000",
        ),
        "cannot fill one global batch",
    );
    // options that would change the training math are refused, not ignored
    fails(
        &(text.clone() + "max_grad_norm_ratio: -1\n"),
        "max_grad_norm_ratio (-1) must be a positive number",
    );
    fails(
        &text.replace(
            "paths:",
            "instance_filter: {repetition_min_period: 5, repetition_max_period: 4}\n  paths:",
        ),
        "repetition_min_period (5) is above repetition_max_period (4)",
    );
    fails(
        &text.replace(
            "paths:",
            "instance_filter: {repetition_max_cout: 8}\n  paths:",
        ),
        "unknown field `repetition_max_cout`",
    );
    fails(
        &text.replace("paths:", "generate_doc_lengths: true\n  paths:"),
        "data.generate_doc_lengths cuts documents at model.eos_token_id, which is not set",
    );
    fails(
        &text
            .replace("paths:", "generate_doc_lengths: true\n  paths:")
            .replace("vocab_size: 16", "vocab_size: 16\n  eos_token_id: 16"),
        "model.eos_token_id (16) is outside the vocabulary (16)",
    );
    fails(
        &(text.clone() + "load_path: /no/such/run/step9\n"),
        "load_path /no/such/run/step9: no such checkpoint folder",
    );
    // OLMo's configs name remote objects, which this trainer does not stream
    fails(
        &text.replace("paths: [", "paths: ['s3://bucket/part-0.npy', "),
        "data.paths entry `s3://bucket/part-0.npy` is a s3:// URL: olmo-train reads local files only",
    );
    fails(
        &(text.clone() + "load_path: https://host/run/step9-unsharded\n"),
        "load_path `https://host/run/step9-unsharded` is a https:// URL",
    );
    std::fs::create_dir_all(r.path("empty-run")).unwrap();
    fails(
        &format!("{text}load_path: {}\n", r.path("empty-run").display()),
        "no model.safetensors or model.pt, and no checkpoint folders in it",
    );
}

#[test]
fn export_hf_writes_olmo_and_llama_layouts_and_import_hf_reads_them_back() {
    let r = Run::new();
    for (name, extra, arch) in [
        ("olmo", "", "OlmoForCausalLM"),
        ("llama", "", "LlamaForCausalLM"),
    ] {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 2\n{extra}"),
        );
        if name == "llama" {
            edit(
                &cfg,
                &[(
                    "layer_norm_with_affine: false",
                    "layer_norm_type: rms\n  layer_norm_with_affine: true\n  weight_tying: false",
                )],
            );
        }
        ok(&r.train(&cfg, &[]));
        let hf = r.path(&format!("{name}-hf"));
        let config = export_hf(&r.path(name).join("step2"), &hf);
        assert_eq!(config["architectures"][0], arch);
        assert_eq!(config["vocab_size"], 128);
        assert_eq!(config["intermediate_size"], 32);
        let header = safetensors_header(&hf.join("model.safetensors"));
        assert_eq!(
            header["model.layers.0.mlp.gate_proj.weight"]["shape"],
            serde_json::json!([32, 16])
        );
        assert_eq!(
            header["model.layers.0.self_attn.k_proj.weight"]["shape"],
            serde_json::json!([16, 16])
        );
        if name == "llama" {
            assert!(header
                .get("model.layers.0.input_layernorm.weight")
                .is_some());
            assert!(header.get("lm_head.weight").is_some());
            assert_eq!(config["tie_word_embeddings"], false);
        } else {
            assert!(header.get("model.norm.weight").is_none());
            assert_eq!(config["tie_word_embeddings"], true);
        }

        // import-hf reads it back to the same weights
        let back = r.path(&format!("{name}-back"));
        ok(&import_hf(&hf, &back, &cfg, &[]));
        let step2 = r.path(name).join("step2/model.safetensors");
        assert_eq!(max_change(&step2, &back.join("model.safetensors")), 0.0);
        if name == "llama" {
            // as transformers often ships it: BF16, in two shards with an index
            let shards = r.path("llama-bf16");
            bf16_shards(&hf, &shards);
            let back16 = r.path("llama-back16");
            ok(&import_hf(&shards, &back16, &cfg, &[]));
            let moved = max_change(&step2, &back16.join("model.safetensors"));
            // bf16 rounding: half a unit in the last place, 2^-8 for weights below 2
            assert!(moved > 0.0 && moved <= 1.0 / 256.0, "{moved}");
        }
        // a model that is not the config's is refused, naming the difference
        refused(
            &import_hf(&hf, &r.path("wrong"), &cfg, &["--model.n_layers=2"]),
            "num_hidden_layers is 1, the training config's model has 2",
        );
        // and a fine-tuning run starts from the imported weights
        let ft = r.config(
            &format!("{name}-ft.yaml"),
            &format!("{name}-ft"),
            &format!(
                "max_duration: 2\nload_path: {}\nreset_trainer_state: true\nreset_optimizer_state: true\n",
                back.display()
            ),
        );
        if name == "llama" {
            edit(
                &ft,
                &[(
                    "layer_norm_with_affine: false",
                    "layer_norm_type: rms\n  layer_norm_with_affine: true\n  weight_tying: false",
                )],
            );
        }
        let err = ok(&r.train(&ft, &[]));
        assert!(
            err.contains("-back: weights, fresh AdamW moments, a new trainer state at step 0"),
            "{err}"
        );
    }
}

/// `export-hf CHECKPOINT OUT`, which must succeed; returns the written `config.json`.
/// OLMo's checkpoints of one state, and that state in our format: `tests/data/olmo`.
fn olmo_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/olmo")
}

/// Copies the files of folder `from` into `to` (made), renaming per `rename` and leaving out
/// those renamed to "".
fn copy_folder(from: &Path, to: &Path, rename: &[(&str, &str)]) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        let target = rename
            .iter()
            .find(|(f, _)| *f == name)
            .map_or(name.as_str(), |(_, t)| t);
        if !target.is_empty() && from.join(&name).is_file() {
            std::fs::copy(from.join(&name), to.join(target)).unwrap();
        }
    }
}

/// `tests/data/olmo/step2-unsharded` is OLMo's unsharded checkpoint (`model.pt`, `optim.pt`,
/// `train.pt`, as its FullCheckpointer saves them) of the state in `tests/data/olmo/step2`,
/// which a 2-step run of `Run::config` wrote; `make_unsharded.py` made it with torch. Read as
/// a `load_path` (as `.pt` files or OLMo's safetensors form), and written by `export-olmo`,
/// it continues to the same bytes as ours.
#[test]
fn olmo_s_unsharded_checkpoints_are_read_and_written_continuing_as_ours() {
    let r = Run::new();
    let fixtures = olmo_fixtures();
    let config = |name: &str, from: &Path| r.continuing(name, from);
    let go = |name: &str, from: &Path| ok(&r.train(&config(name, from), &[]));
    go("ours", &fixtures.join("step2"));
    let err = go("olmo", &fixtures.join("step2-unsharded"));
    assert!(
        err.contains("step2-unsharded: weights, step 2, the data position (epoch 0, 16 instances in), AdamW's moments"),
        "{err}"
    );
    assert!(err.contains("is OLMo's: its train.pt does not record the data"));
    r.same_step4("ours", "olmo");
    // as `unshard.py --safe-tensors` writes it: OLMo's key encoding in model.safetensors and
    // optim.safetensors (made by make_unsharded_safetensors.py)
    go("st", &fixtures.join("step2-unsharded-st"));
    r.same_step4("ours", "st");

    // a plain optimizer's state dict, keyed by index, read through its param_names; and a
    // run folder of OLMo's stands for its newest unsharded checkpoint
    let olmo_run = r.path("olmo-run");
    copy_folder(
        &fixtures.join("step2-unsharded"),
        &olmo_run.join("step2-unsharded"),
        &[("optim.pt", ""), ("optim-by-index.pt", "optim.pt")],
    );
    std::fs::create_dir_all(olmo_run.join("step1/model_and_optim")).unwrap();
    let err = go("by-index", &olmo_run);
    assert!(
        err.contains("olmo-run/step2-unsharded: weights, step 2"),
        "{err}"
    );
    r.same_step4("ours", "by-index");

    // export-olmo writes the same state in OLMo's format (torch.load reads it:
    // tests/data/olmo/check_export.py), which continues as ours
    let export = |from: &Path, to: &Path| {
        Command::new(env!("CARGO_BIN_EXE_olmo-train"))
            .arg("export-olmo")
            .args([from, to])
            .output()
            .unwrap()
    };
    let exported = r.path("exported/step2-unsharded");
    let out = export(&fixtures.join("step2"), &exported);
    ok(&out);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!(
            "wrote model.pt, optim.pt, train.pt, config.yaml in {}",
            exported.display()
        )
    );
    go("exported", &exported);
    r.same_step4("ours", "exported");
    refused(
        &export(&fixtures.join("step2"), &exported),
        "exists and is not empty",
    );
    // weights alone (as import-hf writes them) give model.pt alone; OLMo knows an unsharded
    // checkpoint by its name, which is said
    let weights = r.path("weights");
    copy_folder(
        &fixtures.join("step2"),
        &weights,
        &[("optim.safetensors", ""), ("train.json", "")],
    );
    let err = ok(&export(&weights, &r.path("weights-olmo")));
    assert!(
        err.contains("rename") && err.contains("to end in -unsharded"),
        "{err}"
    );
    let mut files: Vec<String> = std::fs::read_dir(r.path("weights-olmo"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(files, ["config.yaml", "model.pt"]);

    // the weights go to export-hf as ours do
    assert!(
        r.hf_weights(&fixtures.join("step2"), "hf-ours")
            == r.hf_weights(&fixtures.join("step2-unsharded"), "hf-olmo")
    );

    // what cannot be read is said, naming the file
    let olmo = fixtures.join("step2-unsharded");
    refused(
        &r.train(&config("wide", &olmo), &["--model.d_model=32"]),
        "model.pt: `transformer.wte.weight` is [128, 16], the configured model's `transformer.wte.weight` is [128, 32]: is the config's model the checkpoint's?",
    );
    refused(
        &r.train(&config("seed", &olmo), &["--seed=7"]),
        "the checkpoint's data order was shuffled with seed 6198, the config gives 7",
    );
    let no_optim = r.path("no-optim");
    copy_folder(&olmo, &no_optim, &[("optim.pt", "")]);
    refused(
        &r.train(&config("no-optim", &no_optim), &[]),
        "no-optim/optim.pt is missing (set reset_optimizer_state",
    );
    let err = ok(&r.train(
        &config("fresh", &no_optim),
        &["--reset_optimizer_state=true"],
    ));
    assert!(
        err.contains("fresh AdamW moments with the LR warming up again from step 2"),
        "{err}"
    );
    let cut = r.path("cut");
    copy_folder(&olmo, &cut, &[]);
    let model = std::fs::read(cut.join("model.pt")).unwrap();
    std::fs::write(cut.join("model.pt"), &model[..model.len() / 2]).unwrap();
    refused(
        &r.train(&config("cut", &cut), &[]),
        "cut/model.pt: no zip directory at the end (a truncated file?)",
    );
    let sharded = r.path("sharded-run");
    std::fs::create_dir_all(sharded.join("step3/model_and_optim")).unwrap();
    refused(
        &r.train(&config("sharded", &sharded), &[]),
        "sharded-run/step3: one of OLMo's checkpoints, sharded but without model_and_optim/.metadata",
    );
    std::fs::write(sharded.join("step3/rank0.pt"), "").unwrap();
    refused(
        &r.train(&config("sharded", &sharded), &[]),
        "sharded by its legacy checkpointer (per-rank FSDP shards, rank{R}.pt), which olmo-train does not read: unshard it with OLMo's scripts/unshard.py",
    );
}

/// What of an OLMo `optim.pt` depends on how the run wrapped its model: each param group's
/// `params`, `param_names`, `sharded` and weight decay, and each state entry's key and fields.
fn optim_form(path: &Path) -> Vec<String> {
    let (_, root) = olmo_train::torch_file::TorchFile::open(path).unwrap();
    let briefs =
        |v: Value| -> Vec<String> { v.items().unwrap().iter().map(Value::brief).collect() };
    let mut form: Vec<String> = root
        .get("param_groups")
        .unwrap()
        .items()
        .unwrap()
        .into_iter()
        .map(|g| {
            format!(
                "params {:?} names {:?} sharded {:?} weight decay {}",
                briefs(g.get("params").unwrap()),
                briefs(g.get("param_names").unwrap()),
                g.get("sharded").unwrap().as_int(),
                g.get("weight_decay").unwrap().brief(),
            )
        })
        .collect();
    for (key, fields) in root.get("state").unwrap().entries() {
        let mut names: Vec<String> = fields.entries().iter().map(|(k, _)| k.brief()).collect();
        names.sort();
        form.push(format!("state {} {names:?}", key.brief()));
    }
    form
}

/// `export-olmo --distributed_strategy ddp` (or a checkpoint whose config says
/// `distributed_strategy: ddp`) writes `optim.pt` in the form OLMo's DDP runs save, which its
/// DDP path loads as it stands: an FSDP-form `sharded: true` would make OLMo add each rank's
/// whole-gradient norm once per rank, clipping √world too hard (measured: OLMo's grad norm
/// 1.17 for 0.83 on two ranks). Checked against what OLMo's own DDP run saved for this model.
#[test]
fn export_olmo_writes_the_optimizer_form_of_olmo_s_ddp_runs() {
    let r = Run::new();
    let fixtures = olmo_fixtures();
    let export = |to: &Path, strategy: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_olmo-train"))
            .arg("export-olmo")
            .args([&fixtures.join("step2"), to])
            .args(strategy)
            .output()
            .unwrap()
    };
    refused(
        &export(&r.path("zero"), &["--distributed_strategy=zero"]),
        "`zero`: OLMo's unsharded checkpoints come from `fsdp` or `ddp` runs",
    );
    let ddp = r.path("ddp/step2-unsharded");
    ok(&export(&ddp, &["--distributed_strategy", "ddp"]));
    let olmo_s = optim_form(&fixtures.join("by-olmo/step2-unsharded/optim.pt"));
    assert!(olmo_s
        .iter()
        .any(|l| l.contains("module.transformer.wte.weight")));
    assert_eq!(optim_form(&ddp.join("optim.pt")), olmo_s);
    // a checkpoint of a run configured for DDP is exported in DDP's form unasked; one whose
    // strategy OLMo's unsharded checkpoints do not come from is asked about
    let from = |name: &str, strategy: &str| {
        let ck = r.path(name);
        copy_folder(&fixtures.join("step2"), &ck, &[]);
        let cfg = ck.join("config.yaml");
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(&cfg, format!("{text}\ndistributed_strategy: {strategy}\n")).unwrap();
        Command::new(env!("CARGO_BIN_EXE_olmo-train"))
            .arg("export-olmo")
            .args([ck.clone(), r.path(&format!("{name}-olmo/step2-unsharded"))])
            .output()
            .unwrap()
    };
    ok(&from("ddp-run", "ddp"));
    assert_eq!(
        optim_form(&r.path("ddp-run-olmo/step2-unsharded/optim.pt")),
        olmo_s
    );
    refused(
        &from("single-run", "single"),
        "distributed_strategy (give the OLMo run's with --distributed_strategy fsdp|ddp)",
    );
    // the FSDP form (the default) differs, and both continue as ours
    let fsdp = r.path("fsdp/step2-unsharded");
    ok(&export(&fsdp, &[]));
    assert_ne!(optim_form(&fsdp.join("optim.pt")), olmo_s);
    for (name, from) in [
        ("ours", fixtures.join("step2")),
        ("from-ddp", ddp),
        ("from-fsdp", fsdp),
    ] {
        ok(&r.train(&r.continuing(name, &from), &[]));
    }
    r.same_step4("ours", "from-ddp");
    r.same_step4("ours", "from-fsdp");
}

/// `tests/data/olmo/by-olmo` was written by OLMo's own trainer (ai2-olmo 0.6.0, on CPU, one
/// DDP rank, fp32; `make_by_olmo.sh`): `Run::config`'s model trained 52 steps on `Run::new`'s
/// tokens (an epoch is 48), two of its unsharded checkpoints kept with what it logged at each
/// step and the instances of each batch. Continued here from step 2 and from step 46 (across
/// the epoch boundary, where OLMo reshuffles), each step trains on the batch OLMo's did, at
/// its learning rate, to its loss and grad norm (to float32 rounding, the engines summing in
/// different orders, which grows over steps). A DDP run names its optimizer's parameters
/// `module.transformer...`: the hand-made fixtures did not catch that.
#[test]
fn checkpoints_olmo_s_trainer_wrote_continue_as_olmo_did() {
    let r = Run::new();
    let by_olmo = olmo_fixtures().join("by-olmo");
    let olmo = json_lines(&by_olmo.join("metrics.jsonl"));
    let olmo_batches =
        index_lines(&std::fs::read_to_string(by_olmo.join("data-indices.tsv")).unwrap());
    assert_eq!(olmo_batches.len(), 52);
    for (from, tol) in [(2u64, 1e-4), (46, 1e-5)] {
        let name = format!("from{from}");
        let cfg = r.continuing(&name, &by_olmo.join(format!("step{from}-unsharded")));
        ok(&r.train(&cfg, &["--precision=fp32", "--max_duration=52"]));
        let worst = assert_logged_as_olmo(&olmo, &r.metrics(&name), from + 1..=52, tol);
        eprintln!("from step {from}: largest relative difference {worst:e}");
        assert_eq!(
            data_index_lines(&r.path(&name).join("data-indices/rank0.tsv.gz")),
            olmo_batches[from as usize..].to_vec()
        );
    }
}

/// Asserts that at each of `steps` our run logged OLMo's loss, grad norm and LR within `tol`
/// (relative); returns the largest relative difference.
fn assert_logged_as_olmo(
    olmo: &[serde_json::Value],
    ours: &[serde_json::Value],
    steps: std::ops::RangeInclusive<u64>,
    tol: f64,
) -> f64 {
    let mut worst = 0f64;
    for step in steps {
        let find = |rows: &[serde_json::Value]| {
            rows.iter()
                .find(|m| m["step"] == step && m.get("train/CrossEntropyLoss").is_some())
                .unwrap_or_else(|| panic!("no step {step}"))
                .clone()
        };
        let (o, u) = (find(olmo), find(ours));
        for key in [
            "train/CrossEntropyLoss",
            "optim/total_grad_norm",
            "optim/learning_rate_group0",
        ] {
            let (a, b) = (o[key].as_f64().unwrap(), u[key].as_f64().unwrap());
            worst = worst.max((a - b).abs() / a.abs());
            assert!(
                (a - b).abs() <= tol * a.abs(),
                "step {step} {key}: OLMo {a}, ours {b}"
            );
        }
    }
    worst
}

/// `tests/data/olmo/by-olmo/fsdp` is a sharded checkpoint OLMo's trainer wrote from two FSDP
/// ranks (`make_by_olmo.sh`; its `torch_new` checkpointer: each rank's chunks in
/// `model_and_optim/`, `train/rank{R}.pt`), with what it logged and each rank's batches. One
/// process continuing it trains each step on both ranks' instances, in the global order OLMo's
/// ranks took turns in, to OLMo's losses.
#[test]
fn a_sharded_checkpoint_olmo_s_fsdp_ranks_wrote_continues_in_one_process() {
    let r = Run::new();
    let fsdp = olmo_fixtures().join("by-olmo/fsdp");
    ok(&r.train(
        &r.continuing("go", &fsdp.join("step2")),
        &["--precision=fp32"],
    ));
    let worst = assert_logged_as_olmo(
        &json_lines(&fsdp.join("metrics.jsonl")),
        &r.metrics("go"),
        3..=4,
        1e-5,
    );
    eprintln!("largest relative difference {worst:e}");
    let rank =
        |k: u32| index_lines(&std::fs::read_to_string(fsdp.join(format!("rank{k}.tsv"))).unwrap());
    let global: Vec<(u64, Vec<u32>)> = rank(0)
        .into_iter()
        .zip(rank(1))
        .map(|((step, a), (_, b))| (step, a.iter().zip(&b).flat_map(|(x, y)| [*x, *y]).collect()))
        .collect();
    assert_eq!(
        data_index_lines(&r.path("go/data-indices/rank0.tsv.gz")),
        global[2..].to_vec()
    );
}

/// `tests/data/olmo/step2-sharded` is OLMo's sharded checkpoint (its `torch_new`
/// checkpointer's: `model_and_optim/` as torch.distributed.checkpoint saves it, every tensor
/// in two chunks from two ranks, and `train/rank{R}.pt`) of the state in
/// `tests/data/olmo/step2`; `make_sharded.py` made it with torch.
#[test]
fn olmo_s_sharded_checkpoint_continues_as_ours() {
    let r = Run::new();
    let fixtures = olmo_fixtures();
    let config = |name: &str, from: &Path| r.continuing(name, from);
    ok(&r.train(&config("ours", &fixtures.join("step2")), &[]));
    // an OLMo run folder: the sharded step2 stands for the run
    let run = r.path("olmo-run");
    let from = fixtures.join("step2-sharded");
    for sub in ["", "model_and_optim", "train"] {
        copy_folder(&from.join(sub), &run.join("step2").join(sub), &[]);
    }
    let err = ok(&r.train(&config("sharded", &run), &[]));
    assert!(
        err.contains("olmo-run/step2: weights, step 2, the data position (epoch 0, 16 instances in), AdamW's moments"),
        "{err}"
    );
    r.same_step4("ours", "sharded");
    // a save_folder that is the folder of a run OLMo trained: the run resumes its newest
    // checkpoint, and goes on saving its own beside OLMo's
    for sub in ["", "model_and_optim", "train"] {
        copy_folder(&from.join(sub), &r.path("in-place/step2").join(sub), &[]);
    }
    let cfg = r.config("in-place.yaml", "in-place", "max_duration: 4\n");
    let err = ok(&r.train(&cfg, &[]));
    assert!(
        err.contains("resuming from") && err.contains("in-place/step2 (step 2)"),
        "{err}"
    );
    r.same_step4("ours", "in-place");
    // its weights go to export-hf, and a chunk missing is said
    assert!(
        r.hf_weights(&fixtures.join("step2"), "hf-ours")
            == r.hf_weights(&run.join("step2"), "hf-sharded")
    );
    std::fs::remove_file(run.join("step2/model_and_optim/__1_0.distcp")).unwrap();
    refused(
        &r.train(&config("half", &run), &[]),
        "__1_0.distcp: No such file",
    );
}

fn export_hf(checkpoint: &Path, out: &Path) -> serde_json::Value {
    ok(&Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .arg("export-hf")
        .arg(checkpoint)
        .arg(out)
        .output()
        .unwrap());
    serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap()
}

fn import_hf(hf: &Path, out: &Path, cfg: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .arg("import-hf")
        .args([hf, out])
        .arg("-c")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap()
}

/// A transformers folder rewritten in BF16 and split into two shards with an index.
fn bf16_shards(hf: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    std::fs::copy(hf.join("config.json"), out.join("config.json")).unwrap();
    let bytes = std::fs::read(hf.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let data = t
                .data()
                .chunks_exact(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes()
                })
                .collect();
            (name, t.shape().to_vec(), data)
        })
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let half_way = tensors.len() / 2;
    let mut map = serde_json::Map::new();
    for (k, part) in [&tensors[..half_way], &tensors[half_way..]]
        .iter()
        .enumerate()
    {
        let file = format!("model-0000{}-of-00002.safetensors", k + 1);
        let views: Vec<(String, safetensors::tensor::TensorView)> = part
            .iter()
            .map(|(n, shape, data)| {
                map.insert(n.clone(), serde_json::json!(file));
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::BF16,
                    shape.clone(),
                    data,
                )
                .unwrap();
                (n.clone(), view)
            })
            .collect();
        safetensors::serialize_to_file(views, None, &out.join(&file)).unwrap();
    }
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
}

#[test]
fn command_line_overrides_change_the_run_and_its_saved_config() {
    let r = Run::new();
    // `max_duration: 50` and one layer in the file; the command line asks for 3 steps of a
    // two-layer model saved elsewhere, in OLMo's `--key=value` form (the config positional).
    let cfg = r.config("c.yaml", "file", "max_duration: 50\n");
    let out = r.path("cli");
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .arg("train")
        .arg(&cfg)
        .arg("--max_duration=3")
        .arg("--model.n_layers=2")
        .arg(format!("--save-folder={}", out.display()))
        .arg("--optimizer.learning_rate=2e-3")
        .output()
        .unwrap();
    ok(&o);
    assert!(
        !r.path("file").exists(),
        "the file's save_folder is not used"
    );
    let saved = std::fs::read_to_string(out.join("step3").join("config.yaml")).unwrap();
    let saved: serde_json::Value = serde_saphyr::from_str(&saved).unwrap();
    assert_eq!(saved["model"]["n_layers"], 2);
    assert_eq!(saved["model"]["d_model"], 16);
    assert_eq!(saved["max_duration"], 3);
    assert_eq!(saved["optimizer"]["learning_rate"], 2e-3);
    let m = r.metrics("cli");
    let lr_at = |step: u64| {
        m.iter()
            .find(|x| x["step"] == step)
            .map(|x| x["optim/learning_rate_group0"].as_f64().unwrap())
            .unwrap()
    };
    // the cosine ends at step 3 (the new max_duration) at alpha_f (0.1) x the new rate: the
    // file's 50 steps would still be near the peak, and its rate would end at 1e-3
    assert!((lr_at(3) - 2e-4).abs() < 1e-9, "{}", lr_at(3));

    // the checkpoint's config is what export-hf reads: the second layer is there
    let hf = r.path("cli-hf");
    let config = export_hf(&out.join("step3"), &hf);
    assert_eq!(config["num_hidden_layers"], 2);

    // a misspelt field is refused before training, naming it
    for (arg, want) in [
        ("--model.n_layer=2", "does not read `model.n_layer`"),
        ("--model.d_model=many", "with --model.d_model=many"),
        (
            "--global_train_batch_size.x=1",
            "`global_train_batch_size` is `8`",
        ),
        ("--data.paths.x=1", "`data.paths` is a list of 2"),
    ] {
        refused(&r.train(&cfg, &[arg]), want);
    }
    assert!(!r.path("file").exists());
    // every unread field at once; OLMo's machinery, as its launch scripts pass it, is a warning
    refused(
        &r.train(
            &cfg,
            &["--model.n_layer=2", "--remote_save_folder=s3://b/r"],
        ),
        "does not read `model.n_layer`, `remote_save_folder`",
    );
    let machinery = [
        "--wandb.name=run1",
        "--fsdp.sharding_strategy=HYBRID_SHARD",
        "--compile=null",
        "--data.num_workers=4",
        "--dry_run",
    ];
    let err = ok(&r.train(&cfg, &machinery));
    assert!(
        err.contains(
            "ignoring config fields with no effect here: compile, fsdp, wandb, data.num_workers"
        ),
        "{err}"
    );
    // OLMo's save_folder defaults to ./; a run without one says up front that it keeps nothing
    let err = ok(&r.train(&cfg, &["--save_folder=null", "--max_duration=1"]));
    assert!(
        err.contains("no save_folder: this run keeps no checkpoint"),
        "{err}"
    );
}

#[test]
fn olmo_s_interpolations_resolve_in_the_merged_config() {
    let r = Run::new();
    let d = r.path("").display().to_string();
    let cfg = r.config(
        "i.yaml",
        "runs/${run_name}",
        "run_name: first\nmax_duration: 2\ndevice_eval_batch_size: ${global_train_batch_size}\n",
    );
    let d = d.trim_end_matches('/');
    edit(
        &cfg,
        &[(
            &format!("paths: ['{d}/a.npy', '{d}/b.npy']"),
            &format!("paths: ${{path.glob:{d}/[ab].npy}}"),
        )],
    );
    // an override of the field an interpolation names reaches it, as in OLMo
    ok(&r.train(&cfg, &["--run_name=second"]));
    let saved = std::fs::read_to_string(r.path("runs/second/step2/config.yaml")).unwrap();
    assert!(!saved.contains("${"), "{saved}");
    assert!(saved.contains(&format!("{d}/runs/second")), "{saved}");
    assert!(saved.contains("device_eval_batch_size: 8"), "{saved}");
    assert!(!r.path("runs/first").exists() && !r.path("runs/${run_name}").exists());
    // the same weights as the config written out in full
    let plain = r.config("p.yaml", "plain", "run_name: first\nmax_duration: 2\n");
    ok(&r.train(&plain, &[]));
    assert!(r.weights("runs/second/step2") == r.weights("plain/step2"));
    // a mistake names the file and the field
    edit(
        &cfg,
        &[(
            "run_name: first",
            "run_name: ${oc.env:OLMO_TRAIN_UNSET_IN_TESTS}",
        )],
    );
    let err = refused(&r.train(&cfg, &[]), "cannot resolve its interpolations");
    assert!(
        err.contains("i.yaml") && err.contains("field `run_name`: `${oc.env:"),
        "{err}"
    );
}

fn train_state(r: &Run, dir: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(r.path(dir).join("train.json")).unwrap()).unwrap()
}

/// The largest change of a weight between two model files.
fn max_change(a: &Path, b: &Path) -> f64 {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (a, b) = (
        safetensors::SafeTensors::deserialize(&a).unwrap(),
        safetensors::SafeTensors::deserialize(&b).unwrap(),
    );
    let mut most = 0.0f64;
    for (name, t) in a.tensors() {
        let u = b.tensor(&name).unwrap();
        for (x, y) in t.data().chunks_exact(4).zip(u.data().chunks_exact(4)) {
            let x = f32::from_le_bytes(x.try_into().unwrap());
            let y = f32::from_le_bytes(y.try_into().unwrap());
            most = most.max((x - y).abs() as f64);
        }
    }
    most
}

fn learning_rates(m: &[serde_json::Value]) -> Vec<(u64, f64)> {
    m.iter()
        .filter_map(|m| {
            Some((
                m["step"].as_u64()?,
                m["optim/learning_rate_group0"].as_f64()?,
            ))
        })
        .collect()
}

#[test]
fn a_schedule_in_tokens_counts_tokens_as_olmo() {
    let r = Run::new();
    // 8 x 16 = 128 tokens a step; 2000 tokens are 15 whole steps (OLMo floors), the warmup's
    // 300 tokens end within step 3 and the cosine's t_max is the 2000 tokens, not 15 or 16 steps
    let config = |name: &str, extra: &str| {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 2000T\n{extra}"),
        );
        edit(
            &cfg,
            &[("  t_warmup: 3\n", "  t_warmup: 300\n  units: tokens\n")],
        );
        let err = ok(&r.train(&cfg, &[]));
        (cfg, learning_rates(&r.metrics(name)), err)
    };
    let (lr, min) = (1e-2, 1e-3);
    let schedule = |seen: f64| {
        if seen < 300.0 {
            min + (lr - min) * seen / 300.0
        } else {
            let s = (seen - 300.0) / 1700.0;
            min + (lr - min) * (1.0 + (std::f64::consts::PI * s).cos()) / 2.0
        }
    };
    let check =
        |lrs: &[(u64, f64)], steps: std::ops::RangeInclusive<u64>, want: &dyn Fn(u64) -> f64| {
            assert_eq!(
                lrs.iter().map(|l| l.0).collect::<Vec<_>>(),
                steps.collect::<Vec<_>>()
            );
            for &(step, got) in lrs {
                let w = want(step);
                assert!(
                    (got - w).abs() <= 1e-6 * w,
                    "step {step}: lr {got}, want {w}"
                );
            }
        };
    let (cfg, lrs, _) = config("tokens", "save_interval: 5\n");
    check(&lrs, 1..=15, &|step| schedule(128.0 * step as f64));
    assert_eq!(
        train_state(&r, "tokens/step15")["global_train_tokens_seen"],
        15 * 128
    );
    let from = r.path("tokens/step5").display().to_string();

    // the clip warmup counts tokens too: the bound is 10 x max_grad_norm (1.0) through 300
    // tokens (steps 1 and 2), then 1.0 (in steps, 300 would cover the whole run)
    let clip = r.config("clip.yaml", "clip", "max_duration: 4\n");
    edit(
        &clip,
        &[(
            "  t_warmup: 3\n",
            "  t_warmup: 300\n  units: tokens\n  grad_clip_warmup_steps: 300\n  grad_clip_warmup_factor: 10\n",
        )],
    );
    ok(&r.train(&clip, &[]));
    let mut checked = 0;
    for m in r.metrics("clip") {
        let (Some(step), Some(norm), Some(rate)) = (
            m["step"].as_u64(),
            m["optim/total_grad_norm"].as_f64(),
            m["optim/clipping_rate"].as_f64(),
        ) else {
            continue;
        };
        // (norms between the two bounds, so the bound decides)
        assert!(norm > 1.0 && norm < 10.0, "step {step}: norm {norm}");
        assert_eq!(rate, if step <= 2 { 0.0 } else { 1.0 }, "step {step}");
        checked += 1;
    }
    assert_eq!(checked, 4);

    // fresh moments at step 5 (640 tokens): the LR warms up again over 300 tokens, to the
    // schedule's value at 940 tokens, and rejoins it at step 8 (1024 tokens)
    let (_, lrs, err) = config(
        "bolt",
        &format!("stop_at: 8\nload_path: {from}\nreset_optimizer_state: true\n"),
    );
    assert!(err.contains("from step 5 over 300 tokens"), "{err}");
    check(&lrs, 6..=8, &|step| match step {
        6 => schedule(940.0) * 128.0 / 300.0,
        7 => schedule(940.0) * 256.0 / 300.0,
        _ => schedule(1024.0),
    });

    // the same data again from step 5's weights with the dataloader reset: OLMo counts the
    // steps and the tokens seen from 0, so the schedule starts again and the 2000T are 15 steps
    let (_, lrs, _) = config(
        "again",
        &format!("load_path: {from}\nrestore_dataloader: false\n"),
    );
    check(&lrs, 1..=15, &|step| schedule(128.0 * step as f64));

    // less than a batch of tokens trains nothing: refused, naming both
    refused(
        &r.train(&cfg, &["--max_duration=100T"]),
        "max_duration 100T is less than one global batch (128 tokens)",
    );
}

#[test]
fn a_loss_above_early_stopping_factor_times_the_lowest_stops_with_a_checkpoint() {
    let r = Run::new();
    // a factor below 1 catches the first step past the 3 warmup steps (no loss is below the
    // lowest): a stop with a checkpoint, and a failed exit, since the run did not finish
    let cfg = r.config(
        "spike.yaml",
        "spike",
        "max_duration: 12\nearly_stopping_factor: 0.99\n",
    );
    let err = refused(
        &r.train(&cfg, &[]),
        "above early_stopping_factor (0.99) times the run's lowest",
    );
    assert!(
        err.contains("after step 4: stopped early with a checkpoint"),
        "{err}"
    );
    assert!(r.path("spike/step4/model.safetensors").exists());
    let first = losses(&r.metrics("spike"));
    assert_eq!(first.len(), 4);
    let lowest = first.iter().map(|l| l.1).fold(f64::INFINITY, f64::min);
    let kept = train_state(&r, "spike/step4")["min_train_loss"]
        .as_f64()
        .unwrap();
    assert!((kept - lowest).abs() <= 1e-6 * lowest, "{kept} vs {lowest}");

    // the record is kept: a rerun trains one more step, still not below it, and stops again
    refused(&r.train(&cfg, &[]), "after step 5: stopped early");
    // a factor the steady fall of this loss never trips trains to the end
    ok(&r.train(&cfg, &["--early_stopping_factor=2"]));
    let all = losses(&r.metrics("spike"));
    assert_eq!(all.last().unwrap().0, 12);
    let lowest = all.iter().map(|l| l.1).fold(f64::INFINITY, f64::min);
    let kept = train_state(&r, "spike/step12")["min_train_loss"]
        .as_f64()
        .unwrap();
    assert!((kept - lowest).abs() <= 1e-6 * lowest, "{kept} vs {lowest}");
}

#[test]
fn a_dry_run_checks_and_writes_nothing() {
    let r = Run::new();
    let cfg = r.config("dry.yaml", "dry", "max_duration: 5\ndry_run: true\n");
    let err = ok(&r.train(&cfg, &[]));
    assert!(
        err.contains("dry_run: the config and data check out") && err.contains("5 steps of 8"),
        "{err}"
    );
    assert!(!r.path("dry").exists(), "a dry run created its save_folder");
    assert!(err.contains("would start from a new model"), "{err}");
    // it names the checkpoint it would start from, or why there is none
    refused(
        &r.train(&cfg, &["--load_path=/no/such/run"]),
        "load_path /no/such/run: no such checkpoint folder",
    );
    let run = r.config("run.yaml", "run", "max_duration: 2\n");
    ok(&r.train(&run, &[]));
    let err = ok(&r.train(&run, &["--dry_run", "--max_duration=4"]));
    assert!(
        err.contains("would resume") && err.contains("run/step2"),
        "{err}"
    );
    let load = format!("--load_path={}", r.path("run").display());
    let err = ok(&r.train(&cfg, &[load.as_str()]));
    assert!(
        err.contains("would start from") && err.contains("run/step2"),
        "{err}"
    );
    // it still checks: bad data is refused
    edit(&cfg, &[("a.npy", "missing.npy")]);
    refused(&r.train(&cfg, &[]), "missing.npy");
}

#[test]
fn eval_on_load_evaluates_the_starting_weights() {
    let r = Run::new();
    let evals = |extra: &str| {
        format!(
            "eval_on_load: true\neval_interval: 100\nevaluators:\n  - label: held\n    data: {{paths: ['{}/b.npy']}}\n{extra}",
            r.dir.path().display()
        )
    };
    let held = |run: &str| -> Vec<(u64, f64)> {
        r.metrics(run)
            .iter()
            .filter_map(|m| {
                Some((
                    m["step"].as_u64()?,
                    m["eval/held/CrossEntropyLoss"].as_f64()?,
                ))
            })
            .collect()
    };
    // a fresh run: the initial weights at step 0 (evaluated with or without eval_on_load),
    // then the end's
    let cfg = r.config("fresh.yaml", "fresh", &evals("max_duration: 3\n"));
    ok(&r.train(&cfg, &[]));
    let fresh = held("fresh");
    assert_eq!(fresh.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 3]);
    assert!(fresh[1].1 < fresh[0].1, "{fresh:?}");
    // evaluating a checkpoint alone (stop_after: 0) gives the loss its run logged at that step
    let cfg = r.config(
        "only.yaml",
        "only",
        &evals(&format!(
            "max_duration: 3\nstop_after: 0\nload_path: {}\n",
            r.path("fresh/step3").display()
        )),
    );
    let err = ok(&r.train(&cfg, &[]));
    assert!(
        err.contains("0 steps this run") && err.contains("; held perplexity"),
        "{err}"
    );
    assert_eq!(held("only"), [fresh[1]]);
}

#[test]
fn fine_tuning_from_a_checkpoint_on_other_data_restarts_to_the_same_bits() {
    let r = Run::new();
    let base = r.config("base.yaml", "base", "max_duration: 20\nsave_interval: 10\n");
    ok(&r.train(&base, &[]));
    let base_first = losses(&r.metrics("base"))[0].1;
    // other data (b.npy alone: the fingerprint differs), step 0, the moments kept
    let load = format!(
        "load_path: {}\nreset_trainer_state: true\nmax_duration: 12\nsave_interval: 6\n",
        // a run's folder: its newest checkpoint
        r.path("base").display()
    );
    let ft = r.config("ft.yaml", "ft", &load);
    edit(&ft, &[(&format!("'{}', ", r.path("a.npy").display()), "")]);
    let err = ok(&r.train(&ft, &[]));
    assert!(err.contains("step20: weights, AdamW's moments"), "{err}");
    let l = losses(&r.metrics("ft"));
    assert_eq!(l[0].0, 1);
    // the weights were trained: the first loss is far below a fresh model's
    assert!(l[0].1 < base_first - 1.0, "{} vs {base_first}", l[0].1);
    let s = train_state(&r, "ft/step12");
    assert_eq!(s["step"], 12);
    assert_eq!(s["instances"], 128);
    // AdamW's count goes on with its moments
    assert_eq!(s["optimizer_steps"], 32);

    // killed after step 6 and rerun with the same config: it resumes its own checkpoint whole
    // (the reset applies to the first start only) and ends with the same bytes
    let ft2 = r.path("ft2.yaml");
    std::fs::copy(&ft, &ft2).unwrap();
    edit(&ft2, &[("/ft\n", "/ft2\n")]);
    ok(&r.train(&ft2, &["--stop_at=6"]));
    let err = ok(&r.train(&ft2, &[]));
    assert!(err.contains("done: 6 steps this run"), "{err}");
    assert!(
        err.contains("is this run's own checkpoint: resuming it whole (load_path, reset_trainer_state only shape the run's first start)"),
        "{err}"
    );
    for f in ["model.safetensors", "optim.safetensors", "train.json"] {
        assert!(
            std::fs::read(r.path("ft/step12").join(f)).unwrap()
                == std::fs::read(r.path("ft2/step12").join(f)).unwrap(),
            "{f} differs after the restart"
        );
    }
    assert_eq!(losses(&r.metrics("ft")), losses(&r.metrics("ft2")));
}

#[test]
fn a_reset_optimizer_bolts_on_a_warmup_and_the_data_options_move_the_position() {
    let r = Run::new();
    // 40 steps scheduled (cosine, 3 warmup steps, lr 1e-2, alpha_f 0.1), stopped at 20
    let base = r.config(
        "base.yaml",
        "base",
        "max_duration: 40\nstop_at: 20\nsave_interval: 10\n",
    );
    ok(&r.train(&base, &[]));
    let from = |name: &str, extra: &str| {
        r.config(
            &format!("{name}.yaml"),
            name,
            &format!(
                "load_path: {}\nmax_duration: 40\nstop_at: 24\n{extra}",
                r.path("base/step20").display()
            ),
        )
    };

    // fresh moments under the running schedule: OLMo's bolt-on warmup from step 20
    let err = ok(&r.train(&from("bolt", "reset_optimizer_state: true\n"), &[]));
    assert!(
        err.contains("fresh AdamW moments with the LR warming up again from step 20 over 3 steps"),
        "{err}"
    );
    let cosine = |step: f64| {
        let (lr, min) = (1e-2, 1e-3);
        min + (lr - min) * (1.0 + (std::f64::consts::PI * (step - 3.0) / 37.0).cos()) / 2.0
    };
    let lrs = learning_rates(&r.metrics("bolt"));
    let want = [
        (21, cosine(23.0) / 3.0),
        (22, cosine(23.0) * 2.0 / 3.0),
        (23, cosine(23.0)),
        (24, cosine(24.0)),
    ];
    assert_eq!(lrs.len(), 4);
    for ((step, got), (s, w)) in lrs.iter().zip(want) {
        assert_eq!(*step, s);
        assert!((got - w).abs() <= 1e-6 * w, "step {s}: lr {got}, want {w}");
    }
    // AdamW's bias correction counts from the reset: its first update moves each weight by
    // the LR (g / sqrt(g²)), where a count from step 21 would move it by 0.41 LR
    let first = from("first", "reset_optimizer_state: true\n");
    ok(&r.train(&first, &["--stop_at=21"]));
    let moved = max_change(
        &r.path("base/step20/model.safetensors"),
        &r.path("first/step21/model.safetensors"),
    );
    assert!(
        (moved / lrs[0].1 - 1.0).abs() < 0.05,
        "moved {moved}, lr {}",
        lrs[0].1
    );
    // and the CUDA engine's AdamW (on its host emulator) counts the same way
    let emu = from("first-emu", "reset_optimizer_state: true\n");
    ok(&r.train(
        &emu,
        &[
            "--stop_at=21",
            "--device",
            "cuda-emulator",
            "--precision=fp32",
        ],
    ));
    let moved_emu = max_change(
        &r.path("base/step20/model.safetensors"),
        &r.path("first-emu/step21/model.safetensors"),
    );
    assert!(
        (moved_emu / moved - 1.0).abs() < 1e-3,
        "{moved_emu} vs {moved}"
    );
    let s = train_state(&r, "bolt/step24");
    assert_eq!(s["optimizer_steps"], 4);
    assert_eq!(s["lr_warmup_from"], 20);
    assert_eq!(s["global_train_examples_seen_this_epoch"], 24 * 8);

    // weights alone (no optim.safetensors): refused unless the moments are reset
    let weights = r.path("weights");
    std::fs::create_dir_all(&weights).unwrap();
    for f in ["model.safetensors", "train.json"] {
        std::fs::copy(r.path("base/step20").join(f), weights.join(f)).unwrap();
    }
    let cfg = from("w", "");
    edit(&cfg, &[("base/step20", "weights")]);
    let e = refused(&r.train(&cfg, &[]), "weights/optim.safetensors is missing");
    assert!(e.contains("set reset_optimizer_state"), "{e}");
    edit(
        &cfg,
        &[("stop_at: 24", "stop_at: 24\nreset_optimizer_state: true")],
    );
    ok(&r.train(&cfg, &[]));
    assert!(r.weights("w/step24") == r.weights("bolt/step24"));

    // the data order, the step and so the schedule again from the start, as OLMo 0.6.0's
    // restore_dataloader: false (checked against it by bench/olmo_interop.sh); AdamW's moments
    // and its update count go on
    let err = ok(&r.train(&from("again", "restore_dataloader: false\n"), &[]));
    assert!(
        err.contains("step 0 and the data from the start of epoch 0 (restore_dataloader: false)"),
        "{err}"
    );
    let s = train_state(&r, "again/step24");
    assert_eq!(s["global_train_examples_seen_this_epoch"], 24 * 8);
    assert_eq!(s["global_train_tokens_seen"], 24 * 8 * 16);
    assert_eq!(s["optimizer_steps"], 20 + 24);
    let lrs = learning_rates(&r.metrics("again"));
    assert_eq!(lrs.len(), 24);
    let (step, lr) = lrs[3];
    assert_eq!(step, 4);
    assert!((lr - cosine(4.0)).abs() <= 1e-6 * lr, "{lr}");

    // past a loss spike: 5 batches skipped, counted in the position, not in the tokens
    let err = ok(&r.train(&from("skip", "fast_forward_batches: 5\n"), &[]));
    assert!(err.contains("5 batches skipped (40 instances)"), "{err}");
    let s = train_state(&r, "skip/step24");
    assert_eq!(s["global_train_examples_seen_this_epoch"], (20 + 5 + 4) * 8);
    assert_eq!(s["global_train_tokens_seen"], 24 * 8 * 16);
    // the steps after the skip trained on the instances after it
    let order = global_indices(&r.path("base/train_data/global_indices.npy"));
    let lines = data_index_lines(&r.path("skip/data-indices/rank0.tsv.gz"));
    assert_eq!(lines.len(), 4);
    for (k, (step, ids)) in lines.iter().enumerate() {
        assert_eq!(*step, 21 + k as u64);
        let at = (25 + k) * 8;
        assert_eq!(ids, &order[at..at + 8]);
    }

    // batch-at reads the record: step 20 (0-based) is the 21st, after the skip
    let cfg = r.path("skip.yaml");
    assert_eq!(
        batch_at_run(&cfg, 20, &r.path("skip"), &[]),
        &order[200..208]
    );

    // a later epoch asked for begins at its start; an earlier one is refused
    let err = ok(&r.train(&from("later", "epoch: 2\n"), &[]));
    assert!(err.contains("the data from the start of epoch 2"), "{err}");
    assert_eq!(train_state(&r, "later/step24")["epoch"], 2);
    let cfg = from("earlier", "epoch: 1\n");
    edit(&cfg, &[("base/step20", "later/step24")]);
    refused(
        &r.train(&cfg, &[]),
        "the checkpoint is in epoch 2, the config asks for epoch 1",
    );

    // the run's own checkpoint with another data seed: the order would not continue
    refused(
        &r.train(&base, &["--stop_at=30", "--seed=7"]),
        "shuffled with seed 6198, the config gives 7",
    );
}

#[test]
fn stop_after_time_limit_and_sigterm_stop_with_a_checkpoint_and_a_rerun_continues() {
    let r = Run::new();
    let whole = r.config(
        "whole.yaml",
        "whole",
        "max_duration: 20\nsave_interval: 100\n",
    );
    ok(&r.train(&whole, &[]));
    // a job's share of the run at a time: 7, 7, then the last 6
    let jobs = r.config(
        "jobs.yaml",
        "jobs",
        "max_duration: 20\nsave_interval: 100\nstop_after: 7\n",
    );
    for (done, at) in [(7, 7), (7, 14), (6, 20)] {
        let err = ok(&r.train(&jobs, &[]));
        assert!(
            err.contains(&format!("done: {done} steps this run (step {at},")),
            "{err}"
        );
    }
    assert!(r.weights("whole/step20") == r.weights("jobs/step20"));

    // out of time after the first step: saved there, success, the rest on the next run
    let timed = r.config(
        "timed.yaml",
        "timed",
        "max_duration: 20\nsave_interval: 100\n",
    );
    let err = ok(&r.train(&timed, &["--time_limit=1e-9"]));
    assert!(
        err.contains("time_limit (0.000000001 s) reached: stopping after step 1")
            && err.contains("stopped early by time_limit"),
        "{err}"
    );
    assert_eq!(train_state(&r, "timed/step1")["step"], 1);

    // SIGTERM (a scheduler's notice): the step in flight ends, a checkpoint, exit 128 + 15
    let long = r.config(
        "long.yaml",
        "long",
        "max_duration: 100000\nsave_interval: 100000\n",
    );
    let child = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["train", "-c", long.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&r.path("long/metrics.jsonl"), 3);
    terminate(&child);
    let o = child.wait_with_output().unwrap();
    let at = stopped_by_sigterm(&o);
    assert!(at >= 3);
    assert_eq!(train_state(&r, &format!("long/step{at}"))["step"], at);
    assert_eq!(
        std::fs::read_link(r.path("long/latest")).unwrap(),
        Path::new(&format!("step{at}"))
    );
    assert_eq!(
        data_index_lines(&r.path("long/data-indices/rank0.tsv.gz")).len() as u64,
        at
    );
    let err = ok(&r.train(&long, &[&format!("--stop_at={}", at + 2)]));
    assert!(err.contains(&format!("step{at} (step {at})")), "{err}");
    assert!(err.contains("done: 2 steps this run"), "{err}");

    // two ranks, the notice to rank 1 only: both stop after the same step
    let pair = r.config(
        "pair.yaml",
        "pair",
        "max_duration: 100000\nsave_interval: 100000\n",
    );
    let (a, b) = spawn_two_ranks(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_olmo-train"));
        c.args(["train", "-c", pair.to_str().unwrap(), "--device", "cpu"]);
        c
    });
    wait_for_steps(&r.path("pair/metrics.jsonl"), 3);
    terminate(&b);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let at = stopped_by_sigterm(&a);
    assert_eq!(stopped_by_sigterm(&b), at);
    assert_eq!(train_state(&r, &format!("pair/step{at}"))["step"], at);
    for rank in ["rank0", "rank1"] {
        let path = r.path(&format!("pair/data-indices/{rank}.tsv.gz"));
        assert_eq!(data_index_lines(&path).len() as u64, at);
    }
}

/// Waits until a run's metrics hold `n` lines.
#[test]
fn a_stop_signal_cuts_an_evaluation_short() {
    let r = Run::new();
    // 200,000 windows of 16 tokens, one per batch: seconds of evaluation for this model
    let tokens: Vec<u8> = (0..200_000u32 * 16)
        .flat_map(|i| ((i * 7 % 16) as u16).to_le_bytes())
        .collect();
    std::fs::write(r.path("big.npy"), tokens).unwrap();
    let cfg = r.config(
        "e.yaml",
        "run",
        &format!(
            "max_duration: 100000\nsave_interval: 100000\ndevice_eval_batch_size: 1\n\
             evaluators:\n  - label: big\n    data:\n      paths: ['{}']\n",
            r.path("big.npy").display()
        ),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args(["train", "-c", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // the pre-train checkpoint comes just before the first evaluation
    let t0 = std::time::Instant::now();
    while !r.path("run/step0").exists() {
        assert!(t0.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    terminate(&child);
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        err.contains("evaluation abandoned: the run was asked to stop"),
        "{err}"
    );
    // then the step in flight, as ever, and its checkpoint; no partial numbers
    assert_eq!(stopped_by_sigterm(&o), 1);
    assert_eq!(train_state(&r, "run/step1")["step"], 1);
    let m = r.metrics("run");
    assert!(
        m.iter()
            .all(|l| l.get("eval/big/CrossEntropyLoss").is_none()),
        "{m:?}"
    );
    assert!(m[0].get("eval/big/UnigramCrossEntropy").is_some(), "{m:?}");
}

fn wait_for_steps(metrics: &Path, n: usize) {
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(metrics).map_or(0, |m| m.lines().count()) < n {
        assert!(t0.elapsed().as_secs() < 120, "the run did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn terminate(child: &std::process::Child) {
    // Safety: a plain kill(2) of our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// The step a run stopped by SIGTERM says it stopped after; it exited with 128 + 15.
fn stopped_by_sigterm(o: &Output) -> u64 {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(143), "{err}");
    err.split("stopped by SIGTERM after step ")
        .nth(1)
        .and_then(|t| t.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{err}"))
}

#[test]
fn label_masks_leave_the_masked_targets_out_of_the_loss() {
    let r = Run::new();
    // one mask per token file, NumPy bools: `keep(position in the window of 16)`
    let masks = |name: &str, keep: &dyn Fn(usize) -> bool| {
        for (file, n) in [("a", 4096), ("b", 2048)] {
            let bytes: Vec<u8> = (0..n).map(|i| keep(i % 16) as u8).collect();
            std::fs::write(r.path(&format!("{name}-{file}.mask")), bytes).unwrap();
        }
        format!(
            "data:\n  label_mask_paths: ['{d}/{name}-a.mask', '{d}/{name}-b.mask']\n",
            d = r.dir.path().display()
        )
    };
    let config = |run: &str, extra: &str| {
        let cfg = r.config(&format!("{run}.yaml"), run, "max_duration: 6\n");
        // the mask list joins the data section
        if !extra.is_empty() {
            edit(&cfg, &[("data:\n", extra)]);
        }
        cfg
    };
    ok(&r.train(&config("plain", ""), &[]));
    // all ones: the same run, byte for byte
    ok(&r.train(&config("ones", &masks("ones", &|_| true)), &[]));
    assert!(r.weights("plain/step6") == r.weights("ones/step6"));
    // a label is masked before the shift: a window's first token is never a target, so a mask
    // keeping only it scores nothing; one keeping only the last token scores one target of 16
    ok(&r.train(&config("first", &masks("first", &|p| p == 0)), &[]));
    assert!(losses(&r.metrics("first")).iter().all(|l| l.1 == 0.0));
    let last = masks("last", &|p| p == 15);
    ok(&r.train(&config("last", &last), &[]));
    let first = losses(&r.metrics("last"))[0].1;
    let want = 128f64.ln() / 16.0;
    assert!((first - want).abs() < 0.01, "{first} vs {want}");
    // the CUDA engine (on its host emulator) leaves out the same targets
    let emu = config("last-emu", &last);
    ok(&r.train(&emu, &["--device", "cuda-emulator", "--precision=fp32"]));
    let (a, b) = (losses(&r.metrics("last")), losses(&r.metrics("last-emu")));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }

    // mistakes are named
    let fails = |cfg: &Path, want: &str| refused(&r.train(cfg, &[]), want);
    let one = format!(
        "data:\n  label_mask_paths: ['{}']\n",
        r.path("ones-a.mask").display()
    );
    fails(&config("bad1", &one), "1 files for 2 token files");
    let swapped = format!(
        "data:\n  label_mask_paths: ['{d}/ones-b.mask', '{d}/ones-a.mask']\n",
        d = r.dir.path().display()
    );
    fails(
        &config("bad2", &swapped),
        "ones-b.mask: 2048 bytes for the 4096 tokens of",
    );
    let sevens = masks("sevens", &|p| p != 3);
    for file in ["a", "b"] {
        let path = r.path(&format!("sevens-{file}.mask"));
        let bytes: Vec<u8> = std::fs::read(&path)
            .unwrap()
            .into_iter()
            .map(|b| if b == 0 { 7 } else { b })
            .collect();
        std::fs::write(path, bytes).unwrap();
    }
    fails(&config("bad3", &sevens), "is not a bool (0 or 1)");
}

#[test]
fn the_instance_filter_leaves_out_the_instances_olmo_drops() {
    let r = Run::new();
    // b.npy becomes "7 8" over and over: each of its windows repeats period 2 eight times,
    // while a.npy's period of 11 is too long to count in a window of 16
    let tokens: Vec<u8> = (0..2048)
        .map(|i| [7u16, 8][i % 2])
        .flat_map(|t| t.to_le_bytes())
        .collect();
    std::fs::write(r.path("b.npy"), tokens).unwrap();
    let config = |run: &str, extra: &str| {
        let cfg = r.config(&format!("{run}.yaml"), run, "max_duration: 6\n");
        if !extra.is_empty() {
            edit(&cfg, &[("data:\n", extra)]);
        }
        cfg
    };
    let model = |run: &str| r.weights(&format!("{run}/step6"));
    let dropped = |run: &str| -> Vec<f64> {
        r.metrics(run)
            .iter()
            .filter_map(|m| m["train/masked_instances_local_rank"].as_f64())
            .collect()
    };

    // eight repeats reach a count of 8: b's instances are dropped, which is training with
    // label masks that mask all of b
    let log = ok(&r.train(
        &config(
            "filter",
            "data:\n  instance_filter: {repetition_max_count: 8}\n",
        ),
        &[],
    ));
    for (file, n, keep) in [("a", 4096, 1u8), ("b", 2048, 0)] {
        std::fs::write(r.path(&format!("{file}.mask")), vec![keep; n]).unwrap();
    }
    let masks = format!(
        "data:\n  label_mask_paths: ['{d}/a.mask', '{d}/b.mask']\n",
        d = r.dir.path().display()
    );
    ok(&r.train(&config("masked", &masks), &[]));
    assert!(model("filter") == model("masked"));
    assert_eq!(losses(&r.metrics("filter")), losses(&r.metrics("masked")));
    // each step's count is the batch's instances from b (b's follow a's 256 in the order)
    let lines = data_index_lines(&r.path("filter/data-indices/rank0.tsv.gz"));
    let from_b: Vec<f64> = lines
        .iter()
        .map(|(_, ids)| ids.iter().filter(|&&i| i >= 256).count() as f64)
        .collect();
    assert_eq!(dropped("filter"), from_b);
    let total: f64 = from_b.iter().sum();
    assert!(total > 0.0 && total < 48.0, "{from_b:?}");
    assert!(
        log.contains(&format!(
            "the instance filter masked {total} of 48 instances"
        )),
        "{log}"
    );

    // a count of 9 is one repeat more than any window holds: nothing is dropped
    ok(&r.train(
        &config(
            "nine",
            "data:\n  instance_filter: {repetition_max_count: 9}\n",
        ),
        &[],
    ));
    ok(&r.train(&config("plain", ""), &[]));
    assert!(model("nine") == model("plain"));
    assert_eq!(dropped("nine"), vec![0.0; 6]);
    assert!(dropped("plain").is_empty());
}

#[test]
fn adaptive_clipping_clips_tensors_by_their_own_average_and_resumes_to_the_same_bits() {
    let r = Run::new();
    let run = |name: &str, extra: &str, args: &[&str]| {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 8\nsave_interval: 100\n{extra}"),
        );
        if name == "none" {
            edit(&cfg, &[("max_grad_norm: 1.0\n", "")]);
        }
        ok(&r.train(&cfg, args));
        cfg
    };
    let model = |run: &str| r.weights(&format!("{run}/step8"));
    let rates = |run: &str| -> Vec<f64> {
        r.metrics(run)
            .iter()
            .filter_map(|m| m["optim/clipping_rate"].as_f64())
            .collect()
    };
    // a ratio no gradient reaches clips nothing: the run without clipping, bit for bit
    run("huge", "max_grad_norm_ratio: 1.0e6\n", &[]);
    run("none", "", &[]);
    assert!(model("huge") == model("none"));
    assert_eq!(rates("huge"), vec![0.0; 8]);
    assert_eq!(rates("none"), vec![0.0; 8]);

    // a ratio of 1: any tensor whose gradient outgrows its average is clipped (at step 1, its
    // norm over norm + 1e-6 clips every tensor a hair, as in OLMo), and the result differs
    run("adaptive", "max_grad_norm_ratio: 1.0\n", &[]);
    let rate = rates("adaptive");
    assert_eq!(rate.len(), 8);
    assert_eq!(rate[0], 1.0, "{rate:?}");
    assert!(rate[1..].iter().any(|&x| x > 0.0 && x < 1.0), "{rate:?}");
    assert!(model("adaptive") != model("none"));
    // the averages are saved with AdamW's moments, under OLMo's state name
    let header = safetensors_header(&r.path("adaptive/step8/optim.safetensors"));
    assert_eq!(
        header["transformer.wte.weight.grad_norm_exp_avg"]["shape"],
        serde_json::json!([]),
        "{header}"
    );

    // killed after step 5 and rerun: the same bits as the run in one go
    let jobs = run("jobs", "max_grad_norm_ratio: 1.0\nstop_after: 5\n", &[]);
    ok(&r.train(&jobs, &[]));
    assert!(model("jobs") == model("adaptive"));

    // the CUDA engine (on its host emulator) clips the same tensors by the same factors
    run(
        "adaptive-emu",
        "max_grad_norm_ratio: 1.0\n",
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    let (a, b) = (
        losses(&r.metrics("adaptive")),
        losses(&r.metrics("adaptive-emu")),
    );
    assert_eq!(a.len(), 8);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert_eq!(rates("adaptive-emu"), rate);
}

#[test]
fn attention_within_documents_trains_alike_on_both_engines() {
    let r = Run::new();
    // the token stream 3 1 4 1 5 9 2 6 5 3 5 ...: with EOS 1, documents of 2, 2 and 7 tokens
    // evaluated over whole windows and within documents
    let evals = format!(
        "max_duration: 5\neval_interval: 5\nevaluators:\n  - label: whole\n    data: {{paths: ['{d}/b.npy']}}\n  \
         - label: docs\n    data: {{paths: ['{d}/b.npy'], generate_doc_lengths: true}}\n",
        d = r.dir.path().display()
    );
    let run = |name: &str, eos: Option<u32>, d_model: u32, args: &[&str]| {
        let extra = if eos.is_some() {
            evals.as_str()
        } else {
            "max_duration: 5\n"
        };
        let cfg = r.config(&format!("{name}.yaml"), name, extra);
        let model = format!("d_model: {d_model}\n  n_heads: 2\n  flash_attention: true\n");
        edit(&cfg, &[("d_model: 16\n  n_heads: 2\n", &model)]);
        if let Some(e) = eos {
            let eos = format!("vocab_size: 16\n  eos_token_id: {e}");
            edit(
                &cfg,
                &[
                    ("data:\n", "data:\n  generate_doc_lengths: true\n"),
                    ("vocab_size: 16", &eos),
                ],
            );
        }
        ok(&r.train(&cfg, args))
    };
    let model = |run: &str| r.weights(&format!("{run}/step5"));
    let log = run("docs", Some(1), 16, &[]);
    // each window of 15 inputs holds 3 to 5 documents (the first a continuation)
    let n: u64 = log
        .split("(EOS id 1): ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{log}"));
    assert!((24..=40).contains(&n), "{log}");
    assert!(log.contains("in this rank's 8 windows of step 1"), "{log}");
    run("plain", None, 16, &[]);
    assert!(model("docs") != model("plain"));
    let eval = |run: &str, set: &str| -> f64 {
        r.metrics(run)
            .iter()
            .rev()
            .find_map(|m| m[format!("eval/{set}/CrossEntropyLoss")].as_f64())
            .unwrap()
    };
    assert!((eval("docs", "whole") - eval("docs", "docs")).abs() > 1e-4);
    // an EOS the data never holds: the plain run, bit for bit, and a warning
    let log = run("no-eos", Some(12), 16, &[]);
    assert!(log.contains("no window holds an EOS"), "{log}");
    assert!(model("no-eos") == model("plain"));

    // the CUDA engine on its host emulator: the materialised attention in fp32, and (head
    // size 32) the flash kernels under bf16, against the CPU engine
    run(
        "emu",
        Some(1),
        16,
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    let (a, b) = (losses(&r.metrics("docs")), losses(&r.metrics("emu")));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    assert!((eval("docs", "docs") - eval("emu", "docs")).abs() < 1e-5);
    run("cpu64", Some(1), 64, &[]);
    let flash = run("flash", Some(1), 64, &["--device", "cuda-emulator"]);
    assert!(flash.contains("flash attention"), "{flash}");
    let (a, b) = (losses(&r.metrics("cpu64")), losses(&r.metrics("flash")));
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 2e-2 * x.1, "{a:?} vs {b:?}");
    }
}

#[test]
fn clip_qkv_trains_alike_on_both_engines_and_round_trips_through_transformers_files() {
    let r = Run::new();
    let run = |name: &str, clip: Option<f32>, args: &[&str]| {
        let cfg = r.config(&format!("{name}.yaml"), name, "max_duration: 5\n");
        if let Some(c) = clip {
            edit(
                &cfg,
                &[("n_layers: 1", &format!("n_layers: 1\n  clip_qkv: {c}"))],
            );
        }
        ok(&r.train(&cfg, args));
        cfg
    };
    let model = |run: &str| r.weights(&format!("{run}/step5"));
    // a bound no projection reaches changes nothing; a tight one changes the run
    run("plain", None, &[]);
    run("loose", Some(1.0e4), &[]);
    assert!(model("loose") == model("plain"));
    let tight = run("tight", Some(0.05), &[]);
    assert!(model("tight") != model("plain"));
    // the CUDA engine (host emulator, fp32) clips and stops the same gradients
    run(
        "tight-emu",
        Some(0.05),
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    let (a, b) = (losses(&r.metrics("tight")), losses(&r.metrics("tight-emu")));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    // transformers' OLMo config carries the bound, and import-hf checks it
    let hf = r.path("tight-hf");
    let config = export_hf(&r.path("tight/step5"), &hf);
    assert_eq!(config["clip_qkv"], 0.05f32 as f64);
    ok(&import_hf(&hf, &r.path("tight-back"), &tight, &[]));
    assert!(
        r.weights("tight-back") == model("tight"),
        "import-hf reads the weights back"
    );
    refused(
        &import_hf(&hf, &r.path("plain-back"), &r.path("plain.yaml"), &[]),
        "clip_qkv is 0.05, the training config's model.clip_qkv none",
    );
    let bad = r.config("bad.yaml", "bad", "max_duration: 5\n");
    edit(&bad, &[("n_layers: 1", "n_layers: 1\n  clip_qkv: 0")]);
    refused(
        &r.train(&bad, &[]),
        "model.clip_qkv (0) must be a positive number",
    );
}

#[test]
fn olmo2_blocks_train_alike_on_both_engines_and_round_trip_through_transformers_files() {
    let r = Run::new();
    const RMS: &str = "layer_norm_type: rms\n  layer_norm_with_affine: true\n  weight_tying: false";
    let run = |name: &str, olmo2: bool, args: &[&str]| {
        let cfg = r.config(&format!("{name}.yaml"), name, "max_duration: 5\n");
        let block = if olmo2 {
            format!("{RMS}\n  norm_after: true\n  attention_layer_norm: true")
        } else {
            RMS.to_string()
        };
        edit(&cfg, &[("layer_norm_with_affine: false", &block)]);
        ok(&r.train(&cfg, args));
        cfg
    };
    let olmo2 = run("olmo2", true, &[]);
    let llama = run("llama", false, &[]);
    // the checkpoint holds the QK-norm weights under OLMo's names; the runs differ
    let header = safetensors_header(&r.path("olmo2/step5/model.safetensors"));
    for name in ["q_norm", "k_norm"] {
        assert_eq!(
            header[format!("transformer.blocks.0.{name}.weight")]["shape"],
            serde_json::json!([16])
        );
    }
    let (a, b) = (losses(&r.metrics("olmo2")), losses(&r.metrics("llama")));
    assert_eq!(a.len(), 5);
    assert!(a[4].1 != b[4].1, "{a:?} vs {b:?}");
    // the CUDA engine (host emulator, fp32) computes the same block
    run(
        "olmo2-emu",
        true,
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    let c = losses(&r.metrics("olmo2-emu"));
    for (x, y) in a.iter().zip(&c) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {c:?}");
    }
    // transformers' Olmo2 layout, and back
    let hf = r.path("olmo2-hf");
    let config = export_hf(&r.path("olmo2/step5"), &hf);
    assert_eq!(config["architectures"][0], "Olmo2ForCausalLM");
    assert_eq!(config["model_type"], "olmo2");
    let header = safetensors_header(&hf.join("model.safetensors"));
    for name in [
        "self_attn.q_norm",
        "self_attn.k_norm",
        "post_attention_layernorm",
        "post_feedforward_layernorm",
    ] {
        assert_eq!(
            header[format!("model.layers.0.{name}.weight")]["shape"],
            serde_json::json!([16]),
            "{name}"
        );
    }
    assert!(header
        .get("model.layers.0.input_layernorm.weight")
        .is_none());
    ok(&import_hf(&hf, &r.path("olmo2-back"), &olmo2, &[]));
    assert!(r.weights("olmo2-back") == r.weights("olmo2/step5"));
    // a pre-norm model, or another RoPE base, is not this one
    refused(
        &import_hf(&hf, &r.path("wrong"), &llama, &[]),
        "model_type `olmo2`, the training config's model is `llama`",
    );
    refused(
        &import_hf(
            &hf,
            &r.path("wrong"),
            &olmo2,
            &["--model.rope_theta=500000"],
        ),
        "rope_theta is 10000, the training config's model.rope_theta 500000",
    );
}

#[test]
fn grouped_query_attention_trains_alike_on_both_engines_and_round_trips_through_transformers_files()
{
    let r = Run::new();
    // OLMo 2 blocks (QK-norm: k's norm is k's width) with 4 q heads sharing 2 kv heads
    let run = |name: &str, args: &[&str]| {
        let cfg = r.config(&format!("{name}.yaml"), name, "max_duration: 5\n");
        edit(
            &cfg,
            &[
                ("n_heads: 2", "n_heads: 4\n  n_kv_heads: 2"),
                (
                    "layer_norm_with_affine: false",
                    "layer_norm_type: rms\n  layer_norm_with_affine: true\n  weight_tying: false\n  norm_after: true\n  attention_layer_norm: true",
                ),
            ],
        );
        let log = ok(&r.train(&cfg, args));
        (cfg, log)
    };
    let (gqa, log) = run("gqa", &[]);
    assert!(log.contains("QK-norm+weight, 2 kv heads"), "{log}");
    // att_proj's rows: q (16), k and v (8 each)
    let header = safetensors_header(&r.path("gqa/step5/model.safetensors"));
    let shape = |name: &str| header[format!("transformer.blocks.0.{name}.weight")]["shape"].clone();
    assert_eq!(shape("att_proj"), serde_json::json!([32, 16]));
    assert_eq!(shape("k_norm"), serde_json::json!([8]));
    assert_eq!(shape("q_norm"), serde_json::json!([16]));
    // the CUDA engine (host emulator, fp32) computes the same model
    run(
        "gqa-emu",
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    let (a, c) = (losses(&r.metrics("gqa")), losses(&r.metrics("gqa-emu")));
    assert_eq!(a.len(), 5);
    for (x, y) in a.iter().zip(&c) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {c:?}");
    }
    // transformers' layout: k_proj and v_proj of the kv heads, and back
    let hf = r.path("gqa-hf");
    let config = export_hf(&r.path("gqa/step5"), &hf);
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["num_key_value_heads"], 2);
    let header = safetensors_header(&hf.join("model.safetensors"));
    for (name, shape) in [
        ("q_proj", serde_json::json!([16, 16])),
        ("k_proj", serde_json::json!([8, 16])),
        ("v_proj", serde_json::json!([8, 16])),
        ("k_norm", serde_json::json!([8])),
    ] {
        assert_eq!(
            header[format!("model.layers.0.self_attn.{name}.weight")]["shape"],
            shape,
            "{name}"
        );
    }
    ok(&import_hf(&hf, &r.path("gqa-back"), &gqa, &[]));
    assert!(r.weights("gqa-back") == r.weights("gqa/step5"));
    refused(
        &import_hf(&hf, &r.path("wrong"), &gqa, &["--model.n_kv_heads=4"]),
        "num_key_value_heads is 2, the training config's model has 4 kv heads",
    );
    // OLMo's two keys must agree
    refused(
        &r.train(&gqa, &["--model.multi_query_attention=true"]),
        "model.n_kv_heads (2) and multi_query_attention (true, meaning 1 kv heads) disagree",
    );
}

#[test]
fn lionw_trains_on_both_engines_resumes_and_refuses_adamw_moments() {
    let r = Run::new();
    let run = |name: &str, opt: &str, extra: &str, args: &[&str]| {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 6\nsave_interval: 100\n{extra}"),
        );
        // OLMo's default optimizer where the key is absent
        let named = if opt.is_empty() {
            String::new()
        } else {
            format!("  name: {opt}\n")
        };
        edit(&cfg, &[("  name: adamw\n", &named)]);
        (cfg.clone(), r.train(&cfg, args))
    };
    let model = |run: &str| r.weights(&format!("{run}/step6"));
    let (_, o) = run("lion", "", "", &[]);
    let log = ok(&o);
    assert!(log.contains("done: 6 steps"), "{log}");
    let (_, o) = run("adam", "adamw", "", &[]);
    ok(&o);
    assert!(model("lion") != model("adam"));
    let first = losses(&r.metrics("lion"));
    assert!(first.last().unwrap().1 < first[0].1, "{first:?}");
    // LionW keeps one moment: no exp_avg_sq in its checkpoint
    let header = safetensors_header(&r.path("lion/step6/optim.safetensors"));
    let names: Vec<&String> = header.as_object().unwrap().keys().collect();
    assert!(
        names.iter().any(|n| n.ends_with(".exp_avg"))
            && !names.iter().any(|n| n.ends_with(".exp_avg_sq")),
        "{names:?}"
    );
    assert_eq!(train_state(&r, "lion/step6")["optimizer"], "lionw");
    // OLMo's format carries LionW's one moment: going on from an export-olmo of a checkpoint
    // is going on from the checkpoint
    let exported = r.path("lion-olmo/step6-unsharded");
    ok(&Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .arg("export-olmo")
        .args([r.path("lion/step6"), exported.clone()])
        .output()
        .unwrap());
    for (name, from) in [
        ("lion-on", r.path("lion/step6")),
        ("lion-olmo-on", exported),
    ] {
        let cfg = r.config(
            &format!("{name}.yaml"),
            name,
            &format!("max_duration: 8\nload_path: {}\n", from.display()),
        );
        edit(&cfg, &[("  name: adamw\n", "  name: lionw\n")]);
        let log = ok(&r.train(&cfg, &[]));
        assert!(log.contains("LionW's moments"), "{log}");
    }
    for f in ["model.safetensors", "optim.safetensors"] {
        let read = |run: &str| std::fs::read(r.path(run).join("step8").join(f)).unwrap();
        assert!(read("lion-on") == read("lion-olmo-on"), "{f}");
    }
    // stopped after 3 steps and rerun: the run in one go, bit for bit
    let (jobs, o) = run("jobs", "lionw", "stop_after: 3\n", &[]);
    ok(&o);
    ok(&r.train(&jobs, &[]));
    assert!(model("jobs") == model("lion"));
    // the CUDA engine (host emulator, fp32) takes the same steps
    let (_, o) = run(
        "emu",
        "lionw",
        "",
        &["--device", "cuda-emulator", "--precision=fp32"],
    );
    ok(&o);
    let (a, b) = (losses(&r.metrics("lion")), losses(&r.metrics("emu")));
    assert_eq!(a.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.1 - y.1).abs() < 1e-5, "{a:?} vs {b:?}");
    }
    // moments belong to the optimizer that made them
    let adam_from_lion = r.config(
        "switch.yaml",
        "switch",
        &format!(
            "max_duration: 8\nload_path: {}\n",
            r.path("lion/step6").display()
        ),
    );
    refused(
        &r.train(&adam_from_lion, &[]),
        "the checkpoint holds lionw's moments, the config asks for optimizer.name `adamw`",
    );
    let log = ok(&r.train(&adam_from_lion, &["--reset_optimizer_state"]));
    assert!(log.contains("fresh AdamW moments"), "{log}");
}

#[test]
fn ephemeral_checkpoints_last_until_the_next_save_and_resume_like_any() {
    let r = Run::new();
    let extra = "max_duration: 14\nsave_interval: 10\nsave_interval_ephemeral: 3\n\
                 save_num_checkpoints_to_keep: 2\n";
    let whole = r.config("whole.yaml", "whole", extra);
    let err = ok(&r.train(&whole, &[]));
    for s in [3, 6, 9, 12] {
        assert!(err.contains(&format!("step{s} (ephemeral)")), "{err}");
    }
    // each ephemeral one was removed by the next save
    assert_eq!(r.steps("whole"), [10, 14]);
    // a run killed just after an ephemeral save restarts from it, then drops it
    let parts = r.config("parts.yaml", "parts", extra);
    ok(&r.train(&parts, &["--stop_at=13"]));
    assert_eq!(r.steps("parts"), [10, 13]);
    std::fs::write(r.path("parts/step13/ephemeral"), "").unwrap();
    let err = ok(&r.train(&parts, &[]));
    assert!(err.contains("step13 (step 13)"), "{err}");
    assert_eq!(r.steps("parts"), [10, 14]);
    assert!(r.weights("whole/step14") == r.weights("parts/step14"));
}

#[test]
fn olmo_s_unsharded_series_is_kept_apart_and_save_interval_null_saves_at_the_end() {
    let r = Run::new();
    // regular every 4 kept 1 deep; unsharded every 6, all kept; step 12, in both, is kept
    let cfg = r.config(
        "both.yaml",
        "both",
        "max_duration: 14\nsave_interval: 4\nsave_num_checkpoints_to_keep: 1\nsave_interval_unsharded: 6\n",
    );
    let err = ok(&r.train(&cfg, &[]));
    assert!(
        err.contains("step6 (save_interval_unsharded: kept apart)"),
        "{err}"
    );
    assert_eq!(r.steps("both"), [6, 12, 14]);
    assert!(r.path("both/step12/unsharded").exists());
    // and kept `save_num_unsharded_checkpoints_to_keep` deep
    let cfg = r.config(
        "two.yaml",
        "two",
        "max_duration: 20\nsave_interval: 4\nsave_num_checkpoints_to_keep: 1\nsave_interval_unsharded: 6\nsave_num_unsharded_checkpoints_to_keep: 2\n",
    );
    ok(&r.train(&cfg, &[]));
    assert_eq!(r.steps("two"), [12, 18, 20]);
    // save_interval: null (OLMo's no-sharded-checkpoints): the end only, after OLMo's
    // pre-train checkpoint
    let cfg = r.config("end.yaml", "end", "max_duration: 5\nsave_interval: null\n");
    ok(&r.train(&cfg, &[]));
    assert_eq!(r.steps("end"), [0, 5]);
    // save_num_checkpoints_to_keep: 0, OLMo's "no regular checkpoints": the unsharded series
    // alone, the pre-train checkpoint and the end in it
    let cfg = r.config(
        "zero.yaml",
        "zero",
        "max_duration: 14\nsave_interval: 2\nsave_num_checkpoints_to_keep: 0\nsave_interval_unsharded: 6\n",
    );
    ok(&r.train(&cfg, &[]));
    assert_eq!(r.steps("zero"), [0, 6, 12, 14]);
    for s in [0, 6, 12, 14] {
        assert!(r.path(&format!("zero/step{s}/unsharded")).exists(), "{s}");
    }
}

#[test]
fn a_new_model_is_saved_as_step0_first_and_a_rerun_over_it_starts_anew() {
    let r = Run::new();
    let cfg = r.config("c.yaml", "run", "max_duration: 4\nsave_interval: 2\n");
    let err = ok(&r.train(&cfg, &[]));
    assert!(err.contains("run/step0\n"), "{err}");
    assert_eq!(r.steps("run"), [0, 2, 4]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.path("run/step0/train.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 0);
    // the initial weights: another seed's differ, the same seed's are the same bits
    let again = r.config("again.yaml", "again", "max_duration: 4\nsave_interval: 2\n");
    ok(&r.train(&again, &["--stop_at=0"]));
    assert_eq!(r.steps("again"), [0]);
    assert!(r.weights("again/step0") == r.weights("run/step0"));
    assert!(r.weights("run/step2") != r.weights("run/step0"));
    // a rerun over a pre-train checkpoint alone starts anew (the config makes those weights
    // again) and ends with the bits of a run that never stopped
    let err = ok(&r.train(&again, &[]));
    assert!(err.contains("is a pre-train checkpoint"), "{err}");
    assert!(!err.contains("resuming from"), "{err}");
    assert!(r.weights("again/step4") == r.weights("run/step4"));
    assert_eq!(losses(&r.metrics("again")), losses(&r.metrics("run")));
    // ... so a model fixed after a failed start takes effect rather than being refused, and
    // so does a load_path added
    let wide = r.config("wide.yaml", "wide", "max_duration: 2\n");
    ok(&r.train(&wide, &["--stop_at=0"]));
    let err = ok(&r.train(&wide, &["--model.d_model=32"]));
    assert!(err.contains("in 1 layers of"), "{err}");
    assert!(r.weights("wide/step2").len() > r.weights("run/step2").len());
    let late = r.config("late.yaml", "late", "max_duration: 6\n");
    ok(&r.train(&late, &["--stop_at=0"]));
    let err = ok(&r.train(
        &late,
        &[&format!("--load_path={}", r.path("run/step4").display())],
    ));
    assert!(err.contains("starting from"), "{err}");
    assert!(err.contains("(step 6, epoch 0)"), "{err}");
    // OLMo's switch, on the command line as its scripts pass it: no step0
    let off = r.config("off.yaml", "off", "max_duration: 2\n");
    ok(&r.train(&off, &["--no_pre_train_checkpoint"]));
    assert_eq!(r.steps("off"), [2]);
}

#[test]
fn a_run_that_does_not_resume_refuses_or_replaces_earlier_checkpoints() {
    let r = Run::new();
    let cfg = r.config("c.yaml", "run", "max_duration: 4\nsave_interval: 2\n");
    ok(&r.train(&cfg, &[]));
    refused(
        &r.train(&cfg, &["--try_load_latest_save=false", "--max_duration=3"]),
        "holds checkpoints of an earlier run (up to step 4)",
    );
    let o = r.train(
        &cfg,
        &[
            "--try_load_latest_save=false",
            "--save_overwrite",
            &format!("--load_path={}", r.path("run/step2").display()),
        ],
    );
    refused(&o, "is inside save_folder");
    assert!(
        r.path("run/step4").exists(),
        "a refused run removes nothing"
    );
    // a half-written save of the earlier run goes too
    std::fs::create_dir_all(r.path("run/step6.tmp")).unwrap();
    let err = ok(&r.train(
        &cfg,
        &[
            "--try_load_latest_save=false",
            "--save_overwrite",
            "--max_duration=3",
        ],
    ));
    assert!(err.contains("removed the earlier checkpoints"), "{err}");
    assert!(!r.path("run/step4").exists() && !r.path("run/step6.tmp").exists());
    assert_eq!(train_state(&r, "run/step3")["step"], 3);
    assert_eq!(
        std::fs::read_link(r.path("run/latest")).unwrap(),
        Path::new("step3")
    );
    assert_eq!(losses(&r.metrics("run")).len(), 3);
}

#[test]
fn info_tells_what_a_run_takes_of_each_gpu() {
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/OLMo-7B.yaml");
    let o = Command::new(env!("CARGO_BIN_EXE_olmo-train"))
        .args([
            "info",
            cfg.to_str().unwrap(),
            "--activation_checkpointing=one_in_two",
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // 18 bytes a parameter: f32 weights, gradients and AdamW's moments, the bf16 copy
    assert!(
        out.contains("CUDA memory per GPU (amp_bf16, flash attention, AdamW")
            && out.contains("state: 115.5 GiB"),
        "{out}"
    );
    let header = out
        .lines()
        .find(|l| l.contains("micro-batch x 2048"))
        .expect(&out);
    assert!(
        header.contains("no checkpointing | whole_layer | one_in_two (configured)"),
        "{header}"
    );
    // the configured micro-batch's row: less memory the more blocks are computed again
    let row = out
        .lines()
        .find(|l| l.contains("2 (configured)"))
        .expect(&out);
    let gib: Vec<f64> = row
        .split('|')
        .skip(1)
        .map(|c| c.trim().trim_end_matches(" GiB").parse().unwrap())
        .collect();
    assert!(
        gib.len() == 3 && gib[1] < gib[2] && gib[2] < gib[0],
        "{row}"
    );
    assert!(gib.iter().all(|&g| g > 115.5), "{row}");
}
