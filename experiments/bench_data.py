"""Speed of the data pipeline on the shared plain-text corpus (Gutenberg + Brown + WikiText-2, ~3.5M words).

Measures, in one process: reading + sentence splitting, BPE training for a 16k vocabulary, encoding
throughput (cold pre-token cache, as in a first prepare()), batch production (32 x 128 MLM + NSP batches)
and, for scale, the training step of a 12-layer x 256-hidden BERT on the same batches. Prints a markdown table.

With --scale it measures instead the whole cache build (`python data.py --corpus ... --out ...`) on corpora of
growing size: JSONL copies of the shared text, documents of 20 paragraphs, 3% of the words of every copy
after the first perturbed (one letter changed), so that distinct words keep growing as they do in real text.
For each size and worker count it prints wall time, MB/s, CPU time, the pre-tokens BPE trained on and the
peak memory of the whole process tree, with the load average (other work on the machine) at the end.

    python experiments/bench_data.py                       # defaults: ../shared/data, 16384 tokens
    python experiments/bench_data.py --threads 2 --model-steps 3
    python experiments/bench_data.py --scale --generate-only          # write runs/bench-scale/corpus (2 GB)
    python experiments/bench_data.py --scale --sizes 0.25 0.5 1 2 --workers 1 2
"""

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(ROOT, "..", "shared", "data")


def timed(fn):
    """(fn(), wall seconds, CPU seconds of this process). On a shared machine CPU time is the steadier number."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def model_step_seconds(batches, vocab_size: int, steps: int) -> tuple:
    """(wall seconds, CPU seconds per training step of the 12 x 256 BERT, what was measured). Uses bert.py when present,
    else a stand-in of the same shape (nn.TransformerEncoder + tied MLM projection at the masked positions)."""
    try:
        from bert import Bert, BertConfig
        model = Bert(BertConfig(vocab_size=vocab_size, n_layer=12, d_model=256, n_head=4, d_ff=1024, max_position=512))
        loss_of, what = (lambda b: model(**b).loss), "bert.py Bert 12x256"
    except ImportError:
        emb = torch.nn.Embedding(vocab_size, 256)
        layer = torch.nn.TransformerEncoderLayer(256, 4, 1024, batch_first=True, activation="gelu")
        model = torch.nn.ModuleList([emb, torch.nn.TransformerEncoder(layer, 12)])

        def loss_of(b):
            h = model[1](emb(b["input_ids"]), src_key_padding_mask=b["attention_mask"] == 0)
            chosen = b["mlm_labels"] != data.IGNORE
            return torch.nn.functional.cross_entropy(h[chosen] @ emb.weight.T, b["mlm_labels"][chosen])
        what = "stand-in TransformerEncoder 12x256"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wall = cpu = 0.0
    for step in range(steps + 1):  # the first step warms up and is not counted
        batch = batches.for_step(step, 32)
        _, t, c = timed(lambda: (loss_of(batch).backward(), opt.step(), opt.zero_grad(set_to_none=True)))
        wall, cpu = (wall + t, cpu + c) if step else (0.0, 0.0)
    return wall / steps, cpu / steps, what


# ----------------------------------------------------------------------------------------------------
# --scale: the whole cache build on corpora of growing size

WORD = re.compile(r"[^\W\d_]{3,}")  # words of 3+ letters: the ones a perturbation turns into new words
PART_BYTES = 62_500_000  # corpus files of 62.5 MB: 0.25 GB = 4 files, 2 GB = 32


def perturb(text: str, rng: random.Random, rate: float) -> str:
    """`text` with a share `rate` of its words changed in one letter ("house" -> "hovse")."""
    def change(m):
        w = m.group()
        if rng.random() >= rate:
            return w
        i = rng.randrange(len(w))
        return w[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[i + 1:]
    return WORD.sub(change, text)


def base_documents(paths: list) -> list:
    """The shared text as documents of 20 paragraphs of 5 sentences, each within one source document."""
    docs, _ = data.read_corpus(paths)
    out = []
    for d in docs:
        paragraphs = [" ".join(d[i:i + 5]) for i in range(0, len(d), 5)]
        out += ["\n\n".join(paragraphs[i:i + 20]) for i in range(0, len(paragraphs), 20)]
    return out


def generate_corpus(folder: str, total_bytes: float, paths: list, rate: float) -> list:
    """JSONL files of PART_BYTES under `folder` holding `total_bytes`: copy 0 of the shared text as is,
    copy k > 0 with a share `rate` of its words perturbed (seed k). Files already complete are kept."""
    os.makedirs(folder, exist_ok=True)
    n_parts = round(total_bytes / PART_BYTES)
    names = [os.path.join(folder, f"part-{i:03d}.jsonl") for i in range(n_parts)]
    if all(os.path.exists(n) for n in names):
        return names
    docs, copy, part, f, written = base_documents(paths), 0, 0, None, 0
    while part < n_parts:
        rng = random.Random(copy)
        for text in docs:
            if f is None:
                f = open(names[part] + ".tmp", "w", encoding="utf-8")
            line = json.dumps({"text": perturb(text, rng, rate) if copy else text}) + "\n"
            f.write(line)
            written += len(line.encode())
            if written >= PART_BYTES * (part + 1):
                f.close()
                os.replace(names[part] + ".tmp", names[part])
                print(f"  wrote {names[part]} ({written / 1e9:.2f} GB so far, copy {copy})", flush=True)
                f, part = None, part + 1
                if part == n_parts:
                    break
        copy += 1
    return names


def tree_memory(root: int) -> tuple:
    """(sum of RSS, sum of PSS) in bytes over `root` and all its descendants. RSS counts pages shared by
    forked workers once per process; PSS splits them between the processes that share them."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(pid))
        except (OSError, IndexError, ValueError):
            continue
    rss = pss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                kb = {l.split(":")[0]: int(l.split()[1]) for l in f if l.startswith(("Rss:", "Pss:"))}
            rss, pss = rss + kb["Rss"] * 1024, pss + kb["Pss"] * 1024
        except (OSError, KeyError, ValueError):
            continue
    return rss, pss


