"""GLUE fine-tuning and evaluation of pre-trained checkpoints: readers, metrics, grid search, submissions.

Both papers judge a pre-trained BERT by fine-tuning it on GLUE (Gong et al. 2019, section 5.2 and
Table 2; MSLT, section 4.2 and Tables 1-5). This module follows their protocol: BERT's search space
(batch 32, lr in {5e-5, 4e-5, 3e-5, 2e-5}, 3 epochs, 10 for STS-B and RTE as in MSLT), several seeds per
setting, the learning rate selected by its mean dev score over seeds, and mean +- 95% confidence interval
(t-distribution) over seeds as in Gong et al.'s Figure 6, beside the median, which MSLT reports (of five
runs). The model is BERT with dropout and one linear layer on the pooled [CLS] (cross-entropy, or MSE for
STS-B); AdamW, weight decay 0.01 except biases and LayerNorms, 10% linear warm-up then linear decay.
Test-set predictions of the selected setting are written in the GLUE server's submission format.

    python glue.py --checkpoint runs/x/checkpoint.pt --task RTE --out runs/x/glue
    python glue.py --checkpoint runs/x/checkpoint.pt --task RTE --random-init --out runs/x/glue-random
    python glue.py --checkpoint runs/x/checkpoint.pt --task RTE MRPC CoLA --max-train-examples 1000
    python glue.py --table runs/x/glue runs/x/glue-random      # side-by-side markdown table
    torchrun --nproc_per_node 8 glue.py --checkpoint runs/x/checkpoint.pt --task all

Every finished (task, lr, seed) run is saved as JSON under <out>/runs/, so an interrupted grid resumes.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bert
from data import DataError, HelpFormatter, Tokenizer, bert_input, truncate_lengths
from train import (Dist, adamw, all_reduce_mean, autocast, default_dtype, fmt_time, launch_rank, locked_folder,
                   model_from_checkpoint, param_groups, print0, read_checkpoint, require_shared, setup_distributed,
                   use_tf32, warmup_then_decay)

DEFAULT_GLUE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "glue")


class GlueError(ValueError):
    """A problem the user can fix (data file, checkpoint, flags); the message says where and how."""


# ---------------------------------------------------------------------------------------------------------
# Tasks: the column layout of each file, as in BERT's run_classifier.py processors.


@dataclass(frozen=True)
class Layout:
    """Where the fields of one TSV file are. Column numbers may be negative (from the end)."""

    text_a: int  # column of the first sentence
    text_b: Optional[int] = None  # column of the second sentence; None for single-sentence tasks
    label: Optional[int] = None  # column of the label or score; None in unlabelled test files
    index: Optional[int] = None  # column of the row id that the submission file repeats
    header: bool = True  # first line is a header (its width is then the expected number of fields)
    n_fields: Optional[int] = None  # expected fields per row in a file without header


@dataclass(frozen=True)
class Task:
    name: str
    labels: Optional[tuple]  # label strings in class-id order (written back to submissions); None = regression
    metrics: tuple  # dev metrics; the task's score is their mean
    labelled: Layout  # train and dev files
    dev_files: dict  # dev split name -> file in the task folder
    test_files: dict  # submission file stem -> (file relative to the GLUE folder, its Layout)
    epochs: int  # fine-tuning epochs (MSLT: 10 for STS-B and RTE, 3 otherwise)


def _task(name, labels, metrics, labelled, test, epochs=3, dev_files=None, test_files=None):
    """A Task with GLUE's usual files: <name>/dev.tsv, and <name>/test.tsv read with layout `test`."""
    return Task(name, labels, metrics, labelled, dev_files or {"dev": "dev.tsv"},
                test_files or {name: (f"{name}/test.tsv", test)}, epochs)


BINARY, NLI2 = ("0", "1"), ("entailment", "not_entailment")
PAIR_TEST = Layout(text_a=1, text_b=2, index=0)  # index, sentence1, sentence2 (RTE, QNLI, WNLI, QQP, AX)
TASKS = {t.name: t for t in [  # GLUE's order, as in Gong et al.'s Table 2
    _task("CoLA", BINARY, ("mcc",), Layout(3, label=1, header=False, n_fields=4), Layout(1, index=0)),
    _task("SST-2", BINARY, ("acc",), Layout(0, label=1), Layout(1, index=0)),
    _task("MRPC", BINARY, ("acc", "f1"), Layout(3, 4, label=0), Layout(3, 4, index=0)),
    _task("STS-B", None, ("pearson", "spearman"), Layout(7, 8, label=-1), Layout(7, 8, index=0), epochs=10),
    _task("QQP", BINARY, ("acc", "f1"), Layout(3, 4, label=5), PAIR_TEST),
    _task("MNLI", ("contradiction", "entailment", "neutral"), ("acc",), Layout(8, 9, label=-1),
          None, dev_files={"m": "dev_matched.tsv", "mm": "dev_mismatched.tsv"},
          test_files={"MNLI-m": ("MNLI/test_matched.tsv", Layout(8, 9, index=0)),
                      "MNLI-mm": ("MNLI/test_mismatched.tsv", Layout(8, 9, index=0)),
                      "AX": ("diagnostic/diagnostic.tsv", PAIR_TEST)}),  # diagnostics: scored by the MNLI model
    _task("QNLI", NLI2, ("acc",), Layout(1, 2, label=-1), PAIR_TEST),
    _task("RTE", NLI2, ("acc",), Layout(1, 2, label=-1), PAIR_TEST, epochs=10),
    _task("WNLI", BINARY, ("acc",), Layout(1, 2, label=-1), PAIR_TEST),
]}
NOT_AVERAGED = ("WNLI",)  # both papers (and BERT) leave WNLI out of the GLUE average


