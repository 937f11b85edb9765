"""The project's test suite: `python -m pytest -q test_all.py` (CPU only, a few minutes on 2 cores).

Each test asserts a property that would catch a real bug: equivalence with a trusted reference
(HuggingFace's BertForPreTraining), an invariant an operator promises, a round trip, a loss going down.
Tests that need the optional reference packages (transformers) are skipped when those are missing.
"""

import contextlib
import json
import math
import os
import random
import re
import signal
import sys
from collections import Counter
from dataclasses import asdict, replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import bert
import data
import glue
import squad
import stack
from bert import IGNORE, Bert, BertConfig
from data import DataError

SMALL = dict(vocab_size=97, max_position=32, n_layer=3, n_head=4, d_model=32, d_ff=64)
# A `device` parameter value that is skipped without a GPU: `pytest -k cuda` runs the CUDA subset.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def random_batch(vocab=97, B=3, T=12, seed=0):
    """Random ids with different amounts of right padding per row, segments, MLM and NSP labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):
        mask[b, T - 3 * b:] = 0
    ids = ids * mask
    segments = (torch.arange(T) >= T // 2).long().expand(B, T) * mask
    labels = torch.where((torch.rand(B, T, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, IGNORE))
    labels[:, 1] = ids[:, 1]
    nsp = torch.randint(0, 2, (B,), generator=g)
    return dict(input_ids=ids, token_type_ids=segments, attention_mask=mask, mlm_labels=labels, nsp_labels=nsp)


def small_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Bert(BertConfig(**{**SMALL, **overrides})).eval()


# ----------------------------------------------------------------------------------------------------------
# bert.py


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_equal_to_huggingface(tmp_path, attn_implementation):
    """Same weights in our post-LN model and in transformers' BertForPreTraining give the same logits."""
    transformers = pytest.importorskip("transformers")
    ours = small_model()
    bert.save_hf(ours, str(tmp_path))
    theirs = transformers.BertForPreTraining.from_pretrained(str(tmp_path), attn_implementation=attn_implementation)
    theirs.eval()
    batch = random_batch()
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(a.mlm_logits[keep], b.prediction_logits[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        hf_loss = theirs(**inputs, labels=batch["mlm_labels"], next_sentence_label=batch["nsp_labels"]).loss
        our_loss = ours(**inputs, mlm_labels=batch["mlm_labels"], nsp_labels=batch["nsp_labels"]).loss
    torch.testing.assert_close(our_loss, hf_loss, atol=1e-5, rtol=1e-5)


def test_save_hf_loads_with_no_missing_keys(tmp_path):
    transformers = pytest.importorskip("transformers")
    bert.save_hf(small_model(), str(tmp_path))
    _, info = transformers.BertForPreTraining.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


def test_load_hf_reads_a_transformers_directory(tmp_path):
    """A directory written by transformers itself (model.safetensors, tied weights left out) loads back."""
    transformers = pytest.importorskip("transformers")
    hc = bert.hf_config(BertConfig(**SMALL))
    torch.manual_seed(1)
    theirs = transformers.BertForPreTraining(transformers.BertConfig(**hc)).eval()
    with torch.no_grad():
        theirs.cls.predictions.bias.normal_()  # a non-zero decoder bias, so a lost bias would show
    theirs.save_pretrained(str(tmp_path))
    ours = bert.load_hf(str(tmp_path)).eval()
    inputs = {k: v for k, v in random_batch().items() if k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        a, b = ours(**inputs), theirs(**inputs)
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(a.mlm_logits[keep], b.prediction_logits[keep], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.nsp_logits, b.seq_relationship_logits, atol=1e-5, rtol=1e-5)


def test_safetensors_reader_matches_torch_tensors(tmp_path):
    """read_safetensors recovers dtype, shape and values of tensors written by the safetensors package."""
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).view(2, 3),
               "c": torch.randn(5).to(torch.bfloat16), "empty": torch.zeros(0, 2), "empty_int": torch.zeros(0, dtype=torch.int64)}
    st.save_file(tensors, str(tmp_path / "x.safetensors"))
    back = bert.read_safetensors(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])


@pytest.mark.parametrize("pre_norm", [False, True])
def test_explicit_attention_path_matches_fast_path(pre_norm):
    """attention_maps' explicit softmax equals SDPA; maps sum to 1 and give padding zero weight."""
    model = small_model(pre_norm=pre_norm)
    batch = random_batch()
    inputs = {k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        fast, _, _ = model.encode(**inputs)
        slow, _, maps = model.encode(**inputs, need_weights=True)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(maps), torch.stack(model.attention_maps(**inputs)))
    assert len(maps) == model.config.n_layer
    pad = ~batch["attention_mask"].bool()
    for m in maps:
        B, T = batch["input_ids"].shape
        assert m.shape == (B, model.config.n_head, T, T)
        torch.testing.assert_close(m.sum(-1), torch.ones(B, model.config.n_head, T))
        assert torch.all(m.masked_select(pad.view(B, 1, 1, T)) == 0)  # no weight on padded keys


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_no_attention_mask_equals_an_all_ones_mask(pre_norm, device):
    """attention_mask=None (what train.py passes for a batch without padding, so that SDPA may use the flash
    kernel) gives the numbers of an all-ones mask, on the fast path and on the explicit one."""
    model = small_model(pre_norm=pre_norm).to(device)
    batch = {k: v[:1].to(device) for k, v in random_batch().items()}  # row 0 has no padding
    ones = torch.ones_like(batch["input_ids"])
    tolerance = dict(rtol=1e-5, atol=1e-6) if device == "cpu" else dict(rtol=1e-3, atol=1e-4)  # CUDA: other kernels
    with torch.no_grad():
        for need_weights in (False, True):
            masked = model.encode(batch["input_ids"], batch["token_type_ids"], ones, need_weights=need_weights)
            unmasked = model.encode(batch["input_ids"], batch["token_type_ids"], None, need_weights=need_weights)
            for a, b in zip(masked[:2] + tuple(masked[2]), unmasked[:2] + tuple(unmasked[2])):
                torch.testing.assert_close(a, b, **tolerance)
        torch.testing.assert_close(model(**dict(batch, attention_mask=ones)).loss, model(**dict(batch, attention_mask=None)).loss)


def padded_positions(labels, n: int):
    """(B, n) labelled positions of each row in order, padded with 0 ([CLS], never labelled), as data.Batches gives them."""
    out = torch.zeros(len(labels), n, dtype=torch.long)
    for row, label_row in enumerate(labels):
        where = (label_row != IGNORE).nonzero().flatten()
        out[row, :len(where)] = where
    return out


@pytest.mark.parametrize("positions", ["read from the labels", "given, padded"])
def test_sparse_mlm_equals_dense_head(positions):
    """The loss from the head run at labelled positions only (gathered by index, from the labels or from
    fixed-size padded mlm_positions) equals the head over every position, and the boolean-index loss."""
    model = small_model()
    batch = random_batch()
    labels = batch["mlm_labels"].clone()
    labels[:, 0] = IGNORE  # position 0 is [CLS], never labelled: the padding of mlm_positions
    batch["mlm_labels"] = labels
    if positions == "given, padded":
        batch = dict(batch, mlm_positions=padded_positions(labels, labels.shape[1] // 2 + 2))
    with torch.no_grad():
        out = model(**batch)
        full = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
        h, _, _ = model.encode(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    dense = torch.nn.functional.cross_entropy(full.mlm_logits.view(-1, SMALL["vocab_size"]), labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out.mlm_loss, dense)
    boolean = torch.nn.functional.cross_entropy(model.mlm_head(h[labels != IGNORE]), labels[labels != IGNORE])
    torch.testing.assert_close(out.mlm_loss, boolean)
    targets = labels.gather(1, batch.get("mlm_positions", bert.labelled_positions(labels)))
    torch.testing.assert_close(out.mlm_logits[targets != IGNORE], full.mlm_logits[labels != IGNORE])
    nsp = torch.nn.functional.cross_entropy(full.nsp_logits, batch["nsp_labels"])
    torch.testing.assert_close(out.loss, dense + nsp)


def test_output_structure_is_fixed():
    model = small_model()
    batch = random_batch()
    bare = model(batch["input_ids"])
    assert bare.loss is None and bare.mlm_loss is None and bare.nsp_loss is None
    assert bare.mlm_logits.shape == (*batch["input_ids"].shape, SMALL["vocab_size"]) and bare.nsp_logits.shape == (3, 2)
    only_nsp = model(batch["input_ids"], nsp_labels=batch["nsp_labels"])
    assert only_nsp.mlm_loss is None and torch.equal(only_nsp.loss, only_nsp.nsp_loss)


def test_shared_blocks_train_count_once_and_round_trip(tmp_path):
    """ALBERT-style sharing: one block at several depths trains, is counted once, and survives a checkpoint."""
    model = small_model(n_layer=4, group_size=2).train()
    assert model.layers[0] is model.layers[1] and model.layers[2] is model.layers[3]
    assert model.layers[1] is not model.layers[2]
    unshared = small_model(n_layer=2)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in unshared.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.layers[1].ffn.out.weight.detach().clone()
    model(**random_batch()).loss.backward()
    opt.step()
    assert not torch.equal(model.layers[0].ffn.out.weight, before)
    path = tmp_path / "ckpt.pt"
    torch.save({"config": asdict(model.config), "model": model.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    back = Bert(BertConfig(**ckpt["config"])).eval()
    back.load_state_dict(ckpt["model"])
    assert back.layers[0] is back.layers[1]
    batch = random_batch()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).loss, model(**batch).loss, rtol=0, atol=0)


def test_pre_ln_layer_with_zero_output_maps_is_identity():
    """The property the identity baseline relies on: zero output projections make a pre-LN layer x -> x."""
    model = small_model(pre_norm=True)
    block = model.layers[1]
    with torch.no_grad():
        for lin in (block.attn.out, block.ffn.out):
            lin.weight.zero_()
            lin.bias.zero_()
    x = torch.randn(2, 7, SMALL["d_model"])
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    y, _ = block(x, keep)
    assert torch.equal(y, x)


def test_initialisation_follows_bert():
    model = Bert(BertConfig(**{**SMALL, "d_model": 256, "d_ff": 512, "vocab_size": 3000}))
    for name, m in model.named_modules():  # torch's own Linear init would have std ~0.036 at fan-in 256
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            assert abs(m.weight.std().item() - 0.02) < 2e-3 and abs(m.weight.mean().item()) < 2e-3, name
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)) and m.bias is not None:
            assert torch.all(m.bias == 0), name
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1), name
    assert torch.all(model.mlm_bias == 0)
    out = model(**random_batch(vocab=3000))
    assert abs(out.mlm_loss.item() - math.log(3000)) < 0.5  # an untrained head is close to uniform


# ----------------------------------------------------------------------------------------------------------
# data.py

DATA_SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data")
REAL_FILES = sorted(
    [os.path.join("wikitext-2-raw", f) for f in ("wiki.valid.raw", "wiki.test.raw")]
    + [os.path.join("gutenberg", f) for f in (os.listdir(os.path.join(DATA_SHARED, "gutenberg"))
                                             if os.path.isdir(os.path.join(DATA_SHARED, "gutenberg")) else [])
       if f.endswith(".txt")]
    + [os.path.join("brown", "brown.txt")])


def data_quiet(*_):
    pass


# ---------------------------------------------------------------------------------------------------
# Tokenizer

@pytest.fixture(scope="module")
def real_tok():
    """A tokenizer trained on ~20 KB from each real corpus file (~350 KB in all)."""
    if not os.path.isdir(DATA_SHARED):
        pytest.skip("shared/data not present")
    texts = []
    for f in REAL_FILES:
        with open(os.path.join(DATA_SHARED, f), encoding="utf-8") as fh:
            texts += fh.read(20_000).splitlines()
    return data.Tokenizer.train(texts, 2000)


@pytest.mark.parametrize("name", REAL_FILES)
def test_round_trip_real_corpus(real_tok, name):
    with open(os.path.join(DATA_SHARED, name), encoding="utf-8") as f:
        text = f.read(200_000)
    ids = real_tok.encode(text)
    assert real_tok.decode(ids) == real_tok.normalize(text)
    assert min(ids) >= 5 and max(ids) < real_tok.vocab_size
    assert len(ids) < 0.5 * len(text)  # BPE compresses: well under one token per character


WEIRD_TEXTS = ["", " ", "\n\t\r", "\x00\x01\x1f\x7f", "emoji 😀👍🏽 🇺🇸 family 👨‍👩‍👧", "lone \ud800 surrogate \udfff",
         "Ünïcödé ŞTRASSE ß İstanbul", "zero\u200bwidth\u2028line\u3000ideographic", "日本語のテキスト", "مرحبا بالعالم",
         "'s 're 'S I'LL don't", "a  b\t\tc\n\nd \r\n e", "[MASK] [CLS] [SEP]", "x" * 3000, "١٢٣ ½ ² 𝟘𝟙"]


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("text", WEIRD_TEXTS)
def test_round_trip_never_crashes(text, lowercase):
    tok = data.Tokenizer.train(["hello world, the cat's mat", "Ünïcödé 😀 text"] * 3, 300, lowercase)
    ids = tok.encode(text)
    assert tok.decode(ids) == tok.normalize(text)
    assert all(5 <= i < tok.vocab_size for i in ids)  # text never produces specials


def test_round_trip_random_code_points():
    rng = np.random.default_rng(0)
    tok = data.Tokenizer.train(["some training text here"], 300)
    for _ in range(200):
        text = "".join(map(chr, rng.integers(0, 0x10FFFF, size=rng.integers(0, 30))))
        assert tok.decode(tok.encode(text)) == tok.normalize(text)


def test_normalize_known_answer():
    assert data.Tokenizer([], lowercase=True).normalize("  Hello\r\n  World ") == " hello world"
    assert data.Tokenizer([], lowercase=False).normalize("  Hello\r\n  World ") == " Hello World"
    assert data.Tokenizer([], prefix_space=False).normalize("  Hello\r\n  World ") == "hello world"  # v2
    assert data.Tokenizer([]).normalize(" \t ") == "" and data.Tokenizer([]).encode("") == []
    assert data.PRETOKEN.findall("the cat's 2 mats!") == ["the", " cat", "'s", " 2", " mats", "!"]


def test_save_load_and_checkpoint(tmp_path, real_tok):
    path = str(tmp_path / "tok.json")
    real_tok.save(path)
    loaded = data.Tokenizer.load(path)
    assert loaded.hash() == real_tok.hash() and loaded.vocab_size == real_tok.vocab_size
    assert json.load(open(path))["vocab"][real_tok.encode("the")[0]] == " the"  # readable
    torch.save({"tokenizer": real_tok.to_dict()}, tmp_path / "ckpt.pt")
    d = torch.load(tmp_path / "ckpt.pt", weights_only=True)["tokenizer"]
    text = "A sentence from the checkpoint."
    assert data.Tokenizer.from_dict(d).encode(text) == real_tok.encode(text)
    with pytest.raises(DataError):
        data.Tokenizer.from_dict(dict(d, version=99))
    # a tokenizer saved before v3 (no "prefix_space" field) keeps encoding without the space, as its model trained
    v2 = {k: v for k, v in dict(d, version=2).items() if k != "prefix_space"}
    old = data.Tokenizer.from_dict(v2)
    assert not old.prefix_space and old.to_dict() == dict(d, prefix_space=False)
    assert old.decode(old.encode(text)) == text.lower() and real_tok.decode(real_tok.encode(text)) == " " + text.lower()


def test_a_text_becomes_the_same_tokens_in_pre_training_glue_and_tokenizer_json(real_tok):
    """One convention, a space before every text (v3): RTE dev's fields give the same tokens encoded as the token
    cache encodes pre-training text (sentence by sentence, data.tokenize_documents), as glue.py encodes a field
    (whole) and as the exported tokenizer.json does. A v2 tokenizer (no space) differs at later sentences' starts."""
    path = os.path.join(DATA_SHARED, "glue", "RTE", "dev.tsv")
    if not os.path.exists(path):
        pytest.skip("shared GLUE data not present")
    task = glue.TASKS["RTE"]
    texts = [t for e in glue.read_tsv(task, path, task.labelled)[0][:100] for t in (e.text_a, e.text_b)]
    docs = [data.split_sentences(t) for t in texts]
    assert sum(len(d) > 1 for d in docs) > 20  # texts with later sentences, where the conventions differ
    assert real_tok.prefix_space  # a trained tokenizer takes the convention
    for tok in (real_tok, data.Tokenizer(real_tok.merges, prefix_space=False)):
        split = data.tokenize_documents(docs, tok)
        starts = split.sent_starts[split.doc_starts]
        pretraining = [split.tokens[a:b].tolist() for a, b in zip(starts, starts[1:])]
        fields = [ids[1:-1] for ids in glue.encode([glue.Example(t, None, 0, None) for t in texts], tok, 10**6, False).ids]
        agree = sum(p == f for p, f in zip(pretraining, fields, strict=True))
        assert agree == len(texts) if tok.prefix_space else agree < len(texts) - 20
    hf = hf_tokenizer(real_tok)
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == [real_tok.encode(t) for t in texts]


def merge_pair(ids: list, pair: tuple, new_id: int) -> list:
    """Replace every non-overlapping occurrence of `pair`, left to right: ([5, 6, 5, 6, 6], (5, 6), 9) -> [9, 9, 6]."""
    out, i = [], 0
    while i < len(ids):
        if tuple(ids[i:i + 2]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_merges(words: dict, n_merges: int) -> list:
    """Reference BPE: recount every pair of every word before each merge."""
    words = {tuple(w): c for w, c in words.items()}
    merges = []
    for k in range(n_merges):
        counts = Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += c
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))  # most frequent, then smallest ids
        if counts[pair] < 2:
            break
        merges.append(pair)
        merged = Counter()
        for w, c in words.items():
            merged[tuple(merge_pair(list(w), pair, data.N_BASE + k))] += c
        words = merged
    return merges


def bpe_words_of(texts):
    tok = data.Tokenizer([])
    counts = Counter(p for t in texts for p in data.PRETOKEN.findall(tok.normalize(t)))
    return {tuple(b + 5 for b in p.encode()): c for p, c in counts.items()}


@pytest.mark.parametrize("texts", [
    [" ".join(s) for s in data.synthetic_corpus(seed=1, n_docs=20)],
    ["aaaa abab baba aabb", "ab ab ab ba ba ba", "zzzz"],  # many ties
    ["low lower lowest newer wider new newest", "Ünïcödé 😀😀 text text"],
])
def test_incremental_bpe_equals_naive(texts):
    words = bpe_words_of(texts)
    assert data.learn_merges(words, 400) == naive_merges(words, 400)
    assert data.Tokenizer.train(texts, data.N_BASE + 400).merges == naive_merges(words, 400)


# ---------------------------------------------------------------------------------------------------
# HuggingFace export: train.py --export-hf, bert.save_hf / load_hf, data.Tokenizer.save_hf / from_hf


def hf_tokenizer(tok):
    """The tokenizers library's Tokenizer built from our tokenizer.json."""
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_str(json.dumps(tok.to_hf()))


def tricky_code_points(step=41):
    """Every assigned code point that is not a letter or private use (marks, numbers, punctuation, symbols,
    controls, spaces, format characters), every step-th letter, private-use and unassigned one, and Σ."""
    import unicodedata
    out = []
    for cp in range(0x110000):
        cat = unicodedata.category(chr(cp))
        if cat != "Cs" and (cat[0] not in "L" and cat not in ("Co", "Cn") or cp % step == 0):
            out.append(chr(cp))
    return out + ["Σ"]


@pytest.mark.parametrize("prefix_space", [True, False])
@pytest.mark.parametrize("lowercase", [True, False])
def test_pretokens_agree_with_the_tokenizers_library(lowercase, prefix_space):
    """Normalisation and pre-tokens of the exported tokenizer.json equal ours on ~40k code points, each between
    a letter, a digit, a contraction and a space (the classes Python's re and Oniguruma used to disagree on).
    Lower-casing excepted: the tokenizers library lower-cases a few dozen code points that this Python's
    (older) Unicode database has not assigned yet, so those are left out when lower-casing."""
    import unicodedata
    tok = data.Tokenizer([], lowercase, prefix_space=prefix_space)  # v3's space before each text, or v2's none
    hf = hf_tokenizer(tok)
    unbyte = {c: b for b, c in enumerate(data.BYTE_CHARS)}
    chars = [c for c in tricky_code_points() if not (lowercase and unicodedata.category(c) == "Cn")]
    texts = ["".join(f"a{c}1{c}'s{c} {c}x.{c}Σ" for c in chars[i:i + 50]) for i in range(0, len(chars), 50)]
    texts += ["cafe\u0301 नमस्ते ²½Ⅻ ΟΔΟΣ a\x1cb\x1fc\x85d\u2028e  \t f", "x__y _ '' 's 'S"]
    for text in texts:
        theirs = hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(text))
        assert [bytes(unbyte[c] for c in piece).decode() for piece, _ in theirs] == \
            tok.pretoken.findall(tok.normalize(text)), text
    assert data.PRETOKEN.findall("cafe\u0301 x²½ Ⅻ1 a_b") == ["cafe\u0301", " x", "²½", " Ⅻ1", " a", "_", "b"]


def test_ascii_pretokens_equal_the_full_pattern():
    """The fast pattern for ASCII text (data.ASCII_PRETOKEN) finds exactly the pre-tokens of PRETOKEN."""
    rng = random.Random(0)
    alphabet = [chr(i) for i in range(128)]
    texts = ["".join(rng.choices(alphabet, k=rng.randint(0, 60))) for _ in range(3000)]
    texts += ["don't stop: 3.14 pi's  x\ty\n_z", "  leading and trailing  ", "a1b2 'll 're've"]
    for text in texts:
        assert data.ASCII_PRETOKEN.findall(text) == data.PRETOKEN.findall(text), repr(text)
    tok = data.Tokenizer.train(["a b"], vocab_size=300)
    assert tok.pretokens("naïve café 1²") == data.PRETOKEN.findall("naïve café 1²")  # non-ASCII: the full pattern


def test_tokenizer_json_round_trips_and_rejects_others(tmp_path, real_tok):
    """save_hf -> load gives the same tokenizer, also after transformers saves it again; a foreign layout fails."""
    transformers = pytest.importorskip("transformers")
    real_tok.save_hf(str(tmp_path / "ours"), 128)
    assert data.Tokenizer.load(str(tmp_path / "ours" / "tokenizer.json")).hash() == real_tok.hash()
    transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours")).save_pretrained(str(tmp_path / "resaved"))
    assert data.Tokenizer.load(str(tmp_path / "resaved" / "tokenizer.json")).hash() == real_tok.hash()
    d = real_tok.to_hf()
    d["model"]["vocab"] = {k: (v + 1) % real_tok.vocab_size for k, v in d["model"]["vocab"].items()}
    with pytest.raises(DataError, match="not data.Tokenizer's layout"):
        data.Tokenizer.from_hf(d)
    with pytest.raises(DataError, match="not a tokenizer.json"):
        data.Tokenizer.from_hf({"model": {"type": "WordPiece"}})


def test_cache_of_an_earlier_tokenizer_version_is_rebuilt(tmp_path, data_corpus_file):
    """A cache whose tokenizer.json is v1 (Python's \\w classes), consistent with its header, is not reused."""
    cache = tmp_path / "cache"
    first = data_prep(data_corpus_file, cache)
    old = dict(first.tokenizer.to_dict(), version=1, pretoken_pattern=r" ?[^\W\d_]+| ?\d+|'(?:s|t|re|ve|m|ll|d)| ?(?:[^\w\s]|_)+")
    (cache / "tokenizer.json").write_text(json.dumps(old))
    header = json.loads((cache / "header.json").read_text())
    header["tokenizer_hash"] = data.hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    (cache / "header.json").write_text(json.dumps(header))
    again = data_prep(data_corpus_file, cache)
    assert not again.reused and again.tokenizer.to_dict()["version"] == data.Tokenizer.VERSION


