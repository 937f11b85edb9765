"""Stack or identity from one checkpoint, over seeds: the test of why identity growth matches stacking here.

Reads the switching-time ablations that experiments/compare.py ran (--ablation, one --out per seed; each
switch point s has a run `switch-<s>` grown by stack and its branch `switch-<s>-identity`, grown by identity
from the same checkpoint) and writes into --out:
  identity_test.md    per s and seed: both runs' final validation loss and MLM loss, the gap (identity's
                      final loss minus stacking's: positive when stacking is ahead), and the attention
                      measures of experiments/attention.py: how close the half-depth model's heads are to
                      the local + [CLS] mixture at the switch, and how close each final model's layer i + L
                      stays to layer i (its source, for stacking); then per s the gap over seeds
  identity_test.svg   the gap against s, one curve per seed and their mean

    python experiments/identity_test.py runs/ablation-seed0 runs/ablation-seed1 runs/ablation-seed2 \\
        --out experiments/results/identity_ablation
"""

import argparse
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import attention  # noqa: E402
import compare  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402


def switch_points(ablation_dir: str) -> list:
    """The s of every switch-<s> run that has an identity branch in `ablation_dir`, in order."""
    names = os.listdir(ablation_dir)
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(r"switch-(\d+)", n)) and n + "-identity" in names)


def final_losses(run_dir: str) -> tuple:
    """(validation loss, validation MLM loss) of a run's last validation."""
    _, _, loss, mlm = compare.val_points(train.read_log(run_dir))[-1]
    return loss, mlm


def attention_measures(run_dir: str, tok_pair: tuple) -> dict:
    """The run's half-depth model at the switch (stage0_end.pt): its heads' JS from the local + [CLS] mixture;
    its final model (checkpoint.pt): the JS between layer i and layer i + L, L the half depth."""
    shallow, tok = attention.load_model(os.path.join(run_dir, "stage0_end.pt"))
    final, _ = attention.load_model(os.path.join(run_dir, "checkpoint.pt"))
    ids, types, _ = attention.encode_pair(tok, *tok_pair)
    L = shallow.config.n_layer
    return {"shallow_mixture_js": attention.mixture_js(attention.maps_of(shallow, ids, types), range(L)),
            "final_pair_js": attention.layer_pair_js(attention.maps_of(final, ids, types), L)}


def measure(dirs: list, pair: tuple) -> list:
    """One row per (s, seed directory) of every finished stack/identity pair."""
    rows = []
    for d in dirs:
        for s in switch_points(d):
            stack_run, identity_run = os.path.join(d, f"switch-{s}"), os.path.join(d, f"switch-{s}-identity")
            if not all(compare.run_state(r)[0] == "done" for r in (stack_run, identity_run)):
                print(f"skipped {stack_run}: it or its identity branch has not finished")
                continue
            st, idt = attention_measures(stack_run, pair), attention_measures(identity_run, pair)
            (sl, sm), (il, im) = final_losses(stack_run), final_losses(identity_run)
            rows.append(dict(s=s, seed=os.path.basename(os.path.normpath(d)), stack=sl, stack_mlm=sm, identity=il,
                             identity_mlm=im, gap=il - sl, gap_mlm=im - sm, shallow_mix=st["shallow_mixture_js"],
                             stack_pairs=st["final_pair_js"], identity_pairs=idt["final_pair_js"]))
    return rows


def spread(values: list) -> str:
    """'mean ± sample sd (min .. max)', or the one value."""
    if len(values) == 1:
        return f"{values[0]:+.3f}"
    return (f"{statistics.mean(values):+.3f} ± {statistics.stdev(values):.3f} "
            f"({min(values):+.3f} .. {max(values):+.3f})")


def tables(rows: list) -> str:
    lines = ["| s | seed | stack final (MLM) | identity final (MLM) | gap (MLM) | shallow heads: JS from local + [CLS] "
             "| final JS(layer i, i + L): stack | identity |", "|" + "---|" * 8]
    lines += [f"| {r['s']} | {r['seed']} | {r['stack']:.3f} ({r['stack_mlm']:.3f}) | {r['identity']:.3f} "
              f"({r['identity_mlm']:.3f}) | {r['gap']:+.3f} ({r['gap_mlm']:+.3f}) | {r['shallow_mix']:.3f} | "
              f"{r['stack_pairs']:.3f} | {r['identity_pairs']:.3f} |" for r in sorted(rows, key=lambda r: (r["s"], r["seed"]))]
    lines += ["", "| s | seeds | gap: mean ± sd (min .. max) | MLM gap | shallow heads' JS, mean | final pairs' JS, stack / identity |",
              "|" + "---|" * 6]
    for s in sorted({r["s"] for r in rows}):
        rs = [r for r in rows if r["s"] == s]
        mean = lambda k: statistics.mean(r[k] for r in rs)
        lines.append(f"| {s} | {len(rs)} | {spread([r['gap'] for r in rs])} | {spread([r['gap_mlm'] for r in rs])} | "
                     f"{mean('shallow_mix'):.3f} | {mean('stack_pairs'):.3f} / {mean('identity_pairs'):.3f} |")
    return "\n".join(lines)


def plot(rows: list, path: str):
    """The gap against s: one curve per seed, and the mean over seeds."""
    series = {seed: sorted((r["s"], r["gap"]) for r in rows if r["seed"] == seed) for seed in sorted({r["seed"] for r in rows})}
    points = sorted({r["s"] for r in rows})
    series["mean"] = [(s, statistics.mean(r["gap"] for r in rows if r["s"] == s)) for s in points]
    train.svg_plot(series, path, "steps of the half-depth model before it grows (s)",
                   "final val loss: identity - stack", "Stack or identity from one checkpoint: stacking's lead",
                   hline=(0.0, "no difference"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("dirs", nargs="+", help="compare.py --ablation output folders, one per seed")
    p.add_argument("--out", default=".", help="folder for identity_test.md and identity_test.svg")
    a = p.parse_args(argv)
    rows = measure(a.dirs, (attention.SENTENCE_A, attention.SENTENCE_B))
    if not rows:
        raise SystemExit(f"error: no finished stack/identity pair (switch-<s> and switch-<s>-identity) in {', '.join(a.dirs)}")
    text = tables(rows)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "identity_test.md"), "w") as f:
        f.write(text + "\n")
    plot(rows, os.path.join(a.out, "identity_test.svg"))
    print(text)
    print(f"wrote {a.out}/identity_test.md and identity_test.svg")


if __name__ == "__main__":
    main()