@dataclass
class Example:
    text_a: str
    text_b: Optional[str]
    label: Optional[float]  # class id or STS-B score; None for test rows
    index: Optional[str]  # test row id


def parse_row(task: Task, fields: list, layout: Layout) -> Example:
    """One TSV row -> Example; raises ValueError with the reason for a bad label or score."""
    label = None
    if layout.label is not None:
        raw = fields[layout.label]
        if task.labels is None:
            label = float(raw)  # ValueError: could not convert string to float
            if not math.isfinite(label):
                raise ValueError(f"score {raw!r} is not a finite number")
        elif raw in task.labels:
            label = task.labels.index(raw)
        else:
            raise ValueError(f"unknown label {raw!r}, expected one of {', '.join(task.labels)}")
    text_b = fields[layout.text_b] if layout.text_b is not None else None
    index = fields[layout.index] if layout.index is not None else None
    return Example(fields[layout.text_a], text_b, label, index)


def read_tsv(task: Task, path: str, layout: Layout, skip_bad_rows: bool = False) -> tuple:
    """Read a GLUE file with quoting off (fields contain stray quotes). Returns (examples, n_skipped).

    A row with the wrong number of fields, an unknown label or an unparsable score raises GlueError naming
    file and line, or with `skip_bad_rows` is skipped and counted. "utf-8-sig" drops MRPC's BOM.
    """
    if not os.path.exists(path):
        raise GlueError(f"{path} not found; --glue-dir must be the folder download_glue_data.py wrote "
                        f"(with CoLA/, SST-2/, ... inside)")
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().removesuffix("\n").split("\n")  # the final newline (CoLA's dev.tsv has none)
    if lines == [""]:
        raise GlueError(f"{path} is empty; --glue-dir must hold the files download_glue_data.py wrote")
    n_fields = len(lines[0].rstrip("\r").split("\t")) if layout.header else layout.n_fields
    examples, skipped = [], 0
    for lineno, line in enumerate(lines[1:] if layout.header else lines, start=2 if layout.header else 1):
        fields = line.rstrip("\r").split("\t")
        try:
            if len(fields) != n_fields:
                raise ValueError(f"expected {n_fields} tab-separated fields, found {len(fields)}")
            examples.append(parse_row(task, fields, layout))
        except ValueError as e:
            if not skip_bad_rows:
                raise GlueError(f"{path}:{lineno}: {e}; fix the row or pass --skip-bad-rows to skip such rows")
            skipped += 1
    return examples, skipped


@dataclass
class TaskData:
    train: list  # Examples
    dev: dict  # dev split name -> Examples
    test: dict  # submission stem -> Examples (files that exist)
    skipped: int  # malformed rows skipped in all files


def load_task(task: Task, glue_dir: str, skip_bad_rows: bool = False) -> TaskData:
    """Read train, dev and (those present) test files of a task."""
    folder = os.path.join(glue_dir, task.name)
    if not os.path.isdir(folder):
        raise GlueError(f"no GLUE data for {task.name}: {folder} does not exist; pass --glue-dir pointing at the "
                        f"folder download_glue_data.py wrote, or choose --task among those present")
    skipped = []

    def read(path, layout):
        examples, n_bad = read_tsv(task, path, layout, skip_bad_rows)
        skipped.append(n_bad)
        return examples

    train_set = read(os.path.join(folder, "train.tsv"), task.labelled)
    dev = {k: read(os.path.join(folder, f), task.labelled) for k, f in task.dev_files.items()}
    test = {k: read(os.path.join(glue_dir, f), layout) for k, (f, layout) in task.test_files.items()
            if os.path.exists(os.path.join(glue_dir, f))}
    return TaskData(train_set, dev, test, sum(skipped))


def available_tasks(glue_dir: str) -> list:
    """The tasks with a folder under glue_dir, in GLUE's order (--task all)."""
    return [name for name in TASKS if os.path.isdir(os.path.join(glue_dir, name))]


# ---------------------------------------------------------------------------------------------------------
# Metrics (numpy), each as its textbook definition.


def accuracy(y, p) -> float:
    return float(np.mean(np.asarray(y) == np.asarray(p)))


def _confusion(y, p) -> tuple:
    """(tp, fp, fn, tn) of binary labels, positive class 1, as floats (the products below overflow ints)."""
    y, p = np.asarray(y) == 1, np.asarray(p) == 1
    return float(np.sum(y & p)), float(np.sum(~y & p)), float(np.sum(y & ~p)), float(np.sum(~y & ~p))


