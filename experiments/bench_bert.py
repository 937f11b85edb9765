"""Training throughput of our BERT (bert.py) against transformers.BertForPreTraining, side by side.

One training step = forward + backward + AdamW step on a batch of full-length (padding-free) sequences of
two segments, with ~15% of positions carrying MLM labels and an NSP label per sequence. Both models start
from identical weights (ours is exported with `bert.save_hf` and loaded by transformers), run in training
mode (dropout on), and are timed in the same process, interleaved round-robin (every repeat times every
configuration once, in turn), so that noise from a shared machine hits both alike. The table shows
medians over rounds, and the speed-up is the median of the per-round ratios; "best speed-up" divides the
two fastest rounds instead (interference from other processes only ever adds time, so on a busy machine
the best round is the closer estimate of the unloaded speed).

MFU (model FLOPs utilisation) = useful model FLOPs per second / a matmul peak measured here (a large
square matmul in the same dtype on the same device). Counting rule, the same for both implementations:
  useful FLOPs per step = 6 x (encoder matmul parameters) x tokens          (dense parts, fwd + 2x bwd)
                        + 12 x n_layer x T x d_model x tokens                (q k^T and probs @ v, fwd + bwd)
                        + 6 x (d_model^2 + d_model x vocab) x labelled tokens (MLM head where a label is)
                        + 6 x (d_model^2 + 2 d_model) x sequences            (pooler and NSP head)
Embedding lookups, LayerNorm, GELU, softmax and the optimizer count zero. HuggingFace performs more than
this (its MLM head runs at every position), but that extra work is not useful, so it is not counted: with
one rule for both, the MFU ratio equals the throughput ratio.

    python experiments/bench_bert.py                                   # both shapes, fp32 and bf16, CPU
    python experiments/bench_bert.py --shapes 12x256 --dtypes fp32 --repeats 3
    python experiments/bench_bert.py --device cuda --batch 128,64 --steps 10
    python experiments/bench_bert.py --device cuda --shapes base --dtypes bf16 --batch 128 --compile
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bert  # noqa: E402
import data  # noqa: E402

SHAPES = {"12x256": "cpu-12x256", "base": "bert-base"}  # table name -> bert.PRESETS name
DTYPES = {"fp32": None, "bf16": torch.bfloat16}  # table name -> autocast dtype (None = plain float32)


def sync(device: torch.device):
    """Wait for queued kernels, so that a wall-clock time covers the work it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype_name: str):
    dtype = DTYPES[dtype_name]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def make_batch(c: bert.BertConfig, batch: int, seq: int, device: torch.device, seed: int = 0) -> dict:
    """Full-length sequences "[CLS] A [SEP] B [SEP]" with 15% MLM labels and NSP labels, as bert.Bert takes
    them in train.py: no padding, so no attention mask; the labelled positions as indices (mlm_positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, c.vocab_size, (batch, seq), generator=g)  # ordinary word pieces
    cut = torch.randint(seq // 4, 3 * seq // 4, (batch,), generator=g)  # where segment B begins
    pos = torch.arange(seq).expand(batch, seq)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    ids[pos == cut[:, None] - 1] = 102  # [SEP] closing segment A
    segments = (pos >= cut[:, None]).long()  # (B, T): 0 for A, 1 for B
    special = (ids == 101) | (ids == 102)
    chosen = (torch.rand(batch, seq, generator=g) < 0.15) & ~special  # the ~15% to predict
    labels = torch.where(chosen, ids, torch.full_like(ids, bert.IGNORE))
    ids = torch.where(chosen, torch.full_like(ids, 103), ids)  # [MASK] (BERT's 80/10/10 split is irrelevant here)
    nsp = torch.randint(0, 2, (batch,), generator=g)
    out = dict(input_ids=ids, token_type_ids=segments, mlm_labels=labels, nsp_labels=nsp,
               mlm_positions=bert.labelled_positions(labels))
    return {k: v.to(device) for k, v in out.items()}


def useful_flops(c: bert.BertConfig, b: dict) -> float:
    """Useful training FLOPs of one step (the counting rule in the module docstring)."""
    B, T = b["input_ids"].shape
    D, F, L, V = c.d_model, c.d_ff, c.n_layer, c.vocab_size
    tokens, labelled = B * T, int((b["mlm_labels"] != bert.IGNORE).sum())
    dense = 6 * L * (4 * D * D + 2 * D * F) * tokens  # q, k, v, out + FFN inner, out
    attention = 12 * L * T * D * tokens
    mlm = 6 * (D * D + D * V) * labelled
    heads = 6 * (D * D + 2 * D) * B
    return float(dense + attention + mlm + heads)


def matmul_peak(device: torch.device, dtype_name: str, n: int, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` timed n x n @ n x n matmuls in the given dtype."""
    dtype = DTYPES[dtype_name] or torch.float32
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


