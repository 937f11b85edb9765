"""Each method's wall time predicted from per-unit stage costs: will stacking or MSLT save time on a machine?

A training step of a stage costs (forward over every layer) + (backward over the trainable layers only)
+ (optimizer over the trainable parameters) + (all-reduce of the trainable gradients). MSLT (section 3.2)
saves backward, optimizer and communication, never forward; progressive stacking (Gong et al. section 3)
saves everything in its shallow stages. So the speed-up depends on how a step's time splits, which this
script makes explicit and checkable:

1. Step time of one stage from unit costs (`UnitCosts`, `step_time`): forward per layer and for
   embeddings + heads; backward per trainable layer, for the output layer, and for the embeddings when
   they train; optimizer per trainable parameter; ring all-reduce, 2(n-1)/n x gradient bytes / bandwidth
   per trainable parameter, added to backward or overlapped with it. A schedule's time is the sum over its
   stages (`stack.make_schedule`), and each method is reported as its ratio to the baseline's time for the
   same number of steps. The growth operator changes values, not work: identity costs what stacking costs.
2. Calibration (`fit_units`): least squares of each phase's measured time on this model, from timings of
   a few depths and trainable tops that are *not* the schedules' stages (`--measure` times them here);
   then the stage costs that the CPU comparison logged are predicted and compared.
3. Paper scale (`cluster_units`): unit costs from FLOPs (`bench_bert.useful_flops`), peak FLOP/s, an
   assumed MFU, memory and interconnect bandwidth and the GPU count, for BERT-Base and BERT-Large on two
   clusters (`CLUSTERS`; each figure a flag). The MSLT paper's 32 V100s are solved from its own figures
   (85 h per 1M BERT-Base steps, backward with communication ~6x forward) and then checked on the rest.
4. A plot of each method's ratio against the backward : forward ratio R (0.5, this CPU in bf16, to 8).

    python experiments/cost_model.py                              # calibrate on the committed CPU timings, predict, plot
    flock /tmp/bench.lock python experiments/cost_model.py --measure runs/cost_model/cost_cpu.json   # time this machine first
    python experiments/cost_model.py --costs gpu.json             # calibrate on stage costs timed elsewhere (format below)
    python experiments/cost_model.py --cluster v100x32 --mfu 0.2 --bandwidth 12.5   # other hardware assumptions

Stage-cost JSON (what --measure writes and --costs reads; a GPU timing script can write the same): the
model it was timed on and one record per timed configuration, phases in seconds per step, the optimizer
phase (gradient clipping + step) once for AdamW and once for LAMB:
    {"device": "...", "preset": "cpu-12x128", "vocab_size": 8192, "pre_norm": true, "batch": 32, "seq": 128,
     "records": [{"n_layer": 8, "trainable_top": 2, "group_size": 1,     # trainable_top null = all train
                  "forward_s": 0.11, "backward_s": 0.07, "optimizer_s": {"adam": 0.004, "lamb": 0.02}}, ...]}
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import bert  # noqa: E402
import data  # noqa: E402
import stack  # noqa: E402
import train  # noqa: E402
from bench_bert import autocast, make_batch, useful_flops  # noqa: E402  (the same batch, dtypes and FLOP rule)

# ---------------------------------------------------------------------------------------------------------
# What a stage asks of a step: layers run forward, layers run backward, parameters trained.


@dataclass(frozen=True)
class ParamCounts:
    block: int  # one encoder block (shared by the layers of a group)
    output: int  # the output layer that trains in every stage: MLM transform and bias, NSP, pooler, final LN
    embeddings: int  # word (tied decoder), position, segment embeddings and their LayerNorm


def param_counts(c: bert.BertConfig) -> ParamCounts:
    """Exact parameter counts of c's parts, read off a model of one group on the meta device (no memory):
    stack.set_trainable decides what "output layer" means, so the two cannot disagree."""
    return _param_counts(tuple(asdict(c).items()))


@lru_cache(maxsize=None)
def _param_counts(config_items: tuple) -> ParamCounts:
    c = bert.BertConfig(**dict(config_items))
    with torch.device("meta"):
        model = bert.Bert(replace(c, n_layer=c.group_size))
    block = sum(p.numel() for p in model.layers[0].parameters())
    trainable, total = stack.count_parameters(stack.set_trainable(model, c.group_size))
    return ParamCounts(block, trainable - block, total - trainable)


@dataclass(frozen=True)
class StageShape:
    n_layer: int  # layers that run forward
    bwd_layers: int  # layers that run backward (the trainable top, or all)
    embeddings_train: bool  # True when everything trains (first, stacking and retrain stages)
    trainable: int  # trainable parameters: what the optimizer and the all-reduce touch


def stage_shape(c: bert.BertConfig, n_layer: int, trainable_top: Optional[int], group_size: int = 1) -> StageShape:
    """The shape of a step of an n_layer model with the top `trainable_top` layers training (None = all),
    in groups of `group_size` layers sharing a block: backward runs through every trainable layer, but a
    shared block's parameters are optimized and all-reduced once."""
    counts = param_counts(replace(c, n_layer=group_size, group_size=group_size))
    top = n_layer if trainable_top is None else trainable_top
    trainable = top // group_size * counts.block + counts.output + (counts.embeddings if trainable_top is None else 0)
    return StageShape(n_layer, top, trainable_top is None, trainable)


