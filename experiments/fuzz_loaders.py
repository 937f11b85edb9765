"""Fuzz the loaders of files from elsewhere: checkpoint.pt, model.safetensors, config.json and tokenizer.json.

A tiny checkpoint (train.py's format) and its `train.py --export-hf` folder are written once. Each mutation
damages one of their files, seeded: truncation at a random point, random byte flips, header fields swapped for
absurd values, keys removed or retyped (in a JSON file, in a safetensors header, or in the checkpoint's
plain-value tree, tensors included), and loads it through a public entry point (`train.py --export-hf`,
`glue.py --checkpoint` or `squad.py --checkpoint` for checkpoint.pt; `glue.py` or `squad.py --checkpoint FOLDER`
for the folder's files), in a fresh `python` process with limits on CPU time, wall time and address space
(resource.setrlimit). Each outcome is one of:

    loaded     exit status 0: the mutation was harmless (a flipped weight, say) and the file loaded
    refused    exit status 1 or 2 with exactly one line on stderr, starting `error:`
    traceback  an exception escaped (MemoryError included: something tried to allocate past the limit)
    crash      killed by a signal
    hang       past the limit of CPU time (a loop) or of wall time (a wait)
    other      anything else (several lines, no `error:`, another exit status)

Only the first two are acceptable. The test suite runs a few mutations
(test_all.py::test_fuzzed_files_load_or_fail_in_one_line); the tally in experiments/README.md comes from

    python experiments/fuzz_loaders.py --mutations 200 --seed 0
"""

import argparse
import concurrent.futures
import io
import json
import os
import random
import runpy
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import asdict

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import bert  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402

KINDS = ("checkpoint.pt", "model.safetensors", "config.json", "tokenizer.json")
ABSURD = (2 ** 60, -1, 0, 1_000_000, 1e308, float("nan"), "x", None, True, [], {})
LIMIT_S = 60  # CPU seconds per load; a good one takes a few
WALL_S = 30 * LIMIT_S  # per load, for one that waits without computing: on a busy machine a good load may wait long
MEMORY = 4 << 30  # address space per load: torch's libraries map about 1.5 GiB, a tiny model little more


def write_originals(folder: str):
    """A tiny train.py checkpoint, its export (config.json, model.safetensors, tokenizer.json), GLUE files and a
    SQuAD 2.0 file of one article (two questions, one of them unanswerable)."""
    texts = ["the cat sat on a mat yes", "a dog ran to the log no", "the red fox saw a big blue mat"] * 3
    tok = data.Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    config = bert.BertConfig(vocab_size=tok.vocab_size, max_position=64, n_layer=2, n_head=2, d_model=32, d_ff=64,
                             pre_norm=True)
    ckpt = {"format": train.CHECKPOINT_FORMAT, "version": train.CHECKPOINT_VERSION, "step": 0, "stage": 0,
            "wall": 0.0, "config": asdict(config), "model": bert.Bert(config).state_dict(), "optimizer": {},
            "schedule": {}, "train_config": {}, "tokenizer": tok.to_dict()}
    os.makedirs(folder, exist_ok=True)
    torch.save(ckpt, os.path.join(folder, "checkpoint.pt"))
    train.export_hf(os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "hf"))
    rows = ["index\tsentence1\tsentence2\tlabel"] + [f"{i}\t{t}\t{t}\t{'entailment' if i % 2 else 'not_entailment'}"
                                                     for i, t in enumerate(texts)]
    os.makedirs(os.path.join(folder, "glue", "RTE"), exist_ok=True)
    for name in ("train.tsv", "dev.tsv"):
        with open(os.path.join(folder, "glue", "RTE", name), "w") as f:
            f.write("\n".join(rows) + "\n")
    context = " ".join(texts[:3])
    questions = [{"id": "q1", "question": "where did the dog run", "is_impossible": False,
                  "answers": [{"text": "to the log", "answer_start": context.index("to the log")}]},
                 {"id": "q2", "question": "what did the cat eat", "is_impossible": True, "answers": []}]
    with open(os.path.join(folder, "squad.json"), "w") as f:
        json.dump({"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": questions}]}]},
                  f)


