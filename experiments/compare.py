"""Reproduce both papers' pre-training comparisons side by side: same steps, batch, data order and seed.

Runs, one after another, each as a `train.py` run in its own directory under --out:
  baseline (Adam), stack, identity, identity-noise          -- Gong et al. 2019, Adam
  baseline-lamb, mslt, albert-mslt                         -- MSLT, LAMB
  mslt-adam                                                -- MSLT with Adam, against the Adam baseline
then writes, from the runs' logs:
  val_loss.svg    validation loss against training wall time (validation excluded): Figure 5's analogue
  results.md      time to reach the baseline's validation loss at 1/4, 1/2 and all of its budget, speed-ups,
                  final losses, total wall time, and the validation loss of a context-free (unigram) model
  results.json    the same numbers, machine-readable
Every run resumes where it stopped, and finished runs are skipped, so an interrupted comparison is
continued by running the same command again.

    python experiments/compare.py --quick                 # a few minutes: a smoke run of the whole pipeline
    python experiments/compare.py                         # the CPU comparison (a few hours on 2 cores)
    python experiments/compare.py --preset bert-base --seq-len 128 --batch-size 256 --steps 40000 \\
        --lr 1e-4 --lamb-lr 4.4e-4 --nproc 8 --out runs/compare-base   # the same on a GPU node, with torchrun
    python experiments/compare.py --report-only           # only redo tables and plot from existing logs
    python experiments/compare.py --seed 1 --out runs/compare-seed1   # a replicate, then side by side:
    python experiments/compare.py --replicates runs/compare runs/compare-seed1 --out runs/compare
    python experiments/compare.py --window gpu --plan     # BERT-Base on one GPU in 9 minutes: the planned steps
    bash experiments/gpu_window.sh                        # ... and the run (experiments/README.md, "one GPU window")
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bert  # noqa: E402
import cost_model  # noqa: E402
import data  # noqa: E402
import stack  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402

SHARED = os.path.join(ROOT, "..", "shared", "data")
# brown/brown.txt, not the folder: its cats.txt is a category list, not text
DEFAULT_CORPUS = [os.path.join(SHARED, p) for p in ("gutenberg", "brown/brown.txt", "wikitext-2-raw")]

# run name -> (train.py --method, optimizer). Each paper's method is compared with the baseline trained
# by that paper's optimizer: Adam for progressive stacking, LAMB for MSLT.
RUNS = {
    "baseline": ("baseline", "adam"),
    "stack": ("stack", "adam"),
    "mslt-adam": ("mslt", "adam"),  # MSLT with the stacking paper's optimizer, against the same Adam baseline
    "identity": ("identity", "adam"),
    "identity-noise": ("identity-noise", "adam"),
    "baseline-lamb": ("baseline", "lamb"),
    "mslt": ("mslt", "lamb"),
    "albert-mslt": ("albert-mslt", "lamb"),
}
BASELINE_OF = {"adam": "baseline", "lamb": "baseline-lamb"}
FRACTIONS = (0.25, 0.5, 1.0)
# A CPU-sized GLUE protocol: STS-B and MRPC (the small tasks where a weakly pre-trained model can show
# anything; CoLA and RTE stay at the majority class at this scale), one learning rate suited to small
# models, two seeds, 3 epochs. The papers' grid is glue.py's default (--glue-args "--task all").
GLUE_CPU = "--task STS-B MRPC --lrs 1e-4 --seeds 0 1 --epochs 3"
QUICK = dict(preset="tiny", corpus=[], vocab_size=1000, seq_len=64, steps=200, eval_batches=4, out="runs/compare-quick",
             glue_args="--task STS-B --lrs 1e-4 --seeds 0 --epochs 1 --max-train-examples 320")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    # what to run
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS),
                   help="which runs, in order (none: only the ablation)")
    p.add_argument("--out", default="runs/compare", help="directory of the runs and the results")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny model, synthetic corpus, a few minutes")
    p.add_argument("--window", choices=list(WINDOWS), help="one device window: its runs and sizes, --steps from its plan (WINDOWS)")
    p.add_argument("--plan", action="store_true", help="with --window: print the plan (predicted minutes of each run) and stop")
    p.add_argument("--window-costs", default="", metavar="FILE", help="stage costs (cost_model.py --measure) to plan --window from, instead of its own")
    p.add_argument("--report-only", action="store_true", help="do not train; rebuild results from the logs")
    p.add_argument("--replicates", nargs="+", metavar="DIR", default=[],
                   help="do not train; print finished comparisons (e.g. --seed 0 and 1) side by side into <out>/replicates.md")
    p.add_argument("--ablation", action="store_true", help="also run the switching-time ablation (Figure 7)")
    p.add_argument("--ablation-after", type=int, default=0, metavar="F",
                   help="ablation: steps at full depth after the switch (default: --steps / 4)")
    p.add_argument("--ablation-switches", type=int, nargs="+", default=[], metavar="S",
                   help="ablation: steps of the half-depth model before it grows; 0 is the full-depth model from scratch "
                        "(default: 0, F/4, F/2 and F)")
    p.add_argument("--glue", action="store_true", help="fine-tune the final checkpoints on GLUE dev, side by side")
    p.add_argument("--glue-runs", nargs="+", default=["baseline-lamb", "mslt", "baseline", "stack"],
                   help="runs to fine-tune; the first one's config is also fine-tuned from random weights")
    p.add_argument("--glue-args", default=GLUE_CPU, help="glue.py flags (default: a CPU-sized grid)")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    # data (the same for every run)
    p.add_argument("--corpus", nargs="*", default=DEFAULT_CORPUS, help="text files/folders (default: gutenberg, brown/brown.txt and wikitext-2-raw of ../shared/data)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary")
    p.add_argument("--workers", type=int, default=0, help="processes that build the token cache (0 = every core)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    p.add_argument("--batch-size", type=int, default=32, help="global batch in examples")
    # model and optimisation (the same for every run)
    p.add_argument("--preset", default="cpu-12x128", help="model size from bert.PRESETS")
    p.add_argument("--steps", type=int, default=3000, help="total optimizer steps of every run")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the Adam runs (1e-3 beat 2e-3 and 5e-4 at the CPU size)")
    p.add_argument("--lamb-lr", type=float, default=1e-2, help="peak learning rate of the LAMB runs")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (default: 3%% of --steps)")
    p.add_argument("--seed", type=int, default=0, help="model and data seed of every run")
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (default: --steps / 40)")
    p.add_argument("--eval-batches", type=int, default=16, help="validation batches")
    p.add_argument("--extra", default="", help="further train.py flags for every run, e.g. '--dtype bf16 --compile'")
    if p.parse_args(argv).quick:  # quick changes the defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
    window = p.parse_args(argv).window
    if window:  # so does a window; its defaults leave --steps (0) to its plan
        p.set_defaults(**WINDOWS[window].defaults)
    a = p.parse_args(argv)
    if a.plan and not a.window:
        p.error("--plan: give the --window to plan, e.g. --window gpu")
    if a.window and not a.steps:
        a.steps = window_steps(a)
    a.warmup = a.warmup or max(1, a.steps * 3 // 100)
    a.eval_every = a.eval_every or max(1, a.steps // 40)
    return a


def method_flags(a, name: str) -> list:
    """train.py flags that make a run of RUNS differ from the others: method, optimizer, its lr."""
    method, optimizer = RUNS[name]
    return ["--method", method, "--optimizer", optimizer, "--lr", str(a.lamb_lr if optimizer == "lamb" else a.lr),
            "--steps", str(a.steps)]


def train_args(a, name: str, flags: list) -> list:
    """The train.py flags of one run: everything shared by all runs, then the run's own `flags`."""
    args = ["--preset", a.preset, "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len),
            "--vocab-size", str(a.vocab_size), "--warmup", str(a.warmup), "--seed", str(a.seed),
            "--data-seed", str(a.seed), "--eval-every", str(a.eval_every), "--eval-batches", str(a.eval_batches),
            "--save-every", str(a.eval_every * 4), "--log-every", str(max(1, a.eval_every // 2)),
            "--cache-dir", os.path.join(a.out, "cache"), "--workers", str(a.workers), "--out", os.path.join(a.out, name)]
    if a.corpus:
        args += ["--corpus", *a.corpus]
    return args + flags + a.extra.split()


def run_state(run_dir: str) -> tuple:
    """('done', 'partial' (resume it) or 'new'; the run's saved train_config, None when new)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return "new", None
    ckpt = train.load_checkpoint(path, mmap=True)  # only the plain values are read
    return ("done" if ckpt["step"] >= ckpt["train_config"]["steps"] else "partial"), ckpt["train_config"]


def check_same_lr(run_dir: str, saved: dict, flags: list):
    """Refuse to reuse a finished run (its `saved` train_config) trained at another learning rate than
    this comparison gives it: the new runs would be compared against it as if both had the same rate."""
    lr = float(flags[flags.index("--lr") + 1])
    if saved["lr"] != lr:
        flag = "--lamb-lr" if "lamb" in flags else "--lr"
        raise SystemExit(f"error: {run_dir} was trained at lr {saved['lr']:g}, this comparison gives it {lr:g}; "
                         f"pass {flag} {saved['lr']:g} to add runs to it, or use another --out")


def run(a, name: str, flags: list):
    """Train one run to its end: skipped when finished, resumed when interrupted."""
    state, saved = run_state(os.path.join(a.out, name))
    if state == "done":
        check_same_lr(os.path.join(a.out, name), saved, flags)
        print(f"== {name}: finished earlier, skipped")
        return
    launcher = [sys.executable] if a.nproc == 1 else [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={a.nproc}"]
    cmd = launcher + [os.path.join(ROOT, "train.py")] + train_args(a, name, flags) + (["--resume"] if state == "partial" else [])
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def ablation_runs(a) -> dict:
    """Figure 7's switching-time ablation, with identity growth beside stacking: for each switch point s, a
    half-depth model trained s steps, grown to full depth by `stack` and, from the same checkpoint, by
    `identity`, and trained F more steps; and the full-depth model trained F steps from scratch. Each run's
    learning rate decays over its own s + F steps. name -> (train.py flags, name of the run it branches from)."""
    n, F = bert_depth(a.preset), ablation_after(a)
    runs = {}
    for s in a.ablation_switches or (0, F // 4, F // 2, F):
        if s == 0:  # no half-depth steps: the full-depth model from scratch
            runs["switch-scratch"] = (["--method", "baseline", "--schedule", f"{n}:{F}", "--steps", str(F), "--lr", str(a.lr)], None)
            continue
        flags = ["--method", "stack", "--schedule", f"{n // 2}:{s},{n}:{F}", "--steps", str(s + F), "--lr", str(a.lr)]
        runs[f"switch-{s}"] = (flags, None)
        runs[f"switch-{s}-identity"] = (flags + ["--grow", "identity"], f"switch-{s}")
    return runs


def ablation_after(a) -> int:
    return a.ablation_after or max(2, a.steps // 4)


def bert_depth(preset: str) -> int:
    import bert
    return bert.PRESETS[preset].n_layer


def branch(a, source: str, name: str, grow: str):
    """Start run `name` from run `source`'s half-depth model at its switch (stage0_end.pt, saved before it grew):
    the same weights, optimizer state, step and log, with the growth op changed to `grow`. Resuming it then
    grows that same model by `grow` and trains on with the same data order, seed and learning-rate schedule."""
    out = os.path.join(a.out, name)
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        return
    ckpt = train.load_checkpoint(os.path.join(a.out, source, "stage0_end.pt"))
    ckpt["train_config"]["grow"] = grow
    schedule = stack.Schedule.from_dict(ckpt["schedule"])
    ckpt["schedule"] = dataclasses.replace(schedule, method=grow, stages=[
        dataclasses.replace(st, grow=grow) if st.grow != "init" else st for st in schedule.stages]).to_dict()
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(a.out, source, "log.jsonl")) as f:  # the resume validates and grows at the switch
        lines = f.readlines()
    kept = [line for line, r in zip(lines, map(json.loads, lines)) if r["step"] < ckpt["step"] or "loss" in r]
    with open(os.path.join(out, "log.jsonl"), "w") as f:  # again, and drops the records after it
        f.writelines(kept)
    train.save_checkpoint(os.path.join(out, "checkpoint.pt"), ckpt)
    print(f"== {name}: branched from {source} at step {ckpt['step']}, growing by {grow}")


def run_ablation(a):
    """Train every ablation run (finished ones are skipped); a branch starts once its source has switched."""
    for name, (flags, source) in ablation_runs(a).items():
        if source and not a.report_only:
            branch(a, source, name, flags[flags.index("--grow") + 1])
        if not a.report_only:
            run(a, name, flags)


def ablation_report(a, runs: dict):
    """Validation loss against steps after the switch, one curve per run (switches marked), and per run: the loss
    at the switch and at the end. Beside each stacked run, its identity branch and the gap: identity's final
    loss minus stacking's (positive: stacking ahead)."""
    F, series, points, marks = ablation_after(a), {}, {}, {}
    for name, (flags, source) in runs.items():
        switch = int(flags[flags.index("--steps") + 1]) - F
        points[name] = [p for p in val_points(train.read_log(os.path.join(a.out, name))) if p[0] >= switch]
        series[name] = [(step - switch, loss) for step, _, loss, _ in points[name]]
        # the switch, from the flags (logs of older runs hold no growth records); at x = 0 a branch's mark
        # covers its source's, so one label per switch point
        marks[name] = [(0, points[name][0][2], "" if source else f"{switch} steps")] if switch else []
    path = os.path.join(a.out, "switch_ablation.svg")
    train.svg_plot(series, path, "steps after growing (from scratch: all steps)", "validation loss (MLM + NSP)",
                   "Switching time (Figure 7): stack and identity from one checkpoint",
                   marks=marks)
    # at switch: the shallow model's validation just before growing (scratch: its first validation)
    lines = ["| run | loss at switch | final loss | final MLM loss | identity's final loss | gap (identity - stack) |",
             "|---|---|---|---|---|---|"]
    for n, p in points.items():
        if n.endswith("-identity") or not p:
            continue
        twin = points.get(n + "-identity")
        gap = (f"{twin[-1][2]:.3f} | {twin[-1][2] - p[-1][2]:+.3f}" if twin else "- | -")
        lines.append(f"| {n} | {p[0][2]:.3f} | {p[-1][2]:.3f} | {p[-1][3]:.3f} | {gap} |")
    with open(os.path.join(a.out, "switch_ablation.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------
# Analysis of the logs.


def time_to_reach(curve: list, target: float):
    """First training wall time (s) at which validation loss <= target, interpolated linearly between the
    two validations around the crossing; None if the run never gets there. curve: [(wall, loss), ...]."""
    prev = None
    for wall, loss in curve:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return wall
            (w0, l0) = prev
            return w0 + (l0 - target) / (l0 - loss) * (wall - w0)
        prev = (wall, loss)
    return None


def val_points(records: list) -> list:
    """(step, wall seconds, validation loss, validation MLM loss) of each validation in a log."""
    return [(r["step"], r["wall"], r["val_loss"], r["val_mlm_loss"]) for r in records if "val_loss" in r]


def analyse(a) -> dict:
    """Per run: final losses, total wall time, and the time to reach its paper's baseline's loss at each
    budget fraction, with the speed-up (baseline time / method time)."""
    logs = {n: val_points(train.read_log(os.path.join(a.out, n))) for n in a.runs if os.path.exists(os.path.join(a.out, n, "log.jsonl"))}
    results = {}
    for name, pts in logs.items():
        base = BASELINE_OF[RUNS[name][1]]
        r = {"final_val_loss": pts[-1][2], "final_val_mlm_loss": pts[-1][3], "wall": pts[-1][1],
             "steps": pts[-1][0], "baseline": base, "reach": {}}
        if base in logs:
            base_curve = [(w, l) for _, w, l, _ in logs[base]]
            for f in FRACTIONS:
                # target: the baseline's validation loss at that fraction of its steps; both times are
                # first-crossing times, so the baseline's own speed-up is 1 by construction
                target = min(logs[base], key=lambda p: abs(p[0] - f * a.steps))[2]
                t, b_time = time_to_reach([(w, l) for _, w, l, _ in pts], target), time_to_reach(base_curve, target)
                r["reach"][str(f)] = {"target": target, "baseline_time": b_time, "time": t,
                                      "speedup": (b_time / t) if t else None}
        results[name] = r
    return results


def fmt_min(seconds) -> str:
    return "never" if seconds is None else f"{seconds / 60:.1f}"


def fmt_speedup(reach: dict) -> str:
    return f"{reach['speedup']:.2f}x" if reach["speedup"] else "never"


def versus_baseline(results: dict, name: str) -> tuple:
    """(final loss against the baseline's, as '+1.2%'; total wall time / the baseline's), '-' without one."""
    r, base = results[name], results.get(results[name]["baseline"])
    if not base:
        return "-", "-"
    return f"{100 * (r['final_val_loss'] / base['final_val_loss'] - 1):+.1f}%", f"{r['wall'] / base['wall']:.2f}"


def replicates_table(dirs: list) -> str:
    """Finished comparisons that differ only in --seed (or anything else), side by side from their
    results.json: per run and directory, the final loss and total time against the baseline, and the
    speed-up to the baseline's loss at 1/4, 1/2 and all of its steps."""
    results = []
    for d in dirs:
        with open(os.path.join(d, "results.json")) as f:
            results.append(json.load(f)["results"])
    head = ["run"] + [f"{os.path.basename(os.path.normpath(d))}: {c}" for d in dirs
                      for c in ("vs baseline", "wall / baseline's", "speed-up at 1/4, 1/2, 1")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in [n for n in RUNS if any(n in r for r in results)]:
        row = [name]
        for r in results:
            if name not in r:
                row += ["-", "-", "-"]
                continue
            reach = r[name]["reach"]
            row += [*versus_baseline(r, name), " / ".join(fmt_speedup(reach[str(f)]) if str(f) in reach else "-" for f in FRACTIONS)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def results_table(results: dict, plateau: float) -> str:
    """The markdown table of results.md."""
    head = ["run", "baseline", "final val loss", "vs baseline", "final val MLM", "total wall (min)", "wall / baseline's"]
    for f in FRACTIONS:
        head += [f"reach base@{f:g}: min", "speed-up"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        vs, ratio = versus_baseline(results, name)
        row = [name, r["baseline"], f"{r['final_val_loss']:.3f}", vs, f"{r['final_val_mlm_loss']:.3f}", fmt_min(r["wall"]), ratio]
        for f in FRACTIONS:
            x = r["reach"].get(str(f))
            row += ([fmt_min(x["time"]), fmt_speedup(x)] if x else ["-", "-"])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for base in sorted({r["baseline"] for r in results.values()} & results.keys()):
        reach = results[base]["reach"]
        lines.append(f"Targets of `{base}` (its validation loss at 1/4, 1/2 and all of its steps): " + ", ".join(
            f"{reach[str(f)]['target']:.3f}" for f in FRACTIONS) + ".")
    lines.append(f"A model that ignores context (training unigram frequencies) scores a validation MLM loss of "
                 f"{plateau:.3f} nats; NSP at chance: 0.693.")
    return "\n".join(lines)


def report(a):
    results = analyse(a)
    plateau = unigram_plateau(a)
    window = window_numbers(a, results, read_times(a)) if a.window else None
    table = results_table(results, plateau) + ("\n\n" + window_table(a, window) if window else "")
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        args = dict(vars(a), corpus=[os.path.relpath(c, ROOT) for c in a.corpus])  # no machine-specific paths
        json.dump({"results": results, "unigram_plateau": plateau, "args": args, "window": window}, f, indent=2)
    logs = {n: train.read_log(os.path.join(a.out, n)) for n in results}
    curves = {n: train.val_curve(r) for n, r in logs.items()}
    if any(curves.values()):  # a comparison cut before its first validation: no plot
        train.svg_plot(curves, os.path.join(a.out, "val_loss.svg"),
                       "training wall time (min, validation excluded)", "validation loss (MLM + NSP)",
                       f"{a.preset}, {a.steps} steps, batch {a.batch_size} x {a.seq_len}",
                       hline=(plateau + 0.693, "context-free model: unigram + ln 2"),
                       marks={n: train.switch_marks(r) for n, r in logs.items()})
    print(table)
    print(f"wrote {a.out}/results.md, results.json, val_loss.svg")


def unigram_plateau(a) -> float:
    """The validation MLM loss of a model that ignores context: the cross-entropy of the validation tokens
    under the training split's unigram distribution (add-0.5 smoothed). The plateau that BERT training
    sits on before it starts to use context."""
    cfg = data.DataConfig(corpus=list(a.corpus), cache_dir=os.path.join(a.out, "cache"), vocab_size=a.vocab_size,
                          seed=a.seed, seq_len=a.seq_len, workers=a.workers)
    prepared = data.prepare(cfg, progress=lambda *x, **k: None)
    return data.context_free_loss(prepared.train, prepared.tokenizer.vocab_size, scored=prepared.valid)


def glue_compare(a):
    """Fine-tune each run's final checkpoint with glue.py (resumable), then one table side by side. The
    last row is the control: the first run's config and tokenizer with fresh random weights."""
    dirs = []
    for name, extra in [(n, []) for n in a.glue_runs] + [(a.glue_runs[0], ["--random-init"])]:
        out = os.path.join(a.out, name, "glue-random" if extra else "glue")
        cmd = [sys.executable, os.path.join(ROOT, "glue.py"), "--checkpoint", os.path.join(a.out, name, "checkpoint.pt"),
               "--out", out, "--no-test"] + extra + a.glue_args.split()
        if not a.report_only:
            print(f"== GLUE {name}: {' '.join(cmd)}", flush=True)
            subprocess.run(cmd, check=True)
        dirs.append(out)
    table = subprocess.run([sys.executable, os.path.join(ROOT, "glue.py"), "--table", *dirs], check=True,
                           capture_output=True, text=True).stdout
    with open(os.path.join(a.out, "glue.md"), "w") as f:
        f.write(table)
    print(table)


# ---------------------------------------------------------------------------------------------------------
# One device window: the comparison sized beforehand so that the whole command fits a wall-clock budget.


@dataclass(frozen=True)
class Window:
    """A comparison that must fit `minutes` of wall time on one device, data preparation included. Every run
    gets the same --steps: the most whose plan fits. A run's plan is its schedule's time from cost_model.py's
    unit costs fitted to `costs` (forward, backward and optimizer step, timed on the device at the window's
    model, batch and sequence length), plus what such timings leave out, taken from whole runs."""
    costs: str  # stage-cost JSON in cost_model.py's format, timed on the device ("": --window-costs must give one)
    minutes: float  # the whole command's planned wall time, data preparation and report included
    data_s: float  # building the token cache, once, before the first run
    start_s: float  # per run: interpreter, device, model, prefetch worker, first steps, final checkpoint
    loop_s: float  # per step: the training loop's time beyond the timed forward, backward and optimizer step
    save_s: float  # per growth: the stage-end checkpoint
    report_s: float  # results.md, results.json and val_loss.svg after the runs
    defaults: dict  # compare.py flags of the window (a flag given explicitly still wins)


WINDOW_RUNS = ["baseline", "stack", "identity", "baseline-lamb", "mslt"]  # each paper's methods and baseline
# BERT-Base (vocabulary 8192, the CPU comparison's), 128 x 128, bf16, eager (compiling costs ~43 s per model, and
# these runs build 11), on one H100 or H200. Planned on the H200's stage costs for 7.5 of the 9 minutes the command
# may take: the rest is for an H100 (the same bf16 peak, 70% of the memory bandwidth) and for the constants. A
# BERT-Base train.py process took ~18 s beyond its training (results/gpu_check_h200.md, section 10); the eager loop
# 32 ms a step at batch 64 where the step alone took about 22 ms (bench_prefetch.py, the same card); the shared
# corpus's token cache 17 s on 2 cores (experiments/README.md). Adam at 3x BERT's 1e-4 and LAMB at ~3x MSLT's 8.8e-4
# scaled to batch 128 by sqrt(128 / 1024), as so few steps need a higher rate; pre-LN trains stably there without
# a long warm-up (Xiong et al. 2020). Neither rate was tuned at this size. Checkpoints only at growths and at the
# end: one with Adam's moments is 1.3 GB.
GPU_WINDOW = dict(runs=WINDOW_RUNS, preset="bert-base", vocab_size=8192, seq_len=128, batch_size=128, steps=0,
                  lr=3e-4, lamb_lr=1e-3, eval_batches=4, out="runs/gpu-window",
                  extra="--device cuda --dtype bf16 --save-every 1000000")
WINDOWS = {
    "gpu": Window(os.path.join(HERE, "results", "cost_cuda_h200.json"), minutes=7.5, data_s=30, start_s=20,
                  loop_s=0.010, save_s=2, report_s=15, defaults=GPU_WINDOW),
    # The same command on a CPU at the tiny size, on the synthetic corpus (a test runs it), planned from the tiny
    # model's stage costs on that CPU (--window-costs; DRY_RUN_COSTS times them), for a budget of tens of steps.
    "cpu-dry-run": Window("", minutes=0.5, data_s=5, start_s=2, loop_s=0.0, save_s=0.1, report_s=2,
                          defaults=dict(GPU_WINDOW, preset="tiny", corpus=[], vocab_size=1024, seq_len=32, batch_size=8,
                                        eval_every=4, eval_batches=2, out="runs/gpu-window-dry-run",
                                        extra="--device cpu --dtype bf16 --save-every 1000000")),
}
DRY_RUN_COSTS = "python experiments/cost_model.py --preset tiny --vocab-size 1024 --batch 8 --seq 32 --measure FILE"
STEP_UNIT = 8  # a window's --steps is a multiple of this


def costs_path(a) -> str:
    """The stage costs that plan the window: --window-costs, else the window's own."""
    path = a.window_costs or WINDOWS[a.window].costs
    if not path:
        raise SystemExit(f"error: --window {a.window} has no stage costs of its own: time them on this machine "
                         f"({DRY_RUN_COSTS}, seconds) and give --window-costs FILE")
    return path


def window_units(a) -> dict:
    """Unit costs of each optimizer, fitted to the window's stage costs. Those must have been timed on the
    model, batch and sequence length that the window trains; the vocabulary may differ, as it changes only the
    embeddings and the MLM decoder, whose parameters the plan counts from the window's own model."""
    path = costs_path(a)
    costs = cost_model.load_costs(path)
    timed, trained = (costs["preset"], costs["batch"], costs["seq"]), (a.preset, a.batch_size, a.seq_len)
    if timed != trained:
        raise SystemExit(f"error: {path} was timed on {timed[0]} at {timed[1]} x {timed[2]}, --window {a.window} trains "
                         f"{trained[0]} at {trained[1]} x {trained[2]}: keep the window's --preset, --batch-size and "
                         "--seq-len, or time these with experiments/cost_model.py --measure")
    c = cost_model.costs_config(costs)
    return {o: cost_model.fit_units(costs["records"], c, o) for o in cost_model.OPTIMIZERS}


def run_seconds(a, name: str, steps: int, units: dict) -> dict:
    """Planned seconds of one run at `steps` steps: `train`, its schedule's forward, backward and optimizer
    steps (cost_model.schedule_time); `loop`, the loop's time beyond them; `other`, the process's start,
    validations (full-depth forwards) and stage-end checkpoints."""
    w, (method, optimizer) = WINDOWS[a.window], RUNS[name]
    c = bert.preset(a.preset, vocab_size=a.vocab_size, pre_norm=True)
    schedule = stack.make_schedule(method, steps, c.n_layer)
    growths = len(schedule.stages) - 1
    validations = steps // (a.eval_every or max(1, steps // 40)) + growths  # parse_args's default; one at each switch
    forward = cost_model.step_time(cost_model.stage_shape(c, c.n_layer, None), units[optimizer]).forward
    return {"train": cost_model.schedule_time(schedule, c, units[optimizer]), "loop": steps * w.loop_s,
            "other": w.start_s + growths * w.save_s + validations * a.eval_batches * forward}


def window_seconds(a, steps: int, units: dict) -> float:
    """Planned seconds of the whole command: the token cache, every run, the report."""
    w = WINDOWS[a.window]
    return w.data_s + sum(sum(run_seconds(a, n, steps, units).values()) for n in a.runs) + w.report_s


def window_steps(a) -> int:
    """The most steps, a multiple of STEP_UNIT, whose planned whole command fits the window's minutes."""
    units, budget = window_units(a), 60 * WINDOWS[a.window].minutes
    if window_seconds(a, STEP_UNIT, units) > budget:
        raise SystemExit(f"error: --window {a.window}: not even {STEP_UNIT} steps a run fit its {budget / 60:g} minutes "
                         "with these flags; give fewer --runs or --eval-batches")
    steps = STEP_UNIT
    while window_seconds(a, steps + STEP_UNIT, units) <= budget:
        steps += STEP_UNIT
    return steps


def window_numbers(a, results: dict, times: dict) -> dict:
    """The plan beside what ran. Per run: minutes of the whole process and of training alone (the log's wall),
    and its wall over its baseline's as the cost model predicts it (the schedules' steps alone) and as the logs
    measure it. Then the token cache, and the cache and runs together. None where nothing ran yet."""
    units, w, path = window_units(a), WINDOWS[a.window], costs_path(a)
    runs = {}
    for name in a.runs:
        plan, base, r = run_seconds(a, name, a.steps, units), BASELINE_OF[RUNS[name][1]], results.get(name)
        runs[name] = {"planned_s": sum(plan.values()), "measured_s": times.get(name),
                      "planned_train_s": plan["train"] + plan["loop"], "measured_train_s": r["wall"] if r else None,
                      "steps": r["steps"] if r else None,
                      "cost_model_ratio": plan["train"] / run_seconds(a, base, a.steps, units)["train"],
                      "measured_ratio": r["wall"] / results[base]["wall"] if r and base in results else None}
    measured = [times.get(k) for k in ["data", *a.runs]]
    inside = not os.path.relpath(path, ROOT).startswith("..")  # named from the repository, else as given
    return {"costs": os.path.relpath(path, ROOT) if inside else path, "timed_on": cost_model.load_costs(path)["device"],
            "minutes": w.minutes, "ran_on": times.get("device"), "steps": a.steps, "runs": runs,
            "data": {"planned_s": w.data_s, "measured_s": times.get("data")},
            "data_and_runs": {"planned_s": window_seconds(a, a.steps, units) - w.report_s,
                              "measured_s": None if None in measured else sum(measured)}}


def window_table(a, n: dict) -> str:
    """Markdown of window_numbers."""
    def minutes(s):
        return "-" if s is None else f"{s / 60:.2f}"

    def ratio(x):
        return "-" if x is None else f"{x:.3f}"

    lines = [f"Window `{a.window}`: {n['steps']} steps a run, planned for {n['minutes']:g} minutes (the report "
             f"included) from the stage costs in {n['costs']} ({n['timed_on']}); ran on {n['ran_on'] or '-'}.", "",
             "| run | steps done | whole run, min: planned | measured | training (wall), min: planned | measured | "
             "wall / baseline's: cost model | measured |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in n["runs"].items():
        lines.append(f"| {name} | {r['steps'] or '-'} | {minutes(r['planned_s'])} | {minutes(r['measured_s'])} | "
                     f"{minutes(r['planned_train_s'])} | {minutes(r['measured_train_s'])} | "
                     f"{ratio(r['cost_model_ratio'])} | {ratio(r['measured_ratio'])} |")
    for label, key in (("token cache", "data"), ("token cache and runs", "data_and_runs")):
        lines.append(f"| {label} | | {minutes(n[key]['planned_s'])} | {minutes(n[key]['measured_s'])} | | | | |")
    return "\n".join(lines)


def times_path(a) -> str:
    return os.path.join(a.out, "window_times.json")


def read_times(a) -> dict:
    """What run_window measured so far: seconds of the token cache and of each run, and the device."""
    if not os.path.exists(times_path(a)):
        return {}
    with open(times_path(a)) as f:
        return json.load(f)


def write_times(a, times: dict):
    bert.atomic_write(times_path(a), lambda f: f.write(json.dumps(times, indent=1).encode()))


def run_window(a) -> int:
    """--window: print the plan; unless --plan, build the token cache and train each run, timing each into
    <out>/window_times.json (written after each, so that a command cut short keeps what it measured; a run
    resumed after one keeps the time of its last part), then write the report."""
    print(window_table(a, window_numbers(a, {}, {})), flush=True)
    if a.plan:
        return 0
    times = read_times(a)
    times["device"] = (torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu") + f", torch {torch.__version__}"
    t0 = time.perf_counter()
    print("== token cache", flush=True)
    unigram_plateau(a)  # builds the cache that every run reuses
    times.setdefault("data", time.perf_counter() - t0)  # a rerun finds it built: the first build's time stays
    write_times(a, times)
    for name in a.runs:
        finished = run_state(os.path.join(a.out, name))[0] == "done"
        t0 = time.perf_counter()
        run(a, name, method_flags(a, name))
        if not finished:
            times[name] = time.perf_counter() - t0
        write_times(a, times)
    report(a)
    return 0


if __name__ == "__main__":
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.window and not args.report_only:
        sys.exit(run_window(args))
    if args.replicates:
        table = replicates_table(args.replicates)
        with open(os.path.join(args.out, "replicates.md"), "w") as f:
            f.write(table + "\n")
        print(table)
        sys.exit(0)
    for name in args.runs:
        if not args.report_only:
            run(args, name, method_flags(args, name))
    if args.runs:
        report(args)
    if args.ablation:
        run_ablation(args)
        ablation_report(args, ablation_runs(args))
    if args.glue:
        glue_compare(args)
