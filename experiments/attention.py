"""Attention maps before and after stacking: the analogue of Gong et al. 2019, Figures 2 and 4.

From the runs of experiments/compare.py (or any train.py runs of methods stack and identity):
  attention.svg   heat-maps for one sentence pair: heads of the trained shallow model (stage 0 end), the
                  same heads in the top half just after stacking, after further training, and the top half
                  of the identity-grown model after the same training, for contrast
  attention.md    mean Jensen-Shannon divergences, a number the papers did not give:
                  - between layer i and layer i + L (L = the shallow depth), per head, averaged over heads and
                    query positions: how much a copied layer's attention still resembles its source;
                  - between each head and the best "local + [CLS]" mixture the stacking paper describes
                    (w * one-hot([CLS]) + (1 - w) * uniform over the query's neighbours i-1, i, i+1)

    python experiments/attention.py --stack-run runs/compare/stack --identity-run runs/compare/identity
"""

import argparse
import base64
import html
import math
import os
import struct
import sys
import zlib

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import data  # noqa: E402
import stack  # noqa: E402
import train  # noqa: E402

SENTENCE_A = "the old man walked slowly down to the harbour in the morning."
SENTENCE_B = "he sat by the water and watched the boats come in."


def load_model(path: str):
    """(model in eval mode, tokenizer) of a train.py checkpoint."""
    model, tok = train.model_from_checkpoint(train.load_checkpoint(path), path)
    return model.eval(), tok


def encode_pair(tok, a: str, b: str):
    """[CLS] a [SEP] b [SEP] as a batch of one, and the token strings for labels."""
    ids, types = data.bert_input(tok.encode(a), tok.encode(b))
    labels = [tok.decode([i]).strip() for i in ids]  # specials decode to their names
    return torch.tensor(ids)[None], torch.tensor(types)[None], labels


def maps_of(model, ids, types) -> np.ndarray:
    """(layers, heads, T, T) attention probabilities for one input."""
    return torch.stack(model.attention_maps(ids, types))[:, 0].double().numpy()


