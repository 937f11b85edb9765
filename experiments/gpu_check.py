"""One command that checks the GPU path of this project and prints one markdown report.

On one GPU (about 5 minutes on an H200) it reports, each section timed and independent of the others:
1. the environment: torch, device, bf16 support (native or emulated), TF32;
2. which attention kernel SDPA runs in our model, with and without a padding mask;
3. the CUDA test subset (`pytest -k cuda`: LAMB against the paper on the GPU, attention without a mask,
   one training step that never waits for the device);
4. a short MSLT + LAMB run with gradient accumulation (train.py);
5. resume determinism: the same run stopped halfway and resumed, against the uninterrupted one;
6. one training step under `torch.cuda.set_sync_debug_mode("error")`: no host-device synchronisation;
7. BERT-Base seq 128 bf16 training throughput against HuggingFace, eager (batch 128) and compiled (batch 256),
   MFU on useful FLOPs, peak memory (experiments/bench_bert.py);
8. the MSLT stage costs at BERT-Base (experiments/bench_mslt.py);
9. unit costs for experiments/cost_model.py (forward, backward, optimizer per layer at BERT-Base), with each
   method's stage costs predicted from them; the stage-cost JSON is kept in runs/gpu_check/;
10. eager against --compile (train.py, BERT-Base): tokens/s and compile time.

    python experiments/gpu_check.py                          # on a CUDA machine: the report on stdout
    python experiments/gpu_check.py --device cpu --quick     # the same checks at toy sizes on a CPU, < 5 minutes

Progress goes to stderr; the exit code is 1 when a section failed. --quick shrinks every size; on a CPU it
also compiles with dynamo's eager backend (inductor spends minutes compiling C++ there).
"""

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bert  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

# Sizes of the full check (one GPU) and of --quick (toys, for a CPU).
FULL = dict(
    run=["--preset", "cpu-12x256", "--seq-len", "128", "--batch-size", "128", "--micro-batch", "64", "--steps", "100",
         "--k", "4", "--warmup", "10", "--eval-every", "50", "--eval-batches", "4", "--log-every", "10"],
    bench_bert=["--shapes", "base", "--dtypes", "bf16", "--steps", "10", "--repeats", "3", "--warmup", "3"],
    bench_batch=dict(eager="128", compiled="256"),  # a compiled step's fixed costs weigh less at 256
    bench_mslt=["--shapes", "base", "--dtype", "bf16", "--batch", "128", "--repeats", "3", "--warmup", "2"],
    cost_model=["--preset", "bert-base", "--vocab-size", "30522", "--batch", "128", "--seq", "128", "--repeats", "3"],
    compile=["--preset", "bert-base", "--method", "baseline", "--seq-len", "128", "--batch-size", "64", "--steps", "60",
             "--warmup", "10", "--eval-every", "1000", "--eval-batches", "2", "--log-every", "10"],
)
QUICK = dict(
    run=["--preset", "tiny", "--seq-len", "32", "--batch-size", "8", "--micro-batch", "4", "--steps", "10", "--k", "2",
         "--warmup", "2", "--eval-every", "5", "--eval-batches", "2", "--log-every", "1"],
    bench_bert=["--shapes", "12x256", "--dtypes", "bf16", "--seq", "32", "--steps", "1", "--repeats", "1", "--warmup", "1",
                "--peak-n", "512"],
    bench_batch=dict(eager="2", compiled="4"),
    bench_mslt=["--shapes", "12x256", "--batch", "2", "--seq", "32", "--repeats", "1", "--warmup", "0"],
    cost_model=["--preset", "tiny", "--vocab-size", "2000", "--batch", "2", "--seq", "32", "--repeats", "1"],
    compile=["--preset", "tiny", "--method", "baseline", "--seq-len", "32", "--batch-size", "8", "--steps", "6",
             "--warmup", "2", "--eval-every", "1000", "--eval-batches", "2", "--log-every", "2"],
)
DATA = ["--vocab-size", "2000", "--save-every", "1000"]  # the synthetic corpus: the check needs no data files


def progress(*args):
    print(*args, file=sys.stderr, flush=True)


def run_command(args: list, timeout: float = 600) -> str:
    """Run a Python command in the repository root; its output, or an error carrying the output's tail."""
    cmd = [sys.executable, *args]
    progress("  $ python " + " ".join(args))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"exit code {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