# ---------------------------------------------------------------------------------------------------------
# Unit costs and the step time of a stage.


@dataclass
class UnitCosts:
    fwd_layer: float  # s: forward of one encoder layer
    fwd_rest: float  # s: forward of embeddings, heads and losses, once per step
    bwd_layer: float  # s: backward of one trainable encoder layer
    bwd_head: float  # s: backward of the output layer and losses, paid by every stage
    bwd_emb: float  # s: extra backward when the embeddings train (tied decoder's weight gradient, lookups)
    opt_param: float  # s per trainable parameter: gradient clipping and the optimizer step
    comm_param: float = 0.0  # s per trainable parameter: ring all-reduce of its gradient (0 on one device)
    overlap: bool = False  # all-reduce overlapped with backward (DDP buckets): max(backward, comm), not the sum


@dataclass
class StepTime:
    forward: float  # seconds of each phase of one step
    backward: float
    optimizer: float
    comm: float
    overlap: bool

    @property
    def total(self) -> float:
        exposed = max(self.backward, self.comm) if self.overlap else self.backward + self.comm
        return self.forward + exposed + self.optimizer


def step_time(s: StageShape, u: UnitCosts) -> StepTime:
    """Every layer pays forward; only trainable layers pay backward; only trainable parameters pay the
    optimizer and the all-reduce."""
    return StepTime(forward=u.fwd_rest + s.n_layer * u.fwd_layer,
                    backward=u.bwd_head + s.bwd_layers * u.bwd_layer + s.embeddings_train * u.bwd_emb,
                    optimizer=u.opt_param * s.trainable, comm=u.comm_param * s.trainable, overlap=u.overlap)


def schedule_shapes(schedule: stack.Schedule, c: bert.BertConfig) -> list[StageShape]:
    return [stage_shape(c, st.n_layer, st.trainable_top, schedule.group_size) for st in schedule.stages]


def schedule_time(schedule: stack.Schedule, c: bert.BertConfig, u: UnitCosts) -> float:
    """Seconds of the whole schedule: the sum over stages of steps x step time."""
    return sum(st.steps * step_time(s, u).total for st, s in zip(schedule.stages, schedule_shapes(schedule, c)))


def method_ratio(method: str, c: bert.BertConfig, u: UnitCosts, k: int = 4, total_steps: int = 1_000_000) -> float:
    """A method's predicted wall time over the baseline's, both for `total_steps` steps at c's depth."""
    def time_of(m):
        return schedule_time(stack.make_schedule(m, total_steps, c.n_layer, k), c, u)
    return time_of(method) / time_of("baseline")


def bwd_fwd_ratio(c: bert.BertConfig, u: UnitCosts) -> float:
    """R = (backward + the all-reduce time not hidden behind it) / forward of a full step: the MSLT paper's
    "almost six times" (section 3.2)."""
    t = step_time(stage_shape(c, c.n_layer, None), u)
    return (t.total - t.forward - t.optimizer) / t.forward


# ---------------------------------------------------------------------------------------------------------
# Calibration: unit costs from measured phase times.


def fit_units(records: list[dict], c: bert.BertConfig, optimizer: str) -> UnitCosts:
    """Least squares per phase over the records (stage-cost JSON): forward = fwd_rest + n x fwd_layer;
    backward = bwd_head + t x bwd_layer + [embeddings train] x bwd_emb; optimizer = opt_param x trainable.
    Needs records with at least two depths, two trainable tops, and both trainable and frozen embeddings."""
    shapes = [stage_shape(c, r["n_layer"], r["trainable_top"], r.get("group_size", 1)) for r in records]

    def solve(columns, phase):
        a = np.array(columns, dtype=float).T
        if np.linalg.matrix_rank(a) < a.shape[1]:
            raise ValueError(f"the records cannot separate the {phase} unit costs: time more depths and trainable tops")
        return np.linalg.lstsq(a, np.array([_phase(r, phase, optimizer) for r in records]), rcond=None)[0]

    ones = [1.0] * len(shapes)
    fwd_rest, fwd_layer = solve([ones, [s.n_layer for s in shapes]], "forward_s")
    bwd_head, bwd_layer, bwd_emb = solve([ones, [s.bwd_layers for s in shapes], [s.embeddings_train for s in shapes]], "backward_s")
    (opt_param,) = solve([[s.trainable for s in shapes]], "optimizer_s")
    return UnitCosts(fwd_layer, fwd_rest, bwd_layer, bwd_head, bwd_emb, opt_param)