def test_safetensors_writer_is_read_by_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64).view(2, 3),
               "c": torch.randn(5).to(torch.bfloat16), "d": torch.randn(4, 6)[:, ::2]}  # d: not contiguous
    bert.write_safetensors(str(tmp_path / "x.safetensors"), tensors)
    for back in (st.load_file(str(tmp_path / "x.safetensors")), bert.read_safetensors(str(tmp_path / "x.safetensors"))):
        assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_load_hf_reads_a_transformers_roberta_prelayernorm_folder(tmp_path):
    """A RobertaPreLayerNormForMaskedLM saved by transformers (pad_token_id 1: positions start at row 2)
    loads as a pre-LN Bert with equal MLM logits at the real tokens."""
    transformers = pytest.importorskip("transformers")
    hc = dict(bert.hf_config(BertConfig(**SMALL, pre_norm=True)), pad_token_id=1, max_position_embeddings=34)
    torch.manual_seed(1)
    theirs = transformers.RobertaPreLayerNormForMaskedLM(transformers.RobertaPreLayerNormConfig(**hc)).eval()
    with torch.no_grad():
        theirs.lm_head.bias.normal_()
        for m in theirs.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1, 0.1), m.bias.normal_(0, 0.1)  # so that a LayerNorm left out would show
    theirs.save_pretrained(str(tmp_path))
    ours = bert.load_hf(str(tmp_path)).eval()
    assert ours.config.pre_norm and ours.config.max_position == 32
    batch = random_batch()
    keep = batch["attention_mask"].bool()
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).mlm_logits
        b = theirs(input_ids=batch["input_ids"].masked_fill(~keep, 1), token_type_ids=batch["token_type_ids"],
                   attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a[keep], b[keep], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def real_sentences(per_corpus=2000) -> dict:
    """The first `per_corpus` sentences of each shared pre-training corpus (of its files read in turn)."""
    files = {"gutenberg": [f for f in REAL_FILES if f.startswith("gutenberg")], "brown": ["brown/brown.txt"],
             "wikitext": [f for f in REAL_FILES if f.startswith("wikitext")]}
    out = {}
    for corpus, names in files.items():
        sentences = []
        for name in names:
            with open(os.path.join(DATA_SHARED, name), encoding="utf-8") as f:
                text = f.read(400_000 // len(names))
            sentences += [s for p in text.split("\n\n") for s in data.split_sentences(p)]
        assert len(sentences) >= per_corpus, corpus
        out[corpus] = sentences[:per_corpus]
    return out


@pytest.fixture(scope="module")
def exported_runs(tmp_path_factory):
    """Two runs of a few steps on ~200 KB of real text, pre-LN ALBERT-MSLT (shared blocks) and post-LN
    stacking, each exported from checkpoint.pt and from stage0_end.pt."""
    import train
    if not os.path.isdir(DATA_SHARED):
        pytest.skip("shared/data not present")
    root = tmp_path_factory.mktemp("export")
    for name in REAL_FILES:
        with open(os.path.join(DATA_SHARED, name), encoding="utf-8") as f:
            data_write(root / "corpus", os.path.basename(name), f.read(12_000 if "gutenberg" in name else 40_000))
    runs, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)  # see one_thread
    for layout, flags in (("pre-LN", ["--method", "albert-mslt"]), ("post-LN", ["--method", "stack", "--post-norm"])):
        out = root / layout
        argv = TINY_RUN + flags + ["--steps", "6", "--vocab-size", "1000", "--corpus", str(root / "corpus"),
                                   "--cache-dir", str(root / "cache"), "--out", str(out), "--lr", "1e-2", "--eval-batches", "1"]
        assert train.main(argv) == 0
        for ckpt in ("checkpoint", "stage0_end"):
            assert train.main(["--export-hf", str(out / f"hf-{ckpt}"), "--checkpoint", str(out / f"{ckpt}.pt")]) == 0
        runs[layout] = out
    torch.set_num_threads(threads)
    return runs


def checkpoint_model(path):
    """(our model in eval mode, our tokenizer) of a train.py checkpoint."""
    ckpt = torch.load(path, weights_only=True)
    model = Bert(BertConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), data.Tokenizer.from_dict(ckpt["tokenizer"])


@pytest.mark.parametrize("layout", ["pre-LN", "post-LN"])
def test_exported_run_opens_in_transformers(exported_runs, real_sentences, layout, one_thread):
    """AutoModelForMaskedLM, AutoTokenizer and pipeline("fill-mask") on an exported run give our ids, our MLM
    logits (padded pairs, real tokens) and our top-5 predictions."""
    transformers = pytest.importorskip("transformers")
    folder = str(exported_runs[layout] / "hf-checkpoint")
    ours, tok = checkpoint_model(exported_runs[layout] / "checkpoint.pt")
    theirs, info = transformers.AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True)
    head_only = {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight", "cls.seq_relationship.bias"}
    assert not info["missing_keys"] and set(info["unexpected_keys"]) == (set() if layout == "pre-LN" else head_only)
    if layout == "post-LN":  # the whole BertForPreTraining, NSP head included
        _, info = transformers.AutoModelForPreTraining.from_pretrained(folder, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs.eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    sentences = real_sentences
    for corpus, texts in sentences.items():
        assert hf_tok(texts, add_special_tokens=False)["input_ids"] == [tok.encode(t) for t in texts], corpus
    odd = [t for t in WEIRD_TEXTS if not data.SURROGATE.search(t) and "[" not in t]  # "[MASK]" is a special there
    odd += ["tab\there", "many     spaces   ", "Ελληνικά ΟΔΟΣ", "cafe\u0301 ½ ²", "\u00a0nbsp\u3000"]
    assert hf_tok(odd, add_special_tokens=False)["input_ids"] == [tok.encode(t) for t in odd]

    a, b = ([s for s in sentences[c] if len(tok.encode(s)) < 40][:6] for c in ("brown", "wikitext"))
    batch = hf_tok(a, b, padding=True, return_tensors="pt")
    for row, (x, y) in enumerate(zip(a, b)):
        pair = [data.CLS, *tok.encode(x), data.SEP, *tok.encode(y), data.SEP]
        keep = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][keep].tolist() == pair
        assert batch["token_type_ids"][row][keep].tolist() == [0] * (len(tok.encode(x)) + 2) + [1] * (len(tok.encode(y)) + 1)
    assert not batch["attention_mask"].all()  # padding present
    with torch.no_grad():
        mine = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]).mlm_logits
        hers = theirs(**batch).logits
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(mine[keep], hers[keep], atol=1e-5, rtol=1e-5)

    fill = transformers.pipeline("fill-mask", model=folder, top_k=5)
    left, right = "the man went to the", "and bought some bread ."
    n_left = len(tok.encode(left))  # the sentence with one word masked: " and" keeps its space
    ids = [data.CLS, *tok.encode(left), data.MASK, *tok.encode(f"{left} {right}")[n_left:], data.SEP]
    for text in (f"{left} [MASK] {right}", f" {left.upper()}  [MASK]\t{right}"):
        assert hf_tok(text)["input_ids"] == ids, text
    with torch.no_grad():
        logits = ours(torch.tensor([ids])).mlm_logits[0, n_left + 1]
    assert [r["token"] for r in fill(f"{left} [MASK] {right}")] == logits.topk(5).indices.tolist()


@pytest.mark.parametrize("layout", ["pre-LN", "post-LN"])
@pytest.mark.parametrize("ckpt", ["checkpoint", "stage0_end"])
def test_export_round_trips_through_load_hf_and_glue(tmp_path, exported_runs, layout, ckpt, one_thread):
    """load_hf of an export equals the checkpoint's model exactly (shared blocks come back unshared; a pre-LN
    model has no pooler and NSP head there), and glue.py takes the folder as --checkpoint."""
    folder = str(exported_runs[layout] / f"hf-{ckpt}")
    ours, tok = checkpoint_model(exported_runs[layout] / f"{ckpt}.pt")
    back = bert.load_hf(folder).eval()
    assert asdict(back.config) == asdict(replace(ours.config, group_size=1))
    mine, theirs = bert.hf_state_dict(ours), bert.hf_state_dict(back)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    batch = random_batch(vocab=tok.vocab_size, T=16)
    with torch.no_grad():
        a = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
        b = back(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    assert torch.equal(a.mlm_logits, b.mlm_logits)
    if layout == "post-LN":
        assert torch.equal(a.nsp_logits, b.nsp_logits)
    backbone = glue.load_backbone(folder)
    assert backbone.tokenizer.hash() == tok.hash() and backbone.config == back.config
    separable_rte(tmp_path / "glue", n_train=32, n_dev=16)
    assert glue.main(["--checkpoint", folder, "--task", "RTE", "--glue-dir", str(tmp_path / "glue"), "--lrs", "1e-3",
                      "--seeds", "0", "--max-steps", "2", "--max-seq-len", "32", "--no-test", "--out", str(tmp_path / "out")]) == 0
    assert glue.load_runs(str(tmp_path / "out"))["RTE"]


def test_a_checkpoint_from_before_tokenizer_v3_keeps_its_convention(tmp_path, run_cache, one_thread):
    """A checkpoint saved before tokenizer v3 (a v2 tokenizer: no space before a text; no --long-seq-len in its
    flags) fine-tunes and exports with its own convention: glue.py's tokenizer and the exported tokenizer.json (no
    Prepend) give v2's ids. --resume refuses it in one line that says why."""
    import train
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path / "old"
    assert train.main(TINY_RUN + ["--method", "baseline", "--steps", "3", "--cache-dir", run_cache, "--out", str(out)]) == 0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    new_tok = data.Tokenizer.from_dict(ckpt["tokenizer"])
    ckpt["tokenizer"] = {k: v for k, v in dict(ckpt["tokenizer"], version=2).items() if k != "prefix_space"}
    ckpt["train_config"] = {k: v for k, v in ckpt["train_config"].items() if not k.startswith("long_")}
    torch.save(ckpt, out / "checkpoint.pt")
    text = "A vemo kires the tupas. The tupas kire a vemo."
    old_ids = data.Tokenizer(new_tok.merges, prefix_space=False).encode(text)
    assert old_ids != new_tok.encode(text)
    assert glue.load_backbone(str(out / "checkpoint.pt")).tokenizer.encode(text) == old_ids
    assert train.main(["--export-hf", str(tmp_path / "hf"), "--checkpoint", str(out / "checkpoint.pt")]) == 0
    exported = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    assert exported.encode(text, add_special_tokens=False).ids == old_ids
    with pytest.raises(SystemExit, match="another tokenizer .* begun before tokenizer v3") as e:
        train.main(["--resume", "--out", str(out)])
    one_line_error(e)


def test_export_errors_are_one_line(tmp_path):
    import train
    with pytest.raises(SystemExit, match="error: checkpoint .*missing.pt does not exist"):
        train.main(["--export-hf", str(tmp_path / "hf"), "--checkpoint", str(tmp_path / "missing.pt")])
    path = str(tmp_path / "old.pt")
    tiny_checkpoint(path, ["the cat sat on a mat"] * 3)
    ckpt = torch.load(path, weights_only=True)
    torch.save({**dict.fromkeys(train.CHECKPOINT_KEYS, 0), **ckpt, "format": train.CHECKPOINT_FORMAT,
                "version": train.CHECKPOINT_VERSION, "tokenizer": dict(ckpt["tokenizer"], version=1)}, path)
    with pytest.raises(SystemExit, match="error: .*old.pt: not a bert-byte-bpe v2 or v3 tokenizer"):
        train.main(["--export-hf", str(tmp_path / "hf"), "--checkpoint", path])


# ----------------------------------------------------------------------------------------------------------
# Files from elsewhere: checked before anything is built from them


def safetensors_file(path, header, length=None, data=bytes(8)):
    """A .safetensors file of `header` (any JSON) and `data`; `length` overrides the 8-byte header length."""
    head = json.dumps(header).encode()
    path.write_bytes((len(head) if length is None else length).to_bytes(8, "little") + head + data)
    return str(path)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def tiny_train_checkpoint(path) -> dict:
    """tiny_checkpoint in train.py's format (2 layers x 32, 274 tokens, 64 positions, 2 heads); its dict."""
    import train
    tiny_checkpoint(path, ["the cat sat on a mat"] * 3)
    ckpt = {**dict.fromkeys(train.CHECKPOINT_KEYS, 0), **torch.load(path, weights_only=True),
            "format": train.CHECKPOINT_FORMAT, "version": train.CHECKPOINT_VERSION}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("header, length, says", [
    ({"a": F32_2}, 2 ** 60, "header length 1152921504606846976 does not fit a file of"),
    ({"a": F32_2}, 2 ** 20, "header length 1048576 does not fit"),  # longer than the file
    ({"a": dict(F32_2, shape=[4, 4])}, None, "tensor 'a' is"),  # data_offsets hold fewer bytes than the shape needs
    ({"a": dict(F32_2, shape=[2 ** 40], data_offsets=[0, 2 ** 42])}, None,
     "tensor 'a': data_offsets [0, 4398046511104] lie beyond the 8 bytes of data"),
    ({"a": F32_2, "b": dict(F32_2, shape=[1], data_offsets=[4, 8])}, None, "tensor 'b': data_offsets [4, 8] overlap"),
    ({"a": dict(F32_2, data_offsets=[8, 0])}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, dtype="F33")}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, dtype=["F32"])}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, shape=[-2])}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, shape=[True, 2])}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, data_offsets=[0])}, None, "tensor 'a' is"),
    ({"a": dict(F32_2, shape=[1], data_offsets=[0, 4])}, None, "4 bytes after the last tensor's"),  # header cut short
    ([1, 2], None, "the header is not a JSON object"),
])
def test_safetensors_reader_refuses_damaged_files_before_allocating(tmp_path, header, length, says):
    """Each damage is one line naming file and tensor; a header asking for 2^60 bytes, or a tensor for 2^42,
    is refused without trying to allocate them (which ended in a MemoryError traceback)."""
    path = safetensors_file(tmp_path / "model.safetensors", header, length)
    with pytest.raises(ValueError) as e:
        bert.read_safetensors(path)
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_safetensors_reader_reads_empty_tensors_and_metadata(tmp_path):
    path = safetensors_file(tmp_path / "x.safetensors", {"__metadata__": {"format": "pt"}, "a": F32_2,
                            "e": {"dtype": "I64", "shape": [0, 3], "data_offsets": [8, 8]}},
                            data=torch.tensor([1.5, -2.0]).numpy().tobytes())
    back = bert.read_safetensors(path)
    assert torch.equal(back["a"], torch.tensor([1.5, -2.0])) and back["e"].shape == (0, 3)


@pytest.mark.parametrize("change, says", [
    (dict(n_layer=1_000_000), "config says 1000000 layers"),  # refused at once, nothing built
    (dict(n_layer=4000), "config says 4000 layers, the weights hold 2"),
    (dict(n_layer=4), "config says 4 layers, the weights hold 2"),
    (dict(d_model=64), "the weights' tok_emb.weight is torch.float32 [274, 32], the config's model has float [274, 64]"),
    (dict(vocab_size=30522), "the weights' mlm_bias is torch.float32 [274], the config's model has float [30522]"),
    (dict(max_position=512), "the weights' pos_emb.weight is torch.float32 [64, 32], the config's model has float [512"),
    (dict(n_head=3), "3 heads, d_model 32: want at most 4096 layers, whole groups, heads dividing d_model"),
    (dict(n_head=0), "config has n_head=0"),
    (dict(d_ff=-64), "config has d_ff=-64"),
    (dict(vocab_size=2 ** 60), "config has vocab_size=1152921504606846976"),  # overflowed the meta model's bytes
    (dict(n_layer="2"), "config has n_layer='2'"),
    (dict(dropout=float("nan")), "config has dropout=nan"),
    (dict(group_size=2), "the weights' layers.1.attn.qkv.weight differs from layers.0.attn.qkv.weight"),
    (dict(n_layers=2), "unexpected keyword argument 'n_layers'"),
])
def test_checkpoint_config_is_checked_against_its_weights_before_building(tmp_path, monkeypatch, change, says):
    """train.py --export-hf and glue.py (and so every loader of checkpoints: model_from_checkpoint) refuse a
    config at odds with its weights, or one no BERT has, in one line, before any model is built."""
    import train
    path = str(tmp_path / "ckpt.pt")
    ckpt = tiny_train_checkpoint(path)
    torch.save(dict(ckpt, config={**ckpt["config"], **change}), path)
    built = []
    init = bert.Bert.__init__
    monkeypatch.setattr(bert.Bert, "__init__", lambda self, c: built.append(c.n_layer) or init(self, c))
    for load in (lambda: train.main(["--export-hf", str(tmp_path / "hf"), "--checkpoint", path]),
                 lambda: glue.load_backbone(path)):
        with pytest.raises(SystemExit) as e:
            load()
        assert str(e.value.code).startswith(f"error: {path}: ") and says in str(e.value.code), e.value.code
        assert "\n" not in e.value.code
    assert max(built, default=0) <= 4 and not os.path.exists(tmp_path / "hf")  # the meta model of a 4-layer config


@pytest.mark.parametrize("change, says", [
    (dict(num_hidden_layers=1_000_000), "config says 1000000 layers"),
    (dict(num_hidden_layers=3), "config says 3 layers, the weights hold 2"),
    (dict(hidden_size=64), "query.weight is torch.float32 [32, 32], the config's model has float [64, 64]"),
    (dict(max_position_embeddings=66), "position_embeddings.weight is torch.float32 [64, 32], the config's model has "
                                       "float [66, 32]"),
    (dict(hidden_size="32"), "config has d_model='32'"),
    (dict(layer_norm_eps=None), "config has ln_eps=None"),
    (dict(model_type=["bert"]), "model_type ['bert']"),
    (dict(vocab_size=None, num_attention_heads=None), "config has vocab_size=None, n_head=None"),
])
def test_hf_folder_config_is_checked_against_its_weights(tmp_path, capsys, change, says):
    """bert.load_hf refuses a config.json at odds with model.safetensors in one line; glue.py says it so."""
    import train
    path = str(tmp_path / "ckpt.pt")
    tiny_train_checkpoint(path)
    train.export_hf(path, str(tmp_path / "hf"))
    with open(tmp_path / "hf" / "config.json") as f:
        hc = json.load(f)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hc, **change}))
    with pytest.raises(ValueError, match=re.escape(says)):
        bert.load_hf(str(tmp_path / "hf"))
    capsys.readouterr()
    assert glue.main(["--checkpoint", str(tmp_path / "hf"), "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'hf'}: ") and says in err and err.count("\n") == 1, err


def tokenizer_dict():
    return data.Tokenizer.train(["the cat sat on a mat", "a dog sat on the log"] * 3, vocab_size=290).to_dict()


@pytest.mark.parametrize("change, says", [
    (lambda d: d["merges"].append([5, 10_000]), "not two ids of pieces made before it"),
    (lambda d: d["merges"].insert(0, [5, 261]), "merge 0 is [5, 261], not two ids of pieces made before it (5 to 260)"),
    (lambda d: d["merges"].__setitem__(0, [-1, 5]), "merge 0 is [-1, 5]"),
    (lambda d: d["merges"].__setitem__(0, [0, 5]), "merge 0 is [0, 5]"),  # a special is never merged
    (lambda d: d["merges"].__setitem__(0, [5, 6, 7]), "merge 0 is [5, 6, 7]"),
    (lambda d: d.update(merges=17), "merges or pretoken_pattern are not a tokenizer's"),
    (lambda d: d.update(pretoken_pattern="(unclosed"), "missing ), unterminated subpattern"),
    (lambda d: d.update(pretoken_pattern=None), "merges or pretoken_pattern are not a tokenizer's"),
    (lambda d: d.update(specials=["[PAD]"]), "tokenizer with data.py's special tokens"),
    (lambda d: d.pop("version"), "not a bert-byte-bpe v2 or v3 tokenizer"),
])
def test_tokenizer_state_is_checked_on_load(change, says):
    d = tokenizer_dict()
    change(d)
    with pytest.raises(DataError, match=re.escape(says)):
        data.Tokenizer.from_dict(d)
    with pytest.raises(DataError, match="not a bert-byte-bpe"):
        data.Tokenizer.from_dict([1, 2])


def test_tokenizer_json_is_checked_and_its_size_must_be_the_models(tmp_path):
    """Merges of unknown pieces, a moved byte alphabet, ids out of range, another size: one DataError each;
    an extra key (a newer format field, say) is no error."""
    tok = data.Tokenizer.from_dict(tokenizer_dict())
    assert data.Tokenizer.from_dict(dict(tok.to_dict(), extra_field=1), tok.vocab_size).hash() == tok.hash()
    with pytest.raises(DataError, match=f"tokenizer has {tok.vocab_size} tokens, the model's vocabulary 30522"):
        data.Tokenizer.from_dict(tok.to_dict(), 30522)
    good = tok.to_hf()
    unknown, moved, out_of_range = json.loads(json.dumps(good)), json.loads(json.dumps(good)), json.loads(json.dumps(good))
    unknown["model"]["merges"][0] = "zzz qqq"
    moved["model"]["vocab"]["a"], moved["model"]["vocab"]["b"] = good["model"]["vocab"]["b"], good["model"]["vocab"]["a"]
    out_of_range["model"]["vocab"][good["model"]["merges"][0].split(" ")[0]] = 10 ** 9
    for d, says in ((unknown, "KeyError: 'zzz'"), (moved, "not data.Tokenizer's layout"),
                    (out_of_range, "not two ids of pieces made before it"), (dict(good, extra=[1]), None)):
        (tmp_path / "tokenizer.json").write_text(json.dumps(d))
        if says is None:
            assert data.Tokenizer.load(str(tmp_path / "tokenizer.json"), tok.vocab_size).hash() == tok.hash()
            continue
        with pytest.raises(DataError, match=re.escape(says)):
            data.Tokenizer.load(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer.json").write_text(json.dumps(good))
    with pytest.raises(DataError, match="the model's vocabulary 30522"):
        data.Tokenizer.load(str(tmp_path / "tokenizer.json"), 30522)


def test_fuzz_harness_sees_tracebacks_and_memory_blown_past_its_limit(tmp_path, experiments_on_path):
    """The fuzz test below would notice a failure: a traceback, a MemoryError at the address-space limit."""
    import fuzz_loaders
    (tmp_path / "raises.py").write_text("raise KeyError('x')\n")
    (tmp_path / "greedy.py").write_text("x = bytearray(8 << 30)\n")
    (tmp_path / "refuses.py").write_text("raise SystemExit('error: no')\n")
    forker = fuzz_loaders.Forker()
    try:
        seen = [fuzz_loaders.outcome(*forker.run([str(tmp_path / name)])) for name in ("raises.py", "greedy.py",
                                                                                       "refuses.py")]
    finally:
        forker.close()
    assert seen == ["traceback", "traceback", "refused"]
    assert fuzz_loaders.outcome(-9, "") == "crash" and fuzz_loaders.outcome("hang", "") == "hang"
    assert fuzz_loaders.outcome(-signal.SIGXCPU, "") == "hang"  # past the CPU-time limit
    assert fuzz_loaders.outcome(2, "error: a\nerror: b\n") == "other" and fuzz_loaders.outcome(0, "x") == "loaded"


def test_fuzzed_files_load_or_fail_in_one_line(tmp_path, experiments_on_path):
    """Seeded mutations of checkpoint.pt, model.safetensors, config.json and tokenizer.json, each loaded by
    train.py --export-hf, glue.py or squad.py in a process with limits of CPU time, wall time and memory: a correct
    load, or one `error:` line and exit status 1 or 2; never a traceback, crash, hang or memory blow-up. More in
    experiments/README.md."""
    import fuzz_loaders
    results = fuzz_loaders.fuzz(str(tmp_path), mutations=24, seed=0)
    failed = [r for r in results if r["outcome"] not in ("loaded", "refused")]
    assert not failed, failed
    assert {r["kind"] for r in results} == set(fuzz_loaders.KINDS)
    assert {r["entry"] for r in results} == {"glue.py", "squad.py", "train.py"}
    assert sum(r["outcome"] == "refused" for r in results) >= len(results) // 2  # the mutations do damage


# ---------------------------------------------------------------------------------------------------
# Readers

def data_write(tmp_path, name, content, mode="w"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "wb":
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


DATA_LINES = "The cat sat. It slept.\nThen it woke.\n\nA second doc.\nWith two lines.\n\nOnly one sentence.\n"


def test_blank_line_documents(tmp_path):
    docs, report = data.read_corpus([data_write(tmp_path, "a.txt", DATA_LINES)])
    assert docs == [["The cat sat.", "It slept.", "Then it woke."], ["A second doc.", "With two lines."]]
    assert report["skipped_short_documents"] == 1 and report["files_lines"] == 1


def test_crlf_bom_trailing_whitespace(tmp_path):
    messy = ("\ufeff" + DATA_LINES.replace("\n", "  \t\r\n")).encode("utf-8")
    docs, _ = data.read_corpus([data_write(tmp_path, "messy.txt", messy, "wb")])
    assert docs == data.read_corpus([data_write(tmp_path, "clean.txt", DATA_LINES)])[0]


def test_wikitext(tmp_path):
    raw = (" \n = Lobster = \n \n Homarus is a lobster . It is blue .\n \n = = Description = = \n \n"
           " It grows to 60 cm . \n = Second article = \n \n First . Second .\n = Stub = \n \n Just one .\n")
    docs, report = data.read_corpus([data_write(tmp_path, "wiki.test.raw", raw)])
    assert docs == [["Homarus is a lobster .", "It is blue .", "It grows to 60 cm ."], ["First .", "Second ."]]
    assert report["files_wikitext"] == 1 and report["skipped_short_documents"] == 1
    # the content decides for a .txt name too
    assert data.read_corpus([data_write(tmp_path, "wiki.txt", raw)])[0] == docs


def test_jsonl(tmp_path):
    lines = [json.dumps({"text": "One doc. Two sentences."}), "",
             json.dumps({"text": "Para one.\n\nPara two. Three.", "id": 7})]
    docs, report = data.read_corpus([data_write(tmp_path, "d.jsonl", "\n".join(lines))])
    assert docs == [["One doc.", "Two sentences."], ["Para one.", "Para two.", "Three."]]
    assert report["files_jsonl"] == 1


def test_book_layout_and_folder(tmp_path):
    book = "[A Book]\n\nCHAPTER I\n\nIt was a dark\nnight. Rain fell\non the roof.\n\nMr. Holmes said no.\n"
    data_write(tmp_path, "corpus/books/b.txt", book)
    data_write(tmp_path, "corpus/news/n.txt", DATA_LINES)
    data_write(tmp_path, "corpus/extra.jsonl", json.dumps({"text": "J one. J two."}))
    data_write(tmp_path, "corpus/README", "not a corpus file")
    docs, report = data.read_corpus([str(tmp_path / "corpus")])
    assert docs[0] == ["[A Book]", "CHAPTER I", "It was a dark night.", "Rain fell on the roof.", "Mr. Holmes said no."]
    assert len(docs) == 4 and (report["files_book"], report["files_lines"], report["files_jsonl"]) == (1, 1, 1)


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "empty"),
    ("blank.txt", b"\xef\xbb\xbf  \n\r\n", "empty"),
    ("latin1.txt", "Caf\u00e9 au lait. Good.".encode("latin-1"), "byte offset 3"),
    ("bad.jsonl", b'{"text": "ok. ok."}\n{"text": broken\n', r"bad.jsonl:2"),
    ("nofield.jsonl", b'{"body": "x. y."}\n', r"nofield.jsonl:1"),
])
def test_bad_files_name_the_file(tmp_path, name, content, match):
    path = data_write(tmp_path, name, content, "wb")
    with pytest.raises(DataError, match=match) as e:
        data.read_corpus([path])
    assert name in str(e.value)