def js(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (nats) between distributions along the last axis."""
    m = (p + q) / 2

    def kl(x, y):
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1) / np.where(y > 0, y, 1)), 0.0).sum(-1)
    return (kl(p, m) + kl(q, m)) / 2


def layer_pair_js(maps: np.ndarray, L: int) -> float:
    """Mean JS between the heads of layer i and layer i + L, for i < L (all heads and query positions)."""
    return float(np.mean([js(maps[i], maps[i + L]).mean() for i in range(L)]))


def local_cls_mixture_js(head: np.ndarray, weights=np.linspace(0, 1, 21)) -> float:
    """JS of one head's (T, T) map from the closest w * [CLS] + (1 - w) * local-neighbourhood mixture."""
    T = head.shape[0]
    local = np.zeros((T, T))
    for i in range(T):
        local[i, max(0, i - 1):i + 2] = 1
    local /= local.sum(-1, keepdims=True)
    cls = np.zeros((T, T))
    cls[:, 0] = 1
    return float(min(js(head, w * cls + (1 - w) * local).mean() for w in weights))


def mixture_js(maps: np.ndarray, layers) -> float:
    return float(np.mean([local_cls_mixture_js(maps[i, h]) for i in layers for h in range(maps.shape[1])]))


def png_bytes(rgb: np.ndarray) -> bytes:
    """A (H, W, 3) uint8 image as PNG bytes: signature, IHDR, one zlib-compressed IDAT, IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter type 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def heat_png(m: np.ndarray) -> str:
    """A (T, T) attention map as a white-to-blue PNG, base64 for an SVG <image>. Square root of the
    weights, so that weak attention stays visible."""
    v = np.sqrt(np.clip(m, 0, 1))[..., None]
    rgb = (255 * (1 - v * np.array([1.0, 0.6, 0.0]))).astype(np.uint8)
    return base64.b64encode(png_bytes(rgb)).decode()


def heatmap_svg(panels: list, labels: list, path: str, title: str):
    """Rows of (row title, [(caption, (T, T) map), ...]) as an SVG grid of heat-maps (each a small PNG)."""
    T = len(labels)
    size, pad, left, top = 150, 24, 150, 48
    n_cols = max(len(row) for _, row in panels)
    W, H = left + n_cols * (size + pad), top + len(panels) * (size + pad + 14)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="{W}" height="{H}" fill="white"/>', f'<text x="10" y="20" font-size="14">{title}</text>',
           f'<text x="10" y="36" fill="#555">query rows, key columns; {T} tokens: {html.escape(" ".join(labels))}</text>']
    for r, (row_title, row) in enumerate(panels):
        y0 = top + r * (size + pad + 14) + 14
        out.append(f'<text x="8" y="{y0 + size / 2}">{row_title}</text>')
        for c, (caption, m) in enumerate(row):
            x0 = left + c * (size + pad)
            out.append(f'<text x="{x0}" y="{y0 - 3}">{caption}</text>')
            out.append(f'<image x="{x0}" y="{y0}" width="{size}" height="{size}" style="image-rendering:pixelated" '
                       f'preserveAspectRatio="none" href="data:image/png;base64,{heat_png(m)}"/>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.HelpFormatter)
    p.add_argument("--stack-run", default="runs/compare/stack", help="a train.py run of --method stack")
    p.add_argument("--identity-run", default="runs/compare/identity", help="a train.py run of --method identity")
    p.add_argument("--out", default="", help="output directory (default: the stack run's parent)")
    p.add_argument("--heads", type=int, default=2, help="heads shown per layer")
    p.add_argument("--sentence-a", default=SENTENCE_A, help="first segment")
    p.add_argument("--sentence-b", default=SENTENCE_B, help="second segment")
    a = p.parse_args(argv)
    out = a.out or os.path.dirname(os.path.normpath(a.stack_run))

    shallow, tok = load_model(os.path.join(a.stack_run, "stage0_end.pt"))
    L = shallow.config.n_layer
    stacked = stack.stack(shallow, 2 * L).eval()
    trained, _ = load_model(os.path.join(a.stack_run, "stage1_end.pt"))
    ident_shallow, _ = load_model(os.path.join(a.identity_run, "stage0_end.pt"))
    ident_grown = stack.identity(ident_shallow, 2 * L).eval()
    ident_trained, _ = load_model(os.path.join(a.identity_run, "stage1_end.pt"))
    final, _ = load_model(os.path.join(a.stack_run, "checkpoint.pt"))

    ids, types, labels = encode_pair(tok, a.sentence_a, a.sentence_b)
    m = {name: maps_of(model, ids, types) for name, model in [
        ("shallow", shallow), ("stacked", stacked), ("trained", trained),
        ("identity-grown", ident_grown), ("identity-trained", ident_trained), ("final", final)]}
    heads = range(min(a.heads, shallow.config.n_head))
    panels = [
        (f"{L}-layer, trained", [(f"L{i} H{h}", m["shallow"][i, h]) for i in range(L) for h in heads]),
        ("just after stacking", [(f"L{i + L} H{h}", m["stacked"][i + L, h]) for i in range(L) for h in heads]),
        ("stacked, trained on", [(f"L{i + L} H{h}", m["trained"][i + L, h]) for i in range(L) for h in heads]),
        ("identity, trained on", [(f"L{i + L} H{h}", m["identity-trained"][i + L, h]) for i in range(L) for h in heads]),
    ]
    heatmap_svg(panels, labels, os.path.join(out, "attention.svg"),
                f"Attention of layer i (top row) and of layer i + {L} after growing {L} -> {2 * L} layers")

    rows = [
        ("just after stacking", layer_pair_js(m["stacked"], L), mixture_js(m["stacked"], range(L, 2 * L))),
        ("stacked, after its stage of training", layer_pair_js(m["trained"], L), mixture_js(m["trained"], range(L, 2 * L))),
        ("identity, just after growth", layer_pair_js(m["identity-grown"], L), mixture_js(m["identity-grown"], range(L, 2 * L))),
        ("identity, after its stage of training", layer_pair_js(m["identity-trained"], L), mixture_js(m["identity-trained"], range(L, 2 * L))),
        (f"final {final.config.n_layer}-layer stacked model (pairs i, i + {final.config.n_layer // 2})",
         layer_pair_js(m["final"], final.config.n_layer // 2), mixture_js(m["final"], range(final.config.n_layer))),
    ]
    uniform = np.full_like(m["shallow"][0, 0], 1 / len(labels))
    lines = [f"Sentence pair: `{a.sentence_a}` / `{a.sentence_b}` ({len(labels)} tokens). Shallow model: {L} layers; "
             f"its own heads' JS from the local + [CLS] mixture: {mixture_js(m['shallow'], range(L)):.3f}. "
             f"For scale: uniform attention is {local_cls_mixture_js(uniform):.3f} from that mixture; JS is at most ln 2 = {math.log(2):.3f}.",
             "", "| model | JS(layer i, layer i + L) | JS(top-half heads, local + [CLS]) |", "|---|---|---|"]
    lines += [f"| {name} | {pair:.3f} | {mix:.3f} |" for name, pair, mix in rows]
    text = "\n".join(lines)
    with open(os.path.join(out, "attention.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    print(f"wrote {out}/attention.svg and attention.md")


if __name__ == "__main__":
    main()
