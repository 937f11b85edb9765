"""Pre-train BERT with a growth schedule: baseline, progressive stacking, identity, MSLT, ALBERT-group MSLT.

The loop of both papers (Trainer.run, below): train a stage, and at the switch step save the shallow model,
grow it (stack.py) and build a fresh optimizer over the trainable parameters (Adam's moments reset, as the
stacking paper's code does; MSLT's frozen layers simply drop out); the learning-rate schedule goes on
unbroken. Adam with decoupled weight decay (stacking paper, section 4.1) or LAMB (MSLT, section 4.1; You et
al. 2019, written here).

    python train.py                                   # tiny BERT, progressive stacking, synthetic corpus, ~2 min
    python train.py --method mslt --optimizer lamb    # MSLT (k = 4 stages plus retrain)
    python train.py --corpus ../shared/data/gutenberg --preset cpu-12x128 --steps 2000 --out runs/gut
    torchrun --nproc_per_node=2 train.py ...          # DDP: NCCL on CUDA, gloo on CPU
    python train.py --resume --out runs/stack         # continue from the latest checkpoint
    python train.py --plot runs/baseline runs/stack   # validation loss against wall time, as SVG
    python train.py --export-hf runs/stack/hf --checkpoint runs/stack/checkpoint.pt   # for transformers

Every run directory holds `checkpoint.pt` (latest, written atomically), `stage<i>_end.pt` (the model at
the end of each stage, before growth), `log.jsonl` (one record per log step and per validation) and
`val_loss.svg`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections import namedtuple
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

import bert
import data
import stack


@dataclass
class TrainConfig:
    # model
    preset: str = "tiny"  # model size from bert.PRESETS; the vocabulary comes from the tokenizer
    pre_norm: bool = True  # pre-LN as in the stacking paper's code (identity growth is exact only there)
    dropout: float = 0.1  # dropout on embeddings, residual branches and attention probabilities
    # growth schedule
    method: str = "stack"  # baseline | stack | identity | identity-noise | mslt | albert-mslt
    schedule: str = ""  # explicit schedule such as "3:50,6:70,12:280" (overrides --method's proportions)
    grow: str = "stack"  # growth operator of an explicit --schedule
    steps: int = 600  # total optimizer steps of the whole run
    k: int = 4  # MSLT stages
    # data
    corpus: list = field(default_factory=list)  # files or folders; empty = the built-in synthetic corpus
    cache_dir: str = "runs/cache"  # tokenizer and tokenized arrays, reused across runs
    vocab_size: int = 2000  # BPE vocabulary when a tokenizer is trained
    seq_len: int = 64  # tokens per example
    long_seq_len: int = 0  # tokens per example in the run's last --long-fraction of steps (0 = one length throughout)
    long_fraction: float = 0.1  # that share of the steps (BERT, MSLT: the last 10% at 512)
    batch_size: int = 32  # global batch (examples per optimizer step, all ranks and micro-batches)
    micro_batch: int = 0  # examples per forward/backward on one rank; 0 = batch_size / world size
    data_seed: int = 0  # seed of corpus split, pairs and masks
    decode_errors: str = "strict"  # non-UTF-8 bytes: "strict" stops naming file and offset, "replace" -> U+FFFD
    workers: int = 0  # processes that build the token cache (0 = every core this process may use)
    # optimizer
    optimizer: str = "adam"  # adam (AdamW, decoupled decay) | lamb
    lr: float = 2e-3  # peak learning rate
    warmup: int = 30  # linear warm-up steps at the start of the run (once, not after each switch)
    weight_decay: float = 0.01  # on matrices only, not on biases and LayerNorm
    beta1: float = 0.9  # first-moment decay (paper: 0.9)
    beta2: float = 0.999  # second-moment decay (paper: 0.999)
    eps: float = 1e-6  # added to the denominator (paper: 1e-6)
    clip: float = 1.0  # max global gradient norm (0 = no clipping)
    rewarmup: int = 0  # ablation: linear re-warm-up steps after each optimizer reset
    carry_moments: bool = False  # ablation: copy Adam/LAMB moments into copied layers instead of resetting
    # run
    out: str = ""  # run directory; default runs/<method>
    seed: int = 0  # model initialisation and dropout
    device: str = ""  # cpu | cuda; default cuda when available
    dtype: str = ""  # float32 | bf16 (autocast); default bf16 on a GPU with native bf16, else float32
    compile: bool = False  # torch.compile the model (again after every growth)
    compile_backend: str = "inductor"  # torch.compile backend (inductor; eager or aot_eager to debug dynamo)
    log_every: int = 10  # steps between progress lines
    eval_every: int = 50  # steps between validations (and always at each switch and at the end)
    eval_batches: int = 8  # validation batches of batch_size examples each
    save_every: int = 100  # steps between checkpoints (and always at each switch and at the end)
    resume: bool = False  # continue from <out>/checkpoint.pt
    overwrite: bool = False  # start afresh even if <out> holds a run
    stop_after: int = 0  # stop with a checkpoint after this step, as an interruption would (0 = never)


# ---------------------------------------------------------------------------------------------------------
# What --resume takes from the checkpoint and what from the command line: the one rule.
#
# A flag given on the command line wins; a flag left out takes the checkpoint's value, so that
# `train.py --resume --out DIR` continues a run with the flags it was started with (its corpus too). The
# flags in INVOCATION_ONLY concern one command or machine and are never taken from the checkpoint. Apart
# from RESUMABLE_CHANGES, the resumed run must have the checkpoint's settings: a flag given with another
# value is refused, naming it. --device, --dtype and --micro-batch may change so that a run can move to
# another machine or number of GPUs; the resumed losses are then equal only up to rounding (exactly equal
# for the same world size, micro-batch and dtype). Workers that torchrun --max-restarts restarts (with
# the same flags) resume by themselves. parse_args says which flags were given.

RESUMABLE_CHANGES = {"out", "device", "dtype", "micro_batch", "compile", "compile_backend", "log_every",
                     "eval_every", "save_every", "resume", "overwrite", "stop_after", "cache_dir", "corpus", "workers"}
INVOCATION_ONLY = {"out", "resume", "overwrite", "stop_after", "device"}


def resumed_config(cfg: TrainConfig, given: set, restarted: bool = False) -> TrainConfig:
    """The rule's first half: under --resume (or a torchrun restart) every flag not `given` and not
    INVOCATION_ONLY comes from <out>/checkpoint.pt, if there is one."""
    if restarted:
        cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
    path = os.path.join(run_dir(cfg), "checkpoint.pt")
    if not (cfg.resume and os.path.exists(path)):
        return cfg
    saved = load_checkpoint(path, mmap=True, advice=ways_on(os.path.dirname(path)))["train_config"]
    keep = given | INVOCATION_ONLY
    return TrainConfig(**{k: v if k in keep or k not in saved else saved[k] for k, v in asdict(cfg).items()})


def restarted_by_torchrun(d: Dist) -> bool:
    """Whether torchrun restarted the workers after a failure (--max-restarts): TORCHELASTIC_RESTART_COUNT > 0 on
    any rank. torchrun counts on the node whose worker failed; it restarts the other nodes' workers with the count
    unchanged."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    return max(gather(d, restarts) if d.world > 1 else [restarts]) > 0