def test_bad_paths_and_replace(tmp_path):
    (tmp_path / "empty_dir" / "sub").mkdir(parents=True)
    data_write(tmp_path, "empty_dir/sub/notes.md", "not text")
    with pytest.raises(DataError, match="empty_dir.*no text files"):
        data.read_corpus([str(tmp_path / "empty_dir")])
    with pytest.raises(DataError, match="missing.txt"):
        data.read_corpus([str(tmp_path / "missing.txt")])
    path = data_write(tmp_path, "latin1.txt", "Caf\u00e9 au lait. Good.".encode("latin-1"), "wb")
    assert data.read_corpus([path], decode_errors="replace")[0] == [["Caf\ufffd au lait.", "Good."]]


# ---------------------------------------------------------------------------------------------------
# Cache

@pytest.fixture
def data_corpus_file(tmp_path):
    docs = data.synthetic_corpus(seed=5, n_docs=200)
    return data_write(tmp_path, "corpus.txt", "\n\n".join("\n".join(d) for d in docs) + "\n")


def data_prep(corpus, cache, **kw):
    cfg = data.DataConfig(corpus=[corpus], cache_dir=str(cache), **{"vocab_size": 400, **kw})
    return data.prepare(cfg, progress=data_quiet)


def test_cache_reuse_and_rebuild(tmp_path, data_corpus_file):
    cache = tmp_path / "cache"
    first = data_prep(data_corpus_file, cache)
    second = data_prep(data_corpus_file, cache)
    assert not first.reused and second.reused
    assert isinstance(second.train.tokens, np.memmap)
    assert np.array_equal(first.train.tokens, second.train.tokens) and first.tokenizer.hash() == second.tokenizer.hash()
    assert second.report["documents"] == 200 and second.train.num_docs + second.valid.num_docs == 200
    assert 0 < second.unigram_entropy < math.log(second.tokenizer.vocab_size)
    assert not data_prep(data_corpus_file, cache, lowercase=False).reused
    assert not data_prep(data_corpus_file, cache, vocab_size=500).reused
    assert not data_prep(data_corpus_file, cache, seed=1).reused
    with open(data_corpus_file, "a") as f:
        f.write("\nA new document.\nWith two sentences.\n")
    rebuilt = data_prep(data_corpus_file, cache, seed=1)
    assert not rebuilt.reused and rebuilt.report["documents"] == 201


@pytest.mark.parametrize("damage", ["truncate_tokens", "drop_header", "swap_tokenizer"])
def test_damaged_cache_is_rebuilt(tmp_path, data_corpus_file, damage):
    cache = tmp_path / "cache"
    good = data_prep(data_corpus_file, cache)
    tokens = np.array(good.train.tokens)
    if damage == "truncate_tokens":
        path = cache / "train.tokens.npy"
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "drop_header":  # what an interrupted build leaves
        os.remove(cache / "header.json")
    else:
        data.Tokenizer.train(["other text entirely"], 300).save(str(cache / "tokenizer.json"))
    again = data_prep(data_corpus_file, cache)
    assert not again.reused and np.array_equal(again.train.tokens, tokens)
    assert data_prep(data_corpus_file, cache).reused


def test_given_tokenizer_rebuilds(tmp_path, data_corpus_file):
    cache = tmp_path / "cache"
    first = data_prep(data_corpus_file, cache)
    other = data.Tokenizer.train(["a much smaller training text"], 300)
    other.save(str(tmp_path / "other.json"))
    again = data_prep(data_corpus_file, cache, tokenizer=str(tmp_path / "other.json"))
    assert not again.reused and again.tokenizer.hash() == other.hash() != first.tokenizer.hash()


def test_corpus_too_small(tmp_path):
    path = data_write(tmp_path, "tiny.txt", "One doc. Two sentences.\n\nAnother doc. Yes.\n")
    with pytest.raises(DataError, match="usable documents"):
        data_prep(path, tmp_path / "cache")



# ---------------------------------------------------------------------------------------------------
# Cache: streaming build in chunks, worker processes, failures, statistics, torchrun

def data_mixed_corpus(tmp_path) -> str:
    """A folder with every format: lines, the same with BOM + CRLF, JSONL, WikiText, a wrapped book."""
    import textwrap
    docs = data.synthetic_corpus(seed=2, n_docs=160)
    lines = "\n\n".join("\n".join(d) for d in docs[:40]) + "\n"
    data_write(tmp_path, "mixed/a/lines.txt", lines)
    data_write(tmp_path, "mixed/a/crlf.txt", ("\ufeff" + lines.replace("\n", " \r\n")).encode(), "wb")
    data_write(tmp_path, "mixed/b.jsonl", "".join(json.dumps({"text": " ".join(d[:4]) + "\n\n" + " ".join(d[4:])})
                                                  + "\n" for d in docs[40:80]))
    data_write(tmp_path, "mixed/c.raw", "".join(f" = Article {i} = \n \n = = Part = = \n" + "".join(f" {s}\n" for s in d)
                                                for i, d in enumerate(docs[80:120])))
    data_write(tmp_path, "mixed/d.txt", "\n\n".join(textwrap.fill(" ".join(d), 50) for d in docs[120:160]) + "\n")
    return str(tmp_path / "mixed")


def test_chunked_reading_equals_whole_files(tmp_path, monkeypatch):
    """Cutting files into 1 KB chunks at document boundaries reads the same documents as whole files."""
    folder = data_mixed_corpus(tmp_path)
    whole = data.read_corpus([folder])
    assert whole[1] == {"documents": 161, "sentences": sum(map(len, whole[0])), "skipped_short_documents": 0,
                        "files_lines": 2, "files_jsonl": 1, "files_wikitext": 1, "files_book": 1}
    monkeypatch.setattr(data, "CHUNK_BYTES", 1024)
    assert len(list(data.corpus_chunks([folder]))) > 100
    assert data.read_corpus([folder]) == whole


def test_split_is_a_seeded_hash_per_document(tmp_path):
    """A document is for validation when split_score(seed, (file, line)) < 1/200, and at least 2 are."""
    def valid_ids(n_docs, seed):
        path = data_write(tmp_path, f"{n_docs}.txt", "".join(f"d{i} a.\nd{i} b.\n\n" for i in range(n_docs)))
        prep = data_prep(path, tmp_path / f"cache{n_docs}-{seed}", seed=seed)
        v, tok = prep.valid, prep.tokenizer
        assert prep.train.num_docs + v.num_docs == n_docs
        return [int(tok.decode(v.tokens[v.sent_starts[d]:v.sent_starts[d + 1]]).strip()[1:-3]) for d in v.doc_starts[:-1]]

    scores = {seed: [data.split_score(seed, (0, 3 * i + 1)) for i in range(1000)] for seed in (3, 4)}  # doc i: line 3i+1
    for seed in (3, 4):
        assert valid_ids(1000, seed) == [i for i, s in enumerate(scores[seed]) if s < 1 / 200]
    assert valid_ids(1000, 3) != valid_ids(1000, 4) and 2 <= len(valid_ids(1000, 3)) <= 15
    few = scores[3][:20]  # too few documents for 1/200: the two of lowest score
    assert valid_ids(20, 3) == sorted(sorted(range(20), key=few.__getitem__)[:2])


@pytest.mark.parametrize("max_pretokens", [1 << 20, 500])
def test_one_and_two_workers_write_identical_caches(tmp_path, monkeypatch, max_pretokens):
    """Byte-identical tokenizer, arrays and header from 1 and 2 workers (also when the count table is cut);
    the arrays hold every document; with the table uncut, BPE equals Tokenizer.train on the train split."""
    folder = data_mixed_corpus(tmp_path)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4096)
    caches = [tmp_path / f"w{w}" for w in (1, 2)]
    preps = [data_prep(folder, c, workers=w, max_pretokens=max_pretokens) for w, c in zip((1, 2), caches)]
    files = [sorted(set(os.listdir(c)) - {".build.lock"}) for c in caches]  # the lock holds its builder's pid
    assert files[0] == files[1] == sorted(
        ["header.json", "tokenizer.json"] + [f"{s}.{a}.npy" for s in ("train", "valid") for a in data.SPLIT_ARRAYS])
    for name in files[0]:
        assert (caches[0] / name).read_bytes() == (caches[1] / name).read_bytes(), name
    prep, tok = preps[0], preps[0].tokenizer
    decoded = sorted(tuple(tok.decode(sp.tokens[sp.sent_starts[s]:sp.sent_starts[s + 1]])
                           for s in range(sp.doc_starts[d], sp.doc_starts[d + 1]))
                     for sp in (prep.train, prep.valid) for d in range(sp.num_docs))
    assert decoded == sorted(tuple(map(tok.normalize, d)) for d in data.read_corpus([folder])[0])
    found = [doc for chunk in data.corpus_chunks([folder]) for doc in data.chunk_documents(chunk)[0]]
    train = [s for key, d in found if data.split_score(0, key) >= 1 / 200 for s in d]
    assert 2 <= len(found) - prep.train.num_docs == prep.valid.num_docs  # the plain 1/200 rule, no fallback
    assert (tok.merges == data.Tokenizer.train(train, 400).merges) == (max_pretokens > 2000)


def test_header_statistics_equal_a_direct_computation(tmp_path, data_corpus_file):
    prep = data_prep(data_corpus_file, tmp_path / "cache")
    counts = np.bincount(np.asarray(prep.train.tokens), minlength=prep.tokenizer.vocab_size)[len(data.SPECIALS):]
    p = counts[counts > 0] / counts.sum()
    assert prep.unigram_entropy == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert prep.majority_accuracy == pytest.approx(counts.max() / counts.sum(), rel=1e-12)
    header = json.loads((tmp_path / "cache" / "header.json").read_text())
    assert header["stats"] == {"unigram_entropy": prep.unigram_entropy, "majority_accuracy": prep.majority_accuracy}


def assert_no_usable_cache(cache):
    assert not (cache / "header.json").exists() and not [f for f in os.listdir(cache) if ".tmp" in f]


@pytest.mark.parametrize("bad", ["json", "utf-8"])
def test_bad_file_deep_in_the_corpus_fails_at_once_with_two_workers(tmp_path, monkeypatch, bad):
    """A bad line deep in file 9 of 12 stops the build with file and line (or byte offset) as soon as its
    chunk comes back: the chunks after it are not read, and no cache is left."""
    lines = [json.dumps({"text": f"Doc {i}. It has two sentences."}) + "\n" for i in range(300)]
    head, tail = "".join(lines[:250]).encode(), "".join(lines[250:]).encode()
    for f in range(12):
        data_write(tmp_path, f"corpus/f{f:02d}.jsonl", head + tail, "wb")
    if bad == "json":
        data_write(tmp_path, "corpus/f09.jsonl", head + b'{"text": "x. y."}\n{"text": broken\n' + tail, "wb")
        match = r"f09\.jsonl:252: expected a JSON object"
    else:
        data_write(tmp_path, "corpus/f09.jsonl", head + b'{"text": "\xe9t\xe9. Yes."}\n' + tail, "wb")
        match = f"f09.jsonl: not valid UTF-8 at byte offset {len(head) + 10}"
    read, chunks = [], data.corpus_chunks
    monkeypatch.setattr(data, "CHUNK_BYTES", 1024)
    monkeypatch.setattr(data, "corpus_chunks", lambda *a: (read.append(c) or c for c in chunks(*a)))
    with pytest.raises(DataError, match=match):
        data_prep(str(tmp_path / "corpus"), tmp_path / "cache", workers=2)
    at = next(i for i, c in enumerate(read) if c.path.endswith("f09.jsonl") and c.offset + len(c.raw) > len(head))
    assert len(read) <= at + 1 + 2 * 2 + 1 < len(list(chunks([str(tmp_path / "corpus")])))
    assert_no_usable_cache(tmp_path / "cache")


def test_a_worker_that_dies_ends_the_build(tmp_path, monkeypatch, data_corpus_file):
    folder = data_mixed_corpus(tmp_path)
    parent, read = os.getpid(), data.chunk_documents

    def die_on_jsonl(chunk, *args):
        if chunk.path.endswith(".jsonl") and os.getpid() != parent:
            os._exit(1)  # as the kernel's OOM killer would end it
        return read(chunk, *args)
    monkeypatch.setattr(data, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(data, "chunk_documents", die_on_jsonl)
    with pytest.raises(DataError, match=r"worker process died .* from (\S+) from byte \d+ \(line \d+\) on") as e:
        data_prep(folder, tmp_path / "cache", workers=2)
    files = data._corpus_files([folder])  # the chunk named is the oldest in flight: b.jsonl's or one before it
    assert files.index(e.value.args[0].split(" from ")[1]) <= files.index(os.path.join(folder, "b.jsonl"))
    assert_no_usable_cache(tmp_path / "cache")


def test_interrupted_build_leaves_no_usable_cache(tmp_path, monkeypatch, data_corpus_file):
    cache = tmp_path / "cache"
    first = data_prep(data_corpus_file, cache)
    encode = data.tokenize_documents

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "tokenize_documents", interrupt)  # Ctrl-C in pass 2
    with pytest.raises(KeyboardInterrupt):
        data_prep(data_corpus_file, cache, seed=1, workers=1)
    assert_no_usable_cache(cache)
    monkeypatch.setattr(data, "tokenize_documents", encode)
    left = cache / f"train.tokens.npy.tmp{dead_pid()}"
    left.write_bytes(b"left by a killed build")
    again = data_prep(data_corpus_file, cache)
    assert not again.reused and np.array_equal(again.train.tokens, first.train.tokens)
    assert not left.exists()


def test_a_second_process_waits_for_the_cache_build_then_reuses_it(tmp_path, data_corpus_file):
    """Two runs started at once on one --cache-dir: the second waits for the first's build (it used to remove the
    first's temporaries, ending it with "No such file or directory"), names its pid, then reuses the cache."""
    import subprocess
    import time
    cache = tmp_path / "cache"
    here = os.path.dirname(os.path.abspath(__file__))
    code = ("import sys, time, data\n"
            "cfg = data.DataConfig(corpus=[sys.argv[2]], cache_dir=sys.argv[1], vocab_size=400)\n"
            "with data._build_lock(sys.argv[1], print):  # as prepare holds it while it builds\n"
            "    print('locked', flush=True)\n    time.sleep(1.5)\n"
            "    data._build_cache(cfg, data._fingerprint(cfg), lambda *a: None)\n")
    first = subprocess.Popen([sys.executable, "-c", code, str(cache), data_corpus_file], cwd=here, text=True,
                             stdout=subprocess.PIPE)
    try:
        assert first.stdout.readline().strip() == "locked"
        messages, t0 = [], time.time()
        cfg = data.DataConfig(corpus=[data_corpus_file], cache_dir=str(cache), vocab_size=400)
        second = data.prepare(cfg, progress=messages.append)
        assert first.wait(timeout=60) == 0 and time.time() - t0 > 1
    finally:
        first.kill()
    assert messages[0] == f"waiting for process {first.pid}, which is building the token cache in {cache}"
    assert second.reused and messages[1] == f"reusing token cache in {cache}"


SLOW_BUILD_LAUNCHER = """
import datetime, sys, time
sys.path.insert(0, {here!r})
import torch.distributed as dist
import data, train
join = dist.init_process_group
dist.init_process_group = lambda *a, **k: join(*a, **k, timeout=datetime.timedelta(seconds=4))
build = data._build_cache
def slow_build(*args):
    time.sleep(8)  # twice the timeout: a rank waiting in a collective would fail
    return build(*args)
data._build_cache = slow_build
sys.exit(train.main(sys.argv[1:]))
"""


