//! `mpirun -np 2 berth ...` against one process (feature `mpi`; `.ci/run` installs Open MPI
//! and runs these). TCP transport between the ranks, as between machines; each rank one
//! thread.
#![cfg(feature = "mpi")]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::*;

/// `mpirun -np n berth args` (TCP between ranks, root allowed, oversubscribed).
fn mpirun_command<S: AsRef<std::ffi::OsStr>>(n: usize, args: &[S]) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args([
            "--oversubscribe",
            "-np",
            &n.to_string(),
            "--mca",
            "btl",
            "tcp,self",
        ])
        .args(["--mca", "btl_tcp_if_include", "lo"])
        .arg(env!("CARGO_BIN_EXE_berth"))
        .args(args);
    c
}

/// `mpirun -np 2 sh -c script` in `dir` (TCP between the ranks): each rank's shell sees
/// its rank as `$OMPI_COMM_WORLD_RANK`, so a script can give rank 1 other arguments.
fn mpirun_script(dir: &Path, script: &str) -> Output {
    Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(dir)
        .args(["--oversubscribe", "-np", "2", "--mca", "btl", "tcp,self"])
        .args(["--mca", "btl_tcp_if_include", "lo", "sh", "-c", script])
        .output()
        .expect("mpirun runs")
}

/// [`mpirun_command`] run to its end.
fn mpirun(n: usize, args: &[&str]) -> Output {
    mpirun_command(n, args)
        .output()
        .expect("mpirun runs (apt install openmpi-bin)")
}

/// `--threads 1 finetune --task TASK` of `data` into `dir` (a fifth held out, no dropout),
/// then `extra`.
fn finetune_run(task: &str, model: &str, data: &Path, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--threads",
        "1",
        "finetune",
        "--task",
        task,
        "--model",
        model,
        "--train",
        data.to_str().unwrap(),
        "--dev-fraction",
        "0.2",
        "--output",
        dir.to_str().unwrap(),
        "--no-dropout",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The logged training losses of a run (step, loss).
fn losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some() && v.get("eval").is_none())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn newest_checkpoint(run: &Path) -> PathBuf {
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let step = e
                .file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    steps.pop().unwrap().1
}

fn assert_runs_agree(one: &Path, two: &Path, what: &str) {
    assert_runs_agree_except(one, two, what, &[], 1e-5);
}

/// [`assert_runs_agree`], leaving out also the weights named by `zero_gradient` (suffixes):
/// weights whose exact gradient is 0 for the objective, as the key bias is for all; final
/// weights must agree to `tol`.
fn assert_runs_agree_except(one: &Path, two: &Path, what: &str, zero_gradient: &[&str], tol: f32) {
    let (a, b) = (losses(one), losses(two));
    assert!(
        !a.is_empty() && a.len() == b.len(),
        "{what}: {a:?} vs {b:?}"
    );
    for ((sa, la), (sb, lb)) in a.iter().zip(&b) {
        assert_eq!(sa, sb);
        assert!(
            (la - lb).abs() <= 1e-5 * la.abs().max(1e-3),
            "{what}: step {sa} loss {la} (1 rank) vs {lb} (2 ranks)"
        );
    }
    let (wa, wb) = (
        weights(&newest_checkpoint(one)),
        weights(&newest_checkpoint(two)),
    );
    assert_eq!(wa.len(), wb.len());
    let (mut worst, mut at) = (0f32, String::new());
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        // The attention key bias adds the same q·b to every score of a query, which softmax
        // cancels: its exact gradient is 0, its computed one rounding noise, and Adam turns
        // noise into steps of about the learning rate whose signs follow the summation
        // order (seen: 7e-6 vs -8e-6 after 10 steps at 1e-4). Every other weight must
        // agree to `tol`.
        if na.ends_with("attention.self.key.bias") || zero_gradient.iter().any(|z| na.ends_with(z))
        {
            continue;
        }
        for (x, y) in va.iter().zip(vb) {
            if (x - y).abs() > worst {
                (worst, at) = ((x - y).abs(), format!("{na} ({x} vs {y})"));
            }
        }
    }
    assert!(
        worst <= tol,
        "{what}: final weights differ by {worst} at {at}"
    );
    println!(
        "{what}: {} logged losses agree; final weights within {worst:e}",
        a.len()
    );
}