def build_once(files: list, cache: str, workers: int, vocab_size: int) -> dict:
    """Run `python data.py` on `files` into a fresh `cache`; wall time, peak tree memory, its output."""
    subprocess.run(["rm", "-rf", cache], check=True)
    cmd = [sys.executable, os.path.join(ROOT, "data.py"), "--corpus", *files, "--out", cache,
           "--vocab-size", str(vocab_size), "--workers", str(workers)]
    log = cache + ".log"
    cpu0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        peak_rss = peak_pss = 0
        while proc.poll() is None:
            rss, pss = tree_memory(proc.pid)
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            time.sleep(0.2)
    wall, cpu1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # data.py and its reaped workers
    with open(log) as f:
        lines = f.read().splitlines()
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n" + "\n".join(lines[-20:]))
    distinct = next((l.split("bpe: ")[1].split(" distinct")[0] for l in lines if "distinct pre-tokens" in l), "?")
    return dict(wall=wall, cpu=cpu, peak_rss=peak_rss, peak_pss=peak_pss, distinct=distinct, output=lines)


def scale(args):
    """Generate the corpora, then build each (size, workers) cache once and print a markdown table."""
    folder = os.path.join(args.scale_dir, "corpus")
    files = generate_corpus(folder, max(args.sizes) * 1e9, [args.gutenberg, args.brown, args.wikitext], args.perturb)
    if args.generate_only:
        return
    print("| corpus | BPE table | workers | wall | MB/s | CPU time | peak RSS, tree | peak PSS, tree | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        part = files[:round(size * 1e9 / PART_BYTES)]
        mb = sum(os.path.getsize(f) for f in part) / 1e6
        for workers in args.workers:
            r = build_once(part, os.path.join(args.scale_dir, "cache"), workers, args.scale_vocab_size)
            load = os.getloadavg()[0]  # other work on the machine at the end of the build
            print(f"| {mb / 1e3:.2f} GB | {r['distinct']} | {workers} | {r['wall']:.0f} s | {mb / r['wall']:.2f} | "
                  f"{r['cpu']:.0f} s | {r['peak_rss'] / 1e9:.2f} GB | {r['peak_pss'] / 1e9:.2f} GB | {load:.1f} |", flush=True)
            with open(os.path.join(args.scale_dir, "results.jsonl"), "a") as f:  # one line per build, kept
                row = dict(size=size, mb=mb, workers=workers, load=load, **{k: v for k, v in r.items() if k != "output"})
                f.write(json.dumps(row) + "\n")
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    # corpus
    p.add_argument("--gutenberg", default=os.path.join(SHARED, "gutenberg"), help="folder of Gutenberg books (*.txt)")
    p.add_argument("--brown", default=os.path.join(SHARED, "brown", "brown.txt"), help="Brown corpus, one sentence per line")
    p.add_argument("--wikitext", default=os.path.join(SHARED, "wikitext-2-raw"), help="folder of WikiText raw files")
    # what to measure
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size to train")
    p.add_argument("--batches", type=int, default=200, help="32 x 128 batches to time")
    p.add_argument("--model-steps", type=int, default=3, help="model training steps to time (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for the model step")
    # --scale: the whole cache build on growing corpora
    p.add_argument("--scale", action="store_true", help="time `python data.py` on corpora of --sizes GB instead")
    p.add_argument("--sizes", type=float, nargs="+", default=[0.25, 0.5, 1, 2], help="corpus sizes in GB")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--workers of data.py to time")
    p.add_argument("--scale-vocab-size", type=int, default=32768, help="BPE vocabulary of the timed builds")
    p.add_argument("--perturb", type=float, default=0.03, help="share of words changed in each copy of the text")
    p.add_argument("--scale-dir", default=os.path.join(ROOT, "runs", "bench-scale"), help="corpora and cache go here")
    p.add_argument("--generate-only", action="store_true", help="only write the corpora")
    args = p.parse_args()
    if args.scale:
        return scale(args)
    torch.set_num_threads(args.threads)

    (docs, report), t_read, c_read = timed(lambda: data.read_corpus([args.gutenberg, args.brown, args.wikitext]))
    sentences = [s for d in docs for s in d]
    mb = sum(len(s.encode()) for s in sentences) / 1e6
    print(f"corpus: {report['documents']} docs, {len(sentences):,} sentences, {mb:.1f} MB of sentence text")
    tok, t_bpe, c_bpe = timed(lambda: data.Tokenizer.train(sentences, args.vocab_size, progress=True))
    tok = data.Tokenizer.from_dict(tok.to_dict())  # empty pre-token cache: encoding starts cold
    split, t_enc, c_enc = timed(lambda: data.tokenize_documents(docs, tok))
    batches = data.Batches(split, tok, 128, seed=0)
    _, t_batches, c_batches = timed(lambda: [batches.for_step(step, 32) for step in range(args.batches)])
    step_s, step_cpu, what = model_step_seconds(batches, tok.vocab_size, args.model_steps)
    load = os.getloadavg()[0]

    print(f"\n{split.num_tokens:,} tokens ({split.num_tokens / sum(len(s.split()) for s in sentences):.2f} per word); "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {load:.1f} at the end\n")
    print("| measurement | wall time | CPU time | target |")
    print("|---|---|---|---|")
    print(f"| read + sentence-split, {mb:.1f} MB | {t_read:.1f} s | {c_read:.1f} s | - |")
    print(f"| BPE training, {tok.vocab_size} tokens | {t_bpe:.1f} s | {c_bpe:.1f} s | <= 60 s |")
    print(f"| encoding, cold cache | {mb / t_enc:.2f} MB/s | {mb / c_enc:.2f} MB/s | >= 2 MB/s |")
    print(f"| batches of 32 x 128 | {args.batches / t_batches:.0f} /s | {args.batches / c_batches:.0f} /s | - |")
    print(f"| training step, {what} | {step_s:.2f} s | {step_cpu:.2f} s | - |")
    print(f"| batch rate / step rate | {args.batches / t_batches * step_s:.0f}x | "
          f"{args.batches / c_batches * step_cpu:.0f}x | >= 20x |")

if __name__ == "__main__":
    main()
