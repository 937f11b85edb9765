"""Optimizer step time of train.Lamb against torch's fused AdamW, side by side on the same parameters.

Both optimizers are built by train.py's own functions (`param_groups`, `Lamb`, `adamw`: matrices decay,
biases and LayerNorm don't) over the same model, and they are timed in one process, alternating every round, so that noise from a
shared machine hits both alike. Before each step the gradients are set to the same fixed random tensors,
outside the timing (LAMB leaves its update in them, as in training, where backward writes new ones). The
table shows median milliseconds per step and the median over rounds of the per-round ratio.

    python experiments/bench_lamb.py --threads 1                  # cpu-12x256, vocabulary 30522
    python experiments/bench_lamb.py --preset bert-base --repeats 5
    python experiments/bench_lamb.py --device cuda --preset bert-large
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bert  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from bench_bert import sync  # noqa: E402


def timed_step(optimizer, grads: dict, device: torch.device) -> float:
    """Seconds of one optimizer step from the gradients `grads` ({parameter: tensor}), queued kernels included."""
    for q, g in grads.items():
        q.grad.copy_(g)
    sync(device)
    t0 = time.perf_counter()
    optimizer.step()
    sync(device)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on")
    p.add_argument("--preset", default="cpu-12x256", choices=list(bert.PRESETS), help="model size")
    p.add_argument("--vocab-size", type=int, default=30522, help="vocabulary (the embedding is ~40%% of 12x256)")
    p.add_argument("--repeats", type=int, default=15, help="rounds; each times one step of each optimizer")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    torch.manual_seed(0)
    model = bert.Bert(bert.preset(args.preset, vocab_size=args.vocab_size)).to(device)
    grads = {q: torch.randn_like(q) * 1e-3 for q in model.parameters()}
    for q, g in grads.items():
        q.grad = g.clone()
    optimizers = {"lamb": train.Lamb(train.param_groups(model, 0.01), lr=1e-4),
                  "fused adamw": train.adamw(train.param_groups(model, 0.01), lr=1e-4)}
    for opt in optimizers.values():
        timed_step(opt, grads, device)  # moments allocated outside the timing
    times = {name: [] for name in optimizers}
    for r in range(args.repeats):
        order = list(optimizers) if r % 2 == 0 else list(optimizers)[::-1]  # alternate who goes first
        for name in order:
            times[name].append(timed_step(optimizers[name], grads, device))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    n = sum(q.numel() for q in model.parameters())
    print(f"device {args.device} ({where}); torch {torch.__version__}; {args.preset}, vocabulary {args.vocab_size}: "
          f"{n / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors; {args.repeats} rounds\n")
    print("| optimizer | ms/step (median) | x fused AdamW |")
    print("|---|---:|---:|")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, times["fused adamw"]))
        print(f"| {name} | {1000 * statistics.median(t):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
