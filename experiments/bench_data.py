"""Speed of the data pipeline on the shared plain-text corpus (Gutenberg + Brown + WikiText-2, ~3.5M words).

Measures, in one process: reading + sentence splitting, BPE training for a 16k vocabulary, encoding
throughput (cold pre-token cache, as in a first prepare()), batch production (32 x 128 MLM + NSP batches)
and, for scale, the training step of a 12-layer x 256-hidden BERT on the same batches. Prints a markdown table.

    python experiments/bench_data.py                       # defaults: ../shared/data, 16384 tokens
    python experiments/bench_data.py --threads 2 --model-steps 3
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # corpus
    p.add_argument("--gutenberg", default=os.path.join(SHARED, "gutenberg"), help="folder of Gutenberg books (*.txt)")
    p.add_argument("--brown", default=os.path.join(SHARED, "brown", "brown.txt"), help="Brown corpus, one sentence per line")
    p.add_argument("--wikitext", default=os.path.join(SHARED, "wikitext-2-raw"), help="folder of WikiText raw files")
    # what to measure
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size to train")
    p.add_argument("--batches", type=int, default=200, help="32 x 128 batches to time")
    p.add_argument("--model-steps", type=int, default=3, help="model training steps to time (after one warm-up)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads for the model step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    (docs, report), t_read, c_read = timed(lambda: data.read_corpus([args.gutenberg, args.brown, args.wikitext]))
    sentences = [s for d in docs for s in d]
    mb = sum(len(s.encode()) for s in sentences) / 1e6
    print(f"corpus: {report['documents']} docs, {len(sentences):,} sentences, {mb:.1f} MB of sentence text")
    tok, t_bpe, c_bpe = timed(lambda: data.Tokenizer.train(sentences, args.vocab_size, progress=True))
    tok = data.Tokenizer.from_dict(tok.to_dict())  # empty pre-token cache: encoding starts cold
    split, t_enc, c_enc = timed(lambda: data.tokenize_documents(docs, tok, "all", progress=lambda *_: None))
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