/// Rows of a small sentiment-style classification set.
fn classify_rows(dir: &Path) -> PathBuf {
    let words = [
        "good", "bad", "great", "awful", "fine", "poor", "nice", "sad",
    ];
    let mut text = String::from("sentence\tlabel\n");
    for i in 0..40 {
        let w = words[i % words.len()];
        let filler = "the movie was ".repeat(1 + i % 4);
        text.push_str(&format!(
            "{filler}{w} {}\t{}\n",
            i % 7,
            (i % words.len()) % 2
        ));
    }
    let p = dir.join("train.tsv");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn two_ranks_fine_tune_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let data = classify_rows(tmp.path());
    let model = tiny("bert-base");
    for (k, (what, extra)) in [
        ("classify", vec![]),
        // Several micro-batches per step: each is weighted by its share before the sum.
        ("classify --grad-accum 2", vec!["--grad-accum", "2"]),
        // A 1-layer student of the model, written by rank 0 and read by the others.
        ("classify --student-layers 1", vec!["--student-layers", "1"]),
    ]
    .into_iter()
    .enumerate()
    {
        let run = |dir: &Path| -> Vec<String> {
            let settings = [
                "--batch-size",
                "7",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--log-every",
                "1",
                "--seed",
                "5",
            ];
            finetune_run(
                "classify",
                &model,
                &data,
                dir,
                &[&settings[..], &extra[..]].concat(),
            )
        };
        let (one, two) = (
            tmp.path().join(format!("one-{k}")),
            tmp.path().join(format!("two-{k}")),
        );
        ok(&berth(&strs(&run(&one))));
        let out = mpirun(2, &strs(&run(&two)));
        let stdout = ok(&out);
        // One best-checkpoint line (rank 0's), not one per rank.
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        assert_runs_agree(&one, &two, what);
    }
}