def _phase(record: dict, phase: str, optimizer: str) -> float:
    value = record[phase]
    return value[optimizer] if phase == "optimizer_s" else value


def read_json(path: str, what: str):
    """The JSON in `path`; one line naming the file and `what` it should hold when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {path}: cannot read {what} ({e})")


def load_costs(path: str) -> dict:
    """A stage-cost JSON file, checked enough that a wrong file fails with the field it lacks."""
    costs = read_json(path, "stage costs")
    for key in ("preset", "vocab_size", "pre_norm", "batch", "seq", "records"):
        if key not in costs:
            raise SystemExit(f"error: {path}: no {key!r} field (see the format in experiments/cost_model.py)")
    if costs["preset"] not in bert.PRESETS:
        raise SystemExit(f"error: {path}: unknown preset {costs['preset']!r}; choose one of {', '.join(bert.PRESETS)}")
    for i, r in enumerate(costs["records"]):
        missing = [k for k in ("n_layer", "trainable_top", "forward_s", "backward_s", "optimizer_s") if k not in r]
        missing += [f"optimizer_s.{o}" for o in OPTIMIZERS if o not in r.get("optimizer_s", {})]
        if missing:
            raise SystemExit(f"error: {path}: record {i} lacks {', '.join(missing)}")
    return costs


def load_results(path: str) -> dict:
    """The CPU comparison's results.json (experiments/compare.py): its settings and each run's wall time."""
    results = read_json(path, "the comparison's results")
    if not {"args", "results"} <= set(results) or "baseline" not in results["results"]:
        raise SystemExit(f"error: {path}: not a compare.py results.json with a baseline run")
    return results


def costs_config(costs: dict) -> bert.BertConfig:
    return bert.preset(costs["preset"], vocab_size=costs["vocab_size"], pre_norm=costs["pre_norm"])


# ---------------------------------------------------------------------------------------------------------
# Measurement: phase times of configurations that the schedules do not use, so the stages are a prediction.

CALIBRATION = "2,5,8,4:1,8:2,10:4"  # depth[:trainable top]; no 3, 6, 9 or 12 (the schedules' stages)
OPTIMIZERS = ("adam", "lamb")  # timed on the same gradients: the comparison trains stacking with one, MSLT with the other


def parse_configs(text: str) -> list[tuple[int, Optional[int]]]:
    """'2,8:2' -> [(2, None), (8, 2)]."""
    out = []
    for token in text.split(","):
        fields = token.split(":")
        if not 1 <= len(fields) <= 2 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
            raise ValueError(f"bad configuration {token!r} in {text!r}: expected depth[:trainable_top], whole numbers")
        n, top = int(fields[0]), (int(fields[1]) if len(fields) == 2 else None)
        if top is not None and top > n:
            raise ValueError(f"configuration {token!r}: trainable top {top} exceeds the depth {n}")
        out.append((n, top))
    return out


class PhaseTimer:
    """One model, a fixed batch and one optimizer per name (train.build_optimizer, so AdamW and LAMB are
    exactly the training loop's); `time_round` times forward, backward and clip + step of each optimizer."""

    def __init__(self, c: bert.BertConfig, n_layer: int, top: Optional[int], batch: dict, optimizers: tuple[str, ...],
                 dtype: str, device: torch.device):
        torch.manual_seed(0)
        self.n_layer, self.top, self.batch, self.dtype, self.device = n_layer, top, batch, dtype, device
        self.model = stack.set_trainable(bert.Bert(replace(c, n_layer=n_layer)), top).to(device).train()
        self.opts = {name: train.build_optimizer(self.model, train.TrainConfig(optimizer=name)) for name in optimizers}
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def clock(self) -> float:
        """Seconds now, once the device has finished its queue (a GPU runs ahead of the host)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def time_round(self) -> dict:
        t0 = self.clock()
        with autocast(self.device, self.dtype):
            loss = self.model(**self.batch).loss
        t1 = self.clock()
        loss.backward()
        t2 = self.clock()
        opt_s, grads = {}, [p.grad.clone() for p in self.params]
        for name, opt in self.opts.items():  # each optimizer steps on the same gradients (LAMB overwrites them)
            for p, g in zip(self.params, grads):
                p.grad.copy_(g)
            t = self.clock()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            opt.step()
            opt_s[name] = self.clock() - t
        self.model.zero_grad(set_to_none=True)
        return {"forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": opt_s}


def measure(c: bert.BertConfig, preset: str, configs, batch: int, seq: int, repeats: int, optimizers: tuple[str, ...],
            dtype: str, device: torch.device) -> dict:
    """Stage-cost JSON of `configs` on this CPU or GPU: round-robin rounds after one warm-up step each, the
    median of each phase over rounds (noise from a shared machine hits every configuration alike)."""
    b = make_batch(c, batch, seq, device)
    timers = [PhaseTimer(c, n, top, b, optimizers, dtype, device) for n, top in configs]
    for t in timers:
        t.time_round()
    rounds = [[] for _ in timers]
    for r in range(repeats):
        for i, t in enumerate(timers):
            rounds[i].append(t.time_round())
        print(f"round {r + 1}/{repeats}, forward + backward s: " + " ".join(
            f"{rs[-1]['forward_s'] + rs[-1]['backward_s']:.2f}" for rs in rounds), flush=True)
    if device.type == "cuda":
        where = f"cuda ({torch.cuda.get_device_name(device)})"
    else:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        where = f"cpu ({cpu}, {torch.get_num_threads()} threads)"
    records = [{"n_layer": t.n_layer, "trainable_top": t.top, "group_size": 1,
                "forward_s": round(statistics.median(x["forward_s"] for x in rs), 6),
                "backward_s": round(statistics.median(x["backward_s"] for x in rs), 6),
                "optimizer_s": {o: round(statistics.median(x["optimizer_s"][o] for x in rs), 6) for o in optimizers}}
               for t, rs in zip(timers, rounds)]
    return {"device": f"{where}, torch {torch.__version__}, {dtype}",
            "preset": preset, "vocab_size": c.vocab_size, "pre_norm": c.pre_norm, "batch": batch, "seq": seq,
            "repeats": repeats, "records": records}


# ---------------------------------------------------------------------------------------------------------
# The CPU comparison: the stage costs its logs gave, and the whole runs' wall times.

# One step of each stage over a full 12-layer step, medians from the training logs of the CPU comparison
# (experiments/README.md, "Cost of one step of each stage"; experiments/compare.py's defaults: cpu-12x128, vocab 8192,
# batch 32 x 128; bf16 autocast, one thread per run, two runs at a time on a 2-vCPU AMD EPYC; stacking with
# AdamW, MSLT with LAMB, whose seed-0 runs predate the faster `Lamb`: 46 ms a step then, 11 ms now). The logs
# themselves are not kept; the runs' training wall times are in experiments/results/results.json.
LOGGED_STAGE_COSTS = {"stack": ("adam", [0.31, 0.52, 0.96]), "mslt": ("lamb", [0.31, 0.41, 0.53, 0.63, 0.96])}
RESULTS = os.path.join(ROOT, "experiments", "results", "results.json")
COMPARED_RUNS = {  # run in results.json -> (method, optimizer, its baseline run), as in experiments/compare.py
    "stack": ("stack", "adam", "baseline"), "identity": ("identity", "adam", "baseline"),
    "identity-noise": ("identity-noise", "adam", "baseline"), "mslt-adam": ("mslt", "adam", "baseline"),
    "mslt": ("mslt", "lamb", "baseline-lamb"), "albert-mslt": ("albert-mslt", "lamb", "baseline-lamb")}


def stage_ratios(schedule: stack.Schedule, c: bert.BertConfig, u: UnitCosts) -> list[float]:
    """Each stage's step time over a full step of the final depth, as the comparison's logs report them."""
    full = step_time(stage_shape(c, schedule.stages[-1].n_layer, None), u).total
    return [step_time(s, u).total / full for s in schedule_shapes(schedule, c)]


def calibration_report(costs: dict, results: dict) -> list[str]:
    """Markdown: the fitted unit costs, predicted against logged stage costs, and whole-run wall ratios."""
    c = costs_config(costs)
    args = results["args"]
    run_c = bert.preset(args["preset"], vocab_size=args["vocab_size"], pre_norm=True)
    if (run_c, args["batch_size"], args["seq_len"]) != (c, costs["batch"], costs["seq"]):
        print(f"note: the stage costs were timed on {costs['preset']} at {costs['batch']}x{costs['seq']}, the "
              f"comparison ran {args['preset']} at {args['batch_size']}x{args['seq_len']}: the check below compares different models")
    units = {o: fit_units(costs["records"], c, o) for o in OPTIMIZERS}
    u = units["adam"]
    lines = [f"Unit costs fitted on {costs['device']} ({costs['preset']}, vocab {c.vocab_size}, batch {costs['batch']} x "
             f"{costs['seq']}; timed depths[:trainable top] {', '.join(_config_name(r) for r in costs['records'])}), ms: "
             f"forward {1e3 * u.fwd_layer:.1f}/layer + {1e3 * u.fwd_rest:.1f}; backward {1e3 * u.bwd_layer:.1f}/trainable layer "
             f"+ {1e3 * u.bwd_head:.1f} output layer + {1e3 * u.bwd_emb:.1f} embeddings; optimizer "
             f"{1e9 * units['adam'].opt_param:.1f} ns/parameter (AdamW), {1e9 * units['lamb'].opt_param:.1f} (LAMB); "
             f"R = backward / forward of a full step = {bwd_fwd_ratio(c, u):.2f}.", "",
             "| run (optimizer) | stage | predicted x full step | logged | error |", "|---|---|---:|---:|---:|"]
    for method, (opt, logged) in LOGGED_STAGE_COSTS.items():
        schedule = stack.make_schedule(method, args["steps"], c.n_layer)
        for st, pred, got in zip(schedule.stages, stage_ratios(schedule, c, units[opt]), logged):
            top = "all" if st.trainable_top is None else f"top {st.trainable_top}"
            lines.append(f"| {method} ({opt}) | {st.n_layer}L, {top} trainable | {pred:.2f} | {got:.2f} | {100 * (pred / got - 1):+.0f}% |")
    lines += ["", "| run (optimizer) | predicted wall / baseline's | measured (results.json) | error |", "|---|---:|---:|---:|"]
    measured = results["results"]
    for run, (method, opt, base) in COMPARED_RUNS.items():
        if run in measured and base in measured:
            pred = method_ratio(method, c, units[opt], total_steps=args["steps"])
            got = measured[run]["wall"] / measured[base]["wall"]
            lines.append(f"| {run} ({opt}) | {pred:.3f} | {got:.3f} | {100 * (pred / got - 1):+.1f}% |")
    base_ms = 1e3 * step_time(stage_shape(c, c.n_layer, None), u).total
    logged_ms = 1e3 * measured["baseline"]["wall"] / measured["baseline"]["steps"]
    lines += ["", f"Absolute: a full step predicted {base_ms:.0f} ms (phases timed on a fixed batch), the baseline run "
                  f"averaged {logged_ms:.0f} ms (on its own machine and load, data loading included): ratios are what transfers."]
    return lines


def _config_name(record: dict) -> str:
    return f"{record['n_layer']}" + ("" if record["trainable_top"] is None else f":{record['trainable_top']}")


# ---------------------------------------------------------------------------------------------------------
# Paper scale: unit costs from FLOPs and stated hardware figures.


@dataclass
class Cluster:
    name: str  # for tables
    gpus: int  # data-parallel GPUs, one model replica each
    peak_tflops: float  # peak TFLOP/s per GPU at the training precision
    mfu: float  # fraction of the peak that forward and backward reach
    bandwidth: float  # GB/s per GPU of the slowest link of the all-reduce ring
    mem_bw: float  # GB/s of GPU memory: the optimizer step is memory-bound
    batch_per_gpu: int  # sequences per GPU per step
    seq: int  # tokens per sequence
    overlap: bool  # all-reduce overlapped with backward
    bwd_fwd: float = 2.0  # backward : forward FLOPs (each matmul: input and weight gradients)
    grad_bytes: int = 4  # bytes per all-reduced gradient element (fp32 gradients of fp32 master weights)
    opt_bytes: int = 32  # memory traffic per parameter per optimizer step (read p, g, m, v; write p, m, v; norms)


# 8 x H100 over NVLink: the global batch of 1024 (MSLT section 4.1), bf16 dense peak, an MFU typical of
# BERT-Base pre-training, NCCL's ring bandwidth within one NVLink node, DDP's overlapped all-reduce.
# 32 x V100 (MSLT section 4.1: batch 32 x 32, sequence 128): fp16 tensor-core peak; the MFU and the ring
# bandwidth are the two values that give the paper's own figures, 85 h per 1M BERT-Base steps (Table 1)
# and backward with communication ~6x forward (section 3.2), without overlap (`paper_fit` derives them).
CLUSTERS = {
    "nvlink8": Cluster("8 x H100 NVLink", gpus=8, peak_tflops=989, mfu=0.40, bandwidth=300, mem_bw=3350,
                       batch_per_gpu=128, seq=128, overlap=True),
    "v100x32": Cluster("32 x V100 (MSLT paper)", gpus=32, peak_tflops=125, mfu=0.135, bandwidth=5.0, mem_bw=900,
                       batch_per_gpu=32, seq=128, overlap=False),
}
PAPER_STEP_S = {"bert-base": 85 * 3600 / 1e6, "bert-large": 188 * 3600 / 1e6}  # MSLT Table 1: baseline hours / 1M steps
PAPER_R = 6.0  # MSLT section 3.2: BERT-Base backward with communication "almost six times" forward
PAPER_RATIOS = [  # (method, model, wall ratio to the baseline, source)
    ("mslt", "bert-base", 40 / 85, "MSLT Table 1: 40 h vs 85 h"),
    ("mslt", "bert-large", 84 / 188, "MSLT Table 1: 84 h vs 188 h"),
    ("stack", "bert-base", 63 / 85, "MSLT Table 1: stacking 63 h vs 85 h"),
    ("stack", "bert-large", 136 / 188, "MSLT Table 1: stacking 136 h vs 188 h"),
    ("stack", "bert-base", 0.7677, "Gong et al. Fig. 5: time to the baseline's final loss, 4 P40s"),
    ("albert-mslt", "bert-base", 32 / 85, "MSLT Table 3: ALBERT-MSLT 32 h vs BERT 85 h (factorized embeddings)")]
MODELS = {"bert-base": bert.preset("bert-base", vocab_size=30522), "bert-large": bert.preset("bert-large", vocab_size=30522)}


@dataclass
class Flops:
    layer: float  # forward FLOPs of one encoder layer per GPU step
    head: float  # forward FLOPs of the MLM head, pooler and NSP
    decoder: float  # of which the tied decoder; its weight gradient is paid only while the embeddings train


def forward_flops(c: bert.BertConfig, batch: int, seq: int) -> Flops:
    """Forward FLOPs by bench_bert's counting rule (useful training FLOPs = 3 x forward), split per layer."""
    b = make_batch(c, batch, seq, torch.device("cpu"))
    one, two = (useful_flops(replace(c, n_layer=n), b) / 3 for n in (1, 2))
    labelled = int((b["mlm_labels"] != bert.IGNORE).sum())
    return Flops(layer=two - one, head=2 * one - two, decoder=2.0 * c.d_model * c.vocab_size * labelled)


def cluster_units(c: bert.BertConfig, cl: Cluster) -> UnitCosts:
    """Unit costs of one GPU's step: FLOPs / (peak x MFU), backward = bwd_fwd x forward (half of it weight
    gradients), the optimizer at memory bandwidth, the ring all-reduce at the link bandwidth."""
    f, rate, r = forward_flops(c, cl.batch_per_gpu, cl.seq), cl.peak_tflops * 1e12 * cl.mfu, cl.bwd_fwd
    ring = 2 * (cl.gpus - 1) / cl.gpus
    return UnitCosts(fwd_layer=f.layer / rate, fwd_rest=f.head / rate, bwd_layer=r * f.layer / rate,
                     bwd_head=r * (f.head - f.decoder / 2) / rate, bwd_emb=r * f.decoder / 2 / rate,
                     opt_param=cl.opt_bytes / (cl.mem_bw * 1e9), comm_param=ring * cl.grad_bytes / (cl.bandwidth * 1e9),
                     overlap=cl.overlap)


def paper_fit(c: bert.BertConfig, cl: Cluster, step_s: float, R: float) -> tuple[float, float]:
    """(MFU, ring GB/s) that make c's full step take step_s with (backward + all-reduce) = R x forward,
    all-reduce not overlapped: forward x (1 + R) + optimizer = step_s, all-reduce = R x forward - backward."""
    u = cluster_units(c, replace(cl, mfu=1.0, overlap=False))
    t = step_time(stage_shape(c, c.n_layer, None), u)
    mfu = t.forward * (1 + R) / (step_s - t.optimizer)
    comm = R * t.forward / mfu - t.backward / mfu
    if comm <= 0:
        raise ValueError(f"R={R} is below the compute ratio {cl.bwd_fwd}: no all-reduce time is left")
    return mfu, t.comm * cl.bandwidth / comm


def prediction_report(clusters: list[Cluster], k: int) -> list[str]:
    """Markdown: every method's predicted wall ratio for BERT-Base and BERT-Large on each cluster."""
    lines = ["| cluster | model | step ms (baseline) | R | stack = identity(-noise) | mslt | albert-mslt |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for cl in clusters:
        for name, c in MODELS.items():
            u = cluster_units(c, cl)
            ms = 1e3 * step_time(stage_shape(c, c.n_layer, None), u).total
            ratios = " | ".join(f"{method_ratio(m, c, u, k):.2f}" for m in ("stack", "mslt", "albert-mslt"))
            lines.append(f"| {cl.name} | {name} | {ms:.0f} | {bwd_fwd_ratio(c, u):.1f} | {ratios} |")
    return lines


def headline_report(cl: Cluster, k: int) -> list[str]:
    """Markdown: the V100 cluster solved from BERT-Base's figures, then checked on the papers' other ones."""
    base, large = MODELS["bert-base"], MODELS["bert-large"]
    mfu, bw = paper_fit(base, cl, PAPER_STEP_S["bert-base"], PAPER_R)
    solved = replace(cl, mfu=mfu, bandwidth=bw, overlap=False)
    lines = [f"Solved from BERT-Base's {1e3 * PAPER_STEP_S['bert-base']:.0f} ms/step and R = {PAPER_R:g}: MFU {mfu:.3f} of "
             f"{cl.peak_tflops:g} TFLOP/s, ring bandwidth {bw:.2f} GB/s, no overlap (defaults: {cl.mfu:g}, {cl.bandwidth:g}).",
             "", "| check | model | predicted | paper | source |", "|---|---|---:|---:|---|"]
    large_ms = 1e3 * step_time(stage_shape(large, large.n_layer, None), cluster_units(large, solved)).total
    lines.append(f"| baseline ms/step | bert-large | {large_ms:.0f} | {1e3 * PAPER_STEP_S['bert-large']:.0f} | MSLT Table 1: 188 h / 1M steps |")
    for method, model, paper, source in PAPER_RATIOS:
        pred = method_ratio(method, MODELS[model], cluster_units(MODELS[model], solved), k)
        lines.append(f"| {method} wall ratio | {model} | {pred:.3f} | {paper:.3f} | {source} |")
    need = solve_R(lambda R: method_ratio("mslt", base, sweep_units(base, cl, R), k), 40 / 85)
    floor = method_ratio("stack", base, UnitCosts(1.0, 0.0, 1.0, 0.0, 0.0, 0.0), k)
    lines += ["", f"MSLT's 0.47 needs R = {need:.2f} with all-reduce folded into backward (BERT-Base); stacking's "
                  f"50k/70k/280k schedule costs at least {floor:.3f} of the baseline for the same steps (free embeddings and heads). "
                  f"BERT-Large's step is {large_ms / 1e3 / PAPER_STEP_S['bert-base']:.2f}x BERT-Base's here (FLOPs and parameters "
                  f"both ~3x) against {PAPER_STEP_S['bert-large'] / PAPER_STEP_S['bert-base']:.2f}x in the paper: no one MFU "
                  "and bandwidth give both."]
    return lines


def sweep_units(c: bert.BertConfig, cl: Cluster, R: float) -> UnitCosts:
    """Unit costs with backward (communication included) R x forward everywhere: the plot's x-axis."""
    return replace(cluster_units(c, replace(cl, bwd_fwd=R)), comm_param=0.0)


def solve_R(ratio_of, target: float, lo: float = 1.0, hi: float = 50.0) -> float:
    """The R at which the decreasing function ratio_of(R) equals target (bisection); nan if out of [lo, hi]."""
    if not ratio_of(hi) <= target <= ratio_of(lo):
        return math.nan
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ratio_of(mid) > target else (lo, mid)
    return (lo + hi) / 2


def plot(path: str, cl: Cluster, k: int, cpu_R: float, measured: dict):
    """Predicted BERT-Base wall ratio of each method against R, with this CPU and the MSLT cluster marked."""
    c, xs = MODELS["bert-base"], [0.5 + 0.25 * i for i in range(31)]  # R from 0.5 (this CPU in bf16) to 8
    names = {"stack": "stack = identity", "mslt": "mslt", "albert-mslt": "albert-mslt"}
    series = {label: [(x, method_ratio(m, c, sweep_units(c, cl, x), k)) for x in xs] for m, label in names.items()}
    series[f"this CPU, R = {cpu_R:.1f}"] = [(cpu_R, 0.3), (cpu_R, 1.0)]
    series[f"MSLT cluster, R = {PAPER_R:g}"] = [(PAPER_R, 0.3), (PAPER_R, 1.0)]
    for label, (x, y) in measured.items():
        series[f"{label} {y:.2f}"] = [(x - 0.15, y), (x + 0.15, y)]
    train.svg_plot(series, path, "backward (with all-reduce) : forward time of a full step, R",
                   "predicted wall time / baseline's", "BERT-Base: predicted wall-time ratio to the baseline, same steps",
                   hline=(1.0, "baseline"))
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    # calibration
    p.add_argument("--costs", default=os.path.join(ROOT, "experiments", "results", "cost_cpu.json"),
                   help="stage-cost JSON to calibrate on (format in the module docstring)")
    p.add_argument("--measure", default="", metavar="PATH", help="first time --configs on --device and write PATH, then calibrate on it")
    p.add_argument("--configs", default=CALIBRATION, help="depth[:trainable top] configurations that --measure times")
    p.add_argument("--preset", default="cpu-12x128", help="model --measure times (the CPU comparison's)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary of the timed model (the comparison's)")
    p.add_argument("--batch", type=int, default=32, help="sequences per timed step (the comparison's)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (the comparison's)")
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"], help="autocast dtype of the timed steps (the comparison's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where --measure times (cuda: one GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the timed steps (the comparison: one per run)")
    p.add_argument("--repeats", type=int, default=7, help="round-robin rounds of --measure (median of each phase)")
    p.add_argument("--results", default=RESULTS, help="the CPU comparison's results.json (wall time of each run)")
    # paper scale: each flag overrides that figure of every --cluster (defaults in CLUSTERS)
    p.add_argument("--cluster", default="both", choices=["both", *CLUSTERS], help="hardware to predict for")
    p.add_argument("--gpus", type=int, help="data-parallel GPUs (nvlink8: 8, v100x32: 32)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per GPU (nvlink8: 989 bf16, v100x32: 125 fp16)")
    p.add_argument("--mfu", type=float, help="assumed model FLOPs utilisation (nvlink8: 0.40, v100x32: 0.135)")
    p.add_argument("--bandwidth", type=float, help="GB/s of the all-reduce ring's slowest link (nvlink8: 300, v100x32: 5)")
    p.add_argument("--mem-bw", type=float, help="GB/s of GPU memory, for the optimizer (nvlink8: 3350, v100x32: 900)")
    p.add_argument("--bwd-fwd", type=float, help="backward : forward compute ratio, all-reduce excluded (both: 2)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, help="all-reduce overlapped with backward (nvlink8: on, v100x32: off)")
    p.add_argument("--k", type=int, default=4, help="MSLT stages (the paper: 4)")
    # output
    p.add_argument("--out", default="runs/cost_model", help="folder for cost_model.md and cost_model.svg")
    args = p.parse_args()
    given = {f: getattr(args, f) for f in ("gpus", "peak_tflops", "mfu", "bandwidth", "mem_bw", "bwd_fwd", "overlap")}
    given = {f: v for f, v in given.items() if v is not None}
    if any(v <= 0 for f, v in given.items() if f != "overlap") or min(args.batch, args.seq, args.repeats, args.k, args.threads) < 1:
        p.error("sizes and hardware figures must be positive")
    if args.mfu is not None and args.mfu > 1:
        p.error(f"--mfu {args.mfu}: a fraction of the peak, at most 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible")
    if args.preset not in bert.PRESETS:
        p.error(f"--preset {args.preset}: choose from {', '.join(bert.PRESETS)}")
    try:
        configs = parse_configs(args.configs)
    except ValueError as e:
        p.error(f"--configs: {e}")

    if args.measure:
        torch.set_num_threads(args.threads)
        c = bert.preset(args.preset, vocab_size=args.vocab_size, pre_norm=True)
        costs = measure(c, args.preset, configs, args.batch, args.seq, args.repeats, OPTIMIZERS, args.dtype,
                        torch.device(args.device))
        os.makedirs(os.path.dirname(os.path.abspath(args.measure)), exist_ok=True)
        bert.atomic_write(args.measure, lambda f: f.write(json.dumps(costs, indent=1).encode()))
        print(f"wrote {args.measure}")
        args.costs = args.measure
    costs = load_costs(args.costs)
    results = load_results(args.results)
    clusters = [replace(cl, **given) for name, cl in CLUSTERS.items() if args.cluster in ("both", name)]

    c = costs_config(costs)
    try:
        report = ["## Calibration on measured stage costs", ""] + calibration_report(costs, results)
    except ValueError as e:
        raise SystemExit(f"error: {args.costs}: {e}")
    report += ["", f"## Predictions at the papers' scale (same steps, k = {args.k})", ""] + prediction_report(clusters, args.k)
    v100 = replace(CLUSTERS["v100x32"], **given)
    try:
        report += ["", "## The papers' headline ratios", ""] + headline_report(v100, args.k)
    except ValueError as e:
        raise SystemExit(f"error: solving the V100 cluster from the paper's figures: {e}")
    text = "\n".join(report) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    bert.atomic_write(os.path.join(args.out, "cost_model.md"), lambda f: f.write(text.encode()))

    measured = results["results"]
    cpu_R = bwd_fwd_ratio(c, fit_units(costs["records"], c, "adam"))
    marks = {"CPU run: stack": (cpu_R, measured["stack"]["wall"] / measured["baseline"]["wall"]),
             "CPU run: mslt": (cpu_R, measured["mslt"]["wall"] / measured["baseline-lamb"]["wall"]),
             "MSLT paper: stack": (PAPER_R, 63 / 85), "MSLT paper: mslt": (PAPER_R, 40 / 85)}
    plot(os.path.join(args.out, "cost_model.svg"), v100, args.k, cpu_R, marks)


if __name__ == "__main__":
    main()