def test_torchrun_waits_for_a_build_longer_than_the_process_group_timeout(tmp_path):
    """2 gloo ranks with a 4 s process-group timeout; rank 0 builds the cache for 8+ s while rank 1 waits on
    the file system; training runs. A build that fails ends both ranks at once."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    launcher = tmp_path / "slow_build.py"
    launcher.write_text(SLOW_BUILD_LAUNCHER.format(here=here))

    def torchrun(name, *args):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               str(launcher), *TINY_RUN, "--method", "baseline", "--steps", "3", "--cache-dir", str(tmp_path / f"{name}-cache"),
                               "--out", str(tmp_path / name), *args], cwd=here, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    bad = data_write(tmp_path, "bad.jsonl", '{"text": "ok. ok."}\n{"text": broken\n')
    run = torchrun("bad", "--corpus", bad)
    output = run.stdout + run.stderr  # rank 0 says why; rank 1 ends too, not by the process group's timeout
    assert run.returncode != 0 and "error: " + bad + ":2" in output and "Timed out" not in output, output[-3000:]
    run = torchrun("ddp")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(train_losses(tmp_path / "ddp")) == [1, 2, 3]


# ---------------------------------------------------------------------------------------------------
# Batches

@pytest.fixture(scope="module")
def synthetic_split():
    docs = data.synthetic_corpus(seed=0, n_docs=300)
    tok = data.Tokenizer.train([s for d in docs for s in d], 600)
    return tok, data.tokenize_documents(docs, tok)


def batch_seps(batch):
    """Per row: position of the first and second [SEP]."""
    ids = batch["input_ids"].numpy()
    seps = [np.flatnonzero(row == data.SEP) for row in ids]
    assert all(len(s) == 2 for s in seps), "exactly two [SEP] per row"
    return np.array([s[0] for s in seps]), np.array([s[1] for s in seps])


@pytest.mark.parametrize("seq_len", [16, 64, 128])
def test_batch_invariants(synthetic_split, seq_len):
    tok, split = synthetic_split
    batch = data.Batches(split, tok, seq_len, seed=1).get(range(1500))
    assert all(v.dtype == torch.long for v in batch.values())
    ids, types, att, labels = (batch[k].numpy() for k in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels"))
    n = len(ids)
    assert ids.shape == types.shape == att.shape == labels.shape == (n, seq_len) and batch["nsp_labels"].shape == (n,)
    sep1, sep2 = batch_seps(batch)
    pos = np.arange(seq_len)[None]
    assert (ids[:, 0] == data.CLS).all() and (sep1 >= 2).all() and (sep2 >= sep1 + 2).all()
    assert np.array_equal(types, ((pos > sep1[:, None]) & (pos <= sep2[:, None])).astype(int))
    assert np.array_equal(att, (pos <= sep2[:, None]).astype(int)) and np.array_equal(att, (ids != data.PAD).astype(int))
    chosen = labels != data.IGNORE
    special = (pos == 0) | (pos == sep1[:, None]) | (pos == sep2[:, None]) | (att == 0)
    assert not (chosen & special).any() and (labels[chosen] >= 5).all()
    assert not ((ids == data.MASK) & ~chosen).any()
    eligible = sep2 - 2
    assert np.array_equal(chosen.sum(1), np.maximum(1, np.round(eligible * 0.15)))  # 15%, at least one
    # of the chosen: 80% [MASK], 10% a random ordinary token, 10% unchanged (4 sigma bounds)
    m = chosen.sum()
    frac_mask = (ids[chosen] == data.MASK).mean()
    frac_same = (ids[chosen] == labels[chosen]).mean()
    assert abs(frac_mask - 0.8) < 4 * math.sqrt(0.16 / m)
    assert abs(frac_same - 0.1 - 0.1 / tok.vocab_size) < 4 * math.sqrt(0.09 / m)
    assert ((ids[chosen] >= 5) | (ids[chosen] == data.MASK)).all()
    # NSP: half true continuations
    assert abs(batch["nsp_labels"].float().mean().item() - 0.5) < 4 * math.sqrt(0.25 / n)
    # most rows are full length (short_seq_prob = 0.1 of shorter targets; documents hold ~150 tokens)
    if seq_len <= 64:
        assert (sep2 == seq_len - 1).mean() > 0.8


def test_segments_come_from_the_right_places():
    """With token id = position in the corpus, every example shows where A and B were taken from."""
    rng = np.random.default_rng(0)
    sent_lens = rng.integers(1, 30, size=3000)
    doc_sizes = rng.integers(2, 12, size=600)
    doc_sizes = doc_sizes[np.cumsum(doc_sizes) <= len(sent_lens)]
    sent_starts = np.r_[0, np.cumsum(sent_lens[:doc_sizes.sum()])]
    split = data.Split(np.arange(5, 5 + sent_starts[-1]), sent_starts, np.r_[0, np.cumsum(doc_sizes)])
    tok = SimpleNamespace(vocab_size=int(5 + sent_starts[-1]))
    T = 64
    batch = data.Batches(split, tok, T, seed=0).get(range(2000))
    sep1, sep2 = batch_seps(batch)
    ids, labels = batch["input_ids"].numpy(), batch["mlm_labels"].numpy()
    orig = np.where(labels != data.IGNORE, labels, ids) - 5  # corpus positions
    doc_of_pos = np.searchsorted(split.doc_starts, np.searchsorted(sent_starts, np.arange(sent_starts[-1]), "right") - 1,
                                 "right") - 1
    for row in range(len(ids)):
        a, b = orig[row, 1:sep1[row]], orig[row, sep1[row] + 1:sep2[row]]
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all(), "segments are contiguous text"
        same_doc = doc_of_pos[a[0]] == doc_of_pos[a[-1]] == doc_of_pos[b[0]] == doc_of_pos[b[-1]]
        if batch["nsp_labels"][row] == 0:
            assert same_doc and b[0] > a[-1]
            if len(a) + len(b) < T - 3:  # not truncated: A starts a sentence, B follows A, B ends a sentence
                assert a[0] in sent_starts and b[0] == a[-1] + 1 and b[-1] + 1 in sent_starts
        else:
            assert doc_of_pos[a[0]] != doc_of_pos[b[0]]


@pytest.mark.parametrize("len_a,len_b,max_tokens", [(10, 3, 8), (6, 6, 8), (7, 6, 8), (3, 3, 8), (50, 49, 10), (1, 40, 5)])
def test_truncate_lengths_matches_bert_loop(len_a, len_b, max_tokens):
    a, b = len_a, len_b
    while a + b > max_tokens:  # BERT's truncate_seq_pair
        if a > b:
            a -= 1
        else:
            b -= 1
    assert data.truncate_lengths(len_a, len_b, max_tokens) == (a, b)


def test_determinism_and_rank_shares(synthetic_split):
    tok, split = synthetic_split
    batches = data.Batches(split, tok, 32, seed=7)
    full = batches.for_step(3, 16)
    for k, v in batches.for_step(3, 16).items():
        assert torch.equal(v, full[k])
    assert not torch.equal(batches.for_step(4, 16)["input_ids"], full["input_ids"])
    assert not torch.equal(data.Batches(split, tok, 32, seed=8).for_step(3, 16)["input_ids"], full["input_ids"])
    assert torch.equal(batches.get([50, 51])["input_ids"][1], batches.get([51])["input_ids"][0])  # per-example
    for world, n_micro in [(2, 1), (1, 2), (4, 2), (2, 4)]:
        parts = [batches.for_step(3, 16, rank, world, micro, n_micro) for rank in range(world) for micro in range(n_micro)]
        for k in full:
            assert torch.equal(torch.cat([p[k] for p in parts]), full[k]), (world, n_micro, k)
    with pytest.raises(DataError, match="not divisible"):
        batches.for_step(0, 10, world_size=4)


def test_mlm_positions_index_the_labels(synthetic_split):
    """mlm_positions lists each row's labelled positions in order, then pads with 0 ([CLS], never labelled)
    to a fixed max_predictions; gathering the labels by it finds every label once."""
    tok, split = synthetic_split
    batches = data.Batches(split, tok, 64, seed=3)
    batch = batches.get(range(300))
    labels, positions = batch["mlm_labels"], batch["mlm_positions"]
    assert positions.shape == (300, batches.max_predictions) == (300, round(61 * 0.15))
    for row in range(300):
        where = (labels[row] != IGNORE).nonzero().flatten()
        assert torch.equal(positions[row, :len(where)], where) and (positions[row, len(where):] == 0).all()
    assert (labels[:, 0] == IGNORE).all()
    assert torch.equal(labels.gather(1, positions)[labels.gather(1, positions) != IGNORE], labels[labels != IGNORE])


def test_batches_need_two_documents(synthetic_split):
    tok, split = synthetic_split
    one = data.Split(split.tokens[:split.sent_starts[2]], split.sent_starts[:3], np.array([0, 2]))
    with pytest.raises(DataError, match="document"):
        data.Batches(one, tok, 32, seed=0)


def test_synthetic_corpus_is_seeded():
    a, b = data.synthetic_corpus(seed=0, n_docs=50), data.synthetic_corpus(seed=1, n_docs=50)
    assert a == data.synthetic_corpus(seed=0, n_docs=50) and a != b
    assert all(len(d) >= 8 for d in a)
    words = Counter(w for d in a for s in d for w in s.lower().split())
    assert words["a"] > 0 and words["the"] > 0


def test_context_free_loss_known_answers():
    split = data.Split(np.array([5, 5, 6, 6], np.uint16), np.array([0, 2, 4]), np.array([0, 2]))
    assert data.context_free_loss(split, 10) == pytest.approx(math.log(2))
    scored = data.Split(np.array([5, 7], np.uint16), np.array([0, 2]), np.array([0, 1]))
    # counts of ids 5..9 in `split`, add-0.5 smoothed: 2.5, 2.5, 0.5, 0.5, 0.5 (sum 6.5)
    expected = -(math.log(2.5 / 6.5) + math.log(0.5 / 6.5)) / 2
    assert data.context_free_loss(split, 10, scored=scored) == pytest.approx(expected)


@pytest.mark.parametrize("change,match", [
    ({"tokenizer": "no/such/tokenizer.json"}, "tokenizer file not found"),
    ({"layout": "pages"}, "layout"),
    ({"seq_len": 4}, "too short"),
])
def test_prepare_config_errors(tmp_path, data_corpus_file, change, match):
    with pytest.raises(DataError, match=match):
        data_prep(data_corpus_file, tmp_path / "cache", **change)


# ----------------------------------------------------------------------------------------------------------
# stack.py

TINY = dict(vocab_size=97, max_position=32, n_head=4, d_model=32, d_ff=64)


def tiny_model(n_layer=3, seed=0, **overrides):
    """A small model in eval mode (no dropout), so outputs can be compared exactly."""
    torch.manual_seed(seed)
    return Bert(BertConfig(**{**TINY, "n_layer": n_layer, **overrides})).eval()


def tiny_batch(B=4, T=16, seed=0):
    """Random ids with padding in one row, segments, ~30% MLM labels and NSP labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - 5:] = 0
    labels = torch.where((torch.rand(B, T, generator=g) < 0.3) & mask.bool(), ids, torch.full_like(ids, IGNORE))
    labels[:, 1] = ids[:, 1]
    segments = (torch.arange(T) >= T // 2).long().expand(B, T) * mask
    return dict(input_ids=ids * mask, token_type_ids=segments, attention_mask=mask, mlm_labels=labels,
                nsp_labels=torch.randint(0, 2, (B,), generator=g))


def snapshot(model):
    """Detached copies of every parameter, keyed by the parameter object (shared blocks appear once)."""
    return {p: p.detach().clone() for p in model.parameters()}


def adamw_step(model, batch):
    """One AdamW step over the parameters that require grad, as train.py builds its optimizer."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    return loss


def assert_copy(new_layer, old_layer):
    """Every parameter equal in value, held in different storage (a copy, not a shared tensor)."""
    for p, q in zip(new_layer.parameters(), old_layer.parameters(), strict=True):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr()


# ---------------------------------------------------------------------------------------------------------
# Growth operators


@pytest.mark.parametrize("L,n", [(3, 6), (3, 12), (2, 8)])
def test_stack_copies_layer_j_mod_L(L, n):
    old = tiny_model(L, pre_norm=True)
    before = snapshot(old)
    new = stack.stack(old, n)
    assert new.config.n_layer == len(new.layers) == n and old.config.n_layer == len(old.layers) == L
    for j in range(n):
        assert_copy(new.layers[j], old.layers[j % L])
    assert len({id(layer) for layer in new.layers}) == n  # no two new layers share a block
    old_rest, new_rest = stack._non_layer_parameters(old), stack._non_layer_parameters(new)
    assert all(torch.equal(p, q) and p is not q for p, q in zip(new_rest, old_rest, strict=True))
    assert all(torch.equal(p, v) for p, v in before.items())  # the input model is untouched


def test_stacked_model_trains():
    """The stacked model trains, and its copies are independent: layer i and i + L part after one step, the
    old model is untouched."""
    old = tiny_model(3)
    before = {k: v.clone() for k, v in old.state_dict().items()}
    new, batch = stack.stack(old, 6).train(), tiny_batch()
    torch.manual_seed(0)
    opt = torch.optim.Adam(new.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = new(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(new.layers[0].ffn.inner.weight, new.layers[3].ffn.inner.weight)
    assert all(torch.equal(v, before[k]) for k, v in old.state_dict().items())


@pytest.mark.parametrize("n,group_size,message", [(3, 1, "not larger"), (2, 1, "not larger"), (8, 1, "not a multiple"),
                                                   (12, 3, "shares blocks")])
def test_stack_rejects(n, group_size, message):
    model = tiny_model(6 if group_size > 1 else 3, group_size=group_size)
    with pytest.raises(ValueError, match=message):
        stack.stack(model, n)


@pytest.mark.parametrize("n_new,message", [(0, "between 1 and"), (4, "between 1 and")])
def test_mslt_grow_rejects(n_new, message):
    with pytest.raises(ValueError, match=message):
        stack.mslt_grow(tiny_model(3), n_new)


@pytest.mark.parametrize("n", [6, 12])
def test_identity_is_function_preserving_in_pre_ln(n):
    old, batch = tiny_model(3, pre_norm=True), tiny_batch()
    del batch["mlm_labels"]
    new = stack.identity(old, n)
    for layer in new.layers[3:]:
        assert not any(p.any() for m in (layer.attn.out, layer.ffn.out) for p in m.parameters())
        assert layer.attn.qkv.weight.std() > 0.01  # the rest of the new layer is a fresh init, not zeros
    a, b = old(**batch), new(**batch)
    assert (a.mlm_logits - b.mlm_logits).abs().max() < 1e-6 and (a.nsp_logits - b.nsp_logits).abs().max() < 1e-6


def test_identity_noise_has_the_requested_std():
    big = dict(vocab_size=50, max_position=16, n_head=4, d_model=256, d_ff=1024, pre_norm=True)
    old = Bert(BertConfig(n_layer=1, **big)).eval()
    new = stack.identity(old, 2, noise_std=0.03, generator=torch.Generator().manual_seed(0))
    noise = torch.cat([p.flatten() for m in (new.layers[1].attn.out, new.layers[1].ffn.out) for p in m.parameters()])
    assert abs(noise.std().item() - 0.03) < 0.003 and abs(noise.mean().item()) < 0.001
    again = stack.identity(old, 2, noise_std=0.03, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.layers[1].ffn.out.weight, new.layers[1].ffn.out.weight)  # reproducible from the generator
    ids = torch.randint(5, 50, (2, 16))
    assert (old(ids).mlm_logits - new(ids).mlm_logits).abs().max() > 1e-3


@pytest.mark.parametrize("op,L,n,group_size", [("stack", 3, 6, 1), ("identity", 3, 12, 1), ("mslt", 3, 6, 1),
                                               ("mslt", 6, 8, 1), ("mslt", 6, 9, 3)])
def test_layer_sources_match_what_the_operators_copy(op, L, n, group_size):
    old = tiny_model(L, group_size=group_size)
    new = {"stack": lambda: stack.stack(old, n), "identity": lambda: stack.identity(old, n),
           "mslt": lambda: stack.mslt_grow(old, n - L)}[op]()
    sources = stack.layer_sources(op, L, n)
    assert len(sources) == n and sources[:L] == list(range(L))  # the trained layers stay at the bottom
    for j, s in enumerate(sources):
        if s is None:
            assert not torch.equal(new.layers[j].attn.qkv.weight, old.layers[j % L].attn.qkv.weight)
        else:
            assert_copy(new.layers[j], old.layers[s])


def test_layer_sources_known_answers():
    assert stack.layer_sources("stack", 3, 6) == [0, 1, 2, 0, 1, 2]
    assert stack.layer_sources("identity", 2, 4) == [0, 1, None, None]
    assert stack.layer_sources("mslt", 6, 9) == [0, 1, 2, 3, 4, 5, 3, 4, 5]
    assert stack.layer_sources("retrain", 2, 2) == [0, 1]


# ---------------------------------------------------------------------------------------------------------
# MSLT: frozen bottom, trainable top and output layer


def accumulated_parameters(loss):
    """The leaf tensors autograd would write .grad into, found by walking the graph from `loss`."""
    found, seen, todo = set(), set(), [loss.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(fn.variable)
        todo.extend(f for f, _ in fn.next_functions)
    return found


def test_mslt_freezes_the_bottom_and_trains_the_top():
    model = stack.set_trainable(stack.mslt_grow(tiny_model(3), 3).train(), 3)
    trainable = {p for p in model.parameters() if p.requires_grad}
    frozen = {p for p in model.parameters() if not p.requires_grad}
    top = set(model.layers[3:].parameters())
    output = {*model.mlm_dense.parameters(), *model.mlm_ln.parameters(), *model.nsp.parameters(),
              *model.pooler.parameters(), model.mlm_bias}
    assert trainable == top | output and model.tok_emb.weight in frozen and model.pos_emb.weight in frozen
    grad_seen = []
    for j, layer in enumerate(model.layers):
        layer.register_forward_hook(lambda m, args, out, j=j: grad_seen.append((j, out[0].requires_grad)))
    before, batch = snapshot(model), tiny_batch()
    loss = model(**batch).loss
    assert grad_seen == [(j, j >= 3) for j in range(6)]  # frozen layers build no graph
    assert accumulated_parameters(loss) == trainable  # backward reaches exactly the trainable parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    loss.backward()
    opt.step()
    assert all(p.grad is None and torch.equal(p, before[p]) for p in frozen)
    assert all(not torch.equal(p, before[p]) for p in trainable)


def test_pre_ln_output_layer_includes_final_ln():
    model = stack.set_trainable(tiny_model(3, pre_norm=True), 1)
    assert all(p.requires_grad for p in model.final_ln.parameters())
    assert not model.emb_ln.weight.requires_grad and not model.layers[1].ffn.out.weight.requires_grad


def test_mslt_schedule_freezes_embeddings_until_retrain():
    schedule = stack.make_schedule("mslt", total_steps=50, n_layer=8, k=4)
    model = Bert(stack.initial_config(schedule, BertConfig(**TINY)))
    assert all(p.requires_grad for p in model.parameters())  # stage 1 trains everything
    for i in range(1, len(schedule.stages)):
        model = stack.grow_to(model, schedule, i)
        stage = schedule.stages[i]
        assert model.config.n_layer == stage.n_layer
        if stage.grow == "mslt":
            assert not model.tok_emb.weight.requires_grad and stack.count_parameters(model)[0] < stack.count_parameters(model)[1]
            assert [any(p.requires_grad for p in l.parameters()) for l in model.layers] == [j >= stage.n_layer - 2 for j in range(stage.n_layer)]
    assert schedule.stages[-1].grow == "retrain" and all(p.requires_grad for p in model.parameters())
    assert "everything" in stack.trainable_summary(model)


def test_albert_groups_grow_by_a_copied_group_and_freeze_the_rest():
    old = tiny_model(6, group_size=3)
    assert old.layers[0] is old.layers[2] and old.layers[3] is old.layers[5] and old.layers[2] is not old.layers[3]
    new = stack.set_trainable(stack.mslt_grow(old, 3).train(), 3)
    assert new.config.n_layer == 9 and new.layers[6] is new.layers[7] is new.layers[8]
    assert new.layers[6] is not new.layers[3] and new.layers[3] is new.layers[5]
    assert_copy(new.layers[6], old.layers[3])
    before = snapshot(new)
    adamw_step(new, tiny_batch())
    for j in (0, 3):
        assert all(torch.equal(p, before[p]) for p in new.layers[j].parameters())
    assert all(not torch.equal(p, before[p]) for p in new.layers[6].parameters())
    with pytest.raises(ValueError, match="whole number of groups"):
        stack.mslt_grow(old, 2)
    with pytest.raises(ValueError, match="whole number of groups"):
        stack.set_trainable(new, 2)


# ---------------------------------------------------------------------------------------------------------
# Schedules


@pytest.mark.parametrize("total,parts", [(400, [50, 70, 280]), (1000, [125, 175, 700]), (401, [50, 70, 281])])
def test_stack_schedule_keeps_the_papers_proportions(total, parts):
    s = stack.make_schedule("stack", total)
    assert [st.steps for st in s.stages] == parts and s.total_steps == total
    assert [(st.n_layer, st.grow, st.trainable_top) for st in s.stages] == [(3, "init", None), (6, "stack", None), (12, "stack", None)]
    assert str(s) == f"stack: 3L x {parts[0]} -> 6L x {parts[1]} (stack) -> 12L x {parts[2]} (stack)"


def test_mslt_schedules():
    s = stack.make_schedule("mslt", 1000)
    assert [(st.n_layer, st.steps, st.grow, st.trainable_top) for st in s.stages] == [
        (3, 200, "init", None), (6, 200, "mslt", 3), (9, 200, "mslt", 3), (12, 200, "mslt", 3), (12, 200, "retrain", None)]
    a = stack.make_schedule("albert-mslt", 1000)
    assert a.group_size == 3 and a.stages == s.stages
    assert stack.initial_config(a, BertConfig(**TINY)).group_size == 3
    assert [st.grow for st in stack.make_schedule("identity-noise", 400).stages] == ["init", "identity-noise", "identity-noise"]


def test_stage_at_and_switch_steps():
    s = stack.make_schedule("stack", 400)
    assert s.switch_steps == [50, 120]
    assert [s.stage_at(t) for t in (0, 49, 50, 119, 120, 400)] == [(0, 0), (0, 0), (1, 50), (1, 50), (2, 120), (2, 120)]
    with pytest.raises(ValueError, match="outside"):
        s.stage_at(401)


def test_eta_weights_the_steps_left_by_their_stages_cost():
    """train.py's ETA: steps left counted at their stage's cost relative to the current stage (trainable layer 3,
    output layer 3, frozen layer 1), so that a stacking run's first stage does not promise a third of its time."""
    s = stack.parse_schedule("3:10,12:10:stack,15:10:mslt:3")  # costs 12, 39 and 3 x 4 + 12 = 24
    assert [s.step_cost(i) for i in range(3)] == [12, 39, 24]
    assert s.steps_left_at_cost_of(0, 0) == pytest.approx(10 + 10 * 39 / 12 + 10 * 24 / 12)
    assert s.steps_left_at_cost_of(0, 10) == pytest.approx(10 * 39 / 12 + 10 * 24 / 12)  # at a switch, as logged
    assert s.steps_left_at_cost_of(1, 14) == pytest.approx(6 + 10 * 24 / 39)
    assert s.steps_left_at_cost_of(2, 25) == 5 and s.steps_left_at_cost_of(2, 30) == 0
    baseline = stack.make_schedule("baseline", 100)
    assert [baseline.steps_left_at_cost_of(0, t) for t in (0, 60, 100)] == [100, 40, 0]
    # the last 4 steps at a longer sequence, each 2.5 of its stage's steps: counted so, and so measured once there
    long = replace(s, long_steps=4, long_cost=2.5)
    assert long.steps_left_at_cost_of(0, 0) == pytest.approx(10 + 10 * 39 / 12 + (6 + 4 * 2.5) * 24 / 12)
    assert long.steps_left_at_cost_of(2, 25) == pytest.approx(1 + 4 * 2.5)
    assert long.steps_left_at_cost_of(2, 27, long=True) == pytest.approx(3)
    assert stack.Schedule.from_dict(json.loads(json.dumps(long.to_dict()))) == long
    with pytest.raises(ValueError, match="not all in its last stage"):
        replace(s, long_steps=11)
    # a step's cost: T (6d + T) per sequence of T tokens, attention's T^2 included
    assert stack.length_cost(128, 512, 768) == pytest.approx(4 * (6 * 768 + 512) / (6 * 768 + 128))


@pytest.mark.parametrize("method", stack.METHODS)
def test_schedule_round_trips(method):
    s = stack.make_schedule(method, 1000)
    assert stack.parse_schedule(s.spec(), method=method, group_size=s.group_size) == s
    assert stack.Schedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_parse_schedule_per_stage_ops():
    s = stack.parse_schedule("3:100,6:100:identity,12:200:mslt:3", method="custom")
    assert [(st.grow, st.trainable_top) for st in s.stages] == [("init", None), ("identity", None), ("mslt", 3)]
    assert stack.parse_schedule("4:10,8:10:mslt").stages[1].trainable_top == 4  # mslt trains its new layers


@pytest.mark.parametrize("text,kwargs,message", [
    ("3:50,6:x", {}, "bad stage '6:x'"),
    ("3:50,5:70", {}, "multiple of the previous depth 3"),
    ("6:50,3:50", {}, "must grow the depth beyond 6"),
    ("3:50,6:50:grow", {}, "unknown grow 'grow'"),
    ("3:50,12:50:mslt", {}, "at most 3"),
    ("3:50,3:50:retrain:3", {}, "trainable_top=3"),
    ("3:50,6:0", {}, "positive"),
    ("3:50:mslt", {}, "first stage"),
    ("4:50,8:50:mslt", {"group_size": 3}, "not a multiple of group_size 3"),
    ("3:50,6:50:stack", {"group_size": 3}, "grouped models grow with mslt"),
])
def test_bad_schedules_fail_with_a_clear_message(text, kwargs, message):
    with pytest.raises(ValueError, match=message):
        stack.parse_schedule(text, **kwargs)


@pytest.mark.parametrize("text", ["3:2,6:2,12:2", "2:2,4:2,8:2", "3:2,12:2"])
def test_grow_to_any_depth_by_stacking(text):
    schedule = stack.parse_schedule(text)
    first = Bert(stack.initial_config(schedule, BertConfig(**TINY)))
    model = first
    for i in range(1, len(schedule.stages)):
        model = stack.grow_to(model, schedule, i)
    L = schedule.stages[0].n_layer
    assert model.config.n_layer == schedule.stages[-1].n_layer
    for j, layer in enumerate(model.layers):
        assert_copy(layer, first.layers[j % L])  # stacking twice is stacking once to the final depth


def test_grow_to_checks_the_model_matches_the_previous_stage():
    schedule = stack.parse_schedule("3:2,6:2,12:2")
    with pytest.raises(ValueError, match="the model has 3 layers"):
        stack.grow_to(tiny_model(3), schedule, 2)
    with pytest.raises(ValueError, match="stage 0"):
        stack.grow_to(tiny_model(3), schedule, 0)


# ----------------------------------------------------------------------------------------------------------
# train.py: LAMB


def lamb_by_the_paper(params, grads_per_step, lr, b1, b2, eps, wd, excluded):
    """You et al. 2019, Algorithm 2, transcribed directly in float64 numpy, one tensor at a time."""
    import numpy as np
    w = [p.detach().double().numpy().copy() for p in params]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        g = [x.double().numpy() for x in grads]
        for i in range(len(w)):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            m_hat, v_hat = m[i] / (1 - b1 ** t), v[i] / (1 - b2 ** t)
            r = m_hat / (np.sqrt(v_hat) + eps)
            if i in excluded:
                w[i] = w[i] - lr * r
                continue
            u = r + wd * w[i]
            w_norm, u_norm = np.linalg.norm(w[i]), np.linalg.norm(u)
            trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            w[i] = w[i] - lr * trust * u
    return w


@pytest.mark.parametrize("device,foreach", [("cpu", None), ("cpu", True), pytest.param("cuda", None, marks=CUDA.marks)])
@pytest.mark.parametrize("with_exclusions", [True, False])
def test_lamb_matches_the_paper(with_exclusions, device, foreach):
    import train
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64, device=device)),
              torch.nn.Parameter(torch.randn(5, dtype=torch.float64, device=device)),
              torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64, device=device))]  # zero weight: trust ratio 1
    excluded = {1} if with_exclusions else set()
    groups = [{"params": [p for i, p in enumerate(params) if i not in excluded], "weight_decay": 0.01, "trust": True},
              {"params": [p for i, p in enumerate(params) if i in excluded], "weight_decay": 0.0, "trust": False}]
    start = [p.detach().clone() for p in params]
    opt = train.Lamb(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-6, foreach=foreach)
    steps = [[torch.randn_like(p) for p in params] for _ in range(5)]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = lamb_by_the_paper([p.cpu() for p in start], [[g.cpu() for g in s] for s in steps], 0.01, 0.9, 0.999,
                                 1e-6, 0.01, excluded)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().cpu(), torch.from_numpy(e), rtol=1e-10, atol=1e-12)
    assert not torch.equal(params[2].detach(), start[2])  # the zero tensor moved (trust ratio fell back to 1)


# ----------------------------------------------------------------------------------------------------------
# train.py: resume, switches, DDP, flags

TINY_RUN = ["--preset", "tiny", "--device", "cpu", "--batch-size", "8", "--seq-len", "32", "--warmup", "2",
            "--log-every", "1", "--eval-every", "1000", "--eval-batches", "2", "--save-every", "1000", "--vocab-size", "300"]


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory):
    """One token cache (synthetic corpus) shared by the training tests."""
    return str(tmp_path_factory.mktemp("cache"))


def train_losses(out) -> dict:
    """{step: training loss} of a run's log, after checking that each step is logged once, in order."""
    import train
    rows = [r for r in train.read_log(str(out)) if "loss" in r]
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows}), "a step logged twice or out of order"
    return {r["step"]: r["loss"] for r in rows}


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, run_cache):
    """Stops at a switch boundary, one step after a switch, and mid-stage; each resume continues exactly."""
    import train
    args = TINY_RUN + ["--schedule", "3:3,6:3:identity-noise,12:4:stack", "--steps", "10", "--optimizer", "lamb",
                       "--cache-dir", run_cache]  # LAMB here; the SIGTERM test below resumes AdamW
    assert train.main(args + ["--out", str(tmp_path / "whole")]) == 0
    broken = ["--out", str(tmp_path / "broken")]
    assert train.main(args + broken + ["--stop-after", "3"]) == 0
    with open(tmp_path / "broken" / "log.jsonl", "a") as f:  # as if the run had logged step 4 and died before saving
        f.write(json.dumps({"step": 4, "loss": 123.0}) + "\n")
    for stop in ("4", "8", "0"):  # the other flags (schedule, cache, ...) come from the checkpoint
        assert train.main(broken + ["--resume", "--stop-after", stop]) == 0
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "broken")
    assert sorted(whole) == sorted(resumed) == list(range(1, 11))
    for step in whole:
        assert whole[step] == pytest.approx(resumed[step], rel=1e-6, abs=1e-6), step
    ckpt = train.load_checkpoint(str(tmp_path / "broken" / "checkpoint.pt"))
    assert ckpt["step"] == 10 and ckpt["config"]["n_layer"] == 12
    with pytest.raises(SystemExit, match=r"--lr: checkpoint 0\.002, now 0\.1"):  # a flag given anew must agree
        train.main(broken + ["--resume", "--lr", "0.1"])
    other = tmp_path / "other.txt"  # another corpus: another tokenizer, so the token ids would mean other things
    other.write_text("".join(f"Document {d} says {d} things. It ends here.\n\n" for d in range(50)))
    with pytest.raises(SystemExit, match="another tokenizer"):
        train.main(broken + ["--resume", "--corpus", str(other), "--cache-dir", str(tmp_path / "other-cache")])
    # the logged speed is tokens over training time (validation, saving and growth excluded, as in the wall) since
    # the last progress line or, when later, the last switch: a line's speed is its stage's
    speed = ["--schedule", "3:2,6:10,12:12", "--steps", "24", "--log-every", "8", "--eval-every", "5"]
    assert train.main(args + speed + ["--out", str(tmp_path / "speed")]) == 0
    records = train.read_log(str(tmp_path / "speed"))
    rows, wall_at = [r for r in records if "tokens_per_s" in r], {0: 0.0, **{r["step"]: r["wall"] for r in records}}
    assert [r["step"] for r in rows] == [8, 16, 24] and {2, 12} <= set(wall_at)  # validated at each switch
    for a, b in zip([{"step": 0}] + rows, rows):
        start = max([a["step"]] + [s for s in (2, 12) if s < b["step"]])
        tokens = (b["step"] - start) * 8 * 32
        assert b["tokens_per_s"] == pytest.approx(tokens / (b["wall"] - wall_at[start]), rel=0.1), (start, b)
    assert os.path.exists(tmp_path / "broken" / "stage1_end.pt") and os.path.exists(tmp_path / "whole" / "val_loss.svg")
    plots = tmp_path / "new" / "plots"  # --plot into a folder that does not exist yet: one curve per run
    assert train.main(["--plot", str(tmp_path / "whole"), str(tmp_path / "broken"), "--out", str(plots)]) == 0
    assert (plots / "val_loss.svg").read_text().count("<polyline") == 2