#[test]
fn two_ranks_fine_tune_ner_as_one_process() {
    // NER's loss is a mean over labelled tokens, which the ranks hold unequally.
    let tmp = tempfile::tempdir().unwrap();
    let sentences = [
        "Peter B-PER\nlives O\nin O\nParis B-LOC\n. O\n",
        "the O\ndog O\nsees O\nMary B-PER\nand O\nthe O\ncat O\n. O\n",
        "Mary B-PER\nwent O\nto O\nBerlin B-LOC\n. O\n",
        "who O\nis O\nthere O\n? O\n",
        "Anna B-PER\nmet O\nPeter B-PER\nin O\nRome B-LOC\nyesterday O\n. O\n",
    ];
    let data = tmp.path().join("train.conll");
    let text: Vec<&str> = (0..30).map(|i| sentences[i % sentences.len()]).collect();
    std::fs::write(&data, text.join("\n")).unwrap();
    let model = tiny("bert-base");
    let args = |dir: &Path| -> Vec<String> {
        let settings = [
            "--epochs",
            "2",
            "--batch-size",
            "5",
            "--lr",
            "1e-3",
            "--log-every",
            "1",
        ];
        finetune_run("ner", &model, &data, dir, &settings)
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(&berth(&strs(&args(&one))));
    ok(&mpirun(2, &strs(&args(&two))));
    assert_runs_agree(&one, &two, "ner");
}

#[test]
fn sharded_embed_writes_the_one_process_output() {
    let tmp = tempfile::tempdir().unwrap();
    let model = minilm_dir();
    let input = tmp.path().join("texts.txt");
    let texts: Vec<String> = (0..9)
        .map(|i| {
            format!(
                "sentence number {i} about {}",
                ["cats", "stocks", "rain"][i % 3]
            )
            .repeat(1 + i % 3)
        })
        .collect();
    std::fs::write(&input, texts.join("\n")).unwrap();
    // `berth embed` of `src` into `out` on `ranks` ranks (1: no mpirun), then `extra`: the
    // file's bytes.
    let embed_with = |src: &Path, out: &str, ranks: usize, extra: &[&str]| -> Vec<u8> {
        let out = tmp.path().join(out);
        let mut args = vec![
            "--threads",
            "1",
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--input",
            src.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        ok(&if ranks == 1 {
            berth(&args)
        } else {
            mpirun(ranks, &args)
        });
        std::fs::read(&out).unwrap()
    };
    let embed = |src: &Path, out: &str, ranks: usize| embed_with(src, out, ranks, &[]);
    for ext in ["jsonl", "npy"] {
        let one = embed(&input, &format!("one.{ext}"), 1);
        assert!(
            one == embed(&input, &format!("two.{ext}"), 2),
            "{ext}: 2 ranks differ from 1 process"
        );
    }
    // Per-token vectors (--pooling none): the same lines, in input order.
    let none = ["--pooling", "none"];
    let one = embed_with(&input, "tokens-1.jsonl", 1, &none);
    assert_eq!(one.iter().filter(|&&b| b == b'\n').count(), 9);
    assert!(
        one == embed_with(&input, "tokens-2.jsonl", 2, &none),
        "--pooling none: 2 ranks differ from 1 process"
    );
    // Three ranks over nine texts, and more ranks than texts.
    let few = tmp.path().join("few.txt");
    std::fs::write(&few, texts[..3].join("\n")).unwrap();
    for (n, src) in [(3, &input), (4, &few)] {
        let one = embed(src, &format!("n{n}-one.jsonl"), 1);
        assert!(one == embed(src, &format!("n{n}.jsonl"), n), "{n} ranks");
    }
}

/// Sentence-embedding fine-tuning (in-batch negatives: each anchor is scored against every
/// positive and hard negative of the global batch) on 2 and 3 ranks equals one process:
/// each rank embeds its share and gathers the others' embeddings. Without and with
/// dropout (masks of the one-process packed batch's rows), with and without hard negatives,
/// and with a last batch smaller than the world (a rank with nothing to embed).
#[test]
fn ranks_fine_tune_embeddings_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.tsv");
    let words = [
        "cat", "stocks", "rain", "river", "piano", "bread", "train", "snow",
    ];
    let mut text = String::from("anchor\tpositive\tnegative\n");
    for i in 0..25 {
        let (w, v) = (words[i % 8], words[(i + 3) % 8]);
        text.push_str(&format!("the {w} {i}\tsome {w} here\ta {v} again\n"));
    }
    std::fs::write(&pairs, text).unwrap();
    let model = tiny("bert-base");
    for (k, (what, ranks, negatives, extra)) in [
        (
            "embed, 2 ranks, hard negatives",
            2,
            true,
            vec!["--no-dropout"],
        ),
        ("embed, 2 ranks, dropout on", 2, false, vec![]),
        (
            "embed, 3 ranks, a last batch of 2 (one rank empty)",
            3,
            true,
            vec!["--batch-size", "6"],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let run = |dir: &Path| -> Vec<String> {
            let mut a = finetune_run("embed", &model, &pairs, dir, &[]);
            a.retain(|s| s != "--no-dropout");
            if negatives {
                a.extend(["--negative-column", "negative"].map(String::from));
            }
            a.extend(
                [
                    "--epochs",
                    "2",
                    "--lr",
                    "5e-4",
                    "--log-every",
                    "1",
                    "--seed",
                    "4",
                ]
                .map(String::from),
            );
            if !extra.contains(&"--batch-size") {
                a.extend(["--batch-size", "7"].map(String::from));
            }
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let (one, many) = (
            tmp.path().join(format!("one-{k}")),
            tmp.path().join(format!("many-{k}")),
        );
        ok(&berth(&strs(&run(&one))));
        ok(&mpirun(ranks, &strs(&run(&many))));
        assert_runs_agree(&one, &many, what);
    }
}

/// The berth processes `mpirun` (pid `launcher`) started, found through /proc.
fn ranks_of(launcher: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
        let ppid: u32 = after
            .split(' ')
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == launcher && stat.contains("(berth)") {
            out.push(pid);
        }
    }
    out
}

/// A rank killed mid-run ends the job with an error; `--resume` with another world size
/// (one process) then finishes at the uninterrupted run's weights.
#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes_on_another_world_size() {
    let tmp = tempfile::tempdir().unwrap();
    let data = classify_rows(tmp.path());
    let model = tiny("bert-base");
    let args = |dir: &Path, resume: bool| -> Vec<String> {
        let settings = [
            "--batch-size",
            "7",
            "--epochs",
            "60",
            "--lr",
            "1e-4",
            "--log-every",
            "5",
            "--save-every",
            "20",
        ];
        let resumed: &[&str] = if resume { &["--resume"] } else { &[] };
        finetune_run(
            "classify",
            &model,
            &data,
            dir,
            &[&settings[..], resumed].concat(),
        )
    };
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    ok(&berth(&strs(&args(&one, false))));

    let mut job = mpirun_command(2, &args(&two, false))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    // Once the first checkpoint exists, kill one rank.
    loop {
        assert!(
            started.elapsed().as_secs() < 120,
            "no checkpoint after 2 minutes"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before a rank was killed"
        );
        if two.join("checkpoints").is_dir()
            && std::fs::read_dir(two.join("checkpoints"))
                .unwrap()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
        {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ranks = ranks_of(job.id());
    assert_eq!(ranks.len(), 2, "{ranks:?}");
    unsafe { libc::kill(ranks[1] as i32, libc::SIGKILL) };
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed().as_secs() < 180,
            "the job did not end after a rank was killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "a killed rank must fail the job");
    // Resume with one process: the uninterrupted run's weights.
    ok(&berth(&strs(&args(&two, true))));
    assert_runs_agree_weights(&one, &two, "killed, resumed on 1 rank");
}

fn assert_runs_agree_weights(one: &Path, two: &Path, what: &str) {
    let (wa, wb) = (
        weights(&newest_checkpoint(one)),
        weights(&newest_checkpoint(two)),
    );
    let mut worst = 0f32;
    for ((na, va), (nb, vb)) in wa.iter().zip(&wb) {
        assert_eq!(na, nb);
        if na.ends_with("attention.self.key.bias") {
            continue; // see assert_runs_agree
        }
        for (x, y) in va.iter().zip(vb) {
            worst = worst.max((x - y).abs());
        }
    }
    assert!(worst <= 1e-5, "{what}: final weights differ by {worst}");
    println!("{what}: final weights within {worst:e}");
}

#[test]
fn sharded_classify_and_ner_print_the_one_process_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("rows.jsonl");
    let rows: Vec<String> = (0..7)
        .map(|i| {
            format!(
                "{{\"id\": {i}, \"text\": \"George Washington number {i} lived in Virginia {}\"}}",
                "and Paris ".repeat(i)
            )
        })
        .collect();
    std::fs::write(&input, rows.join("\n")).unwrap();
    for (cmd, model) in [
        ("classify", task_model("bert-classify")),
        ("ner", task_model("bert-ner")),
    ] {
        let args = [
            "--threads",
            "1",
            cmd,
            "--model",
            &model,
            "--input",
            input.to_str().unwrap(),
            "--id-column",
            "id",
        ];
        let one = ok(&berth(&args));
        assert_eq!(one.lines().count(), 7);
        for n in [2, 3] {
            let many = ok(&mpirun(n, &args));
            assert_eq!(many, one, "{cmd} on {n} ranks");
        }
    }
}

/// Pretraining from scratch — masked-LM (token and whole-word masking, with the NSP / SOP
/// sentence-pair loss) and ELECTRA's replaced-token detection: masks and sampled
/// replacements keyed by each example's global position, every mean weighted by its own
/// units (masked tokens, pairs, all tokens), so 2 ranks are one process.
#[test]
fn two_ranks_pretrain_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let corpus = root().join("fixtures/vocab/corpus.txt");
    for (k, (what, extra)) in [
        ("mlm", vec![]),
        ("mlm --whole-word", vec!["--whole-word"]),
        ("sop", vec!["--objective", "sop"]),
        ("nsp", vec!["--objective", "nsp"]),
        ("rtd", vec!["--objective", "rtd"]),
    ]
    .into_iter()
    .enumerate()
    {
        let (one, two) = (
            tmp.path().join(format!("one-{k}")),
            tmp.path().join(format!("two-{k}")),
        );
        let flags = [&["--no-dropout"][..], &extra[..]].concat();
        ok(&berth(&strs(&pretrain_run(&vocab, &corpus, &one, &flags))));
        ok(&mpirun(
            2,
            &strs(&pretrain_run(&vocab, &corpus, &two, &flags)),
        ));
        assert_runs_agree(&one, &two, what);
        if what == "rtd" {
            // The generator trains too (its own layers and head; embeddings are shared).
            let gen = |run: &Path| weights(&newest_checkpoint(run).join("generator"));
            let (ga, gb) = (gen(&one), gen(&two));
            assert!(!ga.is_empty() && ga.len() == gb.len());
            for ((na, va), (nb, vb)) in ga.iter().zip(&gb) {
                assert_eq!(na, nb);
                if na.ends_with("attention.self.key.bias") {
                    continue; // see assert_runs_agree
                }
                let worst = va
                    .iter()
                    .zip(vb)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst <= 1e-5, "rtd generator {na}: {worst}");
            }
        }
    }
    // Continued pretraining of a 1-layer student of the first run's checkpoint, distilled
    // from that checkpoint (dropout on): rank 0 writes the student, the teacher runs on each
    // share.
    let teacher = newest_checkpoint(&tmp.path().join("one-0"));
    let teacher = teacher.to_str().unwrap();
    let distill = |dir: &Path| -> Vec<String> {
        [
            "--threads",
            "1",
            "pretrain",
            "--from",
            teacher,
            "--teacher",
            teacher,
            "--student-layers",
            "1",
            "--data",
            corpus.to_str().unwrap(),
            "--output",
            dir.to_str().unwrap(),
            "--max-length",
            "64",
            "--batch-size",
            "11",
            "--max-steps",
            "8",
            "--lr",
            "1e-3",
            "--log-every",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let (one, two) = (
        tmp.path().join("one-distill"),
        tmp.path().join("two-distill"),
    );
    ok(&berth(&strs(&distill(&one))));
    ok(&mpirun(2, &strs(&distill(&two))));
    assert!(two.join("student-init/config.json").is_file());
    assert_runs_agree(&one, &two, "mlm --teacher --student-layers 1");
}

/// The gradient sum (`MpiWorld::all_reduce_sum`, a ring per bucket) on 3 ranks: every rank
/// ends with the same bits, a second run gives them again, and they are the sum (within
/// f32 rounding of an f64 reference) — over buckets that cut the buffer unevenly, parts of
/// unequal size, and a tail shorter than the world. The test runs itself under mpirun: a
/// rank (BERTH_RING_RANK set) checks and exits; the launcher checks the job succeeded.
#[test]
fn ring_all_reduce_sums_the_same_bits_on_every_rank() {
    use berth_train::dist::Collective;
    if std::env::var_os("BERTH_RING_RANK").is_some() {
        let world = berth_train::dist::mpi_world::MpiWorld::init().unwrap();
        let (rank, n) = (world.rank(), world.world_size());
        assert_eq!(n, 3);
        // Values of every rank, from a formula all ranks know (for the f64 reference).
        let value = |r: usize, i: usize| {
            let h = (i as u64 ^ (r as u64) << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 10f32.powi((i % 7) as i32 - 3)
        };
        for (len, bucket) in [(1_000_003usize, 65_537usize), (10, 4), (2, 1 << 20), (5, 5)] {
            let mine: Vec<f32> = (0..len).map(|i| value(rank, i)).collect();
            let mut a = mine.clone();
            world.ring_all_reduce_sum_in(&mut a, bucket).unwrap();
            let mut b = mine.clone();
            world.ring_all_reduce_sum_in(&mut b, bucket).unwrap();
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            for (i, &x) in a.iter().enumerate() {
                let want: f64 = (0..n).map(|r| value(r, i) as f64).sum();
                let scale: f64 = (0..n).map(|r| (value(r, i) as f64).abs()).sum();
                assert!(
                    (x as f64 - want).abs() <= 1e-6 * scale.max(1e-30),
                    "len {len} bucket {bucket} element {i}: {x} vs {want}"
                );
            }
            let bytes: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
            let all = world.gather_all(&bytes).unwrap();
            assert!(all.iter().all(|b| *b == bytes), "ranks differ (len {len})");
        }
        let mut c: Vec<f32> = (0..300_001).map(|i| value(rank, i)).collect();
        let mut d = c.clone();
        world.all_reduce_sum(&mut c).unwrap();
        world
            .ring_all_reduce_sum_in(&mut d, berth_train::dist::mpi_world::BUCKET)
            .unwrap();
        assert_eq!(c, d, "all_reduce_sum is the ring");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("mpirun")
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("BERTH_RING_RANK", "1")
        .args(["--oversubscribe", "-np", "3", "--mca", "btl", "tcp,self"])
        .args(["--mca", "btl_tcp_if_include", "lo", "-x", "BERTH_RING_RANK"])
        .arg(exe)
        .args([
            "--exact",
            "ring_all_reduce_sums_the_same_bits_on_every_rank",
            "--test-threads",
            "1",
        ])
        .output()
        .expect("mpirun runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.matches("1 passed").count() == 3,
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Ranks started unlike each other (another training file, another learning rate, another
/// starting model) all end, quickly, with one error naming the rank and what differs.
#[test]
fn ranks_that_start_differently_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = classify_rows(tmp.path());
    let other = tmp.path().join("other.tsv");
    let text = std::fs::read_to_string(&data).unwrap();
    // One example fewer (the tiny vocabulary reads most changed words as [UNK]).
    let rows: Vec<&str> = text.lines().collect();
    std::fs::write(&other, rows[..rows.len() - 1].join("\n") + "\n").unwrap();
    // The same model with its last weight changed (a finite value).
    let base = tiny("bert-base");
    let changed = tmp.path().join("changed-model");
    std::fs::create_dir(&changed).unwrap();
    for e in std::fs::read_dir(&base).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), changed.join(e.file_name())).unwrap();
    }
    let st = changed.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let at = bytes.len() - 4;
    let x = f32::from_le_bytes(bytes[at..].try_into().unwrap());
    bytes[at..].copy_from_slice(&(x + 0.5).to_le_bytes());
    std::fs::write(&st, bytes).unwrap();
    let changed = changed.display().to_string();
    // `$R` is the rank (the shell under mpirun sees OMPI_COMM_WORLD_RANK).
    for (what, train, lr, model, needle) in [
        (
            "data",
            format!("$R{}", "-data.tsv"),
            "5e-5",
            base.clone(),
            "training data",
        ),
        (
            "lr",
            data.display().to_string(),
            "$LR",
            base.clone(),
            "settings",
        ),
        (
            "model",
            data.display().to_string(),
            "5e-5",
            "$MODEL".into(),
            "starting weights",
        ),
    ] {
        for r in 0..2 {
            let src = if r == 0 { &data } else { &other };
            std::fs::copy(src, tmp.path().join(format!("{r}-data.tsv"))).unwrap();
        }
        let out = tmp.path().join(format!("run-{what}"));
        let script = format!(
            "R=$OMPI_COMM_WORLD_RANK; LR=5e-5; MODEL={base}; \
             if [ $R = 1 ]; then LR=1e-4; MODEL={changed}; fi; \
             exec {bin} --threads 1 finetune --task classify --model {model} --train {train} \
             --output {out} --lr {lr} --max-steps 2 --no-dropout",
            bin = env!("CARGO_BIN_EXE_berth"),
            out = out.display(),
        );
        let start = std::time::Instant::now();
        let result = mpirun_script(tmp.path(), &script);
        let err = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success(), "{what}: {err}");
        assert!(
            err.contains("rank 1's") && err.contains(needle) && !err.contains("panicked"),
            "{what}: {err}"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "{what}: slow"
        );
        assert!(
            !out.join("checkpoints").exists(),
            "{what}: a checkpoint was written"
        );
    }
}

/// With dropout on, the masks are keyed by each token's and sequence's place in the packed
/// global batch, so 2 ranks still train as one process: classification (with and without
/// --grad-accum), NER, masked-LM and ELECTRA pretraining from scratch.
#[test]
fn two_ranks_with_dropout_train_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("bert-base");
    let classify = classify_rows(tmp.path());
    let ner = tmp.path().join("train.conll");
    let sentence = "Anna B-PER\nmet O\nPeter B-PER\nin O\nRome B-LOC\nyesterday O\n. O\n";
    let other = "the O\ndog O\nsees O\nMary B-PER\n. O\n";
    let text: Vec<&str> = (0..24)
        .map(|i| if i % 3 == 0 { other } else { sentence })
        .collect();
    std::fs::write(&ner, text.join("\n")).unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let corpus = root().join("fixtures/vocab/corpus.txt");
    let steps = ["--lr", "1e-3", "--log-every", "1", "--seed", "3"];
    let runs: Vec<(&str, Box<dyn Fn(&Path) -> Vec<String>>)> = vec![
        (
            "classify",
            Box::new(|dir: &Path| {
                let extra = [&steps[..], &["--batch-size", "7", "--epochs", "2"]].concat();
                finetune_run("classify", &model, &classify, dir, &extra)
            }),
        ),
        (
            "classify --grad-accum 2",
            Box::new(|dir: &Path| {
                let extra = [
                    &steps[..],
                    &["--batch-size", "7", "--epochs", "2", "--grad-accum", "2"],
                ]
                .concat();
                finetune_run("classify", &model, &classify, dir, &extra)
            }),
        ),
        (
            "ner",
            Box::new(|dir: &Path| {
                let extra = [&steps[..], &["--batch-size", "5", "--epochs", "2"]].concat();
                finetune_run("ner", &model, &ner, dir, &extra)
            }),
        ),
        (
            "mlm",
            Box::new(|dir: &Path| pretrain_run(&vocab, &corpus, dir, &[])),
        ),
        (
            "rtd",
            Box::new(|dir: &Path| pretrain_run(&vocab, &corpus, dir, &["--objective", "rtd"])),
        ),
    ];
    for (k, (what, args)) in runs.iter().enumerate() {
        let (one, two) = (
            tmp.path().join(format!("one-{k}")),
            tmp.path().join(format!("two-{k}")),
        );
        let on = |dir: &Path| {
            let mut a = args(dir);
            a.retain(|x| x != "--no-dropout");
            a
        };
        ok(&berth(&strs(&on(&one))));
        ok(&mpirun(2, &strs(&on(&two))));
        assert_runs_agree(&one, &two, &format!("{what} with dropout"));
    }
}

/// A tiny model pretrained from scratch on the committed corpus, then `extra`.
fn pretrain_run(vocab: &Path, corpus: &Path, dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--threads",
        "1",
        "pretrain",
        "--tokenizer",
        vocab.to_str().unwrap(),
        "--data",
        corpus.to_str().unwrap(),
        "--output",
        dir.to_str().unwrap(),
        "--batch-size",
        "11",
        "--max-steps",
        "12",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--save-every",
        "6",
    ]
    .iter()
    .chain(TINY_BERT.iter())
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The gradient sum overlapped with the backward (each fused layer's gradients summed over
/// the ranks as its backward finishes, on a second thread) gives the bits of the sum after
/// the backward (`BERTH_MPI_OVERLAP=0`), on 3 ranks where the order of additions shows:
/// fine-tuning with gradient accumulation and dropout, ELECTRA pretraining (two trained
/// networks, a generator and a discriminator) and sentence-embedding fine-tuning (three
/// forward passes per rank). The overlapped run says it overlapped.
#[test]
fn gradient_sums_overlapped_with_the_backward_give_the_same_bits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = classify_rows(tmp.path());
    let model = tiny("bert-base");
    let vocab = root().join("fixtures/vocab/wordpiece");
    let corpus = root().join("fixtures/vocab/corpus.txt");
    let pairs = tmp.path().join("pairs.tsv");
    let mut text = String::from("anchor\tpositive\tnegative\n");
    for i in 0..20 {
        text.push_str(&format!(
            "query {i}\tanswer {i} here\tnot {} at all\n",
            i + 7
        ));
    }
    std::fs::write(&pairs, text).unwrap();
    let runs: [(&str, Box<dyn Fn(&Path) -> Vec<String>>); 3] = [
        (
            "classify --grad-accum 2 (dropout on)",
            Box::new(|dir: &Path| {
                let mut a = finetune_run(
                    "classify",
                    &model,
                    &data,
                    dir,
                    &["--batch-size", "5", "--grad-accum", "2", "--epochs", "2"],
                );
                a.retain(|s| s != "--no-dropout");
                a.extend(["--lr", "1e-3", "--seed", "3"].map(String::from));
                a
            }),
        ),
        (
            "pretrain --objective rtd",
            Box::new(|dir: &Path| pretrain_run(&vocab, &corpus, dir, &["--objective", "rtd"])),
        ),
        (
            // Three forward passes per rank (anchors, positives, negatives): each fused
            // weight's three gradients are added in arrival order before its sum.
            "embed with hard negatives (dropout on)",
            Box::new(|dir: &Path| {
                let mut a = finetune_run("embed", &model, &pairs, dir, &[]);
                a.retain(|s| s != "--no-dropout");
                a.extend(
                    [
                        "--negative-column",
                        "negative",
                        "--batch-size",
                        "8",
                        "--lr",
                        "1e-3",
                    ]
                    .map(String::from),
                );
                a
            }),
        ),
    ];
    for (k, (what, args)) in runs.iter().enumerate() {
        let (on, off) = (
            tmp.path().join(format!("on-{k}")),
            tmp.path().join(format!("off-{k}")),
        );
        let overlapped = ok_stderr(&mpirun(3, &strs(&args(&on))));
        let after = ok_stderr(
            &mpirun_command(3, &args(&off))
                .env("BERTH_MPI_OVERLAP", "0")
                .output()
                .unwrap(),
        );
        let said = "during the backward";
        assert!(overlapped.contains(said), "{what}: {overlapped}");
        assert!(!after.contains(said), "{what}: {after}");
        assert_eq!(losses(&on), losses(&off), "{what}: logged losses");
        let mut dirs = vec![PathBuf::new()];
        if what.contains("rtd") {
            dirs.push("generator".into());
        }
        for sub in dirs {
            let (a, b) = (
                weights(&newest_checkpoint(&on).join(&sub)),
                weights(&newest_checkpoint(&off).join(&sub)),
            );
            assert!(!a.is_empty() && a.len() == b.len());
            for ((na, va), (nb, vb)) in a.iter().zip(&b) {
                assert_eq!(na, nb);
                assert!(
                    va.iter().zip(vb).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}: {sub:?} {na} differs"
                );
            }
        }
    }
}

