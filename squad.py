"""SQuAD 1.1 and 2.0 fine-tuning and evaluation of pre-trained checkpoints, as BERT's run_squad.py does it.

MSLT (section 4.2, Table 1) reports SQuAD 1.1 and 2.0 dev F1/EM, the median of five runs: batch 12, 2 epochs, lr
3e-5 for 1.1; batch 48, 2 epochs, lr 5e-5 for 2.0; windows of 384 tokens. The recipe is BERT's (Devlin et al. 2019,
sections 4.2-4.3, and its run_squad.py):

- Windows: [CLS] question [SEP] piece of the context [SEP], at most 384 tokens, the question cut to 64 tokens; the
  windows of a context start 128 tokens apart, the last one reaching its end.
- Model: a linear layer on every token's hidden state gives start and end logits (B, T, 2); the loss is the mean
  of the start and end cross-entropies over the window's positions. An answer that the window does not hold
  whole, and in 2.0 a question without one, points at [CLS] (position 0).
- Answers: the n best spans of at most 30 context tokens by start + end logit, over the windows of a question,
  each span counted in the one window where its first token has the most context on its nearer side (BERT's
  max-context rule). Every such span is scored, not only those among the 20 best starts and ends as BERT does,
  so the best one is exact. The text is cut from the original context by the character offsets of the span's
  tokens (token_spans), never decoded from tokens: it keeps the context's case, accents and spacing.
- SQuAD 2.0: the null score is [CLS]'s start + end logits (the least over the windows); a question gets no answer
  ("") when null score - best span score exceeds a threshold. Users of BERT choose that threshold on dev with the
  official evaluate-v2.0.py (--na-prob-file null_odds.json, its best_f1_thresh) and predict again; here it is
  chosen the same way at the end of each run (null_threshold), so the reported dev numbers are tuned on dev, as
  the papers' are.
- Metrics: the official scripts' exact match and F1 after normalizing answers (lower case, punctuation and the
  articles a/an/the dropped, whitespace collapsed), each the best over a question's gold answers; for 2.0 also
  over the answerable (HasAns) and unanswerable (NoAns) questions apart.

    python squad.py --checkpoint runs/x/checkpoint.pt --out runs/x/squad2      # bundled sample: 4 articles, dev 1
    python squad.py --checkpoint runs/x/checkpoint.pt --version 1.1 --train-file train-v1.1.json \\
        --dev-file dev-v1.1.json --out runs/x/squad1
    python squad.py --table runs/x/squad2 runs/y/squad2     # side-by-side markdown table

<out> holds runs/<name>_lr<lr>_seed<seed>.json per finished run (a rerun skips them, as glue.py's), each run's
files in <name>_lr<lr>_seed<seed>/ and, copied from the run with the median dev F1, predictions.json (question id
-> answer text, "" for no answer: the official format), nbest_predictions.json, null_odds.json (2.0: null score -
best span score per question) and results.md. The full SQuAD files are downloaded by the user from the SQuAD site.
"""

import argparse
import contextlib
import json
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import glue
from data import SPACE, DataError, HelpFormatter, Tokenizer, bert_input
from train import locked_folder, launch_rank, print0, require_shared, setup_distributed

DEFAULT_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "../shared/data/squad/dev-v2.0-first5.json")
PAPER = {"1.1": (12, 3e-5), "2.0": (48, 5e-5)}  # MSLT's batch size and learning rate per SQuAD version


@dataclass
class SquadConfig(glue.FinetuneConfig):
    version: str = "2.0"  # "1.1": every question has an answer; "2.0": some have none
    lrs: tuple = (5e-5,)  # MSLT's for 2.0 (3e-5 for 1.1)
    seeds: tuple = (0, 1, 2, 3, 4)  # MSLT reports the median of five runs
    epochs: int = 2
    batch_size: int = 48  # windows per global batch (12 for 1.1)
    max_seq_len: int = 384  # tokens per window, specials included
    doc_stride: int = 128  # context tokens from one window's start to the next one's
    max_query_len: int = 64  # question tokens kept
    max_answer_len: int = 30  # tokens of the longest span predicted
    n_best: int = 20  # spans per question in nbest_predictions.json