# ---------------------------------------------------------------------------------------------------------
# Mutations: each returns (what was done, the mutated file's bytes).


def damage_bytes(raw: bytes, rng: random.Random) -> tuple:
    """Truncation at a random point, or 1 to 8 random bytes replaced."""
    if rng.random() < 0.5:
        cut = rng.randrange(len(raw))
        return f"truncated to {cut} of {len(raw)} bytes", raw[:cut]
    out, edge = bytearray(raw), min(len(raw), 2048)  # headers and a zip's directory lie at the ends: aim there often
    spots = [rng.choice([rng.randrange(edge), len(raw) - 1 - rng.randrange(edge), rng.randrange(len(raw))])
             for _ in range(rng.randint(1, 8))]
    for i in spots:
        out[i] = rng.randrange(256)
    return f"bytes replaced at {spots}", bytes(out)


def paths(tree, prefix=()) -> list:
    """Every node below the root of a tree of dicts and lists, as key paths (in key order, so that a mutation does
    not depend on the order in which a writer put the keys)."""
    items = sorted(tree.items(), key=lambda kv: str(kv[0])) if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    return [p for k, v in items for p in [prefix + (k,)] + paths(v, prefix + (k,))]


def damage_tree(tree, rng: random.Random) -> str:
    """Change one node of a tree (a JSON object, or a checkpoint's dict) in place: remove it, retype it, or
    swap it for an absurd value; a tensor may be cut, flattened or turned into integers instead."""
    path = rng.choice(paths(tree))
    *parent_path, key = path
    parent = tree
    for k in parent_path:
        parent = parent[k]
    old, how = parent[key], rng.choice(["remove", "retype", "absurd"])
    if how == "remove":
        del parent[key]
        return f"removed {list(path)}"
    if isinstance(old, torch.Tensor):
        new = rng.choice([old.flatten(), old[:1], old.long(), old.unsqueeze(0), str(old.shape)])
    elif how == "retype":
        new = str(old) if not isinstance(old, str) else [old]
    else:
        new = rng.choice(ABSURD)
    parent[key] = new
    return f"{how} {list(path)}: {repr(old)[:30]} -> {repr(new)[:30]}"


def damage_safetensors_header(raw: bytes, rng: random.Random) -> tuple:
    """The 8-byte header length swapped for an absurd one, or one header field damaged (damage_tree)."""
    n = int.from_bytes(raw[:8], "little")
    if rng.random() < 0.3:
        length = rng.choice([2 ** 60, 2 ** 64 - 1, len(raw), len(raw) - 7, 0, n - 1])
        return f"header length {n} -> {length}", length.to_bytes(8, "little") + raw[8:]
    header = json.loads(raw[8:8 + n])
    what = damage_tree(header, rng)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return f"header: {what}", len(head).to_bytes(8, "little") + head + raw[8 + n:]


def mutate(kind: str, raw: bytes, rng: random.Random) -> tuple:
    """(description, bytes) of one mutation of a file of `kind`."""
    how = rng.random()
    if how < 0.4:
        return damage_bytes(raw, rng)
    if kind == "model.safetensors":
        return damage_safetensors_header(raw, rng)
    if kind == "checkpoint.pt":
        ckpt = torch.load(io.BytesIO(raw), weights_only=True)
        what = damage_tree(ckpt, rng)
        buffer = io.BytesIO()
        torch.save(ckpt, buffer)
        return what, buffer.getvalue()
    tree = json.loads(raw)
    what = damage_tree(tree, rng)
    return what, json.dumps(tree).encode()


# ---------------------------------------------------------------------------------------------------------
# Loading a mutated file through a public entry point, in its own limited process.