/// The stderr of a run that succeeded.
fn ok_stderr(out: &Output) -> String {
    ok(out);
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Pretraining from a prepared corpus (`berth data prepare`, several shards): 2 ranks, each
/// reading every byte of its own half of the shards only (and the held-out shards on rank
/// 0), train as one process; a damaged shard that rank 1 reads ends the job with an error
/// naming the shard.
#[test]
fn two_ranks_pretrain_from_a_prepared_corpus_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    // The fixture corpus as documents of 6 lines (held-out sequences are whole documents).
    let text = std::fs::read_to_string(root().join("fixtures/vocab/corpus.txt")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let docs: Vec<String> = lines.chunks(6).map(|c| c.join("\n")).collect();
    let corpus = tmp.path().join("docs.txt");
    std::fs::write(&corpus, docs.join("\n\n") + "\n").unwrap();
    let data = tmp.path().join("data");
    ok(&berth(&[
        "data",
        "prepare",
        "--tokenizer",
        vocab.to_str().unwrap(),
        "--output",
        data.to_str().unwrap(),
        "--max-length",
        "64",
        "--val-fraction",
        "0.1",
        "--shard-tokens",
        "2000",
        corpus.to_str().unwrap(),
    ]));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("manifest.json")).unwrap())
            .unwrap();
    let shards = manifest["train"].as_array().unwrap();
    assert!(shards.len() >= 2, "{manifest}");
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let flags = ["--no-dropout"];
    ok(&berth(&strs(&pretrain_run(&vocab, &data, &one, &flags))));
    ok(&mpirun(
        2,
        &strs(&pretrain_run(&vocab, &data, &two, &flags)),
    ));
    assert_runs_agree(&one, &two, "mlm from a prepared corpus");

    let name = shards[1]["file"].as_str().unwrap();
    let shard = data.join(name);
    let mut bytes = std::fs::read(&shard).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&shard, &bytes).unwrap();
    let out = mpirun(
        2,
        &strs(&pretrain_run(
            &vocab,
            &data,
            &tmp.path().join("bad"),
            &flags,
        )),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(name) && err.contains("checksum"), "{err}");
}