# ---------------------------------------------------------------------------------------------------------
# Reading: the questions of an official SQuAD JSON file, checked.


@dataclass
class Question:
    qid: str
    text: str
    context: str  # its paragraph (one string object shared by the paragraph's questions)
    answers: list  # [(answer text, its first character in context)]; [] for an unanswerable question


def parse_question(qa: dict, context: str, version: str) -> Question:
    """One entry of a paragraph's "qas"; ValueError, KeyError or TypeError when it is malformed."""
    impossible = qa.get("is_impossible", False)
    if impossible and version == "1.1":
        raise ValueError("is unanswerable (is_impossible), which SQuAD 1.1 is not; pass --version 2.0")
    answers = [(a["text"], a["answer_start"]) for a in qa["answers"]]
    for text, start in answers:  # a text or answer_start of the wrong type raises TypeError or AttributeError
        found = context[max(start, 0):start + len(text)]  # shorter than text where the context ends first
        if found != text or not text.strip():
            raise ValueError(f"answer {text!r}: its answer_start {start} points at {found!r} (the context has "
                             f"{len(context)} characters)" + " and it is blank" * (not text.strip()))
    if bool(answers) == bool(impossible):
        raise ValueError("is_impossible but has answers" if impossible else "has no answers and is not is_impossible")
    return Question(qa["id"], qa["question"], context, answers)


def read_squad(path: str, version: str) -> list:
    """The articles of a SQuAD file, each a list of Questions. A malformed entry is a DataError naming the file
    and the question id (or, lacking one, the article, paragraph and question number)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable JSON file ({e}); pass an official SQuAD file") from None
    articles, where = [], "the top level"
    try:
        for a, article in enumerate(data["data"], 1):
            articles.append([])
            where = f"article {a}"
            for p, paragraph in enumerate(article["paragraphs"], 1):
                where = f"article {a}, paragraph {p}"
                context = paragraph["context"]
                if not context.strip():
                    raise ValueError("the context is empty")
                for q, qa in enumerate(paragraph["qas"], 1):
                    where = f"question {qa['id']}" if "id" in qa else f"article {a}, paragraph {p}, question {q}"
                    articles[-1].append(parse_question(qa, context, version))
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        reason = f"lacks the field {e}" if isinstance(e, KeyError) else e
        raise DataError(f"{path}: {where}: {reason}; fix it or remove it") from None
    return articles


# ---------------------------------------------------------------------------------------------------------
# Tokens with character offsets, and the windows of a question.


def token_spans(tok: Tokenizer, text: str, ids: list) -> np.ndarray:
    """(len(ids), 2): the characters [start, end) of `text` that each token of ids = tok.encode(text) comes from.

    The tokens spell the normalized text (whitespace runs made one space, lower-cased), whose characters are
    matched back to `text` word by word: each character of a word normalizes alone to what it becomes in the
    whole text ("İ" -> "i̇", two characters; "Σ" -> "σ"), and a space belongs to the word after it, as in the
    pre-tokens. A token holding part of a character's UTF-8 bytes (byte-level BPE splits "東" in three) maps to
    that whole character, so neighbouring tokens may share one. A leading space before the text (a prefix-space
    convention) maps to its first word."""
    spelled = b"".join(tok.pieces[i] for i in ids).decode()
    origin, j = [], 0  # origin[k]: the index in `text` of the character that spelled[k] comes from
    for word in re.finditer(f"[^{SPACE}]+", text):
        while j < len(spelled) and spelled[j] == " ":
            origin.append(word.start())
            j += 1
        for i in range(word.start(), word.end()):
            form = tok.normalize(text[i]).strip()
            if spelled[j:j + len(form)] != form:
                raise ValueError(f"the tokens of {text!r} do not spell its normalized text at character {i}")
            origin += [i] * len(form)
            j += len(form)
    char_of_byte = np.repeat(np.arange(len(spelled)), [len(c.encode()) for c in spelled])
    ends = np.cumsum([len(tok.pieces[i]) for i in ids], dtype=np.int64)
    starts = ends - [len(tok.pieces[i]) for i in ids]
    origin = np.asarray(origin, dtype=np.int64)
    return np.stack([origin[char_of_byte[starts]], origin[char_of_byte[ends - 1]] + 1], axis=1)


def window_starts(n_tokens: int, room: int, stride: int) -> list:
    """The first context token of each window of `room` tokens, `stride` apart, the last reaching the end (BERT's
    doc spans): window_starts(10, 4, 3) == [0, 3, 6], windows 0-3, 3-6 and 6-9."""
    starts = [0]
    while starts[-1] + room < n_tokens:
        starts.append(starts[-1] + min(stride, room))
    return starts


@dataclass
class Features:
    """The windows of a list of questions, and what maps them back to the contexts' characters."""

    questions: list  # Questions
    spans: list  # per question, token_spans of its context
    enc: glue.Encoded  # per window [CLS] question [SEP] context piece [SEP]; labels (N, 2): answer's first, last
    windows: list  # per window (question number, its first context token, its number of context tokens)


