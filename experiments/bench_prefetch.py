"""train.py's training loop with the next batches built in a worker process against a thread, side by side.

Building an example is 35-115 us of Python (experiments/README.md: "Data pipeline speed", "The GPU step"). On
a thread that Python holds the interpreter lock (GIL), which the loop needs to launch each kernel, so on a
GPU, where the loop's own Python sets the pace of an eager step, the thread slows every step. train.py
therefore builds batches in a forked worker process on CUDA (train.Prefetcher). This script runs the same
Trainer's steps with one prefetcher and then the other, in interleaved rounds, and prints ms per step.

    python experiments/bench_prefetch.py                                  # BERT-Base, batch 64, on the GPU
    python experiments/bench_prefetch.py --device cpu --preset tiny --batch-size 16
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import data  # noqa: E402
import train  # noqa: E402


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_steps(t: train.Trainer, n: int) -> float:
    """Milliseconds per step of n steps of train.py's loop: each step queued, the one before it read."""
    sync(t.device)
    t0, r = time.perf_counter(), None
    for _ in range(n):
        late, r = r, t.train_step()
        if late is not None:
            late.read()
        t.step += 1
    r.read()
    return (time.perf_counter() - t0) / n * 1000


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--preset", default="bert-base", help="model size (train.py --preset)")
    p.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per prefetcher and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each times both prefetchers, in turn")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="bench_prefetch_")
    total = 10 + 2 * args.rounds * args.steps
    argv = ["--preset", args.preset, "--method", "baseline", "--seq-len", "128", "--batch-size", str(args.batch_size),
            "--steps", str(total + 1), "--warmup", "10", "--vocab-size", "2000", "--dropout", "0",
            "--device", args.device, "--cache-dir", os.path.join(work, "cache"), "--out", os.path.join(work, "run")]
    cfg, given, _ = train.parse_args(argv)
    t = train.Trainer(train.finish_config(train.resumed_config(cfg, given), world=1), train.Dist())
    t.start()
    on_cuda = t.device.type == "cuda"
    prefetchers = {"worker process": train.Prefetcher(t.step_batches, total, worker_process=True, pin=on_cuda),
                   "thread": train.Prefetcher(t.step_batches, total, worker_process=False, pin=on_cuda)}
    t0 = time.perf_counter()
    for s in range(10):
        t.step_batches(s)
    build_ms = (time.perf_counter() - t0) / 10 * 1000
    t.prefetch = prefetchers["worker process"]
    timed_steps(t, 10)  # warm-up
    times = {name: [] for name in prefetchers}
    for _ in range(args.rounds):
        for name, prefetcher in prefetchers.items():
            t.prefetch = prefetcher
            times[name].append(timed_steps(t, args.steps))
    for prefetcher in prefetchers.values():
        prefetcher.pool.shutdown(cancel_futures=True)
    where = torch.cuda.get_device_name(t.device) if on_cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.preset}, batch {args.batch_size} x 128, eager, {t.cfg.dtype} on {where}; "
          f"building one step's batches: {build_ms:.1f} ms\n")
    print("| batches built in | ms/step, each round | median | tokens/s |\n|---|---|---:|---:|")
    tokens = args.batch_size * 128
    for name, ms in times.items():
        print(f"| {name} | {', '.join(f'{x:.1f}' for x in ms)} | {statistics.median(ms):.1f} | "
              f"{tokens / statistics.median(ms) * 1000:,.0f} |")


if __name__ == "__main__":
    main()