def check_resumable(ckpt: dict, cfg: TrainConfig, path: str):
    """The rule's second half, when the checkpoint is loaded: refuse other settings, naming each flag."""
    saved = {**asdict(TrainConfig()), **ckpt["train_config"]}  # a flag newer than the checkpoint: its default
    diffs = [f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {v!r}"
             for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diffs:
        raise SystemExit(f"error: cannot resume {path} with different settings:\n  " + "\n  ".join(diffs)
                         + "\nUse the original flags, or --overwrite to start a new run there.")


# ---------------------------------------------------------------------------------------------------------
# The training run.


class Trainer:
    """The model, optimizer and data of one run: start() builds or restores the model, run() trains it
    through the schedule's stages."""

    def __init__(self, cfg: TrainConfig, d: Dist):
        self.cfg, self.d = cfg, d
        self.device = torch.device(cfg.device)
        self.out = cfg.out
        self.log_path = os.path.join(self.out, "log.jsonl")
        self.checkpoint_path = os.path.join(self.out, "checkpoint.pt")
        self.schedule = run_schedule(cfg)
        self.prepared = prepare_data(cfg, d)
        tok = self.prepared.tokenizer
        if tok.vocab_size < cfg.vocab_size:
            self.print(f"note: --vocab-size {cfg.vocab_size} asked, but the corpus gives {tok.vocab_size} tokens (no "
                       f"pair of tokens repeats for more merges); the model's vocabulary is {tok.vocab_size}")
        self.train_batches = data.Batches(self.prepared.train, tok, cfg.seq_len, seed=cfg.data_seed)
        self.long_batches = data.Batches(self.prepared.train, tok, cfg.long_seq_len or cfg.seq_len, seed=cfg.data_seed)
        self.long_start = cfg.steps - self.schedule.long_steps  # the first step at --long-seq-len (steps: none)
        self.valid_batches = data.Batches(self.prepared.valid, tok, cfg.seq_len, seed=cfg.data_seed + 1)
        self.micro = cfg.micro_batch or cfg.batch_size // d.world  # examples per forward on this rank
        self.n_micro = cfg.batch_size // (d.world * self.micro)  # micro-batches per step (gradient accumulation)
        on_cuda = self.device.type == "cuda"
        self.prefetch = Prefetcher(self.step_batches, end=cfg.steps, worker_process=on_cuda, pin=on_cuda)
        use_tf32(cfg.device)
        # What start() and set_model() fill in, and the loop moves on:
        self.model: Optional[bert.Bert] = None  # the current stage's model, unwrapped (saved, grown)
        self.wrapped = None  # the same model under DDP and/or torch.compile: what forward calls
        self.optimizer: Optional[torch.optim.Optimizer] = None  # fresh at every switch
        self.stage = 0  # index into self.schedule.stages
        self.stage_start = 0  # the step at which the current stage began (for --rewarmup)
        self.step = 0  # optimizer steps done
        self.wall = 0.0  # seconds of training, checkpointing and validation left out (the papers' x-axis)
        self.compile_pending = False  # a model installed under --compile that has not been compiled yet
        self.stop_signal = 0  # set by the SIGTERM/SIGINT handler
        self.last_val_step = -1
        self.last_good = None  # (path, step) of the latest checkpoint.pt written whole
        self.overhead = 0.0  # seconds of checkpointing and validation, which the wall leaves out

    def run(self) -> int:
        """Train to the end of the schedule (or to a stop request); returns the process exit code."""
        cfg = self.cfg
        self.print(f"schedule: {self.schedule}\n{bert.describe(self.model)}\n{data.reference_line(self.prepared)}")
        window = (self.wall, 0)  # (wall, steps) since the last progress line: speed from training time only
        first_wall = self.wall
        r = None  # the last step's statistics (StepStats), read one step late or when needed
        while self.step < cfg.steps:
            stage, _ = self.schedule.stage_at(self.step)
            if stage != self.stage:  # the switch: validate the shallow model, save it, grow, fresh optimizer
                if self.diverged(r):
                    return 1
                if self.last_val_step != self.step:
                    self.log(self.validate())
                self.grow(stage)
                window = (self.wall, 0)  # the next line's speed (and ETA) from this stage's steps alone
            if self.step == self.long_start:  # not a growth: the same model, optimizer and learning-rate schedule
                self.print(f"step {self.step}: sequences of {cfg.long_seq_len} tokens from here on, not {cfg.seq_len}")
                self.log({"seq_len": cfg.long_seq_len})
                window, self.compile_pending = (self.wall, 0), cfg.compile  # compiled for the new shapes, off the clock
            if self.compile_pending:
                self.compile_stage()
            t0 = time.perf_counter()
            late, r = r, self.train_step()
            waited = r if self.pauses_after(self.step + 1) else late  # the device's time counts as training time:
            if waited is not None:  # wait for the step before, or for this one when the loop is about to pause
                waited.read()
            self.wall += time.perf_counter() - t0
            self.step += 1
            window = (window[0], window[1] + 1)
            if self.diverged(late):
                return 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                self.log_progress(r, window)
                window = (self.wall, 0)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self.log_validation()
            stop = self.should_stop()
            if self.step % cfg.save_every == 0 or self.step == cfg.steps or stop:
                if self.diverged(r):
                    return 1
                self.save()
            if stop and self.step < cfg.steps:
                self.print(f"stopped at step {self.step}; resume with: python train.py --resume --out {self.out}")
                return 128 + self.stop_signal if self.stop_signal else 0  # the shell's code for "killed by signal"
        if self.d.master:
            plot_runs([self.out], os.path.join(self.out, "val_loss.svg"))
        self.print(f"done: {cfg.steps} steps in {fmt_time(self.wall)} of training; checkpoint {self.checkpoint_path}")
        share = self.overhead / max(self.wall - first_wall, 1e-9)
        self.print(f"checkpoints and validation took {fmt_time(self.overhead)}, {100 * share:.1f}% of this process's "
                   f"training time (--save-every and --eval-every set how often)")
        return 0

    def train_step(self) -> StepStats:
        """One optimizer step over the global batch: micro-batches with gradient accumulation, DDP
        all-reduce on the last one, clipping, learning rate for this step. Dropout is seeded by
        (seed, step, rank), so a resumed run draws exactly the masks the uninterrupted run would.
        Nothing waits for the device: the statistics come back as StepStats, read later."""
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.step * 101 + self.d.rank)
        lr = get_lr(self.step, self.cfg, self.stage_start)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        stats = torch.zeros(5, device=self.device)  # summed on the device
        for m, batch in enumerate(self.prefetch.get(self.step)):
            sync = m == self.n_micro - 1 or self.d.world == 1  # DDP all-reduces on the last micro-batch only
            with contextlib.nullcontext() if sync else self.wrapped.no_sync():
                out, s = self.forward(batch)
                (out.loss / self.n_micro).backward()
            stats += s / self.n_micro
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.clip if self.cfg.clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = torch.cat([all_reduce_mean_(stats, self.d), grad_norm.float().view(1).to(self.device)])
        return StepStats(self.step + 1, values, lr)

    def forward(self, batch: dict):
        """Loss and the 5 logged statistics of one micro-batch, all on the device: nothing here waits for it."""
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with autocast(self.device, self.cfg.dtype):
            out = self.wrapped(**batch)
        targets = batch["mlm_labels"].gather(1, batch["mlm_positions"])  # (B, P), IGNORE in the padding
        labelled = targets != bert.IGNORE
        mlm_acc = ((out.mlm_logits.argmax(-1) == targets) & labelled).sum() / labelled.sum()
        nsp_acc = (out.nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
        losses = [out.loss.detach(), out.mlm_loss.detach(), out.nsp_loss.detach()]
        return out, torch.stack([*losses, mlm_acc, nsp_acc]).float()

    def grow(self, stage: int):
        """The switch: save the trained shallow model, grow it, reset the optimizer, save; then a log record
        of the growth, which the plots mark (switch_marks). Logged after the save, so that a resume never
        logs one growth twice."""
        old = self.model
        self.save(os.path.join(self.out, f"stage{self.stage}_end.pt"))
        torch.manual_seed(self.cfg.seed * 1000 + stage)  # fresh layers (identity) depend on (seed, stage) only,
        generator = torch.Generator().manual_seed(self.cfg.seed * 1000 + stage)  # so a resume grows them alike
        new = stack.grow_to(old, self.schedule, stage, generator=generator)
        sources = stack.layer_sources(self.schedule.stages[stage].grow, old.config.n_layer, new.config.n_layer)
        self.set_model(new, stage, self.step, old_model=old, sources=sources)
        self.print(f"step {self.step}: grew to {new.config.n_layer} layers by {self.schedule.stages[stage].grow}; "
                   f"{bert.describe(new)}")
        self.save()
        self.log({"grew": growth_label(self.schedule.stages[stage].grow, old.config.n_layer, new.config.n_layer)})

    def set_model(self, model: bert.Bert, stage: int, step: int, old_model=None, sources=None):
        """Install a model for `stage`: move it to the device, build the fresh optimizer, wrap it in DDP
        (which then synchronises only the trainable parameters) and, if asked, compile it: with dynamo's
        caches emptied first, so that each stage compiles its own model once, and earlier stages' graphs
        never count toward the recompile limit (beyond which dynamo silently runs eager)."""
        old_opt = self.optimizer
        self.model, self.stage = model.to(self.device).train(), stage
        self.stage_start = self.schedule.stage_at(step)[1]
        self.optimizer = build_optimizer(model, self.cfg)
        if self.cfg.carry_moments and old_model is not None:
            carry_moments(old_opt, self.optimizer, old_model, model, sources)
        wrapped = model
        if self.d.world > 1:
            wrapped = DDP(model, device_ids=[self.d.local_rank] if self.device.type == "cuda" else None)
        if self.cfg.compile:
            torch._dynamo.reset()
            wrapped = torch.compile(wrapped, backend=self.cfg.compile_backend)
        self.wrapped, self.compile_pending = wrapped, self.cfg.compile

    # -- start, resume, save ---------------------------------------------------------------------------------

    def start(self):
        """Fresh model for stage 0 (saved at once, so a run folder always has a checkpoint.pt), or everything
        from the latest checkpoint. Rank 0 first clears temporaries that killed processes left."""
        if self.d.master:
            os.makedirs(self.out, exist_ok=True)
            for name in data.remove_stale_temporaries(self.out):
                self.print(f"removed {os.path.join(self.out, name)}, left by a process killed while writing it")
        if self.cfg.resume and os.path.exists(self.checkpoint_path):
            self.restore(load_checkpoint(self.checkpoint_path, advice=ways_on(self.out)))
            if self.d.master:
                truncate_log(self.log_path, self.step)
            self.print(f"resumed {self.checkpoint_path} at step {self.step} (stage {self.stage}, "
                       f"{self.model.config.n_layer} layers)")
            return
        if self.cfg.resume:  # a script that always passes --resume (preemptible jobs) starts this way
            self.print(f"note: --resume, but {self.out} holds no run yet: starting a new one there")
        if self.d.master:
            for name in run_files(self.out):  # --overwrite: the old run's files go, so no two runs mix
                os.remove(os.path.join(self.out, name))
        torch.manual_seed(self.cfg.seed)
        c = self.cfg
        base = bert.preset(c.preset, vocab_size=self.prepared.tokenizer.vocab_size, pre_norm=c.pre_norm,
                           dropout=c.dropout, attn_dropout=c.dropout, max_position=max(c.seq_len, c.long_seq_len, 128))
        model = bert.Bert(stack.initial_config(self.schedule, base))
        stack.set_trainable(model, self.schedule.stages[0].trainable_top)
        self.set_model(model, 0, 0)
        self.save()

    def restore(self, ckpt: dict):
        """Model, optimizer, step and wall time from a checkpoint that load_checkpoint accepted."""
        path = self.checkpoint_path
        check_resumable(ckpt, self.cfg, path)
        if ckpt["tokenizer"] != self.prepared.tokenizer.to_dict():
            raise SystemExit(f"error: {path} was trained with another tokenizer than the one in "
                             f"--cache-dir {self.cfg.cache_dir} for --corpus {self.cfg.corpus or '(synthetic)'}; "
                             f"resume with the run's own corpus and cache (leave both flags out); a run begun before "
                             f"tokenizer v3 (a space before each sentence) with the project version that began it")
        model, _ = model_from_checkpoint(ckpt, path, ways_on(self.out))
        stack.set_trainable(model, self.schedule.stages[ckpt["stage"]].trainable_top)
        self.set_model(model, ckpt["stage"], ckpt["step"])
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
            raise SystemExit(f"error: {path}: its optimizer state does not fit its model ({first_line(e)}). "
                             f"{ways_on(self.out)}")
        self.step, self.wall = ckpt["step"], ckpt["wall"]
        self.last_good = (path, self.step)

    def save(self, path: Optional[str] = None):
        """Write checkpoint.pt (or `path`) on rank 0. A write that fails (disk full, read-only filesystem, no
        permission) ends the run in one line naming the file and the last good checkpoint."""
        if not self.d.master:
            return
        path, t0 = path or self.checkpoint_path, time.perf_counter()
        state = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                 "step": self.step, "stage": self.stage, "wall": self.wall,
                 "config": asdict(self.model.config), "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "schedule": self.schedule.to_dict(),
                 "train_config": asdict(self.cfg), "tokenizer": self.prepared.tokenizer.to_dict(),
                 # Data position and random state are functions of (seed, step, rank): see train_step.
                 "data": {"seed": self.cfg.data_seed, "next_example": self.step * self.cfg.batch_size}}
        try:
            save_checkpoint(path, state)
        except Exception as e:
            cause = os_error_of(e)
            if cause is None:
                raise
            raise SystemExit(f"error: could not write {path} ({cause.strerror}); {self.last_good_text()}")
        if path == self.checkpoint_path:
            self.last_good = (path, self.step)
        self.overhead += time.perf_counter() - t0

    def last_good_text(self) -> str:
        path, step = self.last_good or (None, None)
        return f"the last good checkpoint is {path} (step {step})" if path else "no checkpoint was written yet"

    # -- compiling, validation, logging, stopping ----------------------------------------------------------

    def compile_stage(self):
        """Compile a model just installed under --compile before its first timed step, so that compile time
        never lands in `wall` (MSLT compiles five models, the baseline one): forward and backward of a
        micro-batch with and without an attention mask (two graphs), nothing updated; logged as `compile_s`."""
        t0 = time.perf_counter()
        c, d = self.cfg, self.d
        batch = self.batches_at(self.step).for_step(self.step, c.batch_size, d.rank, d.world, 0, self.n_micro)
        for variant in (batch, {k: v for k, v in batch.items() if k != "attention_mask"}):
            self.forward(variant)[0].loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_pending = False
        seconds = time.perf_counter() - t0
        self.log({"compile_s": round(seconds, 3)})
        self.print(f"step {self.step}: compiled the {self.model.config.n_layer}-layer model in {seconds:.1f} s "
                   f"(not counted in the training wall time)")

    def batches_at(self, step: int) -> data.Batches:
        """The training examples of 0-based `step`: of --long-seq-len tokens in the long phase, else --seq-len. Both
        come from the same token cache; validation stays at --seq-len, so that its curve reads across the switch."""
        return self.long_batches if step >= self.long_start else self.train_batches

    def step_batches(self, step: int) -> list:
        """This rank's micro-batches of `step` (built ahead by self.prefetch)."""
        c, d = self.cfg, self.d
        return [host_batch(self.batches_at(step).for_step(step, c.batch_size, d.rank, d.world, m, self.n_micro))
                for m in range(self.n_micro)]

    @torch.no_grad()
    def validate(self) -> dict:
        """Loss and accuracy on the same held-out batches every time (documents never trained on)."""
        t0 = time.perf_counter()
        self.model.eval()
        stats = torch.zeros(5, device=self.device)
        for i in range(self.cfg.eval_batches):
            batch = self.valid_batches.for_step(i, self.cfg.batch_size, self.d.rank, self.d.world)
            stats += self.forward(host_batch(batch))[1] / self.cfg.eval_batches
        self.model.train()  # set here and in set_model, not every step (it walks every module)
        loss, mlm, nsp, mlm_acc, nsp_acc = all_reduce_mean(stats.tolist(), self.d)
        self.overhead += time.perf_counter() - t0
        return dict(val_loss=loss, val_mlm_loss=mlm, val_nsp_loss=nsp, val_mlm_acc=mlm_acc, val_nsp_acc=nsp_acc)

    def log_validation(self):
        v = self.validate()
        self.log(v)
        self.last_val_step = self.step
        self.print(f"step {self.step:>6} | validation loss {v['val_loss']:.4f} (mlm {v['val_mlm_loss']:.4f} "
                   f"acc {v['val_mlm_acc']:.3f}, nsp acc {v['val_nsp_acc']:.3f}) | wall {fmt_time(self.wall)}")

    def log_progress(self, r: StepStats, window: tuple):
        """The progress line and its log record; speed over the `window` (wall, steps) since the last line or, if
        later, the last switch."""
        c = self.cfg
        steps_per_s = window[1] / max(self.wall - window[0], 1e-9)
        tok_per_s = steps_per_s * c.batch_size * self.batches_at(self.step - 1).seq_len
        # deeper stages and longer sequences run slower: the steps left weighed by their cost against the window's
        eta = self.schedule.steps_left_at_cost_of(self.stage, self.step, self.step > self.long_start) / steps_per_s
        trainable = bert.count_parameters(self.model)[0]
        self.print(f"step {self.step:>6}/{c.steps} | stage {self.stage + 1}/{len(self.schedule.stages)} "
                   f"{self.model.config.n_layer:>2}L {trainable / 1e6:.2f}M trainable | loss {r['loss']:.3f} "
                   f"(mlm {r['mlm_loss']:.3f} acc {r['mlm_acc']:.3f}, nsp acc {r['nsp_acc']:.3f}) | "
                   f"lr {r['lr']:.2e} | gnorm {r['grad_norm']:.2f} | {tok_per_s / 1000:.1f}k tok/s | "
                   f"ETA {fmt_time(eta)}")
        self.log({**r.read(), "tokens_per_s": tok_per_s})

    def log(self, record: dict):
        if self.d.master:
            head = dict(step=self.step, stage=self.stage, n_layer=self.model.config.n_layer, wall=round(self.wall, 3))
            with open(self.log_path, "a") as f:
                f.write(json.dumps({**head, **record}) + "\n")

    def print(self, *args):
        print0(self.d, *args)

    def pauses_after(self, steps_done: int) -> bool:
        """Whether the loop logs, validates, saves, grows or stops after this many steps: the last step must
        then be finished on the device before the training clock stops."""
        c = self.cfg
        stage = self.schedule.stage_at(steps_done)[0] if steps_done < c.steps else self.stage
        return (any(steps_done % n == 0 for n in (c.log_every, c.eval_every, c.save_every)) or steps_done == c.steps
                or stage != self.stage or steps_done in (c.stop_after, self.long_start) or self.stop_signal > 0)

    def diverged(self, r: Optional[StepStats]) -> bool:
        """True, after saying so, when step r's loss is not finite: the run stops and saves nothing more."""
        if r is None or math.isfinite(r["loss"]):
            return False
        self.print(f"error: loss is {r['loss']} at step {r.step}; stopping; {self.last_good_text()}. "
                   f"Try a lower --lr or --clip.")
        return True

    def should_stop(self) -> bool:
        """SIGTERM/SIGINT on any rank stops every rank at the same step."""
        flag = [float(self.stop_signal > 0)]
        return all_reduce_mean(flag, self.d)[0] > 0 or (self.cfg.stop_after and self.step == self.cfg.stop_after)