def featurize(questions: list, tok: Tokenizer, cfg: SquadConfig) -> Features:
    """Tokenize the questions and their contexts (each context once, through the tokenizer's encode as glue.py
    encodes a field) and cut the windows. A window's label is the positions of the first answer's first and last
    tokens (those its characters overlap), or (0, 0), [CLS], when it does not hold that answer whole or there is
    none."""
    contexts, spans, ids, n_first, labels, windows = {}, [], [], [], [], []
    for number, q in enumerate(questions):
        if q.context not in contexts:
            context_ids = tok.encode(q.context)
            contexts[q.context] = context_ids, token_spans(tok, q.context, context_ids)
        context_ids, context_spans = contexts[q.context]
        spans.append(context_spans)
        question = tok.encode(q.text)[:cfg.max_query_len]
        room, shift = cfg.max_seq_len - len(question) - 3, len(question) + 2  # window position - context token
        text, start = q.answers[0] if q.answers else ("", 0)
        first = int(np.searchsorted(context_spans[:, 1], start, side="right"))  # the first token ending after it
        last = int(np.searchsorted(context_spans[:, 0], start + len(text), side="left")) - 1  # last starting before
        for start in window_starts(len(context_ids), room, cfg.doc_stride):
            length = min(room, len(context_ids) - start)
            ids.append(bert_input(question, context_ids[start:start + length])[0].tolist())
            n_first.append(shift)
            inside = q.answers and start <= first and last < start + length
            labels.append((first - start + shift, last - start + shift) if inside else (0, 0))
            windows.append((number, start, length))
    return Features(questions, spans, glue.Encoded(ids, n_first, torch.tensor(labels).view(-1, 2), []), windows)


# ---------------------------------------------------------------------------------------------------------
# The model, and the answers from its logits.


class SquadModel(glue.GlueModel):
    """BERT and a Linear(d_model, 2) on every token: start and end logits (B, T, 2), -inf at padding. No dropout
    before the head, as in run_squad.py; the pooler is unused, so frozen (out of the optimizer and of DDP)."""

    def __init__(self, encoder, pad_id: int):
        super().__init__(encoder, 2, pad_id)
        encoder.pooler.requires_grad_(False)

    def forward(self, input_ids, token_type_ids, attention_mask):
        h, _, _ = self.bert.encode(input_ids, token_type_ids, attention_mask)  # (B, T, D)
        return self.head(h).masked_fill(attention_mask[..., None] == 0, float("-inf"))  # (B, T, 2)