def svg_marks(path) -> tuple:
    """(polyline vertices of each curve, (cx, cy, label) of each circle) of an SVG that svg_plot wrote."""
    import re
    text = path.read_text()
    curves = [[tuple(map(float, p.split(","))) for p in pts.split()] for pts in re.findall(r'<polyline points="([^"]*)"', text)]
    circles = re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"[^>]*/>\n<text [^>]*>([^<]*)</text>', text)
    return curves, [(float(x), float(y), label) for x, y, label in circles]


def test_plots_mark_each_switch_on_its_run_curve(tmp_path, run_cache):
    """A run that grows twice: its val_loss.svg holds two marks, each on the curve's point of the validation
    just before that growth (3->6 at step 2, 6->12 at step 4), labelled with the growth; --plot marks each run."""
    import train
    args = TINY_RUN + ["--schedule", "3:2,6:2:identity,12:2:stack", "--steps", "6", "--cache-dir", run_cache]
    assert train.main(args + ["--out", str(tmp_path / "two")]) == 0
    [vals] = [[r["step"] for r in train.read_log(str(tmp_path / "two")) if "val_loss" in r]]
    assert vals == [2, 4, 6]  # validations at each switch and at the end only (--eval-every 1000)
    [curve], marks = svg_marks(tmp_path / "two" / "val_loss.svg")
    assert marks == [(*curve[0], "3\u21926 identity"), (*curve[1], "6\u219212 stack")]
    assert train.main(args + ["--method", "baseline", "--schedule", "", "--out", str(tmp_path / "flat")]) == 0
    assert train.main(["--plot", str(tmp_path / "two"), str(tmp_path / "flat"), "--out", str(tmp_path)]) == 0
    curves, marks = svg_marks(tmp_path / "val_loss.svg")
    assert len(curves) == 2 and [m[:2] for m in marks] == curves[0][:2]  # the baseline never grew: no mark
    assert [train.growth_label(*g) for g in [("mslt", 3, 6), ("retrain", 12, 12), ("stack", 6, 12)]] == \
        ["+3 mslt", "retrain", "6\u219212 stack"]
    same, pts = tmp_path / "same.svg", [(0, 1.0), (1, 0.5)]  # two runs that grew at one point
    train.svg_plot({"a": pts, "b": pts}, str(same), "x", "y", "t", marks={n: [(1, 0.5, "3\u21926 stack")] for n in "ab"})
    rows = re.findall(r'<text x="[\d.]+" y="([\d.]+)" fill="[^"]+" font-size="10">', same.read_text())
    assert len(rows) == 2 and abs(float(rows[0]) - float(rows[1])) >= 11  # their labels in two rows, not overprinted


def test_a_long_sequence_phase_keeps_model_and_optimizer_and_resumes_exactly(tmp_path, run_cache, one_thread):
    """--long-seq-len: the last --long-fraction of the steps take longer examples from the same token cache, with
    the same model and optimizer (no moment reset) and the learning rate on its one schedule. The switch is
    logged, and a run stopped after it resumes to the uninterrupted run's losses bit for bit."""
    import train
    args = TINY_RUN + ["--schedule", "3:3,12:7", "--steps", "10", "--long-seq-len", "48", "--long-fraction", "0.3",
                       "--cache-dir", run_cache]  # the last 3 steps (7, 8, 9) at 48 tokens
    assert train.main(args + ["--out", str(tmp_path / "whole")]) == 0
    broken = ["--out", str(tmp_path / "broken")]
    assert train.main(args + broken + ["--stop-after", "8"]) == 0
    assert train.main(broken + ["--resume"]) == 0
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "broken")
    assert list(whole) == list(range(1, 11)) and whole == resumed  # exactly equal
    records = train.read_log(str(tmp_path / "whole"))
    assert [(r["step"], r["seq_len"]) for r in records if "seq_len" in r] == [(7, 48)]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert lrs == pytest.approx([2e-3 * train.warmup_then_decay(s, 2, 10) for s in range(10)])
    ckpt = train.load_checkpoint(str(tmp_path / "whole" / "checkpoint.pt"))
    assert {s["step"].item() for s in ckpt["optimizer"]["state"].values()} == {7}  # moments since the growth at 3
    t = started_trainer(args + ["--out", str(tmp_path / "shapes")])
    assert [t.step_batches(s)[0]["input_ids"].shape[1] for s in (6, 7, 9)] == [32, 48, 48]
    assert t.model.config.max_position >= 48


def started_trainer(argv: list):
    """A one-process Trainer for TINY_RUN + argv, started (model, optimizer and data ready) but not run."""
    import train
    cfg, _, _ = train.parse_args(TINY_RUN + argv)
    t = train.Trainer(train.finish_config(cfg, world=1), train.Dist())
    t.start()
    return t


def test_resume_where_no_run_is_starts_one_and_says_so(tmp_path, run_cache, capsys):
    """--resume on a new folder (a mistyped --out, or a job script that always resumes) starts a run, saying so."""
    t = started_trainer(["--resume", "--steps", "20", "--cache-dir", run_cache, "--out", str(tmp_path / "new")])
    assert t.step == 0 and "holds no run yet: starting a new one" in capsys.readouterr().out


@pytest.mark.parametrize("save_every", [2, 5])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, run_cache, capsys, save_every):
    """A step whose loss is NaN (weights blown up, as after a divergence) ends the run with exit code 1
    before anything is saved: checkpoint.pt still holds step 2's finite weights (the last switch). The loss
    is read one step late (step 4's after step 5 is queued), but before any save: at once when step 4 saves."""
    import train
    t = started_trainer(["--steps", "6", "--save-every", str(save_every), "--cache-dir", run_cache, "--out", str(tmp_path)])
    real_step = t.train_step

    def diverging_step():
        if t.step == 3:
            with torch.no_grad():
                for p in t.model.parameters():
                    p.fill_(float("nan"))
        return real_step()

    t.train_step = diverging_step
    assert t.run() == 1
    assert "loss is nan at step 4" in capsys.readouterr().out
    ckpt = train.load_checkpoint(str(tmp_path / "checkpoint.pt"))
    assert ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_switch_resets_optimizer_keeps_lr_and_leaves_frozen_out(tmp_path, run_cache):
    import stack
    import train
    t = started_trainer(["--method", "mslt", "--steps", "10", "--cache-dir", run_cache, "--out", str(tmp_path)])
    cfg = t.cfg
    switch = t.schedule.switch_steps[0]
    lrs = []
    for _ in range(switch):
        lrs.append(t.train_step()["lr"])
        t.step += 1
    assert len(t.optimizer.state) == sum(len(g["params"]) for g in t.optimizer.param_groups)  # every parameter stepped
    t.grow(1)
    assert len(t.optimizer.state) == 0  # fresh moments, step 0
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    trainable = {id(p) for p in t.model.parameters() if p.requires_grad}
    frozen = {id(p) for p in t.model.parameters() if not p.requires_grad}
    assert in_opt == trainable and frozen and not (frozen & in_opt)
    assert id(t.model.tok_emb.weight) in frozen
    lrs.append(t.train_step()["lr"])
    expected = [train.get_lr(s, cfg, 0) for s in range(switch + 1)]
    assert lrs == pytest.approx(expected)  # the same continuous schedule through the switch
    assert all(s["step"].item() == 1 for s in t.optimizer.state.values())
    assert isinstance(t.schedule, stack.Schedule)


def test_carry_moments_copies_moments_into_copied_layers(tmp_path, run_cache):
    """--carry-moments (ablation): after stacking 3 -> 6, layers j and j + 3 start with copies of old layer
    j's Adam moments, each its own tensor; embeddings keep theirs too."""
    t = started_trainer(["--schedule", "3:2,6:2,12:2", "--steps", "6", "--carry-moments", "--cache-dir", run_cache,
                         "--out", str(tmp_path)])
    for _ in range(2):
        t.train_step()
        t.step += 1
    old, old_state = t.model, t.optimizer.state
    t.grow(1)
    new, state = t.model, t.optimizer.state
    for j in range(6):
        for p_new, p_old in zip(new.layers[j].parameters(), old.layers[j % 3].parameters()):
            assert torch.equal(state[p_new]["exp_avg"], old_state[p_old]["exp_avg"])
            assert state[p_new]["exp_avg"].data_ptr() != old_state[p_old]["exp_avg"].data_ptr()
    assert torch.equal(state[new.tok_emb.weight]["exp_avg_sq"], old_state[old.tok_emb.weight]["exp_avg_sq"])


def test_unreadable_or_foreign_checkpoint_is_named(tmp_path):
    import train
    garbage, foreign = tmp_path / "garbage.pt", tmp_path / "foreign.pt"
    garbage.write_bytes(b"not a zip file at all")
    torch.save({"x": torch.zeros(1)}, foreign)
    with pytest.raises(SystemExit, match="garbage.pt is not a readable checkpoint"):
        train.load_checkpoint(str(garbage))
    with pytest.raises(SystemExit, match="foreign.pt is not a checkpoint written by train.py"):
        train.load_checkpoint(str(foreign))


def test_pretraining_lr_known_answers():
    """Warm-up 2 of 10 steps, peak 1: ramps 0.5, 1, then falls linearly to 0 at step 10; --rewarmup 2 halves
    the first step after a switch at step 6 and leaves the second alone."""
    import train
    cfg = train.TrainConfig(lr=1.0, warmup=2, steps=10)
    assert [train.get_lr(s, cfg, 0) for s in (0, 1, 2, 6, 9)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.125])
    cfg = train.TrainConfig(lr=1.0, warmup=2, steps=10, rewarmup=2)
    assert [train.get_lr(s, cfg, 6) for s in (6, 7)] == pytest.approx([0.25, 0.375])


@pytest.mark.parametrize("module", ["data", "train", "glue", "squad"])
def test_help_shows_the_docstring_and_each_default_once(module):
    """--help of each command: the module docstring with its commands, each flag's default once (not twice where
    the help says it), and never an empty one ("(default: )", "(default: None)")."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    text = subprocess.run([sys.executable, f"{module}.py", "--help"], cwd=here, capture_output=True, text=True,
                          check=True).stdout
    assert f"python {module}.py" in text and "(default: " in text
    flat = " ".join(text.split())
    assert "(default: )" not in flat and "(default: None)" not in flat and "(default: [])" not in flat
    assert "(default: 10 for STS-B and RTE, 3 otherwise) (default" not in flat  # glue's --epochs


def test_bad_flags_fail_at_once_naming_them(tmp_path, monkeypatch):
    import train

    def no_trainer(*args):
        raise AssertionError("a Trainer was built: the flags were checked too late")

    monkeypatch.setattr(train, "Trainer", no_trainer)  # "at once": before any data or model is made
    for argv, flag in ([["--batch-size", "30", "--micro-batch", "4"], "--batch-size"],
                       [["--schedule", "3:50,6:50", "--steps", "100"], "--schedule"],
                       [["--method", "mslt", "--k", "5"], "--k"],
                       [["--warmup", "700"], "--warmup"]):
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", str(tmp_path)])
        assert flag in str(e.value), (argv, str(e.value))


def test_torchrun_two_processes_equal_one_process(tmp_path, run_cache):
    """2 gloo ranks x 4 examples give the losses of 1 process x 2 micro-batches of 4 (MSLT: frozen layers too)."""
    import subprocess
    import sys
    args = TINY_RUN + ["--method", "mslt", "--steps", "6", "--k", "2", "--dropout", "0", "--cache-dir", run_cache]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args,
                 "--out", str(tmp_path / "ddp")],
                ["train.py", *args, "--micro-batch", "4", "--out", str(tmp_path / "one")]):
        run = subprocess.run([sys.executable, *cmd], cwd=here, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(1, 7))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step


@pytest.mark.parametrize("module", ["data", "train"])
def test_ctrl_c_while_the_cache_builds_ends_in_one_line(tmp_path, module):
    """Ctrl-C (SIGINT) before training, while the token cache builds: one line saying what is kept and what to run,
    no traceback; the training loop's own handler (finish the step, save) is tested below."""
    import signal
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    out = ["--out", str(tmp_path / "cache")] if module == "data" else [
        "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")]
    default_sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background jobs ignore it
    proc = subprocess.Popen([sys.executable, "-u", f"{module}.py", *out], cwd=here, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=default_sigint)
    try:
        for line in proc.stdout:  # ends at EOF too, should the command fail before building
            if "building token cache" in line:
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and err.startswith("interrupted: ") and len(err.strip().splitlines()) == 1, err
    assert "with --resume" in err if module == "train" else "builds it again" in err


def test_ctrl_c_during_glue_says_the_finished_runs_are_kept(tmp_path, monkeypatch, capsys):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(glue, "finetune_all", interrupted)
    assert glue.main(["--checkpoint", str(tmp_path / "checkpoint.pt"), "--out", str(tmp_path / "glue")]) == 130
    assert capsys.readouterr().err.startswith("interrupted: each finished (lr, seed) run is kept")


def test_sigterm_saves_and_the_run_resumes(tmp_path, run_cache):
    """A real SIGTERM mid-run: the step finishes, a checkpoint is written, and --resume completes the run
    with the losses of an uninterrupted one."""
    import signal
    import subprocess
    import sys
    import time
    import train
    args = TINY_RUN + ["--schedule", "3:4,6:4,12:52", "--steps", "60", "--cache-dir", run_cache]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, "train.py", *args, "--out", cut], cwd=here, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = os.path.join(cut, "log.jsonl")
    deadline = time.time() + 600  # generous: on a busy machine building the token cache alone can take minutes
    while not (os.path.exists(log) and len(open(log).readlines()) >= 3):  # training (and its handler) has begun
        assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before its third log line"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, output
    stopped = train.load_checkpoint(os.path.join(cut, "checkpoint.pt"))["step"]
    assert 0 < stopped < 60, output
    assert train.main(args + ["--out", cut, "--resume"]) == 0
    assert train.main(args + ["--out", str(tmp_path / "whole")]) == 0
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(cut)
    assert sorted(resumed) == list(range(1, 61))
    assert all(whole[s] == pytest.approx(resumed[s], rel=1e-6, abs=1e-6) for s in whole)


# ----------------------------------------------------------------------------------------------------------
# No work lost: run-folder refusals, the lock, failed writes, one-line errors, failing ranks


def one_line_error(excinfo) -> str:
    """The message of a SystemExit a user sees: one line starting with 'error:'."""
    message = str(excinfo.value)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message, message
    return message


def dead_pid() -> int:
    """The pid of a process that has ended."""
    import subprocess
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_run_folder_without_its_checkpoint_is_refused_and_keeps_its_files(tmp_path, run_cache):
    """--resume where checkpoint.pt is gone or unreadable refuses, names the stage file to copy and
    --overwrite, and never advises deleting; copying the stage file as advised resumes; a plain start
    refuses too; --overwrite replaces the old run's files."""
    import shutil
    import train
    out = tmp_path / "run"
    args = TINY_RUN + ["--schedule", "3:2,6:2,12:2", "--steps", "6", "--cache-dir", run_cache, "--out", str(out)]
    assert train.main(args + ["--stop-after", "5"]) == 0
    log_before = (out / "log.jsonl").read_text()
    os.rename(out / "checkpoint.pt", tmp_path / "moved.pt")
    for argv in (["--out", str(out), "--resume"], args):
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        message = one_line_error(e)
        assert "log.jsonl" in message and "--overwrite" in message and "delet" not in message, message
    with pytest.raises(SystemExit) as e:
        train.main(["--out", str(out), "--resume"])
    assert f"copy {out / 'stage1_end.pt'} to {out / 'checkpoint.pt'}" in one_line_error(e)
    (out / "checkpoint.pt").write_bytes((tmp_path / "moved.pt").read_bytes()[:2000])  # cut short
    with pytest.raises(SystemExit, match="not a readable checkpoint") as e:
        train.main(["--out", str(out), "--resume"])
    assert "delet" not in one_line_error(e) and "stage1_end.pt" in str(e.value)
    assert (out / "log.jsonl").read_text() == log_before  # nothing was lost by the refusals
    shutil.copy(out / "stage1_end.pt", out / "checkpoint.pt")  # the advised way on: from the end of stage 1
    assert train.main(["--out", str(out), "--resume"]) == 0
    assert train_losses(out).keys() == set(range(1, 7))
    assert train.main(args + ["--overwrite", "--stop-after", "1"]) == 0  # the old run's files are replaced
    assert sorted(train_losses(out)) == [1] and not (out / "stage1_end.pt").exists()


def test_a_locked_run_folder_refuses_a_second_process_and_a_dead_holder_blocks_nothing(tmp_path, run_cache):
    """While another process holds <out>/.lock, train.py and glue.py fail at once naming it; once the holder
    is killed with -9 (its lock file stays behind), both go ahead."""
    import signal
    import subprocess
    import train
    out, here = tmp_path / "run", os.path.dirname(os.path.abspath(__file__))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, train\nwith train.locked_folder(sys.argv[1]):\n"
                               "    print('locked', flush=True)\n    time.sleep(120)", str(out)],
                              cwd=here, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit) as e:
                train.main(TINY_RUN + ["--steps", "6", "--cache-dir", run_cache, "--out", str(out)] + extra)
            assert f"{out} is in use by another process (pid {holder.pid})" in one_line_error(e)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (out / ".lock").read_text() == str(holder.pid)  # the stale lock file is still there
    assert train.main(TINY_RUN + ["--steps", "6", "--cache-dir", run_cache, "--out", str(out)]) == 0
    with train.locked_folder(str(tmp_path / "glue-out")):  # glue.py --out: the same protection
        with pytest.raises(SystemExit) as e:
            train.main(TINY_RUN + ["--out", str(tmp_path / "glue-out")])
        one_line_error(e)


def test_a_dead_batch_worker_stops_the_run_in_one_line():
    """A worker process killed (by the kernel's out-of-memory killer, say) ends the run with one line that
    says how to go on, not with a traceback from the process pool."""
    import train

    def build(step):
        if step == 1 and os.getpid() != parent:
            os._exit(9)  # the worker dies while building step 1
        return [{"x": torch.tensor(step)}]

    parent = os.getpid()
    prefetch = train.Prefetcher(build, end=3, worker_process=True)
    try:
        assert int(prefetch.get(0)[0]["x"]) == 0
        with pytest.raises(SystemExit) as e:
            prefetch.get(1)
        assert one_line_error(e).startswith("error: the process building the batches of step 1 died")
        assert "--resume" in str(e.value)
    finally:
        prefetch.pool.shutdown(cancel_futures=True)


def test_the_batch_worker_process_dies_with_its_run_and_frees_the_lock(tmp_path):
    """On CUDA the batches come from a forked worker process, which inherits the run folder's lock. Killed
    with -9, the training process cannot stop it; the worker must notice and exit, or it would keep the
    lock and refuse every --resume."""
    import contextlib
    import signal
    import subprocess
    import time
    import train
    out, here = tmp_path / "run", os.path.dirname(os.path.abspath(__file__))
    code = ("import os, sys, time, torch, train\nwith train.locked_folder(sys.argv[1]):\n"
            "    p = train.Prefetcher(lambda s: [{'pid': torch.tensor(os.getpid())}], end=3, worker_process=True)\n"
            "    print(int(p.get(0)[0]['pid']), flush=True)\n    time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=here, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(holder.stdout.readline())
        assert worker != holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    try:
        while True:
            try:
                with train.locked_folder(str(out)):
                    break
            except SystemExit as e:
                assert f"pid {holder.pid}" in str(e)  # still held by the worker, which inherited it
                assert time.time() < deadline, "the worker outlived its run by 10 s and keeps the lock"
                time.sleep(0.1)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)  # only alive if the test failed


def test_a_failed_write_leaves_no_temporary_and_names_the_last_good_checkpoint(tmp_path, run_cache, monkeypatch):
    """atomic_write removes its temporary on any error; a disk-full save (a real ENOSPC from /dev/full),
    a read-only filesystem and a denied permission end the run in one line naming the file and the last
    good checkpoint, which stays whole; temporaries of killed processes are cleared at start, a live
    process's are left alone."""
    import errno
    import train
    with pytest.raises(ZeroDivisionError):
        bert.atomic_write(str(tmp_path / "x.bin"), lambda f: f.write(b"half") and 1 / 0)
    assert os.listdir(tmp_path) == []
    stale, live = tmp_path / f"checkpoint.pt.tmp{dead_pid()}", tmp_path / f"log.jsonl.tmp{os.getpid()}"
    stale.write_bytes(b"x" * 1000)
    live.write_bytes(b"y")
    t = started_trainer(["--steps", "6", "--cache-dir", run_cache, "--out", str(tmp_path)])
    assert not stale.exists() and live.exists()
    live.unlink()
    ckpt = str(tmp_path / "checkpoint.pt")
    if os.path.exists("/dev/full"):
        os.symlink("/dev/full", f"{ckpt}.tmp{os.getpid()}")  # every write to it fails with ENOSPC
        t.step = 3
        with pytest.raises(SystemExit) as e:
            t.save()
        assert one_line_error(e) == (f"error: could not write {ckpt} (No space left on device); the last good "
                                     f"checkpoint is {ckpt} (step 0)")
        assert os.listdir(tmp_path) == ["checkpoint.pt"]  # the failed temporary is gone, the step-0 file stays
    for code in (errno.EROFS, errno.EACCES):
        def refuse(path, state, code=code):
            raise OSError(code, os.strerror(code), path)
        monkeypatch.setattr(train, "save_checkpoint", refuse)
        with pytest.raises(SystemExit) as e:
            t.save(str(tmp_path / "stage0_end.pt"))
        assert f"({os.strerror(code)}); the last good checkpoint is {ckpt} (step 0)" in one_line_error(e)
    assert train.load_checkpoint(ckpt)["step"] == 0


@pytest.mark.parametrize("argv, flag", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--dropout", "2"], "--dropout"),
    (["--eval-every", "0"], "--eval-every"), (["--save-every", "0"], "--save-every"), (["--log-every", "0"], "--log-every"),
    (["--vocab-size", "10"], "--vocab-size"), (["--warmup", "-1"], "--warmup"), (["--beta2", "1"], "--beta2"),
    (["--long-seq-len", "1024"], "--long-seq-len"), (["--long-seq-len", "16"], "--long-seq-len"),
    (["--long-seq-len", "64", "--long-fraction", "1"], "--long-fraction")])
def test_each_flag_out_of_range_fails_in_one_line_before_any_work(argv, flag, tmp_path, monkeypatch):
    import train

    def no_trainer(*args):
        raise AssertionError("a Trainer was built: the flags were checked too late")

    monkeypatch.setattr(train, "Trainer", no_trainer)
    with pytest.raises(SystemExit) as e:
        train.main(TINY_RUN + argv + ["--out", str(tmp_path / "run")])
    assert one_line_error(e).startswith(f"error: {flag} "), str(e.value)
    assert not (tmp_path / "run").exists()  # a refused run leaves no folder behind
    with pytest.raises(SystemExit), train.locked_folder(str(tmp_path / "ranks")):  # also where several ranks were
        (tmp_path / "ranks" / ".rank0-id").write_text("5eed")  # asked whether they see the folder (rank0_views)
        raise SystemExit("error: refused")
    assert not (tmp_path / "ranks").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file, not a folder") as e:
        train.main(TINY_RUN + ["--out", str(tmp_path / "file")])
    one_line_error(e)


@pytest.fixture(scope="module")
def bad_corpora(tmp_path_factory):
    """A missing path, an empty folder, a binary file, a Latin-1 file and an empty file."""
    folder = tmp_path_factory.mktemp("corpora")
    (folder / "empty-folder").mkdir()
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 20)
    text = "".join(f"Caf\u00e9 number {d} was good. It ended. Then came {d + 1}.\n\n" for d in range(8))
    (folder / "latin1.txt").write_bytes(text.encode("latin-1"))
    (folder / "empty.txt").write_bytes(b"")
    return folder


@pytest.mark.parametrize("name, says", [
    ("missing", "no such file or folder"), ("empty-folder", "no text files"),
    ("binary.txt", "not valid UTF-8 at byte offset 128"), ("latin1.txt", "not valid UTF-8 at byte offset 3"),
    ("empty.txt", "file is empty")])