def f1(y, p) -> float:
    """F1 of the positive class: 2tp / (2tp + fp + fn); 0 when there are no positives at all."""
    tp, fp, fn, _ = _confusion(y, p)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(y, p) -> float:
    """Matthews correlation (tp tn - fp fn) / sqrt(product of the four margins); 0 if a margin is 0
    (e.g. constant predictions), the convention CoLA's scorer uses."""
    tp, fp, fn, tn = _confusion(y, p)
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom else 0.0


def pearson(x, y) -> float:
    """Sample correlation cov(x, y) / (sd(x) sd(y)); 0 when either is constant (undefined otherwise)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denom if denom else 0.0


def rankdata(x) -> np.ndarray:
    """1-based ranks, tied values get the mean of the ranks they span: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    _, value_of, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # the distinct values, sorted, take ranks last - count + 1 .. last
    return ((last - counts + 1 + last) / 2)[value_of]


def spearman(x, y) -> float:
    """Pearson correlation of the tie-averaged ranks."""
    return pearson(rankdata(x), rankdata(y))


METRICS = {"acc": accuracy, "f1": f1, "mcc": matthews, "pearson": pearson, "spearman": spearman}


def task_score(metrics: dict) -> float:
    """A task's single number: the mean of its metrics (MRPC acc/F1, STS-B Pearson/Spearman, MNLI m/mm)."""
    return float(np.mean(list(metrics.values())))


def glue_average(scores: dict) -> float:
    """GLUE average over tasks {name: task_score}, WNLI left out as in both papers."""
    return float(np.mean([s for name, s in scores.items() if name not in NOT_AVERAGED]))


T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228]  # t_{0.975}, df = 1..10


def t_quantile_975(df: int) -> float:
    """Two-sided 95% quantile of Student's t: a table up to df 10, then the Cornish-Fisher expansion
    z + (z^3 + z) / 4df + (5z^5 + 16z^3 + 3z) / 96df^2 (error < 0.002 from df 11: 2.199 vs 2.201)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values) -> tuple:
    """(mean, half-width of the 95% t confidence interval); the half-width is nan for a single value."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), t_quantile_975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


# ---------------------------------------------------------------------------------------------------------
# Encoding and batches: [CLS] A [SEP] (B [SEP]), longest-first truncation, dynamic padding.


@dataclass
class Encoded:
    ids: list  # token ids per example, specials included
    n_first: list  # tokens in segment 0 ([CLS] A [SEP]) per example
    labels: Optional[torch.Tensor]  # (N,) long class ids or float scores; None for test sets
    index: list  # test row ids (None for train and dev)


def encode(examples: list, tok: Tokenizer, max_len: int, regression: bool) -> Encoded:
    """Tokenize examples into [CLS] A [SEP] B [SEP] of at most max_len tokens, cutting the longer side first."""
    ids, n_first = [], []
    for e in examples:
        a = tok.encode(e.text_a)
        b = tok.encode(e.text_b) if e.text_b is not None else []
        len_a, len_b = truncate_lengths(len(a), len(b), max_len - (3 if e.text_b is not None else 2))
        ids.append(bert_input(a[:len_a], b[:len_b] if e.text_b is not None else None)[0].tolist())
        n_first.append(len_a + 2)  # [CLS] A [SEP]
    labels = torch.tensor([e.label for e in examples], dtype=torch.float32 if regression else torch.long) \
        if examples and examples[0].label is not None else None
    return Encoded(ids, n_first, labels, [e.index for e in examples])