/// Question answering (questions cut into several overlapping windows each: the ranks
/// encode contiguous shares of the questions and exchange the windows) and reranking on 2
/// ranks train as one process.
#[test]
fn two_ranks_fine_tune_qa_and_rerank_as_one_process() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny("bert-base");
    let subjects = ["the dog", "the fox", "a cat", "the world"];
    let paragraphs: Vec<serde_json::Value> = (0..23)
        .map(|i| {
            let subject = subjects[i % 4];
            let filler = "and then some more words ".repeat(1 + i % 3);
            let context = format!("hello {filler}world. {subject} is there, {filler}not here.");
            let start = context.find(subject).unwrap();
            serde_json::json!({"context": context, "qas": [{"id": format!("q{i}"),
                "question": "who is there?", "answers": [{"text": subject, "answer_start": start}]}]})
        })
        .collect();
    let squad = tmp.path().join("train.json");
    std::fs::write(
        &squad,
        serde_json::json!({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]})
            .to_string(),
    )
    .unwrap();
    let pairs = tmp.path().join("rerank.jsonl");
    let mut rows = String::new();
    for i in 0..24 {
        let (q, other) = (subjects[i % 4], subjects[(i + 1) % 4]);
        for (p, l) in [
            (format!("{q} sat here {i}"), 1),
            (format!("{other} ran {i}"), 0),
        ] {
            rows += &(serde_json::json!({"query": q, "passage": p, "label": l}).to_string() + "\n");
        }
    }
    std::fs::write(&pairs, rows).unwrap();
    for (task, data, extra) in [
        (
            "qa",
            &squad,
            vec!["--max-length", "24", "--doc-stride", "6"],
        ),
        ("rerank", &pairs, vec![]),
    ] {
        let run = |dir: &Path| -> Vec<String> {
            let settings = [
                "--batch-size",
                "5",
                "--epochs",
                "2",
                "--lr",
                "1e-3",
                "--log-every",
                "1",
            ];
            finetune_run(
                task,
                &model,
                data,
                dir,
                &[&settings[..], &extra[..]].concat(),
            )
        };
        let (one, two) = (
            tmp.path().join(format!("one-{task}")),
            tmp.path().join(format!("two-{task}")),
        );
        ok(&berth(&strs(&run(&one))));
        ok(&mpirun(2, &strs(&run(&two))));
        // QA's start / end softmax runs over a window's positions: a shift of every
        // position's logit (the output bias) or hidden state (the last LayerNorm's bias)
        // cancels, so their exact gradients are 0 and Adam steps on rounding noise.
        let zero: &[&str] = if task == "qa" {
            &["layer.1.output.LayerNorm.bias", "qa_outputs.bias"]
        } else {
            &[]
        };
        // QA steps 44 times at 1e-3, where Adam carries the all-reduce's rounding further
        // than in the other runs: 5.3e-6 at worst with the general attention path on AVX2,
        // 1.3e-5 with the tiled one (which gives every sequence the same bits in any batch:
        // berth-kernels' `a_sequence_computes_the_same_bits_in_any_batch`). 2e-5 is 2 % of
        // one step; a rank's gradient lost or mis-weighted turns steps of ~1e-3.
        let tol = if task == "qa" { 2e-5 } else { 1e-5 };
        assert_runs_agree_except(&one, &two, task, zero, tol);
    }
}