def test_a_bad_corpus_fails_in_one_line_naming_the_file(name, says, bad_corpora, tmp_path):
    import train
    path = str(bad_corpora / name)
    with pytest.raises(SystemExit) as e:
        train.main(TINY_RUN + ["--steps", "6", "--corpus", path, "--cache-dir", str(tmp_path / "cache"),
                               "--out", str(tmp_path / "run")])
    assert one_line_error(e).startswith(f"error: {path}: ") and says in str(e.value), str(e.value)


def test_decode_errors_advice_works_and_a_too_large_vocabulary_is_reported(bad_corpora, tmp_path, capsys):
    """The non-UTF-8 message's advice, --decode-errors replace, is a train.py flag; a --vocab-size the
    corpus cannot fill is said, with the size reached."""
    t = started_trainer(["--steps", "6", "--corpus", str(bad_corpora / "latin1.txt"), "--decode-errors", "replace",
                         "--vocab-size", "5000", "--cache-dir", str(tmp_path / "cache"),
                         "--out", str(tmp_path / "run")])
    size = t.prepared.tokenizer.vocab_size
    assert size < 5000 and f"--vocab-size 5000 asked, but the corpus gives {size} tokens" in capsys.readouterr().out


def test_damaged_checkpoints_are_refused_in_one_line_and_never_unpickled(tmp_path, run_cache):
    """A checkpoint lacking keys, with weights of the wrong shape, a config of a million layers, or holding code
    to run: one line each (--resume checks the config against the weights before building), and the code never
    runs."""
    import train
    out = tmp_path / "run"
    args = TINY_RUN + ["--steps", "6", "--cache-dir", run_cache, "--out", str(out)]
    assert train.main(args + ["--stop-after", "1"]) == 0
    good = torch.load(out / "checkpoint.pt", weights_only=True)
    lacking = {k: v for k, v in good.items() if k != "optimizer"}
    misshapen = dict(good, model={**good["model"], "tok_emb.weight": torch.zeros(3, 3)})
    marker = tmp_path / "ran"

    class RunsCode:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    deep = dict(good, config={**good["config"], "n_layer": 1_000_000})  # would build a million layers before
    for ckpt, says in ((lacking, "lacks optimizer"), (misshapen, "the weights' tok_emb.weight is torch.float32 [3, 3]"),
                       (deep, "config says 1000000 layers"),
                       (dict(good, extra=RunsCode()), "holds Python objects other than tensors")):
        torch.save(ckpt, out / "checkpoint.pt")
        with pytest.raises(SystemExit) as e:
            train.main(["--out", str(out), "--resume"])
        assert says in one_line_error(e) and "weights_only" not in str(e.value), str(e.value)
    assert not marker.exists()


def test_resume_may_change_micro_batch_and_dtype(tmp_path, run_cache):
    """A run continues on another split of its global batch (as on another number of GPUs): same losses up
    to rounding."""
    import train
    args = TINY_RUN + ["--steps", "6", "--dropout", "0", "--cache-dir", run_cache]
    assert train.main(args + ["--out", str(tmp_path / "whole")]) == 0
    assert train.main(args + ["--out", str(tmp_path / "moved"), "--stop-after", "3"]) == 0
    assert train.main(["--out", str(tmp_path / "moved"), "--resume", "--micro-batch", "4", "--dtype", "float32"]) == 0
    whole, moved = train_losses(tmp_path / "whole"), train_losses(tmp_path / "moved")
    assert sorted(moved) == list(range(1, 7))
    assert all(whole[s] == pytest.approx(moved[s], rel=1e-5, abs=1e-5) for s in whole)