# ---------------------------------------------------------------------------------------------------------
# Optimizers: parameter groups, AdamW, LAMB, the learning-rate schedule.


def param_groups(model: nn.Module, weight_decay: float) -> list:
    """Two groups of the trainable parameters: matrices decay; biases and LayerNorm parameters (1-d) don't.
    Frozen parameters (MSLT's bottom layers) are left out, so the optimizer never touches them."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, "trust": True},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "trust": False}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the trainable parameters: zero moments, step 0 (the papers' reset)."""
    make = Lamb if cfg.optimizer == "lamb" else adamw
    return make(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def warmup_then_decay(step: int, warmup: int, total: int) -> float:
    """The multiplier of the peak learning rate at `step` (from 0): linear warm-up over `warmup` steps, the
    first step at 1 / warmup, then linear decay to 0 at `total` (BERT's schedule; pre-training and glue.py)."""
    return (step + 1) / warmup if step < warmup else max(0.0, (total - step) / max(1, total - warmup))


def get_lr(step: int, cfg: TrainConfig, stage_start: int) -> float:
    """Warm-up once at the start, then decay to 0 at the last step: continuous across switches. With
    --rewarmup, a short linear ramp after each optimizer reset (an ablation)."""
    lr = cfg.lr * warmup_then_decay(step, cfg.warmup, cfg.steps)
    if cfg.rewarmup and stage_start > 0:
        lr *= min(1.0, (step - stage_start + 1) / cfg.rewarmup)
    return lr


class Lamb(torch.optim.Optimizer):
    """LAMB (You et al. 2019, Algorithm 2): Adam's bias-corrected direction plus decoupled weight decay,
    scaled per tensor by the trust ratio ||w|| / ||update|| (1 when either norm is 0). Groups with
    trust=False (biases, LayerNorm) get plain AdamW. Clipping is the training loop's job.

    A trust group's step: (1) u = r + λw, r = m^ / (sqrt(v^) + eps), in the gradients' own buffers: torch's
    fused AdamW kernel updates m, v and its "parameter" x <- x (1 - lr wd) - lr r; run on x = the gradient
    (each element is read before it is written) with lr = wd = -1, that is x <- r; then + λw in place.
    (2) The trust ratio from the norms of w and u. (3) w <- w - lr trust u. On a GPU each pass is one
    multi-tensor operation, the trust ratios on the device (no host sync); on the CPU the passes run tensor
    by tensor, so that a tensor stays in the cache between them: 1.9x fused AdamW's step, not 2.6x
    (experiments/README.md, "Optimizer step"). After a step the gradients hold u.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, foreach=None):
        """foreach: the multi-tensor passes (True) or tensor by tensor (False); None: multi-tensor off the CPU."""
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, trust=True))
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            states = [self.init_state(p) for p in params]
            steps, m, v = ([s[k] for s in states] for k in ("step", "exp_avg", "exp_avg_sq"))
            torch._foreach_add_(steps, 1)  # t
            grads, lr = [p.grad for p in params], g["lr"]
            adam = dict(beta1=g["betas"][0], beta2=g["betas"][1], eps=g["eps"], amsgrad=False, maximize=False)
            if not g["trust"]:  # w <- w (1 - lr λ) - lr r
                torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, weight_decay=g["weight_decay"], **adam)
            elif not (self.foreach if self.foreach is not None else params[0].device.type != "cpu"):
                for w, u, m_, v_, t in zip(params, grads, m, v, steps):
                    torch._fused_adamw_([u], [u], [m_], [v_], [], [t], lr=-1.0, weight_decay=-1.0, **adam)  # u <- r
                    u.add_(w, alpha=g["weight_decay"])
                    w_norm, u_norm = norm(w), norm(u)
                    w.add_(u, alpha=-lr * (w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0))
            else:
                torch._fused_adamw_(grads, grads, m, v, [], steps, lr=-1.0, weight_decay=-1.0, **adam)  # u <- r
                torch._foreach_add_(grads, params, alpha=g["weight_decay"])
                w_norm, u_norm = (torch.stack(torch._foreach_norm(x)) for x in (params, grads))
                trust = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, 1.0)
                torch._foreach_addcmul_(params, grads, list((-lr * trust).unbind()))

    def init_state(self, p) -> dict:
        """Zero moments and step count at the first step; the step count lives where p does (the fused
        kernel reads it there), also after loading a checkpoint that kept it on the CPU."""
        state = self.state[p]
        if not state:
            state.update(step=torch.zeros((), dtype=torch.float32, device=p.device), exp_avg=torch.zeros_like(p),
                         exp_avg_sq=torch.zeros_like(p))
        if state["step"].device != p.device:
            state["step"] = state["step"].to(p.device, torch.float32)
        return state


def norm(x: torch.Tensor) -> float:
    """||x|| of a CPU tensor as a Python number, by a BLAS dot product (faster than linalg.vector_norm)."""
    x = x.reshape(-1)
    return math.sqrt(torch.dot(x, x).item())


def adamw(groups: list, **kwargs) -> torch.optim.AdamW:
    """torch's AdamW over `param_groups`, fused into one kernel on CPU and CUDA (~7x faster a step on CPU
    than the default for-each loop; the same update up to rounding)."""
    for g in groups:
        g.pop("trust", None)
    fused = all(p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, fused=fused, **kwargs)


def carry_moments(old_opt, new_opt, old_model, new_model, sources):
    """Ablation: start the new optimizer with the old one's state for parameters that were copied, paired
    by structure: non-layer modules by name, new layer j with old layer sources[j]. Fresh layers start empty."""
    old_named = {n: p for n, p in old_model.named_parameters() if not n.startswith("layers.")}
    pairs = [(p, old_named[n]) for n, p in new_model.named_parameters() if n in old_named]
    for j, i in enumerate(sources):
        if i is not None:
            pairs += zip(new_model.layers[j].parameters(), old_model.layers[i].parameters())
    trainable = {id(p) for g in new_opt.param_groups for p in g["params"]}
    for new_p, old_p in pairs:
        if id(new_p) in trainable and old_p in old_opt.state:
            new_opt.state[new_p] = {k: v.clone() for k, v in old_opt.state[old_p].items()}


# ---------------------------------------------------------------------------------------------------------
# Feeding the device: batches built ahead (in a worker process on CUDA), statistics read without waiting.


def host_batch(batch: dict) -> dict:
    """A batch without padding loses its attention mask, decided here on the host, so that attention runs
    unmasked (SDPA may then pick the flash kernel)."""
    if batch["attention_mask"].all():
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return batch


class Prefetcher:
    """The coming steps' batches, built ahead while the device runs the current step. `get(step)` returns
    exactly `build(step)` (a list of batches), a pure function of the step, built ahead or not (so a resumed
    run gets the same batches); up to `ahead` later steps (below `end`) are queued behind it.

    With `worker_process` (on CUDA) the builder is a forked process. Building batches is Python (7.3 ms for
    64 examples on an H200's host); on a thread it holds the interpreter lock that the training loop needs to
    launch kernels: an eager BERT-Base step at batch 64 there took 43 ms instead of 32
    (experiments/bench_prefetch.py).
    The process inherits `build` and its data by fork; only step numbers and numpy arrays cross the pipe.
    Elsewhere, and where the OS cannot fork (Windows), a thread: fork is unsafe on macOS, and a CPU's cores
    run the model anyway. With `pin` the batches arrive in pinned memory, so that copying them to the device
    runs asynchronously."""

    def __init__(self, build, end: int, ahead: int = 2, worker_process: bool = False, pin: bool = False):
        self.build, self.end, self.ahead, self.pin = build, end, ahead, pin
        if worker_process and "fork" in multiprocessing.get_all_start_methods():
            fork = multiprocessing.get_context("fork")
            self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=fork, initializer=install_builder,
                                                               initargs=(build,))
            self.build_ahead = build_as_arrays
        else:
            self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")
            self.build_ahead = build
        self.queued = {}  # step -> Future

    def get(self, step: int) -> list:
        for s in [s for s in self.queued if s < step or s > step + self.ahead]:  # after a jump: not needed
            self.queued.pop(s).cancel()
        for s in range(step, min(step + self.ahead + 1, self.end)):
            if s not in self.queued:
                self.queued[s] = self.pool.submit(self.build_ahead, s)
        future = self.queued.pop(step, None)
        try:
            batches = future.result() if future else self.build(step)
        except concurrent.futures.BrokenExecutor:  # the worker process was killed (out of memory?) or crashed
            raise SystemExit(f"error: the process building the batches of step {step} died; the run stops without "
                             f"saving; continue it from its last checkpoint with --resume") from None
        batches = [{k: torch.as_tensor(v) for k, v in b.items()} for b in batches]
        return [{k: v.pin_memory() for k, v in b.items()} for b in batches] if self.pin else batches


_builder = None  # a worker process's `build` (Prefetcher with worker_process)


def install_builder(build):
    """In the worker process: keep `build`; signals and the parent's death as for data.py's workers."""
    global _builder
    _builder = build
    data.start_worker()


def build_as_arrays(step: int) -> list:
    """In the worker process: the step's batches as numpy arrays, which pickle as plain bytes (torch would
    move tensors through shared memory)."""
    return [{k: v.numpy() for k, v in b.items()} for b in _builder(step)]


STAT_NAMES = ("loss", "mlm_loss", "nsp_loss", "mlm_acc", "nsp_acc", "grad_norm")


class StepStats:
    """A training step's logged numbers (stats["loss"], ... and "lr"), computed on the device. They are copied
    to the host as soon as the step is queued, without waiting (pinned memory, an event on CUDA), and read
    when first looked at: the loop looks one step late, when the copy has long finished, or at log and save
    steps. So no step waits for the device to drain its queue."""

    def __init__(self, step: int, values: torch.Tensor, lr: float):
        self.step, self.lr, self.values = step, lr, None  # step: the count of steps done, as the loop says it
        self.host, self.ready = values, None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()

    def read(self) -> dict:
        if self.values is None:
            if self.ready is not None:
                self.ready.synchronize()  # waits for this copy only, not for the steps queued after it
            self.values = dict(zip(STAT_NAMES, self.host.tolist()), lr=self.lr)
        return self.values

    def __getitem__(self, name: str) -> float:
        return self.read()[name]


# ---------------------------------------------------------------------------------------------------------
# Data: the schedule, the token cache built once on rank 0, the context-free reference.


def run_schedule(cfg: TrainConfig):
    """The run's schedule from --method (paper proportions) or an explicit --schedule, with its last
    --long-fraction of steps (at least one) at --long-seq-len, which the ETA weighs by stack.length_cost."""
    size = bert.PRESETS[cfg.preset]
    schedule = stack.parse_schedule(cfg.schedule, grow=cfg.grow) if cfg.schedule else \
        stack.make_schedule(cfg.method, cfg.steps, n_layer=size.n_layer, k=cfg.k)
    long_steps = max(1, round(cfg.long_fraction * cfg.steps)) if cfg.long_seq_len else 0
    return dataclasses.replace(schedule, long_steps=long_steps,
                               long_cost=stack.length_cost(cfg.seq_len, cfg.long_seq_len or cfg.seq_len, size.d_model))


def prepare_data(cfg: TrainConfig, d: Dist):
    """Tokenize once per filesystem (cached), then every rank memory-maps the arrays.

    Under torchrun, rank 0 builds (or reuses) the cache in --cache-dir. A node that does not see rank 0's
    folder there (a node-local disk: rank0_views) has its local rank 0 build or reuse one on its own disk.
    Every other rank waits for its builder, and every builder for the others, through torchrun's key-value
    store, not in a collective: a large corpus takes longer than a process group's timeout (NCCL's is 10
    minutes). No wait is blind: a builder's failure ends every rank with its error, and a builder that stops
    beating (killed, its node lost) ends them within HEARTBEAT_STALE_S. Then one collective checks that every
    rank opened the same data as rank 0 (data.Prepared.fingerprint: tokenizer and arrays)."""
    dcfg = data.DataConfig(corpus=list(cfg.corpus), cache_dir=cfg.cache_dir, vocab_size=cfg.vocab_size,
                           seed=cfg.data_seed, seq_len=cfg.seq_len, decode_errors=cfg.decode_errors,
                           workers=cfg.workers)
    if d.world == 1:
        return data.prepare(dcfg, progress=print)
    run_id, views = rank0_views(d, cfg.cache_dir)
    builders = {0} | {v.first_rank for v in views if not v.sees_rank0}
    print0(d, f"token cache: built or reused in --cache-dir {cfg.cache_dir} by rank 0"
              + "".join(f"; {views[r].node} has its own, by rank {r}" for r in sorted(builders - {0})))
    prepared = None
    if d.rank in builders:
        progress = print if d.master else (lambda line: print(f"[{views[d.rank].node}] {line}", flush=True))
        prepared = build_with_heartbeat(d, f"cache/{run_id}/{d.rank}", lambda: data.prepare(dcfg, progress))
    wait_for_builders(d, f"cache/{run_id}", {r: views[r].node for r in builders})
    prepared = prepared or data.open_cache(cfg.cache_dir)
    check_same_data(d, prepared, views, cfg.cache_dir)
    return prepared


# What one rank sees of a folder that rank 0 names (rank0_views): its node ("node 1 (hostname)": torchrun's node
# rank and the host), the global rank of its node's local rank 0, and whether its copy of the folder is rank 0's
# (a shared filesystem) or its node's own (a node-local disk).
View = namedtuple("View", "node first_rank sees_rank0")


def rank0_views(d: Dist, folder: str) -> tuple:
    """(run id, [View of each rank]): which ranks see rank 0's `folder`. Rank 0 writes a fresh random id into
    <folder>/.rank0-id and sends it to every rank; each rank reads its own copy of that file, and a second
    collective gathers the answers. Where rank 0 cannot write there (a read-only, prebuilt cache), no rank
    sees the id, and each node reads its own copy."""
    marker, run_id = os.path.join(folder, ".rank0-id"), [secrets.token_hex(8)]
    if d.master:
        with contextlib.suppress(OSError):
            os.makedirs(folder, exist_ok=True)
            bert.atomic_write(marker, lambda f: f.write(run_id[0].encode()))
    dist.broadcast_object_list(run_id, src=0, group=d.host_group)
    seen = False
    with contextlib.suppress(OSError), open(marker) as f:
        seen = f.read() == run_id[0]
    node = f"node {os.environ.get('GROUP_RANK', '0')} ({socket.gethostname()})"
    return run_id[0], gather(d, View(node, d.rank - d.local_rank, seen))


def gather(d: Dist, value) -> list:
    """Every rank's `value` (a small picklable one), on every rank: one collective on the host."""
    values = [None] * d.world
    dist.all_gather_object(values, value, group=d.host_group)
    return values