def command(kind: str, case: str, originals: str, rng: random.Random) -> list:
    """An entry point, drawn by `rng`, that loads a mutated file of `kind` held in folder `case`."""
    path = os.path.join(case, "checkpoint.pt" if kind == "checkpoint.pt" else "hf")
    entry = rng.choice(["glue.py", "squad.py"] + ["train.py"] * (kind == "checkpoint.pt"))
    if entry == "train.py":
        return ["train.py", "--export-hf", os.path.join(case, "export"), "--checkpoint", path]
    common = ["--checkpoint", path, "--device", "cpu", "--seeds", "0", "--lrs", "1e-3", "--max-steps", "1",
              "--max-seq-len", "32", "--out", os.path.join(case, "out")]
    squad = os.path.join(originals, "squad.json")
    if entry == "squad.py":
        return ["squad.py", "--train-file", squad, "--dev-file", squad, "--doc-stride", "16", "--max-query-len", "8",
                "--batch-size", "2"] + common
    return ["glue.py", "--task", "RTE", "--glue-dir", os.path.join(originals, "glue"), "--no-test"] + common


def run_fresh(argv: list) -> tuple:
    """(exit status or 'hang', stderr) of `python argv...` in a fresh interpreter, from the repository, with the
    limits (set_limits): the plain way, about 2.5 s of CPU a load, most of it importing torch."""
    launcher = (f"import runpy, sys; sys.path.insert(0, {HERE!r}); import fuzz_loaders; fuzz_loaders.set_limits(); "
                f"sys.argv = {argv!r}; runpy.run_path({argv[0]!r}, run_name='__main__')")
    try:
        p = subprocess.run([sys.executable, "-c", launcher], cwd=ROOT, env=ENV, capture_output=True, text=True,
                           timeout=WALL_S)
    except subprocess.TimeoutExpired:
        return "hang", ""
    return p.returncode, p.stderr


def set_limits():
    """This process's limits: MEMORY bytes of address space, LIMIT_S seconds of CPU (then SIGXCPU ends it). CPU
    time, not wall time, tells a loop from a slow load on a machine that other work keeps busy."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (LIMIT_S, LIMIT_S + 10))


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


class Forker:
    """A server process that has imported torch, train and glue (and run no tensor operation, so that forking
    it is safe) and runs each load in a child forked from it: the same process a fresh `python train.py ...`
    would be, with the same limits, at a tenth of the cost. `--fresh-python` checks that both ways agree."""

    def __init__(self):
        self.server = subprocess.Popen([sys.executable, __file__, "--serve"], cwd=ROOT, env=ENV, text=True,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(self, argv: list) -> tuple:
        self.server.stdin.write(json.dumps(argv) + "\n")
        self.server.stdin.flush()
        status, stderr = json.loads(self.server.stdout.readline())
        return status, stderr

    def close(self):
        self.server.stdin.close()
        self.server.wait()


def serve():
    """Read one JSON argv a line from stdin; answer each with [exit status or "hang", stderr] on stdout."""
    import glue  # noqa: F401  (imported once here, shared by every child)
    import tempfile
    import time
    import traceback
    for line in sys.stdin:
        argv = json.loads(line)
        with tempfile.TemporaryFile("w+") as err:
            pid = os.fork()
            if pid == 0:  # the child: the interpreter's own handling of `python argv...`, under the limit
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
                os.dup2(err.fileno(), 2)
                set_limits()
                code = 0
                try:
                    sys.argv = argv
                    runpy.run_path(argv[0], run_name="__main__")
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 0 if e.code is None else print(e.code, file=sys.stderr) or 1
                except BaseException:
                    traceback.print_exc()
                    code = 1
                sys.stderr.flush()
                os._exit(code)
            deadline, status = time.monotonic() + WALL_S, None
            while status is None:
                done, wait_status = os.waitpid(pid, os.WNOHANG)
                if done:
                    status = os.waitstatus_to_exitcode(wait_status)
                elif time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    status = "hang"
                else:
                    time.sleep(0.01)
            err.seek(0)
            print(json.dumps([status, err.read()]), flush=True)


def outcome(status, stderr: str) -> str:
    """What a load's exit status and stderr show (see the module's docstring)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    if status in ("hang", -signal.SIGXCPU):
        return "hang"
    if status == 0:
        return "loaded"
    if status < 0:
        return "crash"
    if "Traceback (most recent call last)" in stderr:
        return "traceback"
    if status in (1, 2) and len(lines) == 1 and lines[0].startswith("error:"):
        return "refused"
    return "other"