def test_torchrun_a_failing_rank_ends_every_rank_within_seconds_and_refusals_print_once(tmp_path, run_cache):
    """Rank 0's save fails at the first switch (its target is a folder) while rank 1 trains on: both end
    promptly with rank 0's one-line error, rather than rank 1 waiting out the process-group timeout. A bad
    flag under torchrun is printed once, not once per rank."""
    import subprocess
    import time
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    (out / "stage0_end.pt" / "blocked").mkdir(parents=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    args = TINY_RUN + ["--steps", "40", "--cache-dir", run_cache, "--out", str(out)]
    t0 = time.time()
    run = subprocess.run(torchrun + args, cwd=here, env=env, capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and time.time() - t0 < 120, output[-3000:]
    assert output.count(f"error: could not write {out / 'stage0_end.pt'} (Is a directory); the last good "
                        f"checkpoint is {out / 'checkpoint.pt'} (step 0)") == 1, output[-3000:]
    run = subprocess.run(torchrun + args + ["--lr", "nan"], cwd=here, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode != 0 and (run.stdout + run.stderr).count("error: --lr nan") == 1, run.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Across machines: two torchrun launchers on this machine act as two nodes. Node 1 may run in a mount namespace
# of its own with a tmpfs over some folders, so that its disk there really differs from node 0's.

NODE_LAUNCHER = """
import os, signal, sys, time
sys.path.insert(0, {here!r})
import data, train
node, first_try = os.environ["GROUP_RANK"], os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
build, step = data._build_cache, train.Trainer.train_step
def slow_build(*args):  # long enough for node 0 to be killed while it builds
    time.sleep(120)
    return build(*args)
def crashing_step(self):  # node 1's worker dies by SIGKILL in the middle of training, on the first try only
    if str(self.step) == os.environ.get("CRASH_AT_STEP") and node == "1" and first_try:
        os.kill(os.getpid(), signal.SIGKILL)
    return step(self)
if node == "0" and "SLOW_BUILD" in os.environ:
    data._build_cache = slow_build
train.Trainer.train_step = crashing_step
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture
def node_launcher(tmp_path):
    path = tmp_path / "node.py"
    path.write_text(NODE_LAUNCHER.format(here=os.path.dirname(os.path.abspath(__file__))))
    return path


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def needs_namespaces(tmp_path):
    """Skip unless this process may give a child its own mounts (root, or a kernel that lets users do it)."""
    import shutil
    import subprocess
    probe = tmp_path / "probe"
    probe.mkdir()
    cmd = ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", str(probe)]
    if shutil.which("unshare") is None or subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("this machine does not let a process mount a tmpfs in a namespace of its own (unshare -m)")


def start_nodes(tmp_path, script, args, nproc=1, static=False, node1_own=None, extra=(), env=None):
    """torchrun on two 'nodes' at once, `nproc` processes each, output in tmp_path/node<i>.log; their Popens.
    c10d rendezvous on 127.0.0.1, or static (--node-rank, --master-addr). Node 1 runs in its own mount namespace
    with a fresh tmpfs over each folder of `node1_own` ({folder: a folder to copy in, or None}): its own disk."""
    import shlex
    import subprocess
    port = free_port()
    here = os.path.dirname(os.path.abspath(__file__))
    nodes = []
    for node in (0, 1):
        where = (["--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)] if static else
                 ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes"])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc),
               *where, *extra, str(script), *args]
        if node == 1 and node1_own:
            mounts = [f"mkdir -p {f} && mount -t tmpfs tmpfs {f}" + (f" && cp -r {shlex.quote(str(src))}/. {f}" if src else "")
                      for f, src in ((shlex.quote(str(f)), src) for f, src in node1_own.items())]
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c", " && ".join(mounts + ["exec " + shlex.join(cmd)])]
        with open(tmp_path / f"node{node}.log", "w") as log:
            nodes.append(subprocess.Popen(cmd, cwd=here, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}))
    return nodes


def run_nodes(tmp_path, *args, **kw) -> list:
    """start_nodes, then wait for both: [(exit code, output) of node 0, of node 1]."""
    nodes = start_nodes(tmp_path, *args, **kw)
    try:
        codes = [n.wait(timeout=120) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    return [(code, (tmp_path / f"node{i}.log").read_text()) for i, code in enumerate(codes)]


def both_succeed(results):
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + "\n----\n" + results[1][1][-3000:]


def one_process_losses(tmp_path, args, micro: int) -> dict:
    import train
    assert train.main(args + ["--micro-batch", str(micro), "--out", str(tmp_path / "one")]) == 0
    return train_losses(tmp_path / "one")


def test_two_nodes_train_as_one_process_and_restart_together(tmp_path, run_cache, node_launcher):
    """Two nodes x 1 process (c10d rendezvous) give the losses of 1 process with the same global batch. With
    --max-restarts 1, a worker killed on node 1 at step 3 restarts both nodes, which resume from the step-2
    checkpoint and end with the uninterrupted run's losses, bit for bit."""
    args = TINY_RUN + ["--method", "mslt", "--k", "2", "--steps", "6", "--dropout", "0", "--save-every", "2",
                       "--cache-dir", run_cache]
    restarts = ("--max-restarts", "1")
    results = run_nodes(tmp_path, node_launcher, args + ["--out", str(tmp_path / "whole")], extra=restarts)
    both_succeed(results)
    assert "note: for --max-restarts across nodes, start each torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" \
        in results[0][1]  # without it torch keeps one store for every round, and a restart cannot connect
    whole = train_losses(tmp_path / "whole")
    one = one_process_losses(tmp_path, args, micro=4)
    assert sorted(whole) == sorted(one) == list(range(1, 7))
    assert all(whole[s] == pytest.approx(one[s], rel=1e-5, abs=1e-5) for s in one)
    crashed = tmp_path / "crashed"
    results = run_nodes(tmp_path, node_launcher, args + ["--out", str(crashed)], extra=restarts,
                        env={"CRASH_AT_STEP": "3", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    both_succeed(results)
    assert f"resumed {crashed / 'checkpoint.pt'} at step 2" in results[0][1]
    assert train_losses(crashed) == whole


def test_node_local_caches_are_built_per_node_and_checked(tmp_path, run_cache, node_launcher):
    """Two nodes x 2 processes (static rendezvous: --node-rank, --master-addr), where node 1 cannot see the cache
    folder rank 0 writes (a tmpfs over it): its local rank 0, global rank 2, builds one of its own while rank 3
    waits for it, and the losses are those of 1 process. A node whose own disk holds the cache reuses it. A node
    whose corpus file differs is stopped at start, in one line naming both nodes."""
    import socket
    needs_namespaces(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir()
    args = TINY_RUN + ["--schedule", "3:2,12:2", "--steps", "4", "--dropout", "0", "--cache-dir", str(cache)]
    results = run_nodes(tmp_path, node_launcher, args + ["--out", str(tmp_path / "ddp")], nproc=2, static=True,
                        node1_own={cache: None})
    both_succeed(results)
    assert f"node 1 ({socket.gethostname()}) has its own, by rank 2" in results[0][1]
    assert results[1][1].count("building token cache") == 1  # rank 2 built it, rank 3 opened it
    ddp, one = train_losses(tmp_path / "ddp"), one_process_losses(tmp_path, args, micro=2)
    assert sorted(ddp) == sorted(one) == [1, 2, 3, 4]
    assert all(ddp[s] == pytest.approx(one[s], rel=1e-5, abs=1e-5) for s in one)
    import shutil
    shutil.copytree(cache, tmp_path / "cache-on-node-1")  # node 1's own disk already holds this cache: reused
    results = run_nodes(tmp_path, node_launcher, args + ["--out", str(tmp_path / "again")],
                        node1_own={cache: tmp_path / "cache-on-node-1"})
    both_succeed(results)
    assert "reusing token cache" in results[1][1] and "building token cache" not in results[1][1]

    corpus, other = tmp_path / "corpus", tmp_path / "corpus-of-node-1"  # one path, other text on node 1's disk
    for folder, says in ((corpus, "zero"), (other, "one")):
        folder.mkdir()
        (folder / "a.txt").write_text("".join(f"Node {says} says {d} things. It ends here.\n\n" for d in range(60)))
    cache = tmp_path / "cache-of-text"
    args = TINY_RUN + ["--method", "baseline", "--steps", "3", "--corpus", str(corpus), "--cache-dir", str(cache), "--out", str(tmp_path / "x")]
    results = run_nodes(tmp_path, node_launcher, args, node1_own={corpus: other, cache: None})
    host = socket.gethostname()
    assert results[0][0] != 0 and results[0][1].count(
        f"error: the token cache in --cache-dir {cache} differs between node 0 ({host}) and node 1 ({host})") == 1
    # No traceback through our modules; torchrun's own (ChildFailedError) is always there, maybe from a venv in here.
    here = re.escape(os.path.dirname(os.path.abspath(__file__)))
    assert not re.search(rf'File "{here}/\w+\.py"', results[0][1] + results[1][1])


def test_out_on_node_local_disks_is_refused_at_start(tmp_path, node_launcher):
    """A train.py, glue.py or squad.py --out that node 1 sees as another folder (a tmpfs over it) is refused
    before any work, in one line that names the flag and says the folder must be shared."""
    import socket
    import train
    needs_namespaces(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    args = TINY_RUN + ["--method", "baseline", "--steps", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    results = run_nodes(tmp_path, node_launcher, args, node1_own={out: None})
    line = (f"error: --out {out} must be shared by every node: node 1 ({socket.gethostname()}) does not see the "
            f"folder that rank 0 on node 0 ({socket.gethostname()}) writes; put it on a shared filesystem")
    assert results[0][0] != 0 and results[0][1].count(line) == 1, results[0][1][-3000:]
    assert "building token cache" not in results[0][1]  # refused before any work
    assert train.main(TINY_RUN + ["--method", "baseline", "--steps", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]) == 0
    for module, task in ("glue", ["--task", "RTE"]), ("squad", []):
        launcher = tmp_path / f"{module}_node.py"
        launcher.write_text(f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
                            f"import {module}\nsys.exit({module}.main(sys.argv[1:]))\n")
        results = run_nodes(tmp_path, launcher, ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                                                 "--device", "cpu", "--out", str(out)] + task, node1_own={out: None})
        assert results[0][0] != 0 and results[0][1].count(line) == 1, (module, results[0][1][-3000:])


def kill_tree(pid: int):
    """SIGKILL a process and every process under it (torchrun's workers may lead process groups of their own)."""
    import signal
    children = {}
    for stat in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):  # a process that has ended since
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def test_node_0_killed_while_it_builds_the_cache_ends_node_1_within_a_minute(tmp_path, node_launcher):
    """kill -9 of node 0 (launcher and worker) while rank 0 builds the token cache: the rank of node 1, which waits
    for it through torchrun's store, ends within 60 s, saying in one line what happened."""
    import signal
    import time
    args = TINY_RUN + ["--method", "baseline", "--steps", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "run")]
    nodes = start_nodes(tmp_path, node_launcher, args, env={"SLOW_BUILD": "1"})
    try:
        deadline = time.time() + 120
        while "building token cache" not in (tmp_path / "node0.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # node 1's rank is waiting now
        kill_tree(nodes[0].pid)
        t0 = time.time()
        code = nodes[1].wait(timeout=60)
        took = time.time() - t0
    finally:
        for n in nodes:
            n.kill()
    output = (tmp_path / "node1.log").read_text()
    assert code != 0 and took < 60, output[-3000:]
    said = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and "token cache" in said[0] and "every rank stops" in said[0], output[-3000:]


def test_a_silent_builder_or_a_failed_one_ends_the_waiting_ranks(monkeypatch, capsys):
    """The wait's liveness check on its own (an in-process store): a builder whose heartbeat stops ends the
    waiting rank after HEARTBEAT_STALE_S, in one line; a builder's posted error becomes every rank's error."""
    import datetime
    import time
    import train
    store = torch.distributed.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))
    monkeypatch.setattr(train, "job_store", lambda: store)
    monkeypatch.setattr(train, "HEARTBEAT_STALE_S", 1.0)
    d = train.Dist(rank=1, world=2, local_rank=0)
    store.add("cache/x/0/beat", 5)  # it beat five times, then stopped
    t0 = time.time()
    with pytest.raises(SystemExit) as e:
        train.wait_for_builders(d, "cache/x", {0: "node 0 (a)"})
    assert e.value.code == 1 and 1 < time.time() - t0 < 3
    assert capsys.readouterr().err.startswith("error: rank 0 on node 0 (a) stopped while building the token cache")
    store.set("cache/y/0", "")
    store.set("cache/y/2", "corpus.txt:3: not UTF-8")  # a node's builder failed: its error ends this rank too
    with pytest.raises(DataError, match="corpus.txt:3: not UTF-8"):
        train.wait_for_builders(d, "cache/y", {0: "node 0 (a)", 2: "node 1 (b)"})
    monkeypatch.setattr(train, "HEARTBEAT_S", 0.05)  # the builder's side: it beats while it builds, then posts
    assert train.build_with_heartbeat(d, "cache/z/1", lambda: time.sleep(0.5) or "prepared") == "prepared"
    assert store.get("cache/z/1") == b"" and store.add("cache/z/1/beat", 0) >= 3

    def failing():
        raise DataError("corpus.txt:3: not UTF-8")
    with pytest.raises(DataError):
        train.build_with_heartbeat(d, "cache/w/1", failing)
    assert store.get("cache/w/1") == b"corpus.txt:3: not UTF-8"


# ----------------------------------------------------------------------------------------------------------
# train.py: the GPU step (checked on the CPU where it can be; the CUDA-only test is skipped without a GPU)


def test_compile_trains_like_eager_and_compiles_once_per_stage(tmp_path, run_cache, one_thread):
    """--compile on a stacking and an MSLT schedule gives eager's losses (dropout off), compiles each stage's
    model once before its first step (a compile_s record per stage, outside `wall`), and never hits dynamo's
    recompile limit (past it, later stages would silently run eager). Compiled with dynamo's "eager" backend:
    inductor spends minutes compiling C++ on a CPU, while graphs, guards and recompiles are dynamo's either way."""
    import logging
    import train
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append
    logging.getLogger("torch._dynamo").addHandler(handler)  # torch's loggers do not propagate to the root
    try:
        for name, flags in (("stack", ["--schedule", "3:2,6:2,12:2", "--steps", "6"]),
                            ("mslt", ["--method", "mslt", "--k", "2", "--steps", "6"])):
            args = TINY_RUN + flags + ["--dropout", "0", "--cache-dir", run_cache]
            assert train.main(args + ["--out", str(tmp_path / name)]) == 0
            assert train.main(args + ["--out", str(tmp_path / f"{name}-compiled"), "--compile", "--compile-backend", "eager"]) == 0
            eager, compiled = train_losses(tmp_path / name), train_losses(tmp_path / f"{name}-compiled")
            assert sorted(eager) == sorted(compiled)
            assert all(compiled[s] == pytest.approx(eager[s], rel=1e-4) for s in eager), (eager, compiled)
            records = train.read_log(str(tmp_path / f"{name}-compiled"))
            starts = [0] + train.run_schedule(train.parse_args(args)[0]).switch_steps
            assert [r["step"] for r in records if "compile_s" in r] == starts
    finally:
        logging.getLogger("torch._dynamo").removeHandler(handler)
    assert not [w.getMessage() for w in warnings if "recompile" in w.getMessage()]


@pytest.mark.parametrize("worker_process", [False, True])
def test_prefetched_batches_are_the_steps_batches(tmp_path, run_cache, worker_process):
    """Batches built ahead (on the thread; in the forked worker process, as on CUDA) equal those built on the
    spot, in order, after a jump (a resume), backwards and past the end (built on the spot); a batch without
    padding loses its attention mask, one with padding keeps it."""
    import train
    t = started_trainer(["--steps", "10", "--micro-batch", "4", "--cache-dir", run_cache, "--out", str(tmp_path)])
    prefetch = train.Prefetcher(t.step_batches, end=10, worker_process=worker_process)
    try:
        for step in (0, 1, 2, 7, 8, 3, 12):
            got = prefetch.get(step)
            assert len(got) == 2
            for m, batch in enumerate(got):
                direct = t.train_batches.for_step(step, 8, 0, 1, m, 2)
                assert set(batch) | {"attention_mask"} == set(direct)
                assert ("attention_mask" in batch) == bool((direct["attention_mask"] == 0).any())
                assert all(torch.equal(v, direct[k]) for k, v in batch.items())
    finally:
        prefetch.pool.shutdown(cancel_futures=True)
    full = dict(t.train_batches.get(range(4)), attention_mask=torch.ones(4, 32, dtype=torch.long))
    padded = dict(full, attention_mask=full["attention_mask"].clone())
    padded["attention_mask"][2, -3:] = 0
    assert "attention_mask" not in train.host_batch(full)
    assert torch.equal(train.host_batch(padded)["attention_mask"], padded["attention_mask"])


def test_training_mode_is_set_once_per_model_and_restored_after_validation(tmp_path, run_cache):
    """train_step does not call model.train() (it walks every module: 0.3 ms of Python at BERT-Base): validation
    puts the model back in training mode, and every installed model (fresh, grown, retrained) starts in it."""
    t = started_trainer(["--schedule", "6:2,12:2,12:2:retrain", "--steps", "6", "--cache-dir", run_cache,
                         "--out", str(tmp_path)])
    assert all(m.training for m in t.model.modules())
    for stage in (1, 2):
        t.validate()
        assert all(m.training for m in t.model.modules())
        t.model.eval()  # as if something else had left it so: the switch installs it in training mode
        t.grow(stage)
        assert all(m.training for m in t.model.modules()), stage


def test_the_training_clock_waits_for_the_device_before_each_pause(tmp_path, run_cache):
    """Statistics are read one step late, except after the steps where the loop pauses (log, validation,
    save, switch, end, stop): those must finish inside the training time, or `wall` would miss device time."""
    t = started_trainer(["--schedule", "3:3,6:3,12:4", "--steps", "10", "--log-every", "4", "--eval-every", "6",
                         "--save-every", "100", "--stop-after", "9", "--cache-dir", run_cache, "--out", str(tmp_path)])
    pauses = []
    for n in range(1, 11):
        t.stage = t.schedule.stage_at(n - 1)[0]  # the stage of the step just done, as in the loop
        pauses += [n] if t.pauses_after(n) else []
    assert pauses == [3, 4, 6, 8, 9, 10]
    t.stop_signal = 15
    assert t.pauses_after(1)


def test_bf16_is_the_default_only_where_native_and_tf32_only_on_cuda(monkeypatch):
    """bf16 autocast is the default of train.py and glue.py on a GPU that has bf16 natively, not on one
    that only emulates it, nor on a CPU; TF32 matmuls are switched on for CUDA only."""
    import train
    for native in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation or native)
        assert train.default_dtype("cuda") == ("bf16" if native else "float32")
        assert train.default_dtype("cpu") == "float32"
        assert glue.FinetuneConfig(device="cuda").dtype == train.default_dtype("cuda")
    assert glue.FinetuneConfig(device="cpu").dtype == "float32" and glue.FinetuneConfig(dtype="bf16").dtype == "bf16"
    matmul, before = torch.backends.cuda.matmul, torch.backends.cuda.matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        train.use_tf32("cpu")
        assert matmul.fp32_precision == "ieee"
        train.use_tf32("cuda")
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision = before


def test_gpu_check_runs_every_section_at_toy_sizes():
    """experiments/gpu_check.py --device cpu --quick, the script a GPU machine runs, works end to end: every
    section passes and the report is one markdown document (on a CPU a resumed run is bit-identical)."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    run = subprocess.run([sys.executable, "experiments/gpu_check.py", "--device", "cpu", "--quick"], cwd=here,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    report = run.stdout
    assert run.returncode == 0 and "10 of 10 sections ok" in report, report[-3000:] + run.stderr[-3000:]
    assert report.startswith("# GPU check (quick, cpu)") and report.count("\n## ") == 10
    assert "from the uninterrupted run is 0.00e+00" in report
    assert "| 12x256 | bf16 | 2x32 |" in report and "| MSLT stage 5 (retrain) |" in report
    assert "| mslt (lamb) | 12L, top 3 trainable |" in report  # the cost model's stage costs from this device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training_step_never_waits_for_the_device(tmp_path, run_cache, experiments_on_path):
    """A whole training step (batches, forward, backward, clipping, LAMB) under sync debug mode "error":
    any host-device synchronisation raises."""
    import gpu_check
    t = started_trainer(["--steps", "6", "--micro-batch", "4", "--optimizer", "lamb", "--device", "cuda",
                         "--cache-dir", run_cache, "--out", str(tmp_path)])
    assert math.isfinite(gpu_check.step_without_sync(t)["loss"])


# ----------------------------------------------------------------------------------------------------------
# glue.py

GLUE_DIR = glue.DEFAULT_GLUE_DIR

# task: (train, dev, test) rows and train / dev label counts, from shared/data/README.md section 1
OFFICIAL = {
    "CoLA": ((8551, 1043, 1063), {"1": 6023, "0": 2528}, {"1": 721, "0": 322}),
    "SST-2": ((67349, 872, 1821), {"1": 37569, "0": 29780}, {"1": 444, "0": 428}),
    "MRPC": ((3668, 408, 1725), {"1": 2474, "0": 1194}, {"1": 279, "0": 129}),
    "STS-B": ((5749, 1500, 1379), None, None),
    "RTE": ((2490, 277, 3000), {"entailment": 1249, "not_entailment": 1241}, {"entailment": 146, "not_entailment": 131}),
    "WNLI": ((635, 71, 146), {"1": 312, "0": 323}, {"1": 31, "0": 40}),
}


def label_counts(task, examples):
    names, counts = task.labels, {}
    for e in examples:
        counts[names[e.label]] = counts.get(names[e.label], 0) + 1
    return counts


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_glue_files_have_official_sizes_and_labels(name):
    if not os.path.isdir(os.path.join(GLUE_DIR, name)):
        pytest.skip(f"{name} not in {GLUE_DIR}")
    task, (sizes, train_counts, dev_counts) = glue.TASKS[name], OFFICIAL[name]
    data = glue.load_task(task, GLUE_DIR)
    assert (len(data.train), len(data.dev["dev"]), len(data.test[name])) == sizes
    assert data.skipped == 0
    assert all(e.text_a and (e.text_b is None) == (task.labelled.text_b is None) for e in data.train)
    assert all(e.label is None and e.index is not None for e in data.test[name])
    if task.labels is None:  # STS-B: README gives mean scores 2.70 (train), 2.36 (dev)
        assert np.mean([e.label for e in data.train]) == pytest.approx(2.70, abs=0.005)
        assert np.mean([e.label for e in data.dev["dev"]]) == pytest.approx(2.36, abs=0.005)
    else:
        assert label_counts(task, data.train) == train_counts
        assert label_counts(task, data.dev["dev"]) == dev_counts


def write(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


RTE_HEADER = "index\tsentence1\tsentence2\tlabel"


@pytest.mark.parametrize("bad_row, reason", [
    ("1\tA \" quote.\tB.\tmaybe", "unknown label 'maybe'"),
    ("1\tonly two\tfields", "expected 4 tab-separated fields, found 3"),
])
def test_bad_row_names_file_and_line_or_is_skipped(tmp_path, bad_row, reason):
    path = str(tmp_path / "train.tsv")
    write(path, [RTE_HEADER, "0\tA.\tB.\tentailment", bad_row, "2\tC \"x.\tD.\tnot_entailment"])
    with pytest.raises(glue.GlueError, match=f"train.tsv:3: {reason}"):
        glue.read_tsv(glue.TASKS["RTE"], path, glue.TASKS["RTE"].labelled)
    examples, skipped = glue.read_tsv(glue.TASKS["RTE"], path, glue.TASKS["RTE"].labelled, skip_bad_rows=True)
    assert skipped == 1 and [e.label for e in examples] == [0, 1]
    assert examples[1].text_a == 'C "x.'  # quoting is off: quotes stay in the text


def test_bad_score_is_an_error(tmp_path):
    path = str(tmp_path / "dev.tsv")
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    write(path, [header, "0\tg\tf\t2012\t1\tn\tn\tA.\tB.\t4.5", "1\tg\tf\t2012\t2\tn\tn\tA.\tB.\tfive"])
    with pytest.raises(glue.GlueError, match="dev.tsv:3: could not convert"):
        glue.read_tsv(glue.TASKS["STS-B"], path, glue.TASKS["STS-B"].labelled)


def test_mnli_qqp_qnli_layouts(tmp_path):
    """Synthetic files in the official layouts of the three tasks not in shared/data (and AX)."""
    g = tmp_path / "glue"
    parse = ["p1", "p2", "p3", "p4"]  # binary parses and parses: ignored
    mnli_train = "\t".join(["index", "promptID", "pairID", "genre"] + ["s1bp", "s2bp", "s1p", "s2p"] +
                           ["sentence1", "sentence2", "label1", "gold_label"])
    mnli_dev = "\t".join(mnli_train.split("\t")[:11] + ["label2", "label3", "label4", "label5", "gold_label"])
    mnli_test = "\t".join(mnli_train.split("\t")[:10])
    write(f"{g}/MNLI/train.tsv", [mnli_train, "\t".join(["0", "1", "2", "fiction"] + parse + ["P \"a\".", "H.", "neutral", "neutral"])])
    for split in ("dev_matched", "dev_mismatched"):
        write(f"{g}/MNLI/{split}.tsv", [mnli_dev, "\t".join(["0", "1", "2", "slate"] + parse + ["P.", "H.", "neutral"] + ["x"] * 4 + ["contradiction"])])
    for split, idx in (("test_matched", "7"), ("test_mismatched", "8")):
        write(f"{g}/MNLI/{split}.tsv", [mnli_test, "\t".join([idx, "1", "2", "slate"] + parse + ["TP.", "TH."])])
    write(f"{g}/diagnostic/diagnostic.tsv", ["index\tsentence1\tsentence2", "0\tAX a.\tAX b."])
    write(f"{g}/QQP/train.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t1\t2\tWhy?\tHow?\t1"])
    write(f"{g}/QQP/dev.tsv", ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "6\t3\t4\tWho?\tWhom?\t0"])
    write(f"{g}/QQP/test.tsv", ["id\tquestion1\tquestion2", "9\tTQ1?\tTQ2?"])
    write(f"{g}/QNLI/train.tsv", ["index\tquestion\tsentence\tlabel", "0\tQ?\tS.\tnot_entailment"])
    write(f"{g}/QNLI/dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tQ?\tS.\tentailment"])
    write(f"{g}/QNLI/test.tsv", ["index\tquestion\tsentence", "3\tTQ?\tTS."])
    assert glue.available_tasks(str(g)) == ["QQP", "MNLI", "QNLI"]

    mnli = glue.load_task(glue.TASKS["MNLI"], str(g))
    assert (mnli.train[0].text_a, mnli.train[0].text_b, mnli.train[0].label) == ('P "a".', "H.", 2)
    assert [mnli.dev[k][0].label for k in ("m", "mm")] == [0, 0]  # gold label = last column
    assert [(k, v[0].index, v[0].text_a) for k, v in mnli.test.items()] == [
        ("MNLI-m", "7", "TP."), ("MNLI-mm", "8", "TP."), ("AX", "0", "AX a.")]
    qqp = glue.load_task(glue.TASKS["QQP"], str(g))
    assert (qqp.train[0].text_a, qqp.train[0].text_b, qqp.train[0].label, qqp.dev["dev"][0].label) == ("Why?", "How?", 1, 0)
    assert (qqp.test["QQP"][0].index, qqp.test["QQP"][0].text_a, qqp.test["QQP"][0].text_b) == ("9", "TQ1?", "TQ2?")
    qnli = glue.load_task(glue.TASKS["QNLI"], str(g))
    assert (qnli.train[0].label, qnli.dev["dev"][0].label, qnli.test["QNLI"][0].text_b) == (1, 0, "TS.")
    with pytest.raises(glue.GlueError, match="no GLUE data for RTE"):
        glue.load_task(glue.TASKS["RTE"], str(g))


# ---------------------------------------------------------------------------------------------------------
# Metrics against hand-worked values.


def test_matthews():
    # tp 2, fn 1, tn 2, fp 1: (2*2 - 1*1) / sqrt(3*3*3*3) = 1/3
    assert glue.matthews([1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 1]) == pytest.approx(1 / 3)
    assert glue.matthews([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert glue.matthews([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert glue.matthews([1, 0, 1, 0], [1, 1, 1, 1]) == 0.0  # constant prediction: a zero margin
    assert glue.matthews([1, 1, 1], [1, 1, 1]) == 0.0


def test_f1_and_accuracy():
    assert glue.f1([1, 0, 1, 1], [1, 1, 0, 1]) == pytest.approx(2 / 3)  # tp 2, fp 1, fn 1: 4 / 6
    assert glue.f1([0, 0], [0, 0]) == 0.0  # no positives anywhere
    assert glue.f1([1, 1], [0, 0]) == 0.0
    assert glue.f1([0, 1], [1, 1]) == pytest.approx(2 / 3)
    assert glue.accuracy([1, 0, 2, 2], [1, 0, 0, 2]) == 0.75


def test_pearson_spearman():
    # x mean 3, y mean 4: cov 6, var_x 10, var_y 6 -> 6 / sqrt(60) = sqrt(0.6)
    assert glue.pearson([1, 2, 3, 4, 5], [2, 4, 5, 4, 5]) == pytest.approx(math.sqrt(0.6))
    assert glue.pearson([1, 2, 3], [7, 7, 7]) == 0.0
    assert glue.rankdata([10, 20, 20, 30, 20]).tolist() == [1, 3, 3, 5, 3]
    assert glue.rankdata([3.0, 1.0, 2.0, 1.0]).tolist() == [4, 1.5, 3, 1.5]
    # ranks x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]: cov 4.5, var 4.5 and 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    assert glue.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert glue.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert glue.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


def test_glue_average_and_confidence_interval():
    scores = {"MRPC": glue.task_score({"acc": 0.8, "f1": 0.9}), "CoLA": 0.5, "WNLI": 0.1,
              "MNLI": glue.task_score({"acc-m": 0.7, "acc-mm": 0.8})}
    assert glue.glue_average(scores) == pytest.approx((0.85 + 0.5 + 0.75) / 3)  # WNLI left out
    mean, ci = glue.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.303
    assert (mean, ci) == (2.0, pytest.approx(4.303 / math.sqrt(3)))
    assert math.isnan(glue.mean_ci([0.5])[1])
    # mean 0.4, sd sqrt(0.19), half-width 4.303 sd / sqrt(3) = 1.083; the median beside them, as MSLT reports
    assert glue.fmt_cell([0.1, 0.9, 0.2]) == "40.0 ± 108.3 (median 20.0)" and glue.fmt_cell([0.5]) == "50.0"
    assert glue.t_quantile_975(11) == pytest.approx(2.201, abs=0.003)
    assert glue.t_quantile_975(30) == pytest.approx(2.042, abs=0.001)


def test_several_checkpoints_get_one_results_folder_each(tmp_path, capsys):
    import argparse
    a = argparse.Namespace(out="runs/glue", random_init=False, checkpoint=[
        "runs/baseline/checkpoint.pt", "runs/stack/checkpoint.pt", "runs/stack/stage1_end.pt"])
    assert [glue.out_dir(a, p) for p in a.checkpoint] == [
        os.path.join("runs/glue", d) for d in ("baseline", "stack", "stack-stage1_end")]
    clash = [str(tmp_path / "a" / "checkpoint.pt"), str(tmp_path / "b" / "a" / "checkpoint.pt")]
    assert glue.main(["--checkpoint", *clash, "--task", "RTE", "--out", str(tmp_path / "glue")]) == 2
    assert "share one results folder" in capsys.readouterr().err


def test_lr_schedule_warms_up_then_decays():
    """glue.py's schedule: 10% of 100 steps warm up (the first at 1/10 of the peak), then decay to 0."""
    import train
    f = [train.warmup_then_decay(s, 10, 100) for s in range(101)]
    assert [f[0], f[4], f[9], f[10], f[55], f[100]] == [0.1, 0.5, 1.0, 1.0, 0.5, 0.0]


def test_encode_truncates_longest_first_and_marks_segments():
    class Chars:  # one token per character, ids 10..
        cls_id, sep_id, pad_id = 2, 3, 0

        def encode(self, text):
            return [10 + ord(c) - ord("a") for c in text]

    examples = [glue.Example("abcdefgh", "xy", 1, None), glue.Example("ab", None, 0, None)]
    enc = glue.encode(examples, Chars(), max_len=9, regression=False)
    assert enc.ids[0] == [2, 10, 11, 12, 13, 3, 33, 34, 3]  # A cut from 8 to 4 tokens, B kept
    assert enc.ids[1] == [2, 10, 11, 3]
    ids, segments, mask = glue.collate(enc, [1, 0], pad_id=0, device="cpu")
    assert ids[0].tolist() == [2, 10, 11, 3, 0, 0, 0, 0, 0]
    assert segments.tolist() == [[0] * 9, [0] * 6 + [1] * 3]
    assert mask.sum(1).tolist() == [4, 9]


# ---------------------------------------------------------------------------------------------------------
# End to end: a tiny BERT must learn a separable task through the command line, write a submission, resume.


def separable_rte(folder, n_train=256, n_dev=64, n_test=40, seed=0):
    """RTE-layout files where the label is whether sentence 2 says "yes" or "no"."""
    rng = np.random.default_rng(seed)
    words = "the cat dog sat ran on a mat log red blue big small fox saw".split()

    def rows(n, labelled):
        out = []
        for i in range(n):
            yes = rng.random() < 0.5
            s1 = " ".join(rng.choice(words, size=rng.integers(3, 12)))
            s2 = " ".join(rng.choice(words, size=3)) + (" yes" if yes else " no")
            out.append(f"{i}\t{s1}\t{s2}" + (f"\t{'entailment' if yes else 'not_entailment'}" if labelled else ""))
        return out

    write(f"{folder}/RTE/train.tsv", [RTE_HEADER] + rows(n_train, True))
    write(f"{folder}/RTE/dev.tsv", [RTE_HEADER] + rows(n_dev, True))
    write(f"{folder}/RTE/test.tsv", ["index\tsentence1\tsentence2"] + rows(n_test, False))
    return words


def tiny_checkpoint(path, texts):
    data = pytest.importorskip("data")
    tok = data.Tokenizer.train(texts, vocab_size=300)
    torch.manual_seed(0)
    config = bert.BertConfig(vocab_size=tok.vocab_size, max_position=64, n_layer=2, n_head=2, d_model=32, d_ff=64)
    torch.save({"model": bert.Bert(config).state_dict(), "config": asdict(config), "tokenizer": tok.to_dict()}, path)


@pytest.fixture
def one_thread():
    """2 shared cores under load: a second intra-op thread makes tiny models ~10x slower, not faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_finetune_learns_writes_submission_and_resumes(tmp_path, capsys, one_thread):
    words = separable_rte(tmp_path / "glue")
    ckpt, out = str(tmp_path / "ckpt.pt"), str(tmp_path / "out")
    tiny_checkpoint(ckpt, [" ".join(words)] * 3 + ["yes no"] * 3)
    common = ["--checkpoint", ckpt, "--task", "RTE", "--glue-dir", str(tmp_path / "glue"), "--device", "cpu",
              "--batch-size", "16", "--max-seq-len", "32"]
    args = common + ["--out", out, "--lrs", "2e-3", "1e-5", "--seeds", "0", "--epochs", "6"]
    assert glue.main(args) == 0
    runs = glue.load_runs(out)["RTE"]
    best_lr, best = glue.select(runs)
    assert best_lr == 2e-3 and best[0]["dev"]["acc"] >= 0.95, [r["dev"] for r in runs]
    with open(os.path.join(out, "submission", "RTE.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 41
    assert [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(40)]
    assert {line.split("\t")[1] for line in lines[1:]} == {"entailment", "not_entailment"}
    printed = capsys.readouterr().out
    assert "| RTE |" in printed.splitlines()[-3]  # the results table's header
    assert "| run 1 of 2, RTE done in " in printed and "| run 2 of 2, RTE done in 0s" in printed

    # Resume: nothing is redone (the run files are untouched); other settings in the same folder are refused.
    def stamps():
        return {p: os.path.getmtime(os.path.join(out, "runs", p)) for p in os.listdir(os.path.join(out, "runs"))}

    before = stamps()
    assert glue.main(args) == 0
    assert "2 runs already finished" in capsys.readouterr().out and stamps() == before
    assert glue.main(args + ["--random-init"]) == 2
    assert "use another --out" in capsys.readouterr().err

    # Random init: same config and tokenizer, other weights; the table shows both side by side.
    pretrained, fresh = glue.load_backbone(ckpt), glue.load_backbone(ckpt, random_init=True)
    assert fresh.state is None and fresh.config == pretrained.config and "random init" in fresh.label
    assert not torch.equal(fresh.build(1).tok_emb.weight, pretrained.build(1).tok_emb.weight)
    assert glue.main(common + ["--out", out + "-random", "--random-init", "--lrs", "2e-3", "--seeds", "0", "1",
                               "--epochs", "1", "--max-steps", "3", "--no-test"]) == 0
    capsys.readouterr()
    assert glue.main(["--table", out, out + "-random"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| model | RTE | Avg (1 task) |" and len(table) == 4
    assert "(random init)" in table[3] and "±" in table[3]


def test_checkpoint_errors(tmp_path):
    path = str(tmp_path / "bad.pt")
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="bad.pt holds a dict of model, not a checkpoint written by train.py"):
        glue.load_backbone(path)
    with pytest.raises(SystemExit, match="missing.pt does not exist"):
        glue.load_backbone(str(tmp_path / "missing.pt"))
    good = str(tmp_path / "good.pt")
    tiny_checkpoint(good, ["the cat sat on a mat"] * 3)
    with open(good, "rb") as f:
        head = f.read(1000)
    with open(path, "wb") as f:  # a copy cut short, as by a full disk
        f.write(head)
    with pytest.raises(SystemExit, match="bad.pt is not a readable checkpoint.* copy it again"):
        glue.load_backbone(path)
    ckpt = torch.load(good, weights_only=True)
    ckpt["config"]["vocab_size"] = 10  # tokenizer larger than the model's embedding table
    ckpt["model"] = bert.Bert(bert.BertConfig(**ckpt["config"])).state_dict()
    torch.save(ckpt, path)
    with pytest.raises(SystemExit, match="tokenizer has .* tokens, the model's vocabulary 10"):
        glue.load_backbone(path)
    bert.save_hf(bert.Bert(bert.BertConfig(**ckpt["config"])), str(tmp_path / "hf"))
    with pytest.raises(glue.GlueError, match="without our tokenizer; pass --tokenizer"):
        glue.load_backbone(str(tmp_path / "hf"))


@pytest.mark.parametrize("content", [[1, 2], "text", torch.zeros(3)])
def test_a_pt_file_that_is_no_checkpoint_fails_in_one_line(content, tmp_path, capsys):
    path = str(tmp_path / "odd.pt")
    torch.save(content, path)
    assert glue.main(["--checkpoint", path, "--device", "cpu", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} holds a {type(content).__name__}, not a checkpoint") and err.count("\n") == 1


def test_glue_refuses_an_empty_train_file_misshapen_weights_and_a_locked_out(tmp_path, capsys):
    import train
    separable_rte(tmp_path / "glue", n_train=8, n_dev=4, n_test=2)
    ckpt = str(tmp_path / "ckpt.pt")
    tiny_checkpoint(ckpt, ["the cat sat on a mat yes no"] * 3)
    argv = ["--checkpoint", ckpt, "--glue-dir", str(tmp_path / "glue"), "--device", "cpu", "--max-seq-len", "32",
            "--max-steps", "1", "--seeds", "0", "--lrs", "1e-3", "--out", str(tmp_path / "out")]
    with train.locked_folder(str(tmp_path / "out")):
        assert glue.main(argv) == 2
    assert f"{tmp_path / 'out'} is in use by another process (pid {os.getpid()})" in capsys.readouterr().err
    train_tsv = tmp_path / "glue" / "RTE" / "train.tsv"
    train_tsv.write_text("")
    assert glue.main(argv) == 2
    assert capsys.readouterr().err == (f"error: {train_tsv} is empty; --glue-dir must hold the files "
                                       f"download_glue_data.py wrote\n")
    state = torch.load(ckpt, weights_only=True)
    state["model"]["tok_emb.weight"] = torch.zeros(3, 3)
    torch.save(state, ckpt)
    with pytest.raises(SystemExit, match=r"the weights' tok_emb.weight is torch.float32 \[3, 3\]"):
        glue.load_backbone(ckpt)


def test_finetune_is_deterministic_per_seed(tmp_path, one_thread):
    separable_rte(tmp_path / "glue", n_train=64, n_dev=16, n_test=8)
    tiny_checkpoint(str(tmp_path / "ckpt.pt"), ["the cat sat on a mat yes no"] * 3)
    backbone, task = glue.load_backbone(str(tmp_path / "ckpt.pt")), glue.TASKS["RTE"]
    cfg = glue.FinetuneConfig(batch_size=8, max_seq_len=32, max_steps=4, log_every=100, device="cpu")
    data = glue.encode_task(task, backbone, str(tmp_path / "glue"), cfg, False, glue.Dist())
    a, b, c = (glue.finetune(task, backbone, data, 1e-3, seed, cfg, glue.Dist()) for seed in (0, 0, 1))
    assert a["train_loss"] == b["train_loss"] and a["test"] == b["test"]
    assert a["train_loss"] != c["train_loss"]
    # bf16 autocast: the same run up to rounding, recorded in the settings that resuming checks
    e = glue.finetune(task, backbone, data, 1e-3, 0, replace(cfg, dtype="bf16"), glue.Dist())
    assert e["settings"]["dtype"] == "bf16" and e["train_loss"] != a["train_loss"]
    assert abs(e["train_loss"] - a["train_loss"]) < 0.05 * a["train_loss"], (e["train_loss"], a["train_loss"])


def test_submission_strings():
    assert glue.prediction_strings(glue.TASKS["STS-B"], np.array([-0.3, 2.4567, 7.0])) == ["0.000", "2.457", "5.000"]
    assert glue.prediction_strings(glue.TASKS["MNLI"], np.array([2.0, 0.0])) == ["neutral", "contradiction"]
    assert glue.prediction_strings(glue.TASKS["CoLA"], np.array([1.0, 0.0])) == ["1", "0"]


# ----------------------------------------------------------------------------------------------------------
# squad.py: official metrics, offsets, windows, the null threshold, files, bad input, resuming


def question(qid, answers, context="ctx", text="?"):
    return squad.Question(qid, text, context, [(a, 0) for a in answers] if isinstance(answers, list) else answers)


def test_squad_metrics_on_hand_worked_cases():
    assert squad.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert squad.normalize_answer("An apple, a pear and THE theory") == "apple pear and theory"  # "theory" stays
    # gold [big, red, dog], predicted [red, dog, barked]: 2 shared, P = R = 2/3
    assert squad.f1_score("the big red dog", "a red dog barked") == pytest.approx(2 / 3)
    # gold [new, york, new, york], predicted [new, york]: P = 1, R = 1/2, F1 = 2/3 (a repeat counts once per match)
    assert squad.f1_score("New York, New York", "new york") == pytest.approx(2 / 3)
    assert (squad.f1_score("", ""), squad.f1_score("the", "x"), squad.f1_score("cat", "dog")) == (1.0, 0.0, 0.0)
    broncos = question("q", ["Denver Broncos", "the Broncos."])
    assert squad.scores(broncos, "broncos") == (1.0, 1.0)  # the second gold answer normalizes to "broncos"
    assert squad.scores(broncos, "Denver") == (0.0, pytest.approx(2 / 3))  # P 1, R 1/2 against the first
    assert squad.scores(question("q", []), "") == (1.0, 1.0) and squad.scores(question("q", []), "x") == (0.0, 0.0)
    assert squad.scores(question("q", ["The"]), "") == (1.0, 1.0)  # a gold answer that normalizes to "" is left out
    qs = [question("a", ["Paris"]), question("b", ["in 1066"]), question("c", [])]
    # a: EM 1, F1 1; b: "1066" against [in, 1066]: EM 0, F1 2/3; c (no answer) predicted "London": 0, 0
    assert squad.evaluate(qs, {"a": "paris", "b": "1066", "c": "London"}) == pytest.approx(
        {"exact": 1 / 3, "f1": (5 / 3) / 3, "HasAns_exact": 1 / 2, "HasAns_f1": (5 / 6), "NoAns_exact": 0.0,
         "NoAns_f1": 0.0})


def test_squad_offsets_survive_lowercasing_and_non_latin_text():
    """Answers cut by character offsets equal the original text: accents, "İ" (two characters lower-cased), final
    sigma, CJK and Cyrillic split inside their UTF-8 bytes, runs of whitespace; the tokens of each word cover it."""
    context = "  Café au lait\tin İSTANBUL, ΣΟΦΙΑΣ said:\n naïve résumé! 東京は日本の首都です。Москва — столица."
    tok = data.Tokenizer.train(["café au lait in istanbul σοφια said naïve résumé 東京 москва столица"] * 3, 300)
    answers = ["Café", "İSTANBUL", "ΣΟΦΙΑΣ said", "naïve résumé!", "東京は日本", "Москва — столица"]
    qs = [squad.Question(str(i), "where?", context, [(a, context.index(a))]) for i, a in enumerate(answers)]
    for t in data.Tokenizer([], lowercase=False), tok:  # cased bytes; lower-cased BPE
        feats = squad.featurize(qs, t, squad.SquadConfig(max_seq_len=200, device="cpu"))
        for (number, start, _), label, shift in zip(feats.windows, feats.enc.labels.tolist(), feats.enc.n_first):
            spans = feats.spans[number]
            first, last = label[0] - shift + start, label[1] - shift + start
            assert context[spans[first, 0]:spans[last, 1]] == answers[number]
    ids, spans = tok.encode(context), feats.spans[0]
    for word in re.finditer(r"\S+", context):  # the tokens of each word spell its normalized form
        inside = [i for i, (a, b) in zip(ids, spans) if word.start() <= a and b <= word.end()]
        assert tok.decode(inside).strip() == tok.normalize(word.group()).strip()
    for i, (a, b) in zip(ids, spans):  # a token's text (but for split characters) is in that of its characters
        assert tok.decode([i]).strip(" \ufffd") in tok.normalize(context[a:b])
    v2 = data.Tokenizer(tok.merges, prefix_space=False)  # a tokenizer of before the space convention
    prefixed = v2.encode("x " + context)[1:]  # the tokens of " " + the text, as add_prefix_space would give
    assert v2.decode(prefixed) == " " + v2.normalize(context)
    assert squad.token_spans(v2, context, prefixed)[[0, -1]].tolist() == [[2, 3], [len(context) - 1, len(context)]]


def test_squad_windows_stride_labels_and_max_context():
    assert squad.window_starts(10, 4, 3) == [0, 3, 6] and squad.window_starts(4, 4, 3) == [0]
    assert squad.window_starts(10, 4, 9) == [0, 4, 8]  # a stride above the window's room would skip tokens
    tok = data.Tokenizer([], prefix_space=False)  # no merges and no space before a text: "abcdefghij" is 10 tokens
    q = squad.Question("q", "q", "abcdefghij", [("fg", 5)])
    cfg = squad.SquadConfig(max_seq_len=8, doc_stride=3, device="cpu")  # [CLS] q [SEP] + 4 context tokens + [SEP]
    feats = squad.featurize([q], tok, cfg)
    assert feats.windows == [(0, 0, 4), (0, 3, 4), (0, 6, 4)]
    assert tok.decode(feats.enc.ids[1]) == "[CLS]q[SEP]defg[SEP]"
    assert feats.enc.labels.tolist() == [[0, 0], [5, 6], [0, 0]]  # only the middle window holds "fg" whole
    # Window 1 scores the span "de" 20, but "d" has more context in window 0 (at its end there, at the start of
    # window 1: a tie, the first wins), so the span is not counted there; "e" (10) and window 0's "d" (2) are.
    logits = [np.zeros((9, 2), np.float32) for _ in range(3)]
    logits[0][[0, 6]], logits[1][[0, 3]], logits[2][0] = [[3, 3], [1, 1]], [[1, 1], [10, 0]], [2, 2]
    logits[1][4, 1] = 10
    null, found = squad.scored_spans(feats, [0, 1, 2], logits, max_answer_len=30)
    assert null == (2, 1, 1)  # the least [CLS] start + end over the windows, and its two logits
    best = squad.best_answers(q, feats.spans[0], found, n_best=2)
    assert [(b["text"], b["start_logit"] + b["end_logit"]) for b in best] == [("e", 10), ("d", 2)]
    for n in 1, 2, 3:  # no span is longer than max_answer_len tokens, and every shorter one is scored
        _, found = squad.scored_spans(feats, [0, 1, 2], logits, max_answer_len=n)
        assert set((found[:, 2] - found[:, 1] + 1).tolist()) == set(range(1, n + 1))
    # SQuAD 1.1: always an answer, no null odds, no NoAns split
    torch.manual_seed(0)
    model = squad.SquadModel(bert.Bert(BertConfig(vocab_size=261, max_position=8, n_layer=1, n_head=1, d_model=8,
                                                  d_ff=8)), tok.pad_id)
    files, metrics, threshold = squad.predict(model, feats, replace(cfg, version="1.1"))
    assert files.keys() == {"predictions", "nbest_predictions"} and threshold is None
    assert files["predictions"]["q"] in "abcdefghij" and files["predictions"]["q"] != ""
    assert set(metrics) == {"exact", "f1", "HasAns_exact", "HasAns_f1"}


def test_squad_null_threshold_maximizes_f1():
    diffs, answered, blank = np.array([3.0, -1.0, 0.5, 2.0]), np.array([0, 1, 0, 1.0]), np.array([1, 0, 1, 0.0])
    # answering those with diff <= t: t = -1 gives 1 + 1 + 0 + 1 = 3 of 4; t = 2 gives 1 + 0 + 1 + 1 = 3 too: the lower
    assert squad.null_threshold(diffs, answered, blank) == -1.0
    assert squad.null_threshold(np.array([1.0, 1.0]), np.array([1, 0.0]), np.array([0, 1.0])) == 0.0  # all blank
    assert squad.null_threshold(np.array([0.0, 1.0]), np.array([1, 1.0]), np.zeros(2)) == 1.0  # answer all


def test_squad_defaults_are_the_papers(tmp_path, capsys):
    """MSLT's fine-tuning settings per version, BERT's windows and spans, five seeds. A model pre-trained at
    shorter sequences than the windows is refused in one line that says what to do."""
    for version, batch, lr in ("2.0", 48, 5e-5), ("1.1", 12, 3e-5):
        _, cfg = squad.parse_args(["--checkpoint", "x.pt", "--version", version])
        assert (cfg.batch_size, tuple(cfg.lrs), cfg.epochs, tuple(cfg.seeds)) == (batch, (lr,), 2, (0, 1, 2, 3, 4))
        assert (cfg.max_seq_len, cfg.doc_stride, cfg.max_query_len, cfg.max_answer_len) == (384, 128, 64, 30)
    tiny_checkpoint(str(tmp_path / "ckpt.pt"), ["red fox ran"])  # max_position 64
    assert squad.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: --max-seq-len 384 exceeds the model's max_position 64: pass a "
                                       "--max-seq-len up to that, or pre-train with --long-seq-len 384 or more\n")


def test_squad_reads_the_bundled_sample_and_its_windows_hold_their_answers(tmp_path):
    """The real SQuAD 2.0 sample: its counts (see its README), and at the default sizes every window labelled
    with an answer holds that answer's text between its label's tokens. A malformed article is named."""
    if not os.path.exists(squad.DEFAULT_FILE):
        pytest.skip(f"{squad.DEFAULT_FILE} is not here (../shared/data beside the repository)")
    articles = squad.read_squad(squad.DEFAULT_FILE, "2.0")
    questions = [q for article in articles for q in article]
    assert (len(articles), len(questions), sum(not q.answers for q in questions)) == (5, 1407, 702)
    tok = data.Tokenizer.train(sorted({q.context for q in questions})[:20], vocab_size=600)
    feats = squad.featurize(questions, tok, squad.SquadConfig(device="cpu"))
    assert max(len(ids) for ids in feats.enc.ids) <= 384
    labelled = set()  # the questions with a window labelled with their answer
    for (number, window, _), (first, last), shift in zip(feats.windows, feats.enc.labels.tolist(), feats.enc.n_first):
        if first:  # the label's positions, less the question's, plus the window's first context token
            labelled.add(number)
            q, spans = feats.questions[number], feats.spans[number]
            text, start = q.answers[0]
            a, b = spans[first - shift + window, 0], spans[last - shift + window, 1]
            assert a <= start and start + len(text) <= b and b - a < len(text) + 30, (q.qid, q.context[a:b], text)
    assert labelled == {i for i, q in enumerate(questions) if q.answers}  # every answerable one, none other
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": []}, {"title": "no paragraphs"}]}))
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(bad))}: article 2: lacks the field 'paragraphs'"):
        squad.read_squad(str(bad), "2.0")


def squad_file(path, questions_per_context=8, n_contexts=24, seed=0):
    """A SQuAD 2.0 file whose answer is the word after "key" (one of the first 3 words); a context without "key"
    has none."""
    rng = np.random.default_rng(seed)
    words = "red fox dog cat sun sky bus car cow pig hen owl".split()
    paragraphs = []
    for c in range(n_contexts):
        qas = []
        for i in range(questions_per_context):
            text = list(rng.choice(words, size=rng.integers(4, 10)))
            answer = str(rng.choice(words))
            if i % 2 == 0:
                text[int(rng.integers(3)):0] = ["key", answer]
            context = " ".join(text)
            qas.append({"id": f"c{c}q{i}", "question": "what follows key?", "context": context,
                        "is_impossible": i % 2 == 1,
                        "answers": [{"text": answer, "answer_start": context.index("key ") + 4}] if i % 2 == 0 else []})
        paragraphs += [{"context": qa.pop("context"), "qas": [qa]} for qa in qas]
    with open(path, "w") as f:
        json.dump({"version": "v2.0", "data": [{"title": "t", "paragraphs": paragraphs[:-16]},
                                               {"title": "d", "paragraphs": paragraphs[-16:]}]}, f)
    return words


SQUAD_TINY = ["--device", "cpu", "--max-seq-len", "32", "--max-query-len", "8", "--doc-stride", "8", "--log-every",
              "1000"]


def test_squad_learns_writes_official_files_and_resumes(tmp_path, capsys, one_thread):
    path, ckpt, out = str(tmp_path / "squad.json"), str(tmp_path / "ckpt.pt"), str(tmp_path / "out")
    words = squad_file(path)
    tiny_checkpoint(ckpt, [" ".join(words + ["key", "what follows key?"])] * 3)
    args = ["--checkpoint", ckpt, "--train-file", path, "--out", out, "--lrs", "5e-3", "--seeds", "0", "1",
            "--epochs", "10", "--batch-size", "8"] + SQUAD_TINY
    assert squad.main(args) == 0
    runs = glue.load_runs(out)["SQuAD2.0"]
    # 176 training questions, 16 dev: all blank scores 0.5, 2 x 10 epochs take ~2 s
    assert len(runs) == 2 and all(r["dev"]["f1"] > 0.75 and r["dev"]["HasAns_f1"] > 0.6 for r in runs), runs
    with open(os.path.join(out, "predictions.json")) as f:
        predictions = json.load(f)
    with open(path) as f:
        dev = [p["qas"][0] for p in json.load(f)["data"][1]["paragraphs"]]
    assert list(predictions) == [qa["id"] for qa in dev] and all(isinstance(t, str) for t in predictions.values())
    right = [predictions[qa["id"]] == (qa["answers"][0]["text"] if qa["answers"] else "") for qa in dev]
    assert sum(right) >= 12, predictions
    with open(os.path.join(out, "nbest_predictions.json")) as f:
        nbest = json.load(f)
    with open(os.path.join(out, "null_odds.json")) as f:
        odds = json.load(f)
    assert nbest.keys() == odds.keys() == predictions.keys()
    for qid, entries in nbest.items():
        assert sum(e["probability"] for e in entries) == pytest.approx(1.0) and "" in [e["text"] for e in entries]
    assert "(median " in open(os.path.join(out, "results.md")).read().splitlines()[2]

    def stamps():
        return {p: os.path.getmtime(os.path.join(out, "runs", p)) for p in os.listdir(os.path.join(out, "runs"))}

    before = stamps()
    capsys.readouterr()
    assert squad.main(args) == 0
    assert "2 runs already finished" in capsys.readouterr().out and stamps() == before
    assert squad.main(args + ["--max-answer-len", "5"]) == 2
    assert "made with other settings (max_answer_len: saved 30, now 5)" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    (lambda qa, p: qa["answers"][0].update(answer_start=1), "question q1: answer 'fox': its answer_start 1 points "
                                                            "at 'ed ' (the context has 11 characters)"),
    (lambda qa, p: qa["answers"][0].update(answer_start=9), "question q1: answer 'fox': its answer_start 9 points at "
                                                            "'an' (the context has 11 characters)"),
    (lambda qa, p: qa.pop("question"), "question q1: lacks the field 'question'"),
    (lambda qa, p: qa.pop("id"), "article 1, paragraph 1, question 1: lacks the field 'id'"),
    (lambda qa, p: p.pop("context"), "article 1, paragraph 1: lacks the field 'context'"),
    (lambda qa, p: qa.update(answers=[]), "question q1: has no answers and is not is_impossible"),
    (lambda qa, p: qa.update(answers=[], is_impossible=True), "question q1: is unanswerable (is_impossible), which "
                                                               "SQuAD 1.1 is not; pass --version 2.0"),
])
def test_squad_bad_input_is_one_line_naming_file_and_question(change, message, tmp_path, capsys):
    path = str(tmp_path / "bad.json")
    qa = {"id": "q1", "question": "which animal?", "answers": [{"text": "fox", "answer_start": 4}]}
    paragraph = {"context": "red fox ran", "qas": [qa]}
    change(qa, paragraph)
    with open(path, "w") as f:
        json.dump({"data": [{"paragraphs": [paragraph]}]}, f)
    tiny_checkpoint(str(tmp_path / "ckpt.pt"), ["red fox ran"])
    assert squad.main(["--checkpoint", str(tmp_path / "ckpt.pt"), "--train-file", path, "--dev-file", path,
                       "--out", str(tmp_path / "out"), "--version", "1.1"] + SQUAD_TINY) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------------------------------------
# experiments/compare.py: the analysis behind the results tables


@pytest.fixture
def experiments_on_path():
    """experiments/ importable for one test, as it is for its scripts."""
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "experiments")
    sys.path.insert(0, folder)
    yield
    sys.path.remove(folder)


@pytest.fixture
def compare(experiments_on_path):
    import compare
    return compare


def test_time_to_reach_interpolates_the_first_crossing(compare):
    curve = [(10, 8.0), (20, 7.0), (30, 6.0), (40, 5.5)]
    assert compare.time_to_reach(curve, 6.5) == pytest.approx(25.0)  # halfway between 7.0 at 20 s and 6.0 at 30 s
    assert compare.time_to_reach(curve, 8.5) == 10  # already below at the first validation
    assert compare.time_to_reach(curve, 5.0) is None  # never reached


def test_replicates_table_puts_runs_side_by_side(compare, tmp_path):
    def results(stack_loss, stack_speedup):
        reach = {str(f): {"speedup": 1.0} for f in compare.FRACTIONS}
        return {"results": {
            "baseline": {"baseline": "baseline", "final_val_loss": 7.0, "wall": 100.0, "reach": reach},
            "stack": {"baseline": "baseline", "final_val_loss": stack_loss, "wall": 80.0,
                      "reach": dict(reach, **{"1.0": {"speedup": stack_speedup}})}}}
    for name, r in (("seed0", results(6.93, 1.5)), ("seed1", results(7.07, None))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    lines = compare.replicates_table([str(tmp_path / "seed0"), str(tmp_path / "seed1")]).splitlines()
    assert lines[0].startswith("| run | seed0: vs baseline |") and "seed1: vs baseline" in lines[0]
    assert lines[3] == "| stack | -1.0% | 0.80 | 1.00x / 1.00x / 1.50x | +1.0% | 0.80 | 1.00x / 1.00x / never |"


def test_finished_run_at_another_lr_is_not_reused(compare, tmp_path):
    """A comparison adding runs to a folder whose finished runs used another rate stops, naming the flag."""
    import train
    torch.save({**dict.fromkeys(train.CHECKPOINT_KEYS, 0), "format": train.CHECKPOINT_FORMAT,
                "version": train.CHECKPOINT_VERSION, "step": 5, "train_config": {"lr": 0.002, "steps": 5}},
               str(tmp_path / "checkpoint.pt"))
    state, saved = compare.run_state(str(tmp_path))
    assert state == "done" and compare.run_state(str(tmp_path / "absent")) == ("new", None)
    compare.check_same_lr(str(tmp_path), saved, ["--method", "stack", "--optimizer", "adam", "--lr", "0.002"])
    with pytest.raises(SystemExit, match="trained at lr 0.002, this comparison gives it 0.001; pass --lamb-lr 0.002"):
        compare.check_same_lr(str(tmp_path), saved, ["--method", "mslt", "--optimizer", "lamb", "--lr", "0.001"])


def test_gpu_window_plans_its_steps_and_its_cpu_dry_run_trains_them(compare, tmp_path, monkeypatch, one_thread):
    """`compare.py --window`: the GPU window's steps are the most whose plan, from the committed H200 stage
    costs, fits its 7.5 minutes (the number in experiments/README.md). Its dry run (the tiny model on the CPU,
    stage costs made from known unit costs) trains the five runs to the step its plan gives, and results.md
    holds each run twice: in the comparison's table and in the plan's."""
    import cost_model
    import train
    gpu = compare.parse_args(["--window", "gpu"])
    assert gpu.steps == 1152 and gpu.runs == ["baseline", "stack", "identity", "baseline-lamb", "mslt"]
    units = compare.window_units(gpu)
    assert compare.window_seconds(gpu, 1152, units) <= 7.5 * 60 < compare.window_seconds(gpu, 1160, units)
    with pytest.raises(SystemExit, match="at 128 x 128, --window gpu trains bert-base at 64 x 128"):
        compare.parse_args(["--window", "gpu", "--batch-size", "64"])
    with pytest.raises(SystemExit, match="not even 8 steps a run fit its 7.5 minutes"):
        compare.parse_args(["--window", "gpu", "--eval-batches", "100000"])
    with pytest.raises(SystemExit, match="give --window-costs FILE"):
        compare.parse_args(["--window", "cpu-dry-run"])

    c = bert.preset("tiny", vocab_size=1024, pre_norm=True)
    u = cost_model.UnitCosts(fwd_layer=0.003, fwd_rest=0.005, bwd_layer=0.004, bwd_head=0.005, bwd_emb=0.003, opt_param=1e-8)
    records = []
    for n, top in cost_model.parse_configs(cost_model.CALIBRATION):
        t = cost_model.step_time(cost_model.stage_shape(c, n, top), u)
        records.append({"n_layer": n, "trainable_top": top, "forward_s": t.forward, "backward_s": t.backward,
                        "optimizer_s": {"adam": t.optimizer, "lamb": t.optimizer}})
    costs, out = tmp_path / "stage_costs.json", tmp_path / "runs"
    costs.write_text(json.dumps({"device": "known unit costs", "preset": "tiny", "vocab_size": 1024, "pre_norm": True,
                                 "batch": 8, "seq": 32, "records": records}))
    a = compare.parse_args(["--window", "cpu-dry-run", "--window-costs", str(costs), "--out", str(out)])
    units = compare.window_units(a)
    assert asdict(units["adam"]) == pytest.approx(asdict(u))
    assert compare.window_seconds(a, a.steps, units) <= 30 < compare.window_seconds(a, a.steps + 8, units) and a.steps >= 16

    def train_in_process(cmd, check):  # the command compare.py runs, in this process: no interpreter start per run
        assert cmd[:2] == [sys.executable, os.path.join(compare.ROOT, "train.py")] and check
        assert train.main(cmd[2:]) == 0

    out.mkdir()
    compare.report(a)  # as after a command cut short before any validation: the tables without a measurement, no plot
    assert "| baseline | - | 0.07 | - |" in (out / "results.md").read_text() and not (out / "val_loss.svg").exists()
    monkeypatch.setattr(compare, "subprocess", SimpleNamespace(run=train_in_process))
    assert compare.run_window(a) == 0 and (out / "val_loss.svg").exists()
    for name in a.runs:
        assert train.load_checkpoint(str(out / name / "checkpoint.pt"))["step"] == a.steps
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["results"]) == a.runs and {r["steps"] for r in saved["results"].values()} == {a.steps}
    assert set(json.loads((out / "window_times.json").read_text())) == {"device", "data", *a.runs}
    window = saved["window"]["runs"]
    assert all(window[n]["measured_s"] > 0 and window[n]["measured_ratio"] > 0 for n in a.runs)
    assert window["mslt"]["cost_model_ratio"] < window["stack"]["cost_model_ratio"] < window["baseline"]["cost_model_ratio"] == 1
    table = (out / "results.md").read_text()
    assert f"Window `cpu-dry-run`: {a.steps} steps a run" in table and "ran on cpu, torch" in table
    assert [line.split(" |")[0] for line in table.splitlines() if line.startswith("| ") and " | " in line][1:] == \
        ["| " + n for n in a.runs] + ["| run"] + ["| " + n for n in a.runs] + ["| token cache", "| token cache and runs"]


# ----------------------------------------------------------------------------------------------------------
# experiments/cost_model.py: wall time from unit costs, and calibration


@pytest.fixture
def cost_model(experiments_on_path):
    import cost_model
    return cost_model


ROUND_UNITS = dict(fwd_layer=1.0, fwd_rest=2.0, bwd_layer=3.0, bwd_head=1.0, bwd_emb=4.0, opt_param=0.0)


def test_step_time_known_answer(cost_model):
    """4 layers, top 2 trainable, 1000 trainable parameters: forward 2 + 4 x 1, backward 1 + 2 x 3,
    optimizer 1000 x 0.001, all-reduce 1000 x 0.002; overlapped, the all-reduce hides behind backward."""
    shape = cost_model.StageShape(n_layer=4, bwd_layers=2, embeddings_train=False, trainable=1000)
    u = cost_model.UnitCosts(**dict(ROUND_UNITS, opt_param=0.001), comm_param=0.002)
    t = cost_model.step_time(shape, u)
    assert (t.forward, t.backward, t.optimizer, t.comm, t.total) == pytest.approx((6, 7, 1, 2, 16))
    assert cost_model.step_time(shape, replace(u, overlap=True)).total == pytest.approx(14)  # 6 + max(7, 2) + 1


def test_two_stage_schedule_known_answer(cost_model):
    """2 layers all trainable for 100 steps (4 forward + 11 backward) then 4 layers, top 2 trainable, for 300
    (6 + 7): 5400 s; the 4-layer baseline costs 6 + 17 = 23 a step, so MSLT's 100/100/100 steps at k=2 give
    (15 + 13 + 23) / 69."""
    c = BertConfig(vocab_size=100, n_layer=4, n_head=2, d_model=16, d_ff=32, max_position=16)
    u = cost_model.UnitCosts(**ROUND_UNITS)
    assert cost_model.schedule_time(stack.parse_schedule("2:100,4:300:mslt:2"), c, u) == pytest.approx(5400)
    assert cost_model.method_ratio("mslt", c, u, k=2, total_steps=300) == pytest.approx(51 / 69)


@pytest.mark.parametrize("n, top, group_size", [(4, None, 1), (6, 2, 1), (6, 4, 2), (6, None, 3)])
def test_stage_trainable_parameters_match_the_model(cost_model, n, top, group_size):
    c = BertConfig(vocab_size=100, n_layer=n, n_head=2, d_model=16, d_ff=32, max_position=16, group_size=group_size)
    model = stack.set_trainable(Bert(c), top)
    shape = cost_model.stage_shape(replace(c, group_size=1), n, top, group_size)
    assert shape.trainable == stack.count_parameters(model)[0]
    assert shape.bwd_layers == sum(any(p.requires_grad for p in layer.parameters()) for layer in model.layers)


def test_calibration_recovers_known_unit_costs(cost_model):
    """Phase timings made from known unit costs (two optimizers) fit back to the same unit costs; timings
    of all-trainable models alone cannot tell embeddings' backward from the output layer's."""
    c = BertConfig(vocab_size=100, n_layer=12, n_head=2, d_model=16, d_ff=32, max_position=16)
    truth = {"adam": cost_model.UnitCosts(0.3, 0.8, 0.5, 0.2, 0.9, 1e-7), "lamb": cost_model.UnitCosts(0.3, 0.8, 0.5, 0.2, 0.9, 3e-7)}
    records = []
    for n, top in cost_model.parse_configs(cost_model.CALIBRATION):
        shape = cost_model.stage_shape(c, n, top)
        t = {o: cost_model.step_time(shape, u) for o, u in truth.items()}
        records.append({"n_layer": n, "trainable_top": top, "forward_s": t["adam"].forward,
                        "backward_s": t["adam"].backward, "optimizer_s": {o: t[o].optimizer for o in t}})
    for o, u in truth.items():
        assert asdict(cost_model.fit_units(records, c, o)) == pytest.approx(asdict(u))
    with pytest.raises(ValueError, match="cannot separate the backward_s unit costs"):
        cost_model.fit_units([r for r in records if r["trainable_top"] is None], c, "adam")


def test_ring_all_reduce_and_paper_fit_round_trip(cost_model):
    """2(n-1)/n x bytes / bandwidth per parameter; solving MFU and bandwidth from a cluster's own step time
    and backward : forward ratio gives the cluster back."""
    c = BertConfig(vocab_size=2000, n_layer=4, n_head=2, d_model=64, d_ff=256, max_position=64)
    cl = cost_model.Cluster("test", gpus=4, peak_tflops=10, mfu=0.3, bandwidth=1.0, mem_bw=100, batch_per_gpu=4,
                            seq=32, overlap=False)
    u = cost_model.cluster_units(c, cl)
    assert u.comm_param == pytest.approx(2 * 3 / 4 * 4 / 1e9)
    step = cost_model.step_time(cost_model.stage_shape(c, 4, None), u).total
    assert cost_model.paper_fit(c, cl, step, cost_model.bwd_fwd_ratio(c, u)) == pytest.approx((0.3, 1.0))


def test_bad_stage_cost_file_names_what_it_lacks(cost_model, tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps({"preset": "tiny", "vocab_size": 100, "pre_norm": True, "batch": 2, "seq": 8, "records": [
        {"n_layer": 2, "trainable_top": None, "forward_s": 1.0, "backward_s": 1.0, "optimizer_s": {"adam": 0.1}}]}))
    with pytest.raises(SystemExit, match=f"error: {path}: record 0 lacks optimizer_s.lamb"):
        cost_model.load_costs(str(path))