def require_shared(d: Dist, folder: str, flag: str):
    """Refuse at start, not at the first save or resume, a run whose nodes do not all see rank 0's `folder`:
    rank 0 alone writes there, and every rank reads the checkpoint there to resume."""
    if d.world > 1:
        views = rank0_views(d, folder)[1]
        blind = next((v for v in views if not v.sees_rank0), None)
        if blind:
            raise SystemExit(f"error: {flag} {folder} must be shared by every node: {blind.node} does not see the "
                             f"folder that rank 0 on {views[0].node} writes; put it on a shared filesystem")


HEARTBEAT_S, HEARTBEAT_STALE_S = 2.0, 30.0  # a builder's beat, and how long a silent one is trusted


def build_with_heartbeat(d: Dist, key: str, build):
    """build() while a thread adds 1 to <key>/beat in the store every HEARTBEAT_S seconds; then the outcome
    goes to <key>: "" for done, else the error every rank ends with (raised here too)."""
    stop, store = threading.Event(), job_store()
    threading.Thread(target=beat, args=(job_store(), key + "/beat", stop), daemon=True).start()
    try:
        prepared = build()
    except BaseException as e:
        store.set(key, str(e) if isinstance(e, data.DataError) else
                  f"rank {d.rank} stopped building the token cache ({type(e).__name__})")
        raise
    finally:
        stop.set()
    store.set(key, "")
    return prepared