def one_case(i: int, seed: int, originals: str, work: str, run) -> dict:
    """Mutation i: damage one file of a copy of the originals, load it, and say how that went."""
    kind = KINDS[i % len(KINDS)]
    rng = random.Random(f"{seed}-{i}")
    case = os.path.join(work, f"case{i}")
    os.makedirs(os.path.join(case, "hf"), exist_ok=True)
    for name in os.listdir(os.path.join(originals, "hf")):
        with open(os.path.join(originals, "hf", name), "rb") as f, open(os.path.join(case, "hf", name), "wb") as g:
            g.write(f.read())
    source = os.path.join(originals, "checkpoint.pt" if kind == "checkpoint.pt" else os.path.join("hf", kind))
    with open(source, "rb") as f:
        what, raw = mutate(kind, f.read(), rng)
    target = os.path.join(case, "checkpoint.pt" if kind == "checkpoint.pt" else os.path.join("hf", kind))
    with open(target, "wb") as f:
        f.write(raw)
    argv = command(kind, case, originals, rng)
    status, stderr = run(argv)
    return {"i": i, "kind": kind, "mutation": what, "entry": argv[0], "outcome": outcome(status, stderr),
            "status": status, "stderr": stderr.strip().splitlines()[-3:]}


def fuzz(work: str, mutations: int, seed: int = 0, workers: int = 2, fresh: bool = False) -> list:
    """Run `mutations` seeded mutations (`workers` loads at a time) under `work`; the results, in order. Each load
    runs in a child of a Forker, or with `fresh` in a fresh interpreter (run_fresh)."""
    originals = os.path.join(work, "originals")
    write_originals(originals)
    forkers = [] if fresh else [Forker() for _ in range(workers)]
    free = list(forkers)

    def case(i):
        if fresh:
            return one_case(i, seed, originals, work, run_fresh)
        forker = free.pop()  # one per thread at a time: list.pop and append are atomic
        try:
            return one_case(i, seed, originals, work, forker.run)
        finally:
            free.append(forker)
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(case, range(mutations)))
    finally:
        for forker in forkers:
            forker.close()


def tally(results: list) -> str:
    """A markdown table: outcomes per file kind."""
    names = ["loaded", "refused", "traceback", "crash", "hang", "other"]
    counts = Counter((r["kind"], r["outcome"]) for r in results)
    lines = ["| file | mutations | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for kind in KINDS + ("all",):
        row = [sum(v for (k, o), v in counts.items() if o == name and kind in (k, "all")) for name in names]
        lines.append(f"| {kind} | {sum(row)} | " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    serve()
elif __name__ == "__main__":
    import tempfile
    p = argparse.ArgumentParser(description=__doc__, formatter_class=data.HelpFormatter)
    p.add_argument("--mutations", type=int, default=40, help="mutations to try, spread evenly over the four kinds")
    p.add_argument("--seed", type=int, default=0, help="seed of the mutations")
    p.add_argument("--workers", type=int, default=2, help="loads run at once")
    p.add_argument("--fresh-python", action="store_true", help="each load in a fresh interpreter, not a fork")
    p.add_argument("--show", action="store_true", help="print every mutation and its outcome")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        results = fuzz(work, a.mutations, a.seed, a.workers, a.fresh_python)
    for r in results:
        if a.show or r["outcome"] not in ("loaded", "refused"):
            print(f"{r['i']:4d} {r['kind']:18s} {r['entry']:9s} {r['outcome']:9s} {r['mutation']}\n     "
                  + "\n     ".join(r["stderr"]))
    print(tally(results))
    sys.exit(0 if all(r["outcome"] in ("loaded", "refused") for r in results) else 1)