class Runner:
    """One model + its AdamW optimizer + a fixed batch; `time_steps` returns seconds for n training steps."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, device: torch.device, adamw: str):
        self.name, self.model, self.batch, self.device = name, model.to(device).train(), batch, device
        kernel = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[adamw]
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01, **kernel)  # same for both
        self.step_memory = 0  # CUDA: the most memory a step allocated above what was allocated before it

    def loss(self):
        b = self.batch
        if self.name == "ours":
            return self.model(**b).loss
        return self.model(input_ids=b["input_ids"], token_type_ids=b["token_type_ids"],  # HF: its usual all-ones mask
                          attention_mask=torch.ones_like(b["input_ids"]), labels=b["mlm_labels"],
                          next_sentence_label=b["nsp_labels"]).loss

    def step(self, dtype_name: str):
        with autocast(self.device, dtype_name):
            loss = self.loss()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def time_steps(self, dtype_name: str, n: int) -> float:
        sync(self.device)
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        for _ in range(n):
            self.step(dtype_name)
        sync(self.device)
        seconds = time.perf_counter() - t0
        if self.device.type == "cuda":
            self.step_memory = max(self.step_memory, torch.cuda.max_memory_allocated(self.device) - before)
        return seconds


def build_pair(shape: str, batch_size: int, seq: int, device: torch.device, adamw: str) -> dict:
    """Our model and transformers' BertForPreTraining with identical weights, each with its own optimizer."""
    from transformers import BertForPreTraining

    torch.manual_seed(0)
    c = bert.preset(SHAPES[shape], vocab_size=30522)
    ours = bert.Bert(c)
    with tempfile.TemporaryDirectory() as d:
        bert.save_hf(ours, d)
        hf = BertForPreTraining.from_pretrained(d)  # default attention implementation (SDPA)
    b = make_batch(c, batch_size, seq, device)
    return {"config": c, "batch": b, "ours": Runner("ours", ours, b, device, adamw), "hf": Runner("hf", hf, b, device, adamw)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    # what to measure
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    p.add_argument("--shapes", default="12x256,base", help=f"comma-separated model shapes from {list(SHAPES)}")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32 (plain float32) and/or bf16 (bfloat16 autocast)")
    # sizes
    p.add_argument("--batch", default=None, help="sequences per step, one per shape in --shapes order or one for all "
                   "(default: 16,4 on CPU, 128,32 on CUDA)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    # timing
    p.add_argument("--steps", type=int, default=None, help="timed training steps per measurement (default: 1 on CPU, 10 on CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed training steps per model and dtype before timing")
    p.add_argument("--repeats", type=int, default=7, help="round-robin rounds; every configuration is timed once per round")
    p.add_argument("--adamw", default="fused", choices=["fused", "foreach", "for-loop"],
                   help="AdamW kernel, the same for both models (fused: one kernel per step, the fastest on CPU and CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models (the warm-up steps absorb the compile time)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend with --compile (eager: a quick CPU check)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--peak-n", type=int, default=None, help="matrix size for the matmul peak (default: 2048 on CPU, 8192 on CUDA)")
    args = p.parse_args()

    shapes, dtypes = args.shapes.split(","), args.dtypes.split(",")
    if any(s not in SHAPES for s in shapes):
        p.error(f"--shapes {args.shapes}: choose from {list(SHAPES)}")
    if any(d not in DTYPES for d in dtypes):
        p.error(f"--dtypes {args.dtypes}: choose from {list(DTYPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    on_cpu = args.device == "cpu"
    default_batch = {"12x256": 16, "base": 4} if on_cpu else {"12x256": 128, "base": 32}
    batches = [int(x) for x in args.batch.split(",")] if args.batch else [default_batch[s] for s in shapes]
    if len(batches) == 1:
        batches *= len(shapes)
    if len(batches) != len(shapes) or min(batches) < 1:
        p.error(f"--batch {args.batch}: give one positive size, or one per shape ({len(shapes)})")
    steps = args.steps or (1 if on_cpu else 10)
    peak_n = args.peak_n or (2048 if on_cpu else 8192)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import transformers

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?") if os.path.exists("/proc/cpuinfo") else "?"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(f"device {args.device} ({where}); torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"seq {args.seq}, steps {steps} x repeats {args.repeats}, warmup {args.warmup}, "
          f"batch {dict(zip(shapes, batches))}, AdamW {args.adamw}, "
          + (f"compiled ({args.compile_backend})" if args.compile else "eager"))

    pairs = {s: build_pair(s, bs, args.seq, device, args.adamw) for s, bs in zip(shapes, batches)}
    if args.compile:
        for pair in pairs.values():
            for impl in ("ours", "hf"):
                pair[impl].model = torch.compile(pair[impl].model, backend=args.compile_backend)
    configs = [(s, d) for s in shapes for d in dtypes]
    for s, d in configs:
        for impl in ("ours", "hf"):
            for _ in range(args.warmup):
                pairs[s][impl].step(d)

    times = {(s, d, impl): [] for s, d in configs for impl in ("ours", "hf")}
    peaks = {d: [] for d in dtypes}
    for r in range(args.repeats):
        for d in dtypes:
            peaks[d].append(matmul_peak(device, d, peak_n))
        for s, d in configs:
            order = ("ours", "hf") if r % 2 == 0 else ("hf", "ours")  # alternate who goes first
            for impl in order:
                times[s, d, impl].append(pairs[s][impl].time_steps(d, steps) / steps)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{s}/{d} ours {times[s, d, 'ours'][-1]:.3f}s hf {times[s, d, 'hf'][-1]:.3f}s" for s, d in configs), flush=True)

    peak = {d: max(v) for d, v in peaks.items()}
    print("\nmatmul peak (best of all rounds, n=%d): " % peak_n + ", ".join(f"{d} {peak[d] / 1e9:.0f} GFLOP/s" for d in dtypes))
    print("\nstep memory: on CUDA, the peak allocated during a step above what was allocated before it (activations,\n"
          "gradients, temporaries; weights and optimizer state excluded)")
    print(f"\n| shape | dtype | batch x seq | ours tok/s | HF tok/s | speedup | ours MFU | HF MFU | best speedup | "
          f"ours step memory | HF step memory |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s, d in configs:
        c, b = pairs[s]["config"], pairs[s]["batch"]
        tokens = b["input_ids"].numel()
        t_ours, t_hf = statistics.median(times[s, d, "ours"]), statistics.median(times[s, d, "hf"])
        speedup = statistics.median(h / o for o, h in zip(times[s, d, "ours"], times[s, d, "hf"]))
        flops = useful_flops(c, b)
        name = f"{c.n_layer}x{c.d_model}"
        print(f"| {name} | {d} | {b['input_ids'].shape[0]}x{args.seq} | {tokens / t_ours:,.0f} | {tokens / t_hf:,.0f} | "
              f"{speedup:.2f}x | {flops / t_ours / peak[d]:.1%} | {flops / t_hf / peak[d]:.1%} | "
              f"{min(times[s, d, 'hf']) / min(times[s, d, 'ours']):.2f}x | {gib(pairs[s]['ours'])} | {gib(pairs[s]['hf'])} |")


def gib(runner: Runner) -> str:
    return f"{runner.step_memory / 2**30:.2f} GiB" if runner.device.type == "cuda" else "n/a"


if __name__ == "__main__":
    main()
