"""Training step time in each MSLT stage against a full from-scratch step (MSLT section 3.2).

MSLT's speed-up comes from backward: in stages 2..k only the top N/k layers and the output layer train,
so the frozen layers below run forward only and build no autograd graph, and AdamW touches only the
trainable parameters. This script times one training step (forward + backward + AdamW step, sparse MLM
head on ~15% labelled positions, dropout on) of the model of each stage of `stack.make_schedule("mslt")`
(k = 4: 3L all trainable, 6L / 9L / 12L with the top 3 trainable and the embeddings frozen, then the 12L
retrain with everything trainable), next to a 12-layer from-scratch step and a 12-layer forward pass
without gradients (the floor any MSLT stage at full depth can reach). Configurations are timed
round-robin, every round times each once, so noise from a shared machine hits all alike; the table
shows the median ms/step and the median over rounds of the ratio to the full step in the same round.

    python experiments/bench_mslt.py                                # 12x256 at 32x128 and BERT-Base at 8x128, CPU
    python experiments/bench_mslt.py --shapes 12x256 --repeats 3
    python experiments/bench_mslt.py --device cuda --dtype bf16 --batch 128
"""

import argparse
import os
import statistics
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bert  # noqa: E402
import data  # noqa: E402
import stack  # noqa: E402
from bench_bert import DTYPES, SHAPES, autocast, make_batch, sync  # noqa: E402  (same batch and timing helpers)


class Runner:
    """One model with a fixed batch and an AdamW over its trainable parameters; `time_step` -> seconds."""

    def __init__(self, name: str, model: bert.Bert, batch: dict, forward_only: bool = False):
        self.name, self.model, self.batch, self.forward_only = name, model.train(), batch, forward_only
        self.trainable, self.total = stack.count_parameters(model)
        if not forward_only:
            self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)

    def step(self, dtype_name: str):
        device = self.batch["input_ids"].device
        with torch.set_grad_enabled(not self.forward_only), autocast(device, dtype_name):
            loss = self.model(**self.batch).loss
        if not self.forward_only:
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

    def time_step(self, dtype_name: str) -> float:
        device = self.batch["input_ids"].device
        sync(device)
        t0 = time.perf_counter()
        self.step(dtype_name)
        sync(device)
        return time.perf_counter() - t0


def build_runners(shape: str, batch_size: int, seq: int, device: torch.device, k: int) -> list[Runner]:
    """The full 12-layer step first, then every stage of the MSLT schedule, then a forward-only pass."""
    c = bert.preset(SHAPES[shape], vocab_size=30522)
    b = make_batch(c, batch_size, seq, device)
    torch.manual_seed(0)
    full = bert.Bert(c).to(device)
    runners = [Runner(f"full {c.n_layer}L from scratch", full, b)]
    for i, st in enumerate(stack.make_schedule("mslt", total_steps=k + 1, n_layer=c.n_layer, k=k).stages):
        model = stack.set_trainable(bert.Bert(replace(c, n_layer=st.n_layer)).to(device), st.trainable_top)
        runners.append(Runner(f"MSLT stage {i + 1} ({st.grow})", model, b))
    runners.append(Runner(f"{c.n_layer}L forward only", full, b, forward_only=True))
    return runners


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    # what to measure
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="fp32 (plain float32) or bf16 (bfloat16 autocast)")
    p.add_argument("--shapes", default="12x256,base", help=f"comma-separated model shapes from {list(SHAPES)}")
    p.add_argument("--k", type=int, default=4, help="MSLT stages (the paper: 4)")
    # sizes
    p.add_argument("--batch", default=None, help="sequences per step, one per shape or one for all (default: 32,8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    # timing
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration before timing")
    p.add_argument("--repeats", type=int, default=5, help="round-robin rounds; each configuration is timed once per round")
    args = p.parse_args()

    shapes = args.shapes.split(",")
    if any(s not in SHAPES for s in shapes):
        p.error(f"--shapes {args.shapes}: choose from {list(SHAPES)}")
    batches = [int(x) for x in args.batch.split(",")] if args.batch else [{"12x256": 32, "base": 8}[s] for s in shapes]
    batches = batches * len(shapes) if len(batches) == 1 else batches
    if len(batches) != len(shapes) or min(batches) < 1:
        p.error(f"--batch {args.batch}: give one positive size, or one per shape ({len(shapes)})")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"device {args.device} ({where}); torch {torch.__version__}; dtype {args.dtype}; seq {args.seq}; "
          f"batch {dict(zip(shapes, batches))}; repeats {args.repeats}")

    runners = {s: build_runners(s, bs, args.seq, device, args.k) for s, bs in zip(shapes, batches)}
    for r in (r for rs in runners.values() for r in rs):
        for _ in range(args.warmup):
            r.step(args.dtype)
    times = {(s, i): [] for s in shapes for i in range(len(runners[s]))}
    for round_ in range(args.repeats):
        for s in shapes:
            for i, r in enumerate(runners[s]):
                times[s, i].append(r.time_step(args.dtype))
        print(f"round {round_ + 1}/{args.repeats}: " + ", ".join(
            f"{s}: " + " ".join(f"{times[s, i][-1]:.2f}" for i in range(len(runners[s]))) for s in shapes), flush=True)

    print("\n| shape | batch x seq | configuration | layers | trainable params | ms/step | x full step |")
    print("|---|---|---|---:|---:|---:|---:|")
    for s, bs in zip(shapes, batches):
        for i, r in enumerate(runners[s]):
            c = r.model.config
            ratio = statistics.median(t / full for t, full in zip(times[s, i], times[s, 0]))
            top = "all" if r.trainable == r.total else f"top {sum(any(q.requires_grad for q in l.parameters()) for l in r.model.layers)}"
            trainable = "none" if r.forward_only else f"{top}: {r.trainable / 1e6:.1f}M of {r.total / 1e6:.1f}M"
            print(f"| {s} | {bs}x{args.seq} | {r.name} | {c.n_layer} | {trainable} | "
                  f"{1000 * statistics.median(times[s, i]):.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