def train_run(argv: list, out: str) -> list:
    """train.py with these flags into `out`; its log records."""
    run_command(["train.py", *argv, "--out", out])
    return train.read_log(out)


def losses(records: list) -> dict:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# ---------------------------------------------------------------------------------------------------------
# The sections: each returns markdown and raises on failure.


def environment(device: torch.device, args) -> str:
    rows = [("torch", torch.__version__), ("python", platform.python_version()), ("device", str(device))]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        rows += [("GPU", f"{p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB"),
                 ("CUDA / cuDNN", f"{torch.version.cuda} / {torch.backends.cudnn.version()}"),
                 ("bf16", f"native {torch.cuda.is_bf16_supported(including_emulation=False)}, "
                          f"with emulation {torch.cuda.is_bf16_supported()}")]
    else:
        rows.append(("CPU threads", torch.get_num_threads()))
    train.use_tf32(device.type)
    rows += [("train.py default dtype", train.default_dtype(device.type)),
             ("float32 matmul precision", torch.backends.cuda.matmul.fp32_precision if device.type == "cuda" else "n/a"),
             ("sizes", "quick (toys)" if args.quick else "full")]
    return table(["what", "value"], rows)


def sdpa_kernels(device: torch.device) -> str:
    """The attention op SDPA dispatches to inside bert.SelfAttention at BERT-Base shape, read from the profiler."""
    from torch.profiler import ProfilerActivity, profile
    attn = bert.SelfAttention(bert.preset("bert-base")).to(device)
    x = torch.randn(8, 128, 768, device=device)
    padded = torch.ones(8, 1, 1, 128, dtype=torch.bool, device=device)
    padded[1:, ..., 100:] = False  # rows 1.. padded after 100 tokens
    rows = []
    for mode in ("train", "eval"):
        attn.train(mode == "train")
        for name, keep in (("none (no padding)", None), ("boolean (padding)", padded)):
            with torch.autocast(device.type, dtype=torch.bfloat16), profile(activities=[ProfilerActivity.CPU]) as prof:
                attn(x, keep)
            ops = sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")})
            rows.append((mode + (" (dropout 0.1, grad)" if mode == "train" else ""), name, ", ".join(ops) or "?"))
    return table(["mode", "mask", "SDPA kernel (bf16)"], rows)


def test_subset(device: torch.device) -> str:
    out = run_command(["-m", "pytest", "-q", "test_all.py", "-k", "cuda", "-rs", "-p", "no:cacheprovider"])
    summary = out.strip().splitlines()[-1]
    return f"`python -m pytest -q test_all.py -k cuda`: {summary}"


def mslt_lamb_run(sizes: dict, work: str, device: torch.device) -> tuple:
    """(markdown, argv, records) of a short MSLT + LAMB run with micro-batches."""
    argv = sizes["run"] + DATA + ["--method", "mslt", "--optimizer", "lamb", "--lr", "5e-3", "--device", device.type,
                                  "--cache-dir", os.path.join(work, "cache")]
    records = train_run(argv, os.path.join(work, "mslt"))
    steps = [r for r in records if "loss" in r]
    vals = [r for r in records if "val_loss" in r]
    if not steps or any(r["loss"] != r["loss"] for r in steps):
        raise RuntimeError("no finite training loss logged")
    rows = [(r["step"], r["stage"], r["n_layer"], f"{r['val_loss']:.3f}", f"{r['wall']:.1f}") for r in vals]
    speed = statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)
    text = (f"`python train.py {' '.join(argv)}`\n\nfirst/last training loss {steps[0]['loss']:.3f} / {steps[-1]['loss']:.3f}, "
            f"median {speed:,.0f} tokens/s, {sum(r.get('compile_s', 0) for r in records):.0f} s compiling\n\n"
            + table(["step", "stage", "layers", "validation loss", "wall s"], rows))
    return text, argv, records