def scored_spans(feats: Features, window_numbers: list, logits: list, max_answer_len: int) -> tuple:
    """(null score, its start and end logit, spans) of one question's windows. spans (n, 5): score, first and last
    context token, start and end logit of every span of at most max_answer_len tokens whose first token is in the
    window where it has most context: min(tokens to its left, tokens to its right) + 0.01 x window length."""
    windows = [feats.windows[w] for w in window_numbers]
    context = np.full((len(windows), len(feats.spans[windows[0][0]])), -np.inf)
    for k, (_, start, length) in enumerate(windows):
        t = np.arange(length)
        context[k, start:start + length] = np.minimum(t, length - 1 - t) + 0.01 * length
    home, found, null = context.argmax(0), [], (np.inf, 0.0, 0.0)
    for k, ((_, start, length), w) in enumerate(zip(windows, window_numbers)):
        lg, shift = logits[w], feats.enc.n_first[w]
        null = min(null, (lg[0, 0] + lg[0, 1], lg[0, 0], lg[0, 1]))
        first = np.repeat(np.arange(length), max_answer_len)
        last = first + np.tile(np.arange(max_answer_len), length)
        keep = (last < length) & (home[start + first] == k)
        s, e = lg[shift + first[keep], 0], lg[shift + last[keep], 1]
        found.append(np.stack([s + e, start + first[keep], start + last[keep], s, e], axis=1))
    return null, np.concatenate(found)


def best_answers(q: Question, spans: np.ndarray, found: np.ndarray, n_best: int) -> list:
    """The n_best spans of distinct text, best first: [{"text", "start_logit", "end_logit"}], text cut from the
    context by the characters of the span's tokens."""
    out = {}  # text -> its best span
    for score, first, last, s, e in found[np.argsort(-found[:, 0], kind="stable")]:
        text = q.context[spans[int(first), 0]:spans[int(last), 1]]
        out.setdefault(text, {"text": text, "start_logit": float(s), "end_logit": float(e)})
        if len(out) == n_best:
            break
    return list(out.values())


def null_threshold(diffs: np.ndarray, f1_answered: np.ndarray, f1_blank: np.ndarray) -> float:
    """The t that maximizes total F1 when a question with null score - best span score > t gets no answer:
    f1_answered and f1_blank are each question's F1 with its best span and with "". Swept over the sorted
    differences, as the official evaluate-v2.0.py's find_best_thresh, but with every question's best span
    (that script scores only the spans predicted at threshold 0). All blank, if best, is t below every difference."""
    order = np.argsort(diffs, kind="stable")
    d, gain = diffs[order], np.cumsum((f1_answered - f1_blank)[order])  # gain of answering the k + 1 lowest
    gain = np.where(np.r_[d[1:] != d[:-1], True], gain, -np.inf)  # a threshold falls between distinct differences
    k = int(np.argmax(gain))
    return float(d[k]) if gain[k] > 0 else float(d[0]) - 1.0