def collate(enc: Encoded, rows: list, pad_id: int, device) -> tuple:
    """(input_ids, token_type_ids, attention_mask), each (B, T) padded to the longest row in the batch. The mask
    is 1 where a token is not padding: an encoded text never holds the padding id (a special)."""
    T = max(len(enc.ids[i]) for i in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    segments = torch.zeros(len(rows), T, dtype=torch.long)
    for r, i in enumerate(rows):
        n = len(enc.ids[i])
        ids[r, :n] = torch.tensor(enc.ids[i])
        segments[r, enc.n_first[i]:n] = 1
    return ids.to(device), segments.to(device), (ids != pad_id).long().to(device)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, ranks: Dist):
    """Shuffled batches of example numbers for one epoch; each rank takes a disjoint shard of every batch.
    A last batch smaller than the number of ranks is dropped (a rank would get nothing)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(1000 * seed + epoch)).tolist()
    for start in range(0, n, batch_size):
        batch = perm[start:start + batch_size]
        if len(batch) >= ranks.world:
            yield batch[ranks.rank::ranks.world]


# ---------------------------------------------------------------------------------------------------------
# The model: a pre-trained (or freshly initialised) BERT with a head on the pooled [CLS].


class GlueModel(nn.Module):
    """BERT, dropout and Linear(d_model, n_out) on pooled [CLS]; logits (B, n_out), n_out = 1 for regression."""

    def __init__(self, encoder: bert.Bert, n_out: int, pad_id: int):
        super().__init__()
        self.bert, self.pad_id = encoder, pad_id  # pad_id: the tokenizer's, for padding batches
        self.drop = nn.Dropout(encoder.config.dropout)
        self.head = nn.Linear(encoder.config.d_model, n_out)
        bert.init_weights(self.head)
        # The pre-training heads are unused here; frozen, they stay out of the optimizer and of DDP.
        for module in (encoder.mlm_dense, encoder.mlm_ln, encoder.nsp):
            module.requires_grad_(False)
        encoder.mlm_bias.requires_grad_(False)

    def forward(self, input_ids, token_type_ids, attention_mask):
        _, pooled, _ = self.bert.encode(input_ids, token_type_ids, attention_mask)  # (B, D)
        return self.head(self.drop(pooled))  # (B, n_out)


@dataclass
class Backbone:
    """What is fine-tuned: a BERT config, its weights (None = fresh init per seed), tokenizer, a table label."""

    config: bert.BertConfig
    state: Optional[dict]
    tokenizer: Tokenizer
    label: str
    source: str  # checkpoint path, recorded with every result

    def build(self, seed: int) -> bert.Bert:
        torch.manual_seed(seed)
        model = bert.Bert(self.config)
        if self.state is not None:
            model.load_state_dict(self.state)
        return model


def load_backbone(path: str, random_init: bool = False, tokenizer_path: Optional[str] = None,
                  max_seq_len: int = 0) -> Backbone:
    """A train.py checkpoint (dict with model, config, tokenizer) or a HuggingFace folder with our tokenizer:
    one written by `train.py --export-hf` (either layout; a pre-LN one has no pooler, so GLUE's pooled [CLS]
    starts from a fresh one) or a BERT folder and --tokenizer. An error if it has no position for token
    `max_seq_len` (glue.py and squad.py's --max-seq-len)."""
    if os.path.isdir(path):
        tokenizer_path = tokenizer_path or os.path.join(path, "tokenizer.json")
        if not os.path.exists(tokenizer_path):
            raise GlueError(f"{path} is a HuggingFace folder without our tokenizer; pass --tokenizer FILE (the "
                            f"tokenizer.json of train.py --export-hf, or a JSON file written by data.Tokenizer.save)")
        try:
            model = bert.load_hf(path)
            tok = Tokenizer.load(tokenizer_path, model.config.vocab_size)
        except (OSError, ValueError) as e:
            raise GlueError(f"{path}: not a folder that bert.load_hf and data.Tokenizer.load read "
                            f"({type(e).__name__}: {e})") from None
    else:  # train.py's checked loading, with its one-line errors
        advice = "Give a checkpoint of train.py (if a copy is damaged, copy it again) or a HuggingFace folder."
        model, tok = model_from_checkpoint(read_checkpoint(path, advice=advice), path, advice)
    if max_seq_len > model.config.max_position:
        raise GlueError(f"--max-seq-len {max_seq_len} exceeds the model's max_position {model.config.max_position}: "
                        f"pass a --max-seq-len up to that, or pre-train with --long-seq-len {max_seq_len} or more")
    name = os.path.join(os.path.basename(os.path.dirname(os.path.abspath(path))), os.path.basename(path))
    return Backbone(model.config, None if random_init else model.state_dict(), tok,
                    name + (" (random init)" if random_init else ""), os.path.abspath(path))


# ---------------------------------------------------------------------------------------------------------
# Fine-tuning one (task, lr, seed) run.


@dataclass
class FinetuneConfig:
    lrs: tuple = (5e-5, 4e-5, 3e-5, 2e-5)  # learning-rate grid (BERT's)
    seeds: tuple = (0, 1, 2)  # fine-tuning repeats per learning rate
    epochs: Optional[int] = None  # None: the task's (10 for STS-B and RTE, 3 otherwise)
    batch_size: int = 32  # global batch, split over ranks under torchrun
    max_seq_len: int = 128  # [CLS] A [SEP] B [SEP] cut to this many tokens
    warmup: float = 0.1  # fraction of steps with linear warm-up, then linear decay to 0
    weight_decay: float = 0.01  # AdamW decay on matrices, none on biases and LayerNorms
    clip: float = 1.0  # gradient-norm clipping, as BERT's optimizer does
    max_steps: Optional[int] = None  # cap on optimizer steps per run (quick runs)
    max_train_examples: Optional[int] = None  # fixed random subset of the training set (quick runs)
    predict_test: bool = True  # also predict the test sets (needed for submissions)
    log_every: int = 50  # steps between progress lines
    device: str = "cuda" if torch.cuda.is_available() else "cpu"  # where to train
    dtype: str = ""  # float32 | bf16 (autocast of forward passes; weights, AdamW float32); "": default_dtype(device)

    def __post_init__(self):
        self.dtype = self.dtype or default_dtype(self.device)  # bf16 on a GPU with native bf16, as train.py

    def settings(self, backbone: Backbone, epochs: int) -> dict:
        """What a finished run's result depends on, besides lr and seed: resuming requires it to match. Every
        field but these four, so that those squad.py's SquadConfig adds count too."""
        skip = ("lrs", "seeds", "log_every", "device")
        return dict({k: v for k, v in asdict(self).items() if k not in skip}, epochs=epochs,
                    checkpoint=backbone.source, random_init=backbone.state is None)


@torch.no_grad()
def batched_logits(model: nn.Module, enc: Encoded, dtype: str = "float32", batch_size: int = 128):
    """Yields (example numbers, their float logits) for every example, a batch at a time, in evaluation mode.
    Batches are taken in order of length, so each is padded little."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(enc.ids)), key=lambda i: len(enc.ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        with autocast(device, dtype):
            logits = model(*collate(enc, rows, model.pad_id, device)).float()
        yield rows, logits


def predict(model: GlueModel, enc: Encoded, dtype: str = "float32") -> np.ndarray:
    """Class ids (argmax) or scores (regression) for every example, in file order."""
    pred = np.empty(len(enc.ids), dtype=np.float64)
    for rows, logits in batched_logits(model, enc, dtype):
        pred[rows] = (logits[:, 0] if logits.size(1) == 1 else logits.argmax(-1)).double().cpu().numpy()
    return pred


def dev_metrics(task: Task, model: GlueModel, dev: dict, dtype: str = "float32") -> dict:
    """{metric: value}; with several dev sets (MNLI) the keys are metric-split, e.g. acc-m, acc-mm."""
    out = {}
    for split, enc in dev.items():
        pred = predict(model, enc, dtype)
        for name in task.metrics:
            out[name if len(dev) == 1 else f"{name}-{split}"] = METRICS[name](enc.labels.numpy(), pred)
    return out


def prediction_strings(task: Task, pred: np.ndarray) -> list:
    """What the GLUE server reads: label strings, or STS-B scores clipped to [0, 5]."""
    if task.labels is None:
        return [f"{v:.3f}" for v in np.clip(pred, 0.0, 5.0)]
    return [task.labels[int(i)] for i in pred]


def fit(model: nn.Module, enc: Encoded, lr: float, seed: int, cfg: FinetuneConfig, ranks: Dist, epochs: int,
        tag: str) -> float:
    """AdamW with warm-up and linear decay over the epochs (or --max-steps); returns the last logged loss. Float
    labels (N,) are regressed (MSE on logits[:, 0]); class ids are cross-entropy targets: (N,) for logits (B, C),
    or (N, 2) for squad.py's (B, T, 2) start and end logits, the mean of the start and end losses. The model
    moves to cfg.device (this rank's GPU under torchrun)."""
    device = torch.device(f"cuda:{ranks.local_rank}" if cfg.device == "cuda" else cfg.device)
    use_tf32(cfg.device)
    model.to(device)
    wrapped = DDP(model, device_ids=[ranks.local_rank] if device.type == "cuda" else None) if ranks.world > 1 else model
    optimizer = adamw(param_groups(model, cfg.weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-6)
    per_epoch = sum(1 for _ in epoch_batches(len(enc.ids), cfg.batch_size, seed, 0, ranks))
    total = min(epochs * per_epoch, cfg.max_steps or math.inf)
    n_warm = max(1, int(cfg.warmup * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_then_decay(s, n_warm, total))
    step, t0, window = 0, time.time(), []
    wrapped.train()
    while step < total:
        for rows in epoch_batches(len(enc.ids), cfg.batch_size, seed, step // per_epoch, ranks):
            with autocast(device, cfg.dtype):
                logits = wrapped(*collate(enc, rows, model.pad_id, device)).float()
            y = enc.labels[rows].to(device)
            loss = F.mse_loss(logits[:, 0], y) if y.is_floating_point() else F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            schedule.step()
            step += 1
            window.append(loss.item())
            if step % cfg.log_every == 0 or step == total:
                (train_loss,) = all_reduce_mean([sum(window) / len(window)], ranks)
                elapsed, window = time.time() - t0, []
                eta = fmt_time(elapsed / step * (total - step))
                print0(ranks, f"{tag} | step {step}/{total} | epoch {step / per_epoch:.2f} | loss {train_loss:.4f} | "
                              f"{step * cfg.batch_size / elapsed:.0f} ex/s | ETA {eta}")
            if step == total:
                break
    return train_loss


def finetune(task: Task, backbone: Backbone, encoded: dict, lr: float, seed: int, cfg: FinetuneConfig,
             ranks: Dist) -> dict:
    """One (lr, seed) run from the backbone; returns its record: dev metrics, score, test predictions."""
    t0 = time.time()
    n_out = 1 if task.labels is None else len(task.labels)
    model = GlueModel(backbone.build(seed), n_out, backbone.tokenizer.pad_id)
    train_loss = fit(model, encoded["train"], lr, seed, cfg, ranks, cfg.epochs or task.epochs,
                     f"{task.name} lr {lr:g} seed {seed}")
    dev = dev_metrics(task, model, encoded["dev"], cfg.dtype)
    test = {stem: {"index": enc.index, "prediction": prediction_strings(task, predict(model, enc, cfg.dtype))}
            for stem, enc in encoded["test"].items()} if cfg.predict_test else {}
    return {"task": task.name, "lr": lr, "seed": seed, "label": backbone.label, "dev": dev, "score": task_score(dev),
            "settings": cfg.settings(backbone, cfg.epochs or task.epochs), "train_loss": train_loss,
            "train_examples": len(encoded["train"].ids), "seconds": round(time.time() - t0, 1), "test": test}


# ---------------------------------------------------------------------------------------------------------
# Grid search with resume, selection on dev, submissions, tables.


def atomic_write(path: str, text: str):
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    bert.atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def load_runs(out: str) -> dict:
    """{task: [result records]} of every finished run under <out>/runs ({} if there is none)."""
    folder, runs = os.path.join(out, "runs"), {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                r = json.load(f)
            runs.setdefault(r["task"], []).append(r)
    return runs


def select(runs: list) -> tuple:
    """Best learning rate by mean dev score over seeds, and its runs sorted by seed."""
    by_lr = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    best = max(by_lr, key=lambda lr: np.mean([r["score"] for r in by_lr[lr]]))
    return best, sorted(by_lr[best], key=lambda r: r["seed"])


def write_submission(runs: list, out: str) -> list:
    """<out>/submission/<stem>.tsv from the best-scoring seed of the selected lr; returns the paths."""
    best, paths = max(runs, key=lambda r: r["score"]), []
    for stem, t in best["test"].items():
        lines = ["index\tprediction"] + [f"{i}\t{p}" for i, p in zip(t["index"], t["prediction"])]
        paths.append(os.path.join(out, "submission", f"{stem}.tsv"))
        atomic_write(paths[-1], "\n".join(lines) + "\n")
    return paths


def encode_task(task: Task, backbone: Backbone, glue_dir: str, cfg: FinetuneConfig, skip_bad_rows: bool, ranks: Dist):
    """Read and tokenize a task's files: {"train": Encoded, "dev": {split: Encoded}, "test": {stem: Encoded}}."""
    raw = load_task(task, glue_dir, skip_bad_rows)
    if raw.skipped:
        print0(ranks, f"{task.name}: skipped {raw.skipped} malformed rows (--skip-bad-rows)")
    train_set, n = raw.train, cfg.max_train_examples
    if not train_set:
        raise GlueError(f"{task.name}: the training file has no usable rows")
    if n and n < len(train_set):  # the same subset for every run
        train_set = [train_set[i] for i in sorted(np.random.default_rng(0).permutation(len(train_set))[:n])]

    enc = lambda examples: encode(examples, backbone.tokenizer, cfg.max_seq_len, regression=task.labels is None)
    return {"train": enc(train_set), "dev": {k: enc(v) for k, v in raw.dev.items()},
            "test": {k: enc(v) for k, v in raw.test.items()}}


def run_grid(name: str, settings: dict, out: str, cfg: FinetuneConfig, ranks: Dist, prepare, run_one):
    """The (lr, seed) runs of `name` (a GLUE task, a SQuAD version) not yet in <out>/runs: `prepare()` once if
    any is left (reading and tokenizing the data), then `run_one(prepared, lr, seed)` -> the run's record, saved
    as <out>/runs/<name>_lr<lr>_seed<seed>.json. Runs made with other settings in the same folder are an error:
    a resumed grid must not mix them."""
    done = load_runs(out).get(name, [])
    for r in done:
        if r["settings"] != settings:
            diffs = [f"{k}: saved {r['settings'].get(k)!r}, now {v!r}" for k, v in settings.items()
                     if r["settings"].get(k) != v]
            raise GlueError(f"{out} holds {name} runs made with other settings ({'; '.join(diffs)}); use another --out")
    finished = {(r["lr"], r["seed"]) for r in done}
    todo = [(lr, seed) for lr in cfg.lrs for seed in cfg.seeds if (lr, seed) not in finished]
    n_done = len(cfg.lrs) * len(cfg.seeds) - len(todo)
    print0(ranks, f"{name}: {n_done} runs already finished in {out}, {len(todo)} to do")
    prepared = prepare() if todo else None
    t0 = time.time()
    for i, (lr, seed) in enumerate(todo, 1):
        result = run_one(prepared, lr, seed)
        dev = ", ".join(f"{k} {v:.4f}" for k, v in result["dev"].items())
        eta = fmt_time((time.time() - t0) / i * (len(todo) - i))  # a task's runs cost about the same
        print0(ranks, f"{name} lr {lr:g} seed {seed}: dev {dev} | run {n_done + i} of {n_done + len(todo)}, "
                      f"{name} done in {eta}")
        if ranks.master:
            atomic_write(os.path.join(out, "runs", f"{name}_lr{lr:g}_seed{seed}.json"), json.dumps(result))


def run_task(task: Task, backbone: Backbone, glue_dir: str, out: str, cfg: FinetuneConfig, ranks: Dist,
             skip_bad_rows: bool = False):
    """The (lr, seed) runs of a task not yet in <out>, then the selected lr and the submission files."""
    run_grid(task.name, cfg.settings(backbone, cfg.epochs or task.epochs), out, cfg, ranks,
             lambda: encode_task(task, backbone, glue_dir, cfg, skip_bad_rows, ranks),
             lambda encoded, lr, seed: finetune(task, backbone, encoded, lr, seed, cfg, ranks))
    if ranks.master:
        best_lr, best = select(load_runs(out)[task.name])
        score = fmt_cell([r["score"] for r in best])
        print(f"{task.name}: best lr {best_lr:g}, dev score {score} over {len(best)} seed{'s' * (len(best) != 1)}")
        for path in write_submission(best, out):
            print(f"  wrote {path}")


def fmt_cell(values) -> str:
    """Percent: mean ± 95% CI half-width, then the median ("71.2 ± 1.3 (median 71.5)"); one value alone.
    Gong et al. give the mean and its interval (Figure 6); MSLT, like RoBERTa, the median of five runs."""
    mean, ci, median = *mean_ci(values), 100 * np.median(values)
    return f"{100 * mean:.1f}" + ("" if math.isnan(ci) else f" ± {100 * ci:.1f} (median {median:.1f})")


def results_table(dirs: list) -> str:
    """Markdown table, a row per results folder: each task's score at its best lr (mean ± 95% CI over seeds;
    MRPC, QQP, STS-B and MNLI score the mean of their two metrics) and the GLUE average of the tasks all
    rows have (WNLI aside), averaged per seed over the seeds those tasks share."""
    best = {}
    for folder in dirs:
        runs = load_runs(folder)
        if not runs:
            raise GlueError(f"{folder} holds no results (no {folder}/runs/*.json); make them with "
                            f"glue.py --checkpoint ... --out {folder}")
        best[folder] = {name: {r["seed"]: r for r in select(task_runs)[1]} for name, task_runs in runs.items()}
    tasks = [t for t in TASKS if any(t in b for b in best.values())]
    common = [t for t in tasks if all(t in b for b in best.values()) and t not in NOT_AVERAGED]
    avg = f"Avg ({len(common)} task{'s' * (len(common) != 1)})"
    lines = [f"| model | {' | '.join(tasks)} | {avg} |", "|---" * (len(tasks) + 2) + "|"]
    for b in best.values():
        label = next(iter(next(iter(b.values())).values()))["label"]
        cells = [fmt_cell([r["score"] for r in b[t].values()]) if t in b else "–" for t in tasks]
        seeds = set.intersection(*(set(b[t]) for t in common)) if common else set()
        per_seed = [glue_average({t: b[t][k]["score"] for t in common}) for k in sorted(seeds)]
        lines.append(f"| {label} | {' | '.join(cells)} | {fmt_cell(per_seed) if per_seed else '–'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv=None) -> tuple:
    """(arguments, the task names, FinetuneConfig); argparse's one-line error and exit 2 on a bad flag."""
    defaults = FinetuneConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_model_flags(p, nargs="+", default=[], help="train.py checkpoint(s) or HuggingFace BERT folder(s)")
    g = p.add_argument_group("data")
    g.add_argument("--task", nargs="+", default=["RTE"], help=f"tasks among {', '.join(TASKS)}, or 'all' present")
    g.add_argument("--glue-dir", default=DEFAULT_GLUE_DIR, help="folder with one sub-folder per task")
    g.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len, help="tokens per example with specials")
    g.add_argument("--max-train-examples", type=int, help="fine-tune on a fixed random subset of this size")
    g.add_argument("--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of failing")
    g = add_finetune_flags(p, defaults)
    g.add_argument("--epochs", type=int, help="epochs (default: 10 for STS-B and RTE, 3 otherwise)")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="results folder (default: <checkpoint folder>/glue-<name>[-random]); with "
                                 "several checkpoints, one sub-folder each, named after the run (runs/stack/"
                                 "checkpoint.pt -> stack, runs/stack/stage1_end.pt -> stack-stage1_end)")
    g.add_argument("--no-test", action="store_true", help="skip test-set predictions and submission files")
    g.add_argument("--table", nargs="+", metavar="RESULTS_DIR", help="print a markdown table of finished results")
    a = p.parse_args(argv)
    if not a.table and not a.checkpoint:
        p.error("pass --checkpoint PATH (e.g. runs/x/checkpoint.pt) to fine-tune, or --table DIR ... to compare")
    tasks = [t for t in a.task if t != "all"] + (available_tasks(a.glue_dir) if "all" in a.task else [])
    if not tasks and not a.table:
        p.error(f"no task folders (CoLA/, RTE/, ...) under --glue-dir {a.glue_dir}")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {', '.join(unknown)}; choose among {', '.join(TASKS)} or all")
    return a, list(dict.fromkeys(tasks)), finetune_config(p, a, FinetuneConfig, predict_test=not a.no_test)


def add_model_flags(p: argparse.ArgumentParser, **checkpoint):
    """The model group of flags that glue.py and squad.py share; `checkpoint`: --checkpoint's nargs, default, help."""
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", **checkpoint)
    g.add_argument("--tokenizer", help="tokenizer JSON (data.Tokenizer.save) for a HuggingFace folder")
    g.add_argument("--random-init", action="store_true", help="same config and tokenizer, fresh BERT weights")


def add_finetune_flags(p: argparse.ArgumentParser, defaults: FinetuneConfig):
    """The fine-tuning group of flags that glue.py and squad.py share (each adds its --epochs); returns it."""
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--lrs", type=float, nargs="+", default=list(defaults.lrs), help="learning-rate grid")
    g.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds), help="seeds per learning rate")
    g.add_argument("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    g.add_argument("--max-steps", type=int, help="cap on optimizer steps per run")
    g.add_argument("--warmup", type=float, default=defaults.warmup, help="fraction of steps of linear warm-up")
    g.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW decay on matrices")
    g.add_argument("--device", default=defaults.device, choices=["cpu", "cuda"], help="training device")
    g.add_argument("--dtype", default="", choices=["", "float32", "bf16"], help="bf16: autocast (fast on "
                   "GPUs and on CPUs with AVX-512 BF16 or AMX); default bf16 on GPUs with native bf16, else float32")
    g.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between progress lines")
    return g


def finetune_config(p: argparse.ArgumentParser, a, cls, **more) -> FinetuneConfig:
    """A FinetuneConfig (or squad.py's subclass, `cls`) of the parsed flags, after argparse's one-line error
    for a value out of range."""
    if a.batch_size < 1 or a.max_seq_len < 3 or not 0 <= a.warmup < 1 or not 0 <= a.weight_decay < math.inf or \
            not all(0 < lr < math.inf for lr in a.lrs):
        p.error("need --batch-size >= 1, --max-seq-len >= 3, 0 <= --warmup < 1, --weight-decay >= 0, every --lrs > 0")
    if any(v is not None and v < 1 for v in (a.epochs, a.max_steps, a.max_train_examples)) or a.log_every < 1:
        p.error("need --epochs, --max-steps, --max-train-examples and --log-every >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    return cls(**{f.name: getattr(a, f.name) for f in fields(cls) if hasattr(a, f.name)}, **more)


def checkpoint_label(path: str) -> str:
    """runs/stack/checkpoint.pt -> 'stack', runs/stack/stage1_end.pt -> 'stack-stage1_end', a HF folder -> its name."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return os.path.basename(path)
    run, stem = os.path.basename(os.path.dirname(path)), os.path.splitext(os.path.basename(path))[0]
    return run if stem == "checkpoint" else f"{run}-{stem}"


def out_dir(a, path: str) -> str:
    """Where a checkpoint's results go: --out, one sub-folder per checkpoint with several, else beside it."""
    suffix = "-random" if a.random_init else ""
    if a.out:
        return a.out if len(a.checkpoint) == 1 else os.path.join(a.out, checkpoint_label(path) + suffix)
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    return os.path.join(os.path.dirname(os.path.abspath(path)), f"glue-{stem}{suffix}")


def main(argv=None) -> int:
    """glue.py's command line."""
    a, tasks, cfg = parse_args(argv)
    return one_line_errors(lambda: table_or_finetune(a, tasks, cfg))


def one_line_errors(command) -> int:
    """command() -> its exit code, for glue.py and squad.py; a mistake a user can make ends in one `error: ...`
    line (printed by rank 0 only under torchrun) and exit code 2, Ctrl-C in one line saying what is kept."""
    try:
        return command()
    except (GlueError, DataError, OSError, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        message = e.code if isinstance(e, SystemExit) else f"error: {e}"
        if launch_rank() == 0:
            print(message, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if launch_rank() == 0:
            print("interrupted: each finished (lr, seed) run is kept in <out>/runs; the same command goes on "
                  "from there", file=sys.stderr)
        return 130


def table_or_finetune(a, tasks: list, cfg: FinetuneConfig) -> int:
    """--table, or every --checkpoint fine-tuned into its own results folder, locked while it is written."""
    if a.table:
        print(results_table(a.table), end="")
        return 0
    outs = [out_dir(a, path) for path in a.checkpoint]
    if len(set(outs)) < len(outs):
        raise GlueError(f"--checkpoint: several checkpoints would share one results folder ({', '.join(outs)}); "
                        f"fine-tune them one at a time, each with its own --out")
    with contextlib.ExitStack() as locks:
        if launch_rank() == 0:  # one process writes each results folder
            for out in outs:
                locks.enter_context(locked_folder(out))
        return finetune_all(a, tasks, cfg, outs)


def finetune_all(a, tasks: list, cfg: FinetuneConfig, outs: list) -> int:
    """Every task of every --checkpoint into its results folder, then the results tables."""
    ranks = setup_distributed(cfg.device)
    for out in outs:
        require_shared(ranks, out, "--out")
    for path, out in zip(a.checkpoint, outs):
        backbone = load_backbone(path, a.random_init, a.tokenizer, cfg.max_seq_len)
        print0(ranks, f"{backbone.label}: {bert.describe(backbone.build(0))} -> {out}")
        for name in tasks:
            run_task(TASKS[name], backbone, a.glue_dir, out, cfg, ranks, a.skip_bad_rows)
    if ranks.master:
        table = results_table(outs)
        for out in outs:
            atomic_write(os.path.join(out, "results.md"), results_table([out]))
        print("\n" + table, end="")
    if ranks.world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