def resume_determinism(argv: list, whole: list, work: str) -> str:
    """Stop the same run halfway, resume it, and compare every logged training loss with the whole run."""
    steps = int(argv[argv.index("--steps") + 1])
    out = os.path.join(work, "resumed")
    train_run(argv + ["--stop-after", str(steps // 2)], out)
    device = argv[argv.index("--device") + 1]  # --device is not taken from the checkpoint
    resumed = losses(train_run(["--resume", "--stop-after", "0", "--device", device], out))
    expected = losses(whole)
    if sorted(resumed) != sorted(expected):
        raise RuntimeError(f"logged steps differ: {sorted(resumed)} against {sorted(expected)}")
    diff = max(abs(resumed[s] - expected[s]) for s in expected)
    return (f"stopped at step {steps // 2} of {steps} and resumed: the largest difference of a logged training loss "
            f"from the uninterrupted run is {diff:.2e} (0 means bit-identical)")


def step_without_sync(trainer: train.Trainer) -> train.StepStats:
    """One step to allocate the optimizer state, then a whole training step under CUDA's sync debug mode
    "error", in which any host-device synchronisation raises (the CUDA test runs this too)."""
    trainer.train_step()
    trainer.step += 1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def no_sync_step(sizes: dict, work: str, device: torch.device) -> str:
    """Two LAMB steps with micro-batches in this process; the second under sync debug mode "error"."""
    argv = sizes["run"] + DATA + ["--optimizer", "lamb", "--device", device.type, "--out", os.path.join(work, "sync"),
                                  "--cache-dir", os.path.join(work, "cache")]
    with contextlib.redirect_stdout(sys.stderr):  # train.py's progress lines are not part of the report
        trainer = train.Trainer(train.finish_config(train.parse_args(argv)[0], world=1), train.Dist())
        trainer.start()
    if device.type != "cuda":
        trainer.train_step()
        return "needs CUDA: a training step ran on the CPU, but only CUDA can report host-device synchronisations"
    stats = step_without_sync(trainer)
    return (f"a whole training step ({trainer.n_micro} micro-batches, forward, backward, clipping, LAMB) ran under "
            f'set_sync_debug_mode("error") without a synchronisation; its loss, read afterwards: {stats["loss"]:.3f}')


def cells(out: str, row_has: str) -> list:
    """The cells of the first markdown table row of `out` containing `row_has`."""
    row = next(l for l in out.splitlines() if l.startswith("|") and row_has in l)
    return [c.strip() for c in row.strip("|").split("|")]


def throughput(sizes: dict, device: torch.device, backend: str) -> str:
    """bench_bert.py eager and compiled (at a larger batch): our tokens/s against HuggingFace's, and MFU."""
    parts, found = [], {}
    for mode, extra in (("eager", []), ("compiled", ["--compile", "--compile-backend", backend])):
        argv = ["experiments/bench_bert.py", "--device", device.type, *sizes["bench_bert"],
                "--batch", sizes["bench_batch"][mode], *extra]
        out = run_command(argv)
        found[mode] = cells(out, "| bf16 |")[5:7]  # speed-up, our MFU
        parts.append(f"`python {' '.join(argv)}`\n\n"
                     + "\n".join(l for l in out.splitlines() if l.startswith(("|", "matmul", "device"))))
    (eager_speedup, eager_mfu), (compiled_speedup, compiled_mfu) = found["eager"], found["compiled"]
    batch = sizes["bench_batch"]
    return ("\n\n".join(parts) + f"\n\nTargets at BERT-Base on one H100/H200: MFU >= 45% (here {eager_mfu} eager at "
            f"batch {batch['eager']}, {compiled_mfu} compiled at batch {batch['compiled']}), >= 1.3x HuggingFace's "
            f"tokens/s (here {eager_speedup} eager, {compiled_speedup} compiled, both models compiled).")


def mslt_costs(sizes: dict, device: torch.device) -> str:
    argv = ["experiments/bench_mslt.py", "--device", device.type, *sizes["bench_mslt"]]
    out = run_command(argv)
    ratio = cells(out, "MSLT stage 4")[-1]
    return (f"`python {' '.join(argv)}`\n\n" + "\n".join(l for l in out.splitlines() if l.startswith("|"))
            + f"\n\nTarget: a stage with the top 3 of 12 layers trainable (stage 4) <= 0.5x a full step (here {ratio}x).")


def unit_costs(sizes: dict, work: str, keep_dir: str, device: torch.device) -> str:
    """Forward, backward and optimizer time per layer on this device, fitted by cost_model.py, which then
    predicts each method's stage costs here; the stage-cost JSON is kept in `keep_dir` for later use."""
    keep = os.path.join(keep_dir, f"cost_{device.type}.json")
    keep = os.path.relpath(keep, ROOT) if keep.startswith(ROOT) else keep
    argv = ["experiments/cost_model.py", "--measure", keep, "--device", device.type, *sizes["cost_model"],
            "--out", os.path.join(work, "cost_model")]
    out = run_command(argv)
    calibration = out.split("## Predictions")[0].split("## Calibration on measured stage costs")[-1].strip()
    return (f"`python {' '.join(argv)}` (its stage costs: `{keep}`; `cost_model.py --costs "
            f"FILE` predicts from them again). Its `logged` column is the CPU comparison's: on another device a\n"
            f"difference there is the device's, not the model's error.\n\n{calibration}")


def eager_vs_compile(sizes: dict, work: str, device: torch.device, backend: str) -> str:
    base = sizes["compile"] + DATA + ["--device", device.type, "--dropout", "0", "--cache-dir", os.path.join(work, "cache")]
    rows = []
    for name, extra in (("eager", []), (f"--compile ({backend})", ["--compile", "--compile-backend", backend])):
        records = train_run(base + extra, os.path.join(work, "compile" if extra else "eager"))
        steps = [r for r in records if "tokens_per_s" in r]
        speed = statistics.median(r["tokens_per_s"] for r in steps[1:] or steps)  # the first window warms up
        compile_s = sum(r.get("compile_s", 0) for r in records)
        rows.append((name, f"{speed:,.0f}", f"{steps[-1]['loss']:.4f}", f"{steps[-1]['wall']:.1f}", f"{compile_s:.1f}"))
    return (f"`python train.py {' '.join(base)} [--compile]` (dropout off, so the losses should agree)\n\n"
            + table(["mode", "tokens/s (median of log windows)", "last loss", "wall s (training only)", "compile s"], rows))


# ---------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"], help="device to check")
    p.add_argument("--quick", action="store_true", help="toy sizes (a CPU check of the script itself)")
    p.add_argument("--skip", nargs="*", default=[], metavar="SECTION",
                   help="section numbers to leave out, e.g. --skip 7 8 (the report says so)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use --device cpu --quick to check the script)")
    device = torch.device(args.device)
    sizes = QUICK if args.quick else FULL
    backend = "eager" if args.quick and device.type == "cpu" else "inductor"
    work = tempfile.mkdtemp(prefix="gpu_check_")
    keep_dir = work if args.quick else os.path.join(ROOT, "runs", "gpu_check")  # the full check's cost JSON stays
    state = {}

    def run_and_keep():
        text, state["argv"], state["records"] = mslt_lamb_run(sizes, work, device)
        return text

    sections = [
        ("Environment", lambda: environment(device, args)),
        ("Attention kernels (SDPA)", lambda: sdpa_kernels(device)),
        ("CUDA test subset", lambda: test_subset(device)),
        ("Short MSLT + LAMB run with gradient accumulation", run_and_keep),
        ("Resume determinism", lambda: resume_determinism(state["argv"], state["records"], work)),
        ("No host-device synchronisation in a training step", lambda: no_sync_step(sizes, work, device)),
        ("BERT-Base seq 128 bf16 throughput against HuggingFace", lambda: throughput(sizes, device, backend)),
        ("MSLT stage costs", lambda: mslt_costs(sizes, device)),
        ("Unit costs for the cost model", lambda: unit_costs(sizes, work, keep_dir, device)),
        ("Eager against --compile", lambda: eager_vs_compile(sizes, work, device, backend)),
    ]
    # Each section is printed as it ends, so that a run cut short by a time limit still leaves its report.
    print(f"# GPU check ({'quick, ' if args.quick else ''}{args.device})", flush=True)
    failed, ran, t_start = 0, 0, time.time()
    for i, (title, section) in enumerate(sections, start=1):
        if str(i) in args.skip:
            print(f"\n## {i}. {title} (skipped: --skip)", flush=True)
            continue
        progress(f"[{time.time() - t_start:5.0f} s] {i}. {title}")
        t0, ran = time.time(), ran + 1
        try:
            body, status = section(), "ok"
        except Exception as e:  # a failing section is reported, and the others still run
            body, status = f"```\n{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}\n```", "FAILED"
            failed += 1
        print(f"\n## {i}. {title} ({status}, {time.time() - t0:.0f} s)\n\n{body}", flush=True)
    print(f"\n{ran - failed} of {ran} sections ok in {time.time() - t_start:.0f} s.")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