def predict(model: SquadModel, feats: Features, cfg: SquadConfig) -> tuple:
    """(files, dev metrics, threshold): predictions, nbest_predictions and (2.0) null_odds as dicts by question
    id; the 2.0 threshold chosen on these questions (null_threshold), None for 1.1."""
    logits, by_question = [None] * len(feats.windows), [[] for _ in feats.questions]  # per window (tokens, 2)
    for rows, batch in glue.batched_logits(model, feats.enc, cfg.dtype):
        for r, w in enumerate(rows):
            logits[w] = batch[r, :len(feats.enc.ids[w])].cpu().numpy()
    for w, (number, _, _) in enumerate(feats.windows):
        by_question[number].append(w)
    best, nbest, odds = {}, {}, {}
    for q, spans, window_numbers in zip(feats.questions, feats.spans, by_question):
        (null, null_s, null_e), found = scored_spans(feats, window_numbers, logits, cfg.max_answer_len)
        answers = best_answers(q, spans, found, cfg.n_best)
        best[q.qid], odds[q.qid] = answers[0]["text"], float(null - found[:, 0].max())
        blank = [{"text": "", "start_logit": float(null_s), "end_logit": float(null_e)}] * (cfg.version == "2.0")
        nbest[q.qid] = sorted(answers + blank, key=lambda n: -n["start_logit"] - n["end_logit"])
        totals = np.array([n["start_logit"] + n["end_logit"] for n in nbest[q.qid]])
        p = np.exp(totals - totals[0])  # BERT's softmax over the n best
        for n, probability in zip(nbest[q.qid], p / p.sum()):
            n["probability"] = float(probability)
    if cfg.version == "1.1":
        return {"predictions": best, "nbest_predictions": nbest}, evaluate(feats.questions, best), None
    f1_answered, f1_blank = np.array([(scores(q, best[q.qid])[1], scores(q, "")[1]) for q in feats.questions]).T
    threshold = null_threshold(np.array([odds[q.qid] for q in feats.questions]), f1_answered, f1_blank)
    final = {qid: "" if odds[qid] > threshold else text for qid, text in best.items()}
    return ({"predictions": final, "nbest_predictions": nbest, "null_odds": odds}, evaluate(feats.questions, final),
            threshold)


# ---------------------------------------------------------------------------------------------------------
# The official metrics (evaluate-v2.0.py; on 1.1 data the same as evaluate-v1.1.py).