def beat(store, key: str, stop: threading.Event):
    """The heartbeat loop (a thread's own store client); a lost store ends it quietly: the waits report that."""
    with contextlib.suppress(dist.DistError):
        while not stop.wait(HEARTBEAT_S):
            store.add(key, 1)


def wait_for_builders(d: Dist, prefix: str, builders: dict):
    """Wait until every builder (rank -> node) has posted its outcome at <prefix>/<rank>, and raise the first
    error posted. A builder whose beat has not moved for HEARTBEAT_STALE_S, or a store that cannot be reached
    (node 0's launcher holds it), ends this rank in one line (lost_rank); so does SIGTERM, by which torchrun ends a
    job when it loses a node, often before this rank has seen why."""
    store, last = job_store(), {r: (-1, time.monotonic()) for r in builders}
    stopped = signal.signal(signal.SIGTERM, lambda *_: lost_rank(
        d, "torchrun stopped this rank (SIGTERM) as it waited for the token cache: a node was lost, or the job ended"))
    try:
        while pending := [r for r in builders if not store.check([f"{prefix}/{r}"])]:
            for r in pending:
                count = store.add(f"{prefix}/{r}/beat", 0)
                if count != last[r][0]:
                    last[r] = (count, time.monotonic())
                elif time.monotonic() - last[r][1] > HEARTBEAT_STALE_S:
                    lost_rank(d, f"rank {r} on {builders[r]} stopped while building the token cache (no heartbeat "
                                 f"for {HEARTBEAT_STALE_S:.0f} s: killed, hung, or its node lost)")
            time.sleep(0.25)
        errors = [store.get(f"{prefix}/{r}").decode() for r in sorted(builders)]
    except dist.DistError as e:
        lost_rank(d, f"torchrun's store at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} is gone while "
                     f"the token cache was built ({type(e).__name__}): node 0's launcher stopped")
    finally:
        signal.signal(signal.SIGTERM, stopped)
    if any(errors):
        raise data.DataError(next(e for e in errors if e))


def lost_rank(d: Dist, what: str):
    """End this rank because another one is gone. Said by each node's local rank 0, as rank 0, which reports
    every other error, may be the one lost."""
    if d.local_rank == 0:
        print(f"error: {what}; every rank stops. Run the job again (a finished token cache is reused)",
              file=sys.stderr, flush=True)
    raise SystemExit(1)


def check_same_data(d: Dist, prepared: data.Prepared, views: list, cache_dir: str):
    """One collective: every rank's data fingerprint (tokenizer and arrays) against rank 0's. A difference
    (other corpus files, or settings, on a node's own disk) stops every rank, naming both nodes."""
    prints = gather(d, prepared.fingerprint)
    other = next((r for r, p in enumerate(prints) if p != prints[0]), None)
    if other is not None:
        raise SystemExit(f"error: the token cache in --cache-dir {cache_dir} differs between {views[0].node} and "
                         f"{views[other].node} (tokenizer or token arrays): give every node the same --corpus "
                         f"files, or put --cache-dir on a shared filesystem")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: plain dicts, written atomically, read with weights_only=True.