/// Pretraining ranks that read different text corpora (one line changed on rank 1) stop,
/// quickly, with one error naming the training data, before any step.
#[test]
fn ranks_that_read_different_corpora_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let vocab = root().join("fixtures/vocab/wordpiece");
    let text = std::fs::read_to_string(root().join("fixtures/vocab/corpus.txt")).unwrap();
    std::fs::write(tmp.path().join("0-corpus.txt"), &text).unwrap();
    std::fs::write(
        tmp.path().join("1-corpus.txt"),
        text.replacen("the", "a", 1),
    )
    .unwrap();
    let out = tmp.path().join("run");
    let args = pretrain_run(&vocab, Path::new("$R-corpus.txt"), &out, &["--no-dropout"]);
    let script = format!(
        "R=$OMPI_COMM_WORLD_RANK; exec {} {}",
        env!("CARGO_BIN_EXE_berth"),
        args.join(" ")
    );
    let start = std::time::Instant::now();
    let result = mpirun_script(tmp.path(), &script);
    let err = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{err}");
    assert!(
        err.contains("training data") && err.contains("same corpus") && !err.contains("panicked"),
        "{err}"
    );
    assert!(start.elapsed() < std::time::Duration::from_secs(60));
    assert!(!out.join("checkpoints").exists());
}