def normalize_answer(s: str) -> str:
    """Lower case, punctuation (string.punctuation) and the words a/an/the dropped, whitespace collapsed:
    "The  Eiffel-Tower!" -> "eiffeltower"."""
    s = "".join(c for c in s.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def f1_score(gold: str, pred: str) -> float:
    """F1 of the normalized words (a bag: repeats count): 2PR / (P + R); 1 if both are empty, 0 if one is."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    same = sum((Counter(g) & Counter(p)).values())
    if not g or not p or not same:
        return float(g == p)
    return 2 * same / (len(g) + len(p))  # = 2PR / (P + R) with P = same / len(p), R = same / len(g)


def scores(q: Question, pred: str) -> tuple:
    """(exact match, F1) of pred, each the best over the gold answers; gold answers that normalize to nothing are
    left out, and an unanswerable question's gold answer is ""."""
    golds = [text for text, _ in q.answers if normalize_answer(text)] or [""]
    return (max(float(normalize_answer(g) == normalize_answer(pred)) for g in golds),
            max(f1_score(g, pred) for g in golds))


def evaluate(questions: list, predictions: dict) -> dict:
    """exact and f1 over all questions as fractions (the official script's percentages / 100); where some have no
    answer, also HasAns_ and NoAns_ exact and f1 over the answerable and the unanswerable ones."""
    out, has, blank = {}, [q for q in questions if q.answers], [q for q in questions if not q.answers]
    for prefix, group in ("", questions), ("HasAns_", has), ("NoAns_", blank):
        if group:
            em, f1 = np.mean([scores(q, predictions[q.qid]) for q in group], axis=0)
            out.update({f"{prefix}exact": float(em), f"{prefix}f1": float(f1)})
    return out


# ---------------------------------------------------------------------------------------------------------
# Runs, their files and the table.


def finetune(backbone: glue.Backbone, data: tuple, lr: float, seed: int, cfg: SquadConfig, ranks, out: str) -> dict:
    """One (lr, seed) run: fine-tune on data's training windows, predict its dev questions, write the run's files
    into <out>/<name>_lr<lr>_seed<seed>/ (rank 0); returns the run's record."""
    t0, (train_set, dev), name = time.time(), data, f"SQuAD{cfg.version}"
    model = SquadModel(backbone.build(seed), backbone.tokenizer.pad_id)
    train_loss = glue.fit(model, train_set.enc, lr, seed, cfg, ranks, cfg.epochs, f"{name} lr {lr:g} seed {seed}")
    files, metrics, threshold = predict(model, dev, cfg)
    for stem, content in files.items() if ranks.master else ():
        glue.atomic_write(os.path.join(out, f"{name}_lr{lr:g}_seed{seed}", f"{stem}.json"), json.dumps(content))
    return {"task": name, "lr": lr, "seed": seed, "label": backbone.label, "dev": metrics, "score": metrics["f1"],
            "settings": cfg.settings(backbone, cfg.epochs), "threshold": threshold, "train_loss": train_loss,
            "train_windows": len(train_set.windows), "seconds": round(time.time() - t0, 1)}


def prepare(a, cfg: SquadConfig, tok: Tokenizer, ranks) -> tuple:
    """(training Features, dev Features): --dev-file, or the last article of --train-file held out."""
    articles = read_squad(a.train_file, cfg.version)
    dev = read_squad(a.dev_file, cfg.version) if a.dev_file else articles[-1:]
    train_set = [q for article in articles[:len(articles) - (not a.dev_file)] for q in article]
    dev_set = [q for article in dev for q in article]
    if not train_set or not dev_set:
        where, what = (a.dev_file or a.train_file, "dev") if train_set else (a.train_file, "training")
        raise DataError(f"{where}: no {what} questions (without --dev-file the last article of --train-file is dev)")
    n = cfg.max_train_examples
    if n and n < len(train_set):  # the same subset for every run
        train_set = [train_set[i] for i in sorted(np.random.default_rng(0).permutation(len(train_set))[:n])]
    data = featurize(train_set, tok, cfg), featurize(dev_set, tok, cfg)
    print0(ranks, ", ".join(f"{what}: {len(f.questions)} questions in {len(f.windows)} windows"
                            for what, f in zip(("train", "dev"), data)))
    return data


def results_table(dirs: list) -> str:
    """Markdown table, a row per results folder: EM and F1 of each SQuAD version at its selected lr (best mean F1),
    mean ± 95% interval and median over seeds. (glue.results_table's columns and GLUE average are GLUE's own.)"""
    rows = [{name: glue.select(runs)[1] for name, runs in glue.load_runs(folder).items()} for folder in dirs]
    if not all(rows):
        raise DataError(f"no results (<folder>/runs/*.json) in {dirs[rows.index({})]}; make them with squad.py")
    names = sorted({name for row in rows for name in row})
    lines = ["| model | " + " | ".join(f"{name} {m}" for name in names for m in ("EM", "F1")) + " |",
             "|---" * (2 * len(names) + 1) + "|"]
    for row in rows:
        cells = [glue.fmt_cell([run["dev"][m] for run in row[name]]) if name in row else "–"
                 for name in names for m in ("exact", "f1")]
        lines.append(f"| {next(iter(row.values()))[0]['label']} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def run(a, cfg: SquadConfig) -> int:
    """--table, or the runs of --checkpoint not yet in --out, then the median run's files and the table."""
    if a.table:
        print(results_table(a.table), end="")
        return 0
    ranks, name = setup_distributed(cfg.device), f"SQuAD{cfg.version}"
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(a.checkpoint)), f"squad{cfg.version}"
                                + "-random" * a.random_init)
    require_shared(ranks, out, "--out")  # rank 0 alone writes there, and every rank reads which runs are done
    backbone = glue.load_backbone(a.checkpoint, a.random_init, a.tokenizer, cfg.max_seq_len)
    with locked_folder(out) if launch_rank() == 0 else contextlib.nullcontext():
        if set(glue.load_runs(out)) - {name}:
            raise DataError(f"{out} holds runs of another SQuAD version; use another --out for SQuAD {cfg.version}")
        glue.run_grid(name, cfg.settings(backbone, cfg.epochs), out, cfg, ranks,
                      lambda: prepare(a, cfg, backbone.tokenizer, ranks),
                      lambda data, lr, seed: finetune(backbone, data, lr, seed, cfg, ranks, out))
        if ranks.master:  # the files of the run at the median F1 (the lower one of an even count), at the top
            runs = sorted(glue.select(glue.load_runs(out)[name])[1], key=lambda r: r["score"])
            median = runs[(len(runs) - 1) // 2]
            folder = os.path.join(out, f"{name}_lr{median['lr']:g}_seed{median['seed']}")
            for file in sorted(os.listdir(folder)):
                with open(os.path.join(folder, file), encoding="utf-8") as f:
                    glue.atomic_write(os.path.join(out, file), f.read())
            glue.atomic_write(os.path.join(out, "results.md"), results_table([out]))
            print(f"{out}/predictions.json: seed {median['seed']}, the median F1\n\n" + results_table([out]), end="")
    return 0


def parse_args(argv=None) -> tuple:
    """(arguments, SquadConfig); argparse's one-line error and exit 2 on a bad flag."""
    defaults = SquadConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    glue.add_model_flags(p, help="train.py checkpoint or HuggingFace BERT folder, as glue.py reads them")
    g = p.add_argument_group("data")
    g.add_argument("--version", choices=sorted(PAPER), default=defaults.version,
                   help="SQuAD 1.1 (every question answerable) or 2.0 (some not)")
    g.add_argument("--train-file", default=DEFAULT_FILE, help="official SQuAD JSON file, e.g. train-v2.0.json")
    g.add_argument("--dev-file", help="official SQuAD JSON file (default: the last article of --train-file, the "
                                      "others train: 4 and 1 of the bundled sample)")
    g.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len, help="tokens per window with specials")
    g.add_argument("--doc-stride", type=int, default=defaults.doc_stride, help="tokens from a window to the next")
    g.add_argument("--max-query-len", type=int, default=defaults.max_query_len, help="question tokens kept")
    g.add_argument("--max-answer-len", type=int, default=defaults.max_answer_len, help="tokens of the longest answer")
    g.add_argument("--n-best", type=int, default=defaults.n_best, help="answers per question in nbest_predictions.json")
    g.add_argument("--max-train-examples", type=int, help="train on a fixed random subset of this many questions")
    g = glue.add_finetune_flags(p, defaults)
    g.add_argument("--epochs", type=int, default=defaults.epochs, help="epochs")
    p.set_defaults(lrs=None, batch_size=None)
    g = p.add_argument_group("output")
    g.add_argument("--out", help="results folder (default: squad<version>[-random] beside the checkpoint)")
    g.add_argument("--table", nargs="+", metavar="RESULTS_DIR", help="print a markdown table of finished results")
    a = p.parse_args(argv)
    if not a.table and not a.checkpoint:
        p.error("pass --checkpoint PATH (e.g. runs/x/checkpoint.pt) to fine-tune, or --table DIR ... to compare")
    if not 1 <= a.max_query_len <= a.max_seq_len - 4 or min(a.doc_stride, a.max_answer_len, a.n_best) < 1:
        p.error("need 1 <= --max-query-len <= --max-seq-len - 4 and --doc-stride, --max-answer-len, --n-best >= 1")
    a.batch_size, lr = a.batch_size or PAPER[a.version][0], PAPER[a.version][1]  # MSLT's, for the version
    a.lrs = a.lrs or [lr]
    return a, glue.finetune_config(p, a, SquadConfig)


def main(argv=None) -> int:
    """squad.py's command line; mistakes end in one `error: ...` line (glue.one_line_errors)."""
    a, cfg = parse_args(argv)
    return glue.one_line_errors(lambda: run(a, cfg))


if __name__ == "__main__":
    sys.exit(main())