CHECKPOINT_FORMAT = "progressive-bert-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("step", "stage", "wall", "config", "model", "optimizer", "schedule", "train_config", "tokenizer")


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, then rename: the previous checkpoint survives until the new one is whole."""
    bert.atomic_write(path, lambda f: torch.save(state, f))


def os_error_of(e: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind `e`, if any: torch.save reports a full disk as a RuntimeError raised while handling
    the OSError (ENOSPC) that caused it."""
    while e is not None and not isinstance(e, OSError):
        e = e.__cause__ or e.__context__
    return e


def read_checkpoint(path: str, mmap: bool = False, advice: str = ""):
    """What torch.load(weights_only=True) reads from `path`, run by no code from it: a file that needs Python
    objects other than tensors and plain values is never loaded, as unpickling them could run code. A missing
    or unreadable file ends in one line, with `advice` (how to go on). `mmap` maps the file instead of reading
    it: cheap when only the plain values are wanted."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(e), re.IGNORECASE)
        why = (f"holds Python objects other than tensors and plain values ({unsafe[1]}); it is not loaded, because "
               f"unpickling them could run code" if unsafe else f"is not a readable checkpoint: truncated, corrupt "
               f"or not a torch file ({type(e).__name__})")
        raise SystemExit(f"error: {path} {why}. {advice}".rstrip())


def load_checkpoint(path: str, mmap: bool = False, advice: str = "") -> dict:
    """A checkpoint train.py wrote, read by read_checkpoint; a one-line error for a foreign or incomplete file,
    ending with `advice` (how to go on)."""
    ckpt = read_checkpoint(path, mmap, advice)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"error: {path} is not a checkpoint written by train.py")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"error: {path} has checkpoint version {ckpt.get('version')}, "
                         f"this train.py reads {CHECKPOINT_VERSION}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise SystemExit(f"error: {path} lacks {', '.join(missing)}: it is damaged. {advice}".rstrip())
    return ckpt


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def model_from_checkpoint(ckpt, path: str, advice: str = "") -> tuple:
    """(model, tokenizer) of a dict with a checkpoint's "config", "model" and "tokenizer", as every loader of a
    checkpoint gets them (train.py --resume and --export-hf, glue.py, squad.py, experiments/). Nothing is built
    before the config is checked against the weights (bert.check_weights) and the tokenizer on its own and
    against the model's vocabulary (data.Tokenizer.from_dict); one line naming the file (and `advice`) when
    they do not fit, or when `ckpt` is no such dict."""
    if not isinstance(ckpt, dict) or not {"config", "model", "tokenizer"} <= ckpt.keys():
        what = f"dict of {', '.join(sorted(map(str, ckpt)))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"error: {path} holds a {what}, not a checkpoint written by train.py. {advice}".rstrip())
    try:
        config = bert.BertConfig(**ckpt["config"])  # TypeError: not a dict, or with keys that are no field
        bert.check_weights(config, ckpt["model"])
        tok = data.Tokenizer.from_dict(ckpt["tokenizer"], config.vocab_size)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: {path}: {first_line(e)}. {advice}".rstrip())
    model = bert.Bert(config)
    model.load_state_dict(ckpt["model"])
    return model, tok


# ---------------------------------------------------------------------------------------------------------
# The run folder: one process at a time, and a run's files are never lost by accident.

RUN_FILE = re.compile(r"checkpoint\.pt|log\.jsonl|stage\d+_end\.pt|val_loss\.svg")  # what a run leaves


def run_dir(cfg: TrainConfig) -> str:
    """--out, or runs/<method> when it is not given."""
    return cfg.out or os.path.join("runs", cfg.method)


def run_files(folder: str) -> list:
    """The files of a run in `folder`, sorted (none if it does not exist)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if RUN_FILE.fullmatch(n) and os.path.isfile(os.path.join(folder, n))]


def ways_on(folder: str) -> str:
    """How to go on from a run whose checkpoint.pt is missing or unreadable, naming its stage files."""
    stages = sorted((n for n in run_files(folder) if n.startswith("stage")), key=lambda n: int(re.sub(r"\D", "", n)))
    copy = (f"copy {os.path.join(folder, stages[-1])} to {os.path.join(folder, 'checkpoint.pt')} and --resume to "
            f"go on from the end of that stage, or " if stages else "")
    return f"To go on: {copy}pass --overwrite to start afresh there (its files are then replaced)."


def check_run_folder(cfg: TrainConfig):
    """Refuse to start where a run's files would be lost: a folder holding a run needs --resume (which needs
    its checkpoint.pt) or --overwrite."""
    files = run_files(cfg.out)
    if cfg.resume and files and "checkpoint.pt" not in files:
        raise SystemExit(f"error: --resume: {cfg.out} holds a run ({', '.join(files)}) but no checkpoint.pt. "
                         f"{ways_on(cfg.out)}")
    if files and not (cfg.resume or cfg.overwrite):
        raise SystemExit(f"error: {cfg.out} already holds a run ({', '.join(files)}); pass --resume to continue "
                         f"it or --overwrite to start afresh")


@contextlib.contextmanager
def locked_folder(folder: str, flag: str = "--out"):
    """Hold an exclusive lock on <folder>/.lock while the block runs, so two processes never write one run.
    A second process fails at once, naming the folder and the holder's pid (data.pid_lock: a .lock file left
    behind by a dead holder never blocks). A folder made here that holds nothing but the lock and rank0_views'
    marker (a refused run, of one rank or several) is removed again."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SystemExit(f"error: {flag} {folder} is a file, not a folder; choose another {flag}")
    made = not os.path.exists(folder)
    os.makedirs(folder, exist_ok=True)

    def refuse(pid):
        raise SystemExit(f"error: {folder} is in use by another process (pid {pid}); wait for it to end, or "
                         f"choose another {flag}")

    with data.pid_lock(os.path.join(folder, ".lock"), refuse):
        try:
            yield
        finally:
            if made and set(os.listdir(folder)) <= {".lock", ".rank0-id"}:
                shutil.rmtree(folder)




# ---------------------------------------------------------------------------------------------------------
# Devices and ranks: torchrun's environment variables, rank-0 printing, averages over ranks, dtypes.


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    host_group: Optional[object] = None  # under NCCL, a gloo group for numbers on the host (stop flags, logs)

    @property
    def master(self) -> bool:
        return self.rank == 0


def job_store() -> dist.Store:
    """A new client of torchrun's key-value store (MASTER_ADDR:MASTER_PORT), for waits outside collectives
    (prepare_data). One per thread: a client is not shared between threads."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=30))


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), known before any process group."""
    return int(os.environ.get("RANK", "0"))


def setup_distributed(device: str) -> Dist:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    if "RANK" not in os.environ:
        return Dist()
    d = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if device == "cuda":
        torch.cuda.set_device(d.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", d.local_rank))  # binds NCCL to the GPU now
        d.host_group = dist.new_group(backend="gloo")  # averaging a host number never waits for the GPU's queue
    else:
        dist.init_process_group("gloo")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ["GROUP_WORLD_SIZE"]) > 1 \
            and int(os.environ["TORCHELASTIC_MAX_RESTARTS"]) > 0:  # torch 2.13's default: one store for every round
        print0(d, "note: for --max-restarts across nodes, start each torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
                  " in its environment: else the restarted workers find the failed round's addresses in the store "
                  "that torchrun keeps, and cannot connect")
    return d


def print0(d: Dist, *args):
    """print on rank 0 only: every rank computes the same numbers, one says them."""
    if d.master:
        print(*args, flush=True)


def all_reduce_mean_(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Average a tensor over ranks in place, queued on its device without waiting for it (NCCL: a CUDA tensor)."""
    if d.world > 1:
        dist.all_reduce(t)
        t /= d.world
    return t


def all_reduce_mean(values: list, d: Dist) -> list:
    """Average a list of floats over ranks (logged numbers are the same on every rank), on the host: the
    per-step stop flag must not wait for the GPU to finish the steps queued before it."""
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=d.host_group)
    return (t / d.world).tolist()


def autocast(device: torch.device, dtype: str):
    """bf16 autocast when --dtype bf16, else a no-op context; weights and optimizer stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def default_dtype(device: str) -> str:
    """bf16 on a GPU that computes in bf16 natively (Ampere and later), else float32: on older GPUs
    torch emulates bf16, slower than float32."""
    native = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "float32"


def use_tf32(device: str):
    """On CUDA, float32 matmuls run on the TF32 tensor cores (float32 range, 10-bit mantissa inputs,
    float32 sums): what bf16 autocast leaves in float32 runs ~8x faster than in full float32 on A100/H100."""
    if device == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "tf32"


# ---------------------------------------------------------------------------------------------------------
# Logging: one readable line per log step, a JSONL record beside it, and an SVG plot.


def fmt_time(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7.5 -> '7s'."""
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def truncate_log(path: str, step: int):
    """On resume, drop records the interrupted run wrote after its checkpoint (they are redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    bert.atomic_write(path, lambda f: f.write("".join(kept).encode()))


def read_log(run_dir: str) -> list:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise SystemExit(f"error: {path} does not exist; is {run_dir} a run directory of train.py?")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


COLORS = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def nice_ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round tick values inside [lo, hi]: nice_ticks(0, 20.1) -> [0, 5, 10, 15, 20]."""
    raw = (hi - lo) / n or 1.0
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def free_row(x: float, y: float, width: float, taken: list) -> float:
    """The row nearest y (rows 11 px apart, alternately above and below) where a label of this width at x overlaps
    none of the labels taken, which it then joins: where several runs grow at one point, their labels stack in
    rows instead of printing over each other."""
    free = lambda v: not any(abs(v - ty) < 11 and x < tx + tw and tx < x + width for tx, ty, tw in taken)
    y = next((y + d for n in range(40) for d in (-11 * n, 11 * n) if free(y + d)), y)
    taken.append((x, y, width))
    return y


def svg_plot(series: dict, path: str, xlabel: str, ylabel: str, title: str, hline: Optional[tuple] = None,
             marks: Optional[dict] = None):
    """Write a line plot as SVG with no plotting library. series: {label: [(x, y), ...]};
    hline: optional (y, label) reference line, e.g. the corpus's unigram entropy; marks: {label: [(x, y, text),
    ...]}, points marked on a series' curve in its colour, e.g. where the run grew (switch_marks)."""
    W, H, L, R, T, B = 720, 440, 70, 190, 40, 55  # canvas and margins
    ys = [y for s in series.values() for _, y in s] + ([hline[0]] if hline else [])
    x0, x1 = 0.0, max(x for s in series.values() for x, _ in s) or 1.0
    y0, y1 = min(ys), max(ys)
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
    sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
    sy = lambda y: T + (y1 - y) / (y1 - y0) * (H - T - B)
    line = lambda x1, x2, y1, y2, style: f'<line x1="{x1}" x2="{x2}" y1="{y1:.1f}" y2="{y2:.1f}" {style}/>'
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
           f'font-size="12">', f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{(W - R + L) / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>',
           f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#444"/>']
    out += [f'<text x="{sx(xv):.1f}" y="{H - B + 18}" text-anchor="middle">{xv:g}</text>' for xv in nice_ticks(x0, x1)]
    for yv in nice_ticks(y0, y1):
        out.append(f'<text x="{L - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:g}</text>')
        out.append(line(L, W - R, sy(yv), sy(yv), 'stroke="#eee"'))
    out.append(f'<text x="{(W - R + L) / 2}" y="{H - 12}" text-anchor="middle">{xlabel}</text>')
    out.append(f'<text transform="translate(16,{(H - B + T) / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>')
    if hline:
        out.append(line(L, W - R, sy(hline[0]), sy(hline[0]), 'stroke="#999" stroke-dasharray="5,4"'))
        out.append(f'<text x="{W - R - 4}" y="{sy(hline[0]) - 5:.1f}" text-anchor="end" fill="#666">{hline[1]}</text>')
    taken = []  # the labels of marks placed so far: (x, y, width)
    for i, (label, s) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        poly = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        out.append(f'<polyline points="{poly}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, text in (marks or {}).get(label, []):
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="#fff" stroke="{color}" stroke-width="2"/>')
            ty = free_row(sx(x) + 4, sy(y) - 8, 5.5 * len(text), taken)
            out.append(f'<text x="{sx(x) + 4:.1f}" y="{ty:.1f}" fill="{color}" font-size="10">{text}</text>')
        out.append(line(W - R + 12, W - R + 36, T + 10 + 18 * i, T + 10 + 18 * i, f'stroke="{color}" stroke-width="3"'))
        out.append(f'<text x="{W - R + 42}" y="{T + 14 + 18 * i}">{label}</text>')
    out.append("</svg>")
    bert.atomic_write(path, lambda f: f.write("\n".join(out).encode()))


def val_curve(records: list) -> list:
    """(training wall minutes, validation loss) points of a run's log."""
    return [(r["wall"] / 60, r["val_loss"]) for r in records if "val_loss" in r]


def growth_label(grow: str, old: int, new: int) -> str:
    """How a switch reads on a plot: '3->6 stack', '+3 mslt' (new layers on top of frozen ones), 'retrain'."""
    return f"+{new - old} {grow}" if grow == "mslt" else f"{old}\u2192{new} {grow}" if new != old else grow


def switch_marks(records: list, x=lambda r: r["wall"] / 60) -> list:
    """(x, validation loss, label) of each growth in a run's log: the run validates just before it grows,
    so the mark sits on its validation curve at the switch. x: a record's x (default: wall minutes)."""
    marks, loss = [], None
    for r in records:
        loss = r.get("val_loss", loss)
        if "grew" in r and loss is not None:
            marks.append((x(r), loss, r["grew"]))
    return marks


def plot_runs(run_dirs: list, path: str):
    """Validation loss against training wall time (validation excluded) for one or several runs, each
    growth marked on its run's curve."""
    logs = {os.path.basename(os.path.normpath(d)): read_log(d) for d in run_dirs}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # --plot ... --out may name a new folder
    svg_plot({n: val_curve(r) for n, r in logs.items()}, path, "training wall time (min, validation excluded)",
             "validation loss (MLM + NSP)", "Validation loss against wall time",
             marks={n: switch_marks(r) for n, r in logs.items()})
    print(f"wrote {path}")


# ---------------------------------------------------------------------------------------------------------
# Export: a checkpoint as a folder that transformers loads.


def export_hf(checkpoint: str, out_dir: str):
    """Write a checkpoint train.py wrote (checkpoint.pt or stage<i>_end.pt, either layout) as a folder that
    transformers' AutoModelForMaskedLM, AutoTokenizer and pipeline("fill-mask") load: config.json and
    model.safetensors (bert.save_hf), tokenizer.json and its two config files (data.Tokenizer.save_hf)."""
    model, tok = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    try:
        bert.save_hf(model, out_dir)
        tok.save_hf(out_dir, model.config.max_position)
    except (data.DataError, OSError) as e:
        raise SystemExit(f"error: --export-hf {out_dir} --checkpoint {checkpoint}: {e}")
    kind = "RobertaPreLayerNormForMaskedLM (no pooler, no NSP head)" if model.config.pre_norm else "BertForPreTraining"
    print(f"wrote {out_dir}: {bert.describe(model)} as {kind}; tokenizer of {tok.vocab_size} tokens")


def export_main(argv) -> int:
    """The command line of export_hf: train.py --export-hf DIR --checkpoint FILE."""
    p = argparse.ArgumentParser(prog="train.py --export-hf", description=export_hf.__doc__)
    p.add_argument("--export-hf", required=True, metavar="DIR", help="folder to write (made if missing)")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="checkpoint.pt or stage<i>_end.pt of a run")
    a = p.parse_args(argv)
    export_hf(a.checkpoint, a.export_hf)
    return 0


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> tuple:
    """argparse mirroring TrainConfig; returns (config, names of the fields given on the command line, plot
    dirs): under --resume, the fields not given come from the checkpoint (the resume rule, above)."""
    unset = object()  # argparse leaves a field it finds on the namespace alone unless the flag is given
    namespace = argparse.Namespace(**{f.name: unset for f in dataclasses.fields(TrainConfig)})
    p = build_parser()
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR",
                   help="only plot validation loss of these runs to --out/val_loss.svg (or ./val_loss.svg)")
    a = vars(p.parse_args(argv, namespace))
    plot = a.pop("plot")
    given = {k for k, v in a.items() if v is not unset}
    return TrainConfig(**{k: a[k] for k in given}), given, plot


def build_parser() -> argparse.ArgumentParser:
    """The flags of TrainConfig, grouped as there, each with its default shown by --help."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter,
                                epilog="Paper-scale recipes are in README.md.")
    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=d.preset, choices=list(bert.PRESETS), help="model size (depth x hidden)")
    g.add_argument("--post-norm", dest="pre_norm", action="store_false", default=argparse.SUPPRESS,
                   help="original post-LN BERT instead of pre-LN (the default)")
    g.add_argument("--dropout", type=float, default=d.dropout, help="dropout probability")
    g = p.add_argument_group("growth schedule")
    g.add_argument("--method", default=d.method, choices=list(stack.METHODS), help="method (paper proportions)")
    g.add_argument("--schedule", default=d.schedule, help='explicit schedule "depth:steps,..." e.g. "3:50,6:70,12:280"')
    g.add_argument("--grow", default=d.grow, choices=[g for g in stack.GROWS if g != "init"],
                   help="growth operator for an explicit --schedule")
    g.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    g.add_argument("--k", type=int, default=d.k, help="number of MSLT stages (before the retrain stage)")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", nargs="*", default=[], help="text files or folders (default: built-in synthetic corpus)")
    g.add_argument("--cache-dir", default=d.cache_dir, help="where the tokenizer and token arrays are cached")
    g.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per example")
    g.add_argument("--long-seq-len", type=int, default=d.long_seq_len, help="tokens per example in the last "
                   "--long-fraction of the steps (0: none); the same model, optimizer, lr schedule and batch")
    g.add_argument("--long-fraction", type=float, default=d.long_fraction, help="share of the steps at --long-seq-len")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch in examples")
    g.add_argument("--micro-batch", type=int, default=d.micro_batch, help="per-rank forward batch (0: batch/world)")
    g.add_argument("--data-seed", type=int, default=d.data_seed, help="seed of split, pairs and masks")
    g.add_argument("--decode-errors", default=d.decode_errors, choices=["strict", "replace"],
                   help="non-UTF-8 bytes in the corpus: 'strict' stops naming file and offset, 'replace' reads U+FFFD")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="processes that build the token cache (0 = every core); any number gives the same cache")
    g = p.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=d.optimizer, choices=["adam", "lamb"], help="AdamW or LAMB")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=d.warmup, help="warm-up steps at the start of the run")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="decoupled weight decay on matrices")
    g.add_argument("--beta1", type=float, default=d.beta1, help="first-moment decay")
    g.add_argument("--beta2", type=float, default=d.beta2, help="second-moment decay")
    g.add_argument("--eps", type=float, default=d.eps, help="denominator epsilon")
    g.add_argument("--clip", type=float, default=d.clip, help="max global gradient norm (0 = off)")
    g.add_argument("--rewarmup", type=int, default=d.rewarmup, help="ablation: re-warm-up steps after each reset")
    g.add_argument("--carry-moments", action="store_true", help="ablation: carry optimizer moments into copied layers")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=d.out, help="run directory (default runs/<method>)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of initialisation and dropout")
    g.add_argument("--device", default=d.device, choices=["", "cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--dtype", default=d.dtype, choices=["", "float32", "bf16"],
                   help="default: bf16 on capable CUDA, else float32")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--compile-backend", default=d.compile_backend,
                   help="torch.compile backend: inductor (fast code); eager or aot_eager compile in seconds, to debug")
    g.add_argument("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    g.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validations")
    g.add_argument("--eval-batches", type=int, default=d.eval_batches, help="validation batches")
    g.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints")
    g.add_argument("--resume", action="store_true",
                   help="continue from <out>/checkpoint.pt; flags not given take the checkpoint's values")
    g.add_argument("--overwrite", action="store_true", help="start afresh even if <out> holds a run")
    g.add_argument("--stop-after", type=int, default=d.stop_after, help="save and stop after this step (0 = never)")
    return p


def device_of(cfg: TrainConfig) -> str:
    return cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")


def finish_config(cfg: TrainConfig, world: int) -> TrainConfig:
    """Fill defaults that depend on the machine, and check flags together; fail fast naming them."""
    device = device_of(cfg)
    cfg = dataclasses.replace(cfg, device=device, dtype=cfg.dtype or default_dtype(device), out=run_dir(cfg))
    errors = flag_errors(cfg, world)
    if cfg.resume and cfg.overwrite:
        errors.append("--resume and --overwrite contradict each other")
    if cfg.method in ("identity", "identity-noise") and not cfg.pre_norm and not cfg.schedule:
        print("note: identity growth is function-preserving only in the pre-LN layout; running it post-LN anyway")
    if errors:
        raise SystemExit("error: " + "\n       ".join(errors))
    try:
        schedule = run_schedule(cfg)  # validates itself
    except ValueError as e:
        raise SystemExit(f"error: --method/--schedule/--steps/--k/--long-fraction: {e}")
    if schedule.total_steps != cfg.steps or schedule.stages[-1].n_layer != bert.PRESETS[cfg.preset].n_layer:
        raise SystemExit(f"error: --schedule {cfg.schedule!r} has {schedule.total_steps} steps and ends at "
                         f"{schedule.stages[-1].n_layer} layers; --steps is {cfg.steps} and --preset {cfg.preset} "
                         f"has {bert.PRESETS[cfg.preset].n_layer} layers")
    return cfg


def flag_errors(cfg: TrainConfig, world: int) -> list:
    """Each flag outside its range, alone or with the others and the `world` size, as "--flag value: must be ..."
    (NaN fails every comparison, so it is refused wherever a number is)."""
    micro = cfg.micro_batch or cfg.batch_size // world
    rules = [("dropout", 0 <= cfg.dropout < 1, "in [0, 1)"), ("steps", cfg.steps >= 1, "positive"),
             ("k", cfg.k >= 1, "positive"),
             ("vocab_size", cfg.vocab_size >= data.N_BASE, f"at least {data.N_BASE} (5 specials + 256 bytes)"),
             ("seq_len", 8 <= cfg.seq_len <= 512, "between 8 and 512"),
             ("batch_size", cfg.batch_size >= 1 and micro >= 1 and cfg.batch_size % (world * micro) == 0,
              f"positive and divisible by the world size {world} x --micro-batch {micro}"),
             ("long_seq_len", not cfg.long_seq_len or cfg.seq_len < cfg.long_seq_len <= 512, "0 or (--seq-len, 512]"),
             ("long_fraction", 0 < cfg.long_fraction < 1, "in (0, 1)"),
             ("micro_batch", cfg.micro_batch >= 0, "0 (batch / world size) or positive"),
             ("data_seed", cfg.data_seed >= 0, "0 or positive"), ("seed", cfg.seed >= 0, "0 or positive"),
             ("lr", 0 < cfg.lr < math.inf, "a positive number"),
             ("warmup", 0 <= cfg.warmup < cfg.steps, f"0 or positive, below --steps {cfg.steps}"),
             ("weight_decay", 0 <= cfg.weight_decay < math.inf, "0 or a positive number"),
             ("beta1", 0 <= cfg.beta1 < 1, "in [0, 1)"), ("beta2", 0 <= cfg.beta2 < 1, "in [0, 1)"),
             ("eps", 0 < cfg.eps < math.inf, "a positive number"),
             ("clip", 0 <= cfg.clip < math.inf, "0 (off) or positive"),
             ("rewarmup", cfg.rewarmup >= 0, "0 or positive"), ("log_every", cfg.log_every >= 1, "positive"),
             ("eval_every", cfg.eval_every >= 1, "positive"), ("eval_batches", cfg.eval_batches >= 1, "positive"),
             ("save_every", cfg.save_every >= 1, "positive"),
             ("stop_after", cfg.stop_after >= 0, "0 (never) or positive"),
             ("decode_errors", cfg.decode_errors in ("strict", "replace"), "strict or replace"),
             ("workers", cfg.workers >= 0, "0 (every core) or positive"),
             ("device", cfg.device != "cuda" or torch.cuda.is_available(), "cpu: no CUDA device is available")]
    return [f"--{name.replace('_', '-')} {getattr(cfg, name)}: must be {need}" for name, ok, need in rules if not ok]


def main(argv=None) -> int:
    """train.py's command line. What a user can get wrong (a flag, a corpus, a folder, a full disk) ends in
    one line, `error: ...`, and a non-zero exit; under torchrun only rank 0 prints it, as every rank refuses
    alike. Any other exception ends its process at once (rank 0 with the traceback, other ranks in one line),
    and torchrun then stops the others; no rank waits in a barrier for one that failed."""
    try:
        return run_training(argv)
    except data.DataError as e:
        message = f"error: {e}"
    except OSError as e:
        message = f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}"
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        message = e.code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop, whose own handler finishes the step and saves
        message = "interrupted: what was saved is kept; the same command with --resume goes on from there"
    except Exception as e:
        if launch_rank() == 0:
            raise
        # Another rank's failure closes the connections this rank's collectives use: say so in one line.
        raise SystemExit(f"error: rank {launch_rank()} stopped: {type(e).__name__}: {first_line(e)}")
    raise SystemExit(message if launch_rank() == 0 else 1)


def run_training(argv=None) -> int:
    """Parse, lock the run folder (rank 0), check everything, then train; returns the exit code."""
    if any(a.split("=")[0] == "--export-hf" for a in (sys.argv[1:] if argv is None else argv)):
        return export_main(argv)
    cfg, given, plot = parse_args(argv)
    if plot:
        plot_runs(plot, os.path.join(cfg.out or ".", "val_loss.svg"))
        return 0
    # rank 0 locks the run folder before anything is read there
    with locked_folder(run_dir(cfg)) if launch_rank() == 0 else contextlib.nullcontext():
        d = setup_distributed(device_of(cfg))
        require_shared(d, run_dir(cfg), "--out")  # before any rank reads a checkpoint there
        cfg = finish_config(resumed_config(cfg, given, restarted_by_torchrun(d)), d.world)
        check_run_folder(cfg)
        trainer = Trainer(cfg, d)
        trainer.start()
        code = run_until_signalled(trainer)
        trainer.prefetch.pool.shutdown(cancel_futures=True)
        del trainer  # its DDP wrapper holds the process group: let both go before the group is destroyed
        if d.world > 1:  # only after a normal end: a rank that failed never reaches a barrier the others wait in
            dist.barrier()  # rank 0 may still be plotting; tearing gloo down under it can crash the process
            dist.destroy_process_group()
        return code


def run_until_signalled(trainer: Trainer) -> int:
    """trainer.run() with SIGTERM/SIGINT turned into a stop request: finish the step, save, exit."""

    def request_stop(signum, frame):
        trainer.stop_signal = signum
        trainer.print(f"received signal {signum}: saving a checkpoint at the end of this step")

    old = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return trainer.run()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
