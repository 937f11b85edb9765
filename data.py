"""Pre-training data for BERT: a byte-level BPE tokenizer, corpus readers, a token cache and MLM + NSP batches.

This is the data pipeline of Gong et al. 2019, "Efficient Training of BERT by Progressively Stacking",
section 4.1: documents are segmented into sentences, lower-cased, tokenized with byte pair encoding
(Sennrich et al. 2016) and split 199:1 into training and validation documents. Batches follow the
original BERT recipe (Devlin et al. 2019, `create_pretraining_data.py`): [CLS] A [SEP] B [SEP], B the
true next text or (p = 0.5) text from another document, 15% of tokens chosen for MLM, of those 80% [MASK],
10% a random token, 10% unchanged. Unlike the original, examples are drawn on the fly: example `e` is a
pure function of (seed, e), so masks are fresh every epoch and every rank/micro-batch split of a step sees
the same examples.

Read in this order: Tokenizer (BPE), synthetic_corpus, read_corpus (+ chunk_documents, split_score),
prepare (the cache, built in two streaming passes by worker processes), Batches. With no corpus the built-in
synthetic language is used, so a bare run is a smoke test:

    python data.py                                      # synthetic corpus, ~10 s
    python data.py --corpus ../shared/data/gutenberg ../shared/data/brown/brown.txt \\
        ../shared/data/wikitext-2-raw --out runs/data-real --vocab-size 16384
    python data.py --corpus /data/wiki_books --out runs/data-wiki --vocab-size 32768 --workers 16
"""

import argparse
import codecs
import contextlib
import hashlib
import heapq
import io
import json
import math
import os
import random
import re
import signal
import threading
import time
import unicodedata
from array import array
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import chain
from typing import Iterable, Optional, Sequence

try:
    import fcntl  # pid_lock (POSIX)
except ImportError:
    fcntl = None

import numpy as np
import regex
import torch

from bert import IGNORE, atomic_write

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4  # special ids: [PAD] = 0 as in HuggingFace's BERT (bert.HF_PAD)
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
N_BASE = len(SPECIALS) + 256  # specials, then one token per byte value; merges start here


class DataError(ValueError):
    """A problem with the user's data or cache that they can fix; the message says which file and how."""


# ----------------------------------------------------------------------------------------------------
# Tokenizer: byte-level BPE

# Pre-tokens as in GPT-2, on whitespace-collapsed text: a space belongs to the token after it, so joining
# the pre-tokens gives the text back. Runs of letters with their combining marks (Unicode L and M), of numbers
# (N: also "²", "½", "Ⅻ"), and of anything else but whitespace. "the cat's 2 mats!" -> ["the", " cat", "'s",
# " 2", " mats", "!"]. The classes are code-point ranges from this Python's Unicode database, never \w, \d,
# \s or \p{..}, which mean other things in `re` and in the `tokenizers` library's engine (Oniguruma), where
# the exported tokenizer.json runs the same pattern. `re` runs it at ~12 MB/s (`regex`: 4x slower); ASCII
# text gets the same pattern with classes cut to ASCII, which finds the same pre-tokens at ~25 MB/s.


def _class_ranges(runs: str, pattern: str) -> str:
    """A character-class body ("\\x41-\\x5a...") of the code points at which `pattern` matches `runs`, a string
    of one character per code point. ASCII is escaped as \\xHH (read alike by both engines), the rest literal."""
    def char(cp):
        return f"\\x{cp:02x}" if cp < 0x80 else chr(cp)
    spans = ((m.start(), m.end() - 1) for m in re.finditer(pattern, runs))
    return "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in spans)


def _unicode_classes() -> tuple:
    """(whitespace, letters and marks, numbers) as class bodies, in ~0.1 s. Whitespace is what str.split and
    re's \\s split on. An unassigned code point between two of a class joins it: both engines read the same
    explicit ranges, so that only shortens the pattern."""
    code_points = np.arange(0x110000, dtype="<u4")
    code_points[0xD800:0xE000] = 0xE000  # surrogates cannot be decoded; a private-use stand-in is in no class
    every = code_points.tobytes().decode("utf-32-le")  # every[i] == chr(i)
    kinds = "".join(["?" if c == "Cn" else c[0] for c in map(unicodedata.category, every)])
    return (_class_ranges(every, r"\s+"), _class_ranges(kinds, "[LM](?:[LM?]*[LM])?"),
            _class_ranges(kinds, "N(?:[N?]*N)?"))


def _pretoken_pattern(letter: str, number: str) -> str:
    """The pre-token pattern over these letter and number class bodies (whitespace is SPACE)."""
    return f" ?[{letter}]+| ?[{number}]+|'(?:s|t|re|ve|m|ll|d)| ?[^{SPACE}{letter}{number}]+"


SPACE, LETTER, NUMBER = _unicode_classes()
PRETOKEN = re.compile(_pretoken_pattern(LETTER, NUMBER))
ASCII_PRETOKEN = re.compile(_pretoken_pattern(*(_class_ranges("".join(map(chr, range(128))), f"[{c}]+")
                                               for c in (LETTER, NUMBER))))
SURROGATE = re.compile("[\ud800-\udfff]")  # lone surrogates cannot be written as UTF-8


def _merge_in_word(w: list, pair: tuple, new_id: int, f: int, counts: dict) -> list:
    """Merge `pair` in word `w` in place, leftmost occurrence first (a a a -> n a). At each occurrence,
    x a b y -> x n y, the word's count f moves from (x, a), (a, b), (b, y) to (x, n), (n, y); returns those."""
    made, j = [], 0
    while True:
        try:
            j = w.index(pair[0], j)
        except ValueError:
            break
        if j + 1 < len(w) and w[j + 1] == pair[1]:
            counts[pair] -= f
            if j:
                counts[w[j - 1], pair[0]] -= f
                made.append((w[j - 1], new_id))
            if j + 2 < len(w):
                counts[pair[1], w[j + 2]] -= f
                made.append((new_id, w[j + 2]))
            w[j:j + 2] = (new_id,)
        j += 1
    for p in made:
        counts[p] += f
    return made


def learn_merges(words: dict, n_merges: int, progress=None) -> list:
    """BPE merges for `words` ({tuple of base ids: count}). Each step merges the most frequent adjacent pair;
    ties go to the smallest (left id, right id), and merging stops early when no pair occurs twice.

    Never rescans the corpus: `where` indexes pair -> words containing it, and a merge only moves counts
    between the pairs around each occurrence (_merge_in_word). Counts live in a lazy max-heap: a merge only
    lowers the counts of old pairs (an entry found stale on pop is re-pushed with its true count) and
    creates pairs with the new id, which are pushed.
    Example: {(a, b, c): 2, (a, b): 1} -> first merge (a, b), the only pair occurring 3 times.
    """
    seqs, freqs = [list(w) for w in words], list(words.values())
    counts, where = defaultdict(int), defaultdict(set)
    for i, (w, f) in enumerate(zip(seqs, freqs)):
        for pair in zip(w, w[1:]):
            counts[pair] += f
            where[pair].add(i)
    heap = [(-c, pair) for pair, c in counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg, pair = heapq.heappop(heap)
        if -neg != counts[pair]:  # stale entry: its count dropped since it was pushed
            if counts[pair] > 0:
                heapq.heappush(heap, (-counts[pair], pair))
            continue
        if -neg < 2:
            break
        new_id, created = N_BASE + len(merges), set()
        merges.append(pair)
        for i in where.pop(pair):  # may name words the pair has left since: nothing is found there
            made = _merge_in_word(seqs[i], pair, new_id, freqs[i], counts)
            for p in made:
                where[p].add(i)
            created.update(made)
        for p in created:
            if counts[p] > 0:  # not merged away again in the same word (x a b a b -> x n n)
                heapq.heappush(heap, (-counts[p], p))
        if progress and len(merges) % 2000 == 0:
            progress(f"  bpe: {len(merges)}/{n_merges} merges, last count {-neg}")
    return merges


def check_vocab_size(vocab_size: int):
    """Fail before any work on a vocabulary without room for the 261 base tokens."""
    if vocab_size < N_BASE:
        raise DataError(f"vocab_size={vocab_size} is too small: at least {N_BASE} (5 specials + 256 bytes)")


def count_pretokens(texts: Iterable[str], tok: "Tokenizer") -> Counter:
    """Occurrences of each pre-token of the texts, normalized by `tok`: a Counter over tok.pretokens of 10k
    texts at a time, ASCII ones apart ("\\n" is in no pre-token, so joining texts with it keeps them apart)."""
    counts, batches = Counter(), ([], [])
    for text in texts:
        text = tok.normalize(text)
        batch = batches[text.isascii()]
        batch.append(text)
        if len(batch) >= 10_000:
            counts.update(tok.pretokens("\n".join(batch)))
            batch.clear()
    for batch in batches:
        counts.update(tok.pretokens("\n".join(batch)))
    return counts


class Tokenizer:
    """Byte-level BPE: ids 0-4 are the specials, 5-260 the 256 byte values, then one id per learned merge.
    Bytes as the base alphabet make every string encodable: no [UNK] (its id only keeps the layout fixed),
    and decode gives the normalised text back (U+FFFD for invalid byte sequences from a model).

    One convention for every text: `encode` (through `normalize`) puts a space before it, as RoBERTa's
    add_prefix_space does, so a word takes the same tokens at a text's start as inside it. A sentence of
    pre-training, a GLUE field, a SQuAD question or context, and the exported tokenizer.json then all agree:
    a text gives the same tokens encoded whole or sentence by sentence. Tokenizers saved before (format v2)
    had no such space; they load with prefix_space=False and keep encoding as their models were trained."""

    # v2: letters, marks and numbers by Unicode category (PRETOKEN), capital sigma lower-cased alike everywhere;
    # v3: "prefix_space" says whether a space goes before every text (v2 read as False)
    FORMAT, VERSION = "bert-byte-bpe", 3
    pad_id, unk_id, cls_id, sep_id, mask_id = PAD, UNK, CLS, SEP, MASK

    def __init__(self, merges: Sequence, lowercase: bool = True, pretoken: str = PRETOKEN.pattern, prefix_space=True):
        self.merges = [tuple(m) for m in merges]
        self.lowercase, self.prefix_space = lowercase, prefix_space
        self.pretoken = re.compile(pretoken)  # a saved tokenizer keeps its own classes under another Unicode version
        self.ascii_pretoken = ASCII_PRETOKEN if pretoken == PRETOKEN.pattern else self.pretoken
        self.ranks = {pair: N_BASE + i for i, pair in enumerate(self.merges)}  # pair -> merged id (= rank)
        self.pieces = [s.encode() for s in SPECIALS] + [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self.pieces.append(self.pieces[a] + self.pieces[b])
        self.vocab_size = len(self.pieces)
        self.cache = {}  # pre-token -> ids; text repeats, so most pre-tokens are looked up, not merged

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True, progress=False):
        """Learn vocab_size - 261 merges from `texts` (fewer if no pair repeats). progress: False, True (print)
        or a print-like function."""
        check_vocab_size(vocab_size)
        return cls.from_counts(count_pretokens(texts, cls([], lowercase)), vocab_size, lowercase, progress)

    @classmethod
    def from_counts(cls, counts: dict, vocab_size: int, lowercase: bool = True, progress=False):
        """Learn merges from pre-token counts ({pre-token of normalized text: occurrences})."""
        progress = print if progress is True else progress or None
        check_vocab_size(vocab_size)
        words = {tuple(b + len(SPECIALS) for b in piece.encode()): c for piece, c in counts.items()}
        if progress:
            progress(f"  bpe: {len(words):,} distinct pre-tokens, {sum(counts.values()):,} in all")
        return cls(learn_merges(words, vocab_size - N_BASE, progress), lowercase)

    def normalize(self, text: str) -> str:
        """What encode sees: lower-cased (optional), whitespace runs -> one space, no outer spaces, then with
        prefix_space one space before any non-empty text: normalize("  Hello\\r\\n  World ") == " hello world"
        (v2 tokenizers: "hello world"). Capital sigma becomes "σ" even at a word's end, where str.lower alone
        writes "ς": character by character, as the tokenizers library lower-cases."""
        text = " ".join(text.split())  # the same whitespace as re's \s
        text = " " + text if text and self.prefix_space else text
        if SURROGATE.search(text):
            text = SURROGATE.sub("\ufffd", text)
        return text.replace("Σ", "σ").lower() if self.lowercase else text

    def _encode_piece(self, piece: str) -> list:
        """BPE on one pre-token: repeatedly merge the leftmost pair of the earliest-learned merge present.
        ranks[i] is the rank (= merged id) of the pair at i; a merge changes only its two neighbours."""
        ids, get, never = [b + len(SPECIALS) for b in piece.encode()], self.ranks.get, math.inf
        ranks = [get(pair, never) for pair in zip(ids, ids[1:])]
        while ranks:
            new_id = min(ranks)
            if new_id == never:
                break
            i = ranks.index(new_id)
            ids[i:i + 2] = (new_id,)
            del ranks[i]
            if i:
                ranks[i - 1] = get((ids[i - 1], new_id), never)
            if i < len(ranks):
                ranks[i] = get((new_id, ids[i + 1]), never)
        return ids

    def pretokens(self, text: str) -> list:
        """The pre-tokens of normalized text; ASCII text by ASCII_PRETOKEN, which finds the same ones faster."""
        return (self.ascii_pretoken if text.isascii() else self.pretoken).findall(text)

    def encode(self, text: str) -> list:
        """Token ids of `text` (no specials added). Never fails: any string is a byte sequence."""
        pieces, cache = self.pretokens(self.normalize(text)), self.cache
        try:
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))
        except KeyError:  # unseen pre-tokens: merge them once, then look up again
            if len(cache) > 1_000_000:  # bound memory on adversarial input
                cache.clear()
            for piece in pieces:
                if piece not in cache:
                    cache[piece] = self._encode_piece(piece)
            return list(chain.from_iterable(map(cache.__getitem__, pieces)))

    def decode(self, ids) -> str:
        """Text of `ids`; specials appear by name ("[MASK]"). decode(encode(t)) == normalize(t)."""
        return b"".join(self.pieces[int(i)] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        """Plain JSON-able state (str/int/bool/list), safe inside a weights_only torch checkpoint."""
        return {"format": self.FORMAT, "version": self.VERSION, "lowercase": self.lowercase,
                "prefix_space": self.prefix_space, "pretoken_pattern": self.pretoken.pattern, "specials": SPECIALS,
                "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict, vocab_size: Optional[int] = None) -> "Tokenizer":
        """A tokenizer from to_dict's state (a checkpoint's), of this version or v2 (saved before prefix_space: no
        space), checked (see checked), of `vocab_size` tokens if given."""
        d = d if isinstance(d, dict) else {"format": type(d).__name__}
        if d.get("format") != cls.FORMAT or d.get("version") not in (2, cls.VERSION) or d.get("specials") != SPECIALS:
            raise DataError(f"not a {cls.FORMAT} v2 or v{cls.VERSION} tokenizer with data.py's special tokens: format="
                            f"{d.get('format')!r}, version={d.get('version')!r}; train one again with this data.py")
        return cls.checked(*map(d.get, ("merges", "lowercase", "pretoken_pattern", "prefix_space")), vocab_size)

    @classmethod
    def checked(cls, merges, lowercase, pretoken, prefix_space, vocab_size: Optional[int] = None) -> "Tokenizer":
        """A tokenizer of parts read from a file (to_dict's state, or a tokenizer.json), each checked before it is
        used, so that a damaged or foreign file is refused in one DataError line: each merge joins two pieces made
        before it (ids from 5, the first byte, up to 260 + its rank); the pre-token pattern is a string that compiles;
        and, given the model's `vocab_size`, the tokenizer has that many tokens. Specials and byte alphabet have
        fixed ids (0-4, 5-260): from_dict and from_hf check what a file says of them. Keys a file holds beyond
        these are not read."""
        try:
            bad = next((i for i, m in enumerate(merges) if not (isinstance(m, (list, tuple)) and len(m) == 2 and all(
                type(x) is int and len(SPECIALS) <= x < N_BASE + i for x in m))), None)
            if bad is not None:
                raise DataError(f"tokenizer's merge {bad} is {str(merges[bad])[:40]}, not two ids of pieces made "
                                f"before it ({len(SPECIALS)} to {N_BASE + bad - 1})")
            if vocab_size is not None and N_BASE + len(merges) != vocab_size:
                raise DataError(f"tokenizer has {N_BASE + len(merges)} tokens, the model's vocabulary {vocab_size}")
            return cls(merges, bool(lowercase), pretoken, bool(prefix_space))
        except (TypeError, re.error) as e:  # merges not a list, a pattern not a string or not one
            raise DataError(f"tokenizer's merges or pretoken_pattern are not a tokenizer's: {e}") from None

    def hash(self) -> str:
        """Short content hash: caches built with another tokenizer are detected by it."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, path: str):
        """JSON file: to_dict() plus a readable "vocab" list (id -> token text), for people, not for loading."""
        d = dict(self.to_dict(), vocab=[p.decode("utf-8", errors="backslashreplace") for p in self.pieces])
        atomic_write(path, lambda f: f.write(json.dumps(d, ensure_ascii=False).encode()))

    @classmethod
    def load(cls, path: str, vocab_size: Optional[int] = None) -> "Tokenizer":
        """Read a file written by save, or a tokenizer.json written by save_hf (of `vocab_size` tokens if given)."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return cls.from_hf(d, vocab_size) if isinstance(d, dict) and "model" in d else cls.from_dict(d, vocab_size)

    # -- the tokenizers library's tokenizer.json, which transformers' AutoTokenizer loads --------------------

    def hf_tokens(self) -> list:
        """Id -> token string in the byte-level alphabet (BYTE_CHARS); the specials by name."""
        return SPECIALS + ["".join(BYTE_CHARS[b] for b in piece) for piece in self.pieces[len(SPECIALS):]]

    def to_hf(self) -> dict:
        """This tokenizer as a tokenizer.json that encodes every text to the same ids: whitespace collapsed and
        stripped, lower-cased with sigma first, a space put before it (Prepend, with prefix_space; each text of
        a pair gets its own, as glue.py's fields do), split by the same pattern, bytes mapped to BYTE_CHARS, BPE
        with the merges in rank order. [CLS] A [SEP] B [SEP] gives segment ids 0 then 1. "[MASK]" in a text is
        found after normalizing and takes the space before it, as RoBERTa's <mask> does: "went to the [MASK] and"
        reads as the sentence with one word masked, " and" keeping its space (normalizing each piece around an
        unnormalized special would strip it)."""
        tokens, vocab = self.hf_tokens(), {}
        for i, token in enumerate(tokens):
            if vocab.setdefault(token, i) != i:
                raise DataError(f"tokens {vocab[token]} and {i} are the same bytes {token!r}; tokenizer.json "
                                f"cannot tell them apart")
        lower = [{"type": "Replace", "pattern": {"String": "Σ"}, "content": "σ"}, {"type": "Lowercase"}]
        prefix = [{"type": "Prepend", "prepend": " "}] if self.prefix_space else []  # before a non-empty text only
        normalizers = [{"type": "Replace", "pattern": {"Regex": f"[{SPACE}]+"}, "content": " "},
                       {"type": "Strip", "strip_left": True, "strip_right": True}] + (lower if self.lowercase else [])
        special = lambda name, segment: {"SpecialToken": {"id": name, "type_id": segment}}
        text = lambda name, segment: {"Sequence": {"id": name, "type_id": segment}}
        return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": s == "[MASK]", "rstrip": False,
                              "normalized": s == "[MASK]", "special": True} for i, s in enumerate(SPECIALS)],
            "normalizer": {"type": "Sequence", "normalizers": normalizers + prefix},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pretoken.pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "TemplateProcessing",
                "single": [special("[CLS]", 0), text("A", 0), special("[SEP]", 0)],
                "pair": [special("[CLS]", 0), text("A", 0), special("[SEP]", 0), text("B", 1), special("[SEP]", 1)],
                "special_tokens": {s: {"id": s, "ids": [SPECIALS.index(s)], "tokens": [s]}
                                   for s in ("[CLS]", "[SEP]")}},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [f"{tokens[a]} {tokens[b]}" for a, b in self.merges]}}

    @classmethod
    def from_hf(cls, d: dict, vocab_size: Optional[int] = None) -> "Tokenizer":
        """Read a tokenizer.json written by to_hf, or saved again by transformers (merges as "a b" or [a, b])."""
        try:
            vocab = d["model"]["vocab"]
            merges = [m.split(" ") if isinstance(m, str) else m for m in d["model"]["merges"]]
            pattern = next(p["pattern"]["Regex"] for p in d["pre_tokenizer"]["pretokenizers"] if p["type"] == "Split")
            kinds = [n["type"] for n in d["normalizer"]["normalizers"]]
            parts = [(vocab[a], vocab[b]) for a, b in merges], "Lowercase" in kinds, pattern, "Prepend" in kinds
        except (KeyError, TypeError, ValueError, StopIteration) as e:
            raise DataError(f"not a tokenizer.json of data.Tokenizer.save_hf ({type(e).__name__}: {e})") from None
        tok = cls.checked(*parts, vocab_size)
        if dict(zip(tok.hf_tokens(), range(tok.vocab_size))) != vocab:
            raise DataError("tokenizer.json's ids are not data.Tokenizer's layout (specials 0-4, bytes 5-260, "
                            "then one id per merge in rank order)")
        return tok

    def save_hf(self, directory: str, max_length: int):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `directory`, which
        transformers' AutoTokenizer loads as a PreTrainedTokenizerFast (inputs up to `max_length` tokens)."""
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        config = dict(tokenizer_class="PreTrainedTokenizerFast", model_max_length=max_length, padding_side="right",
                      clean_up_tokenization_spaces=False,
                      model_input_names=["input_ids", "token_type_ids", "attention_mask"], **names)
        os.makedirs(directory, exist_ok=True)
        for name, d in (("tokenizer.json", self.to_hf()), ("tokenizer_config.json", config),
                        ("special_tokens_map.json", names)):
            text = json.dumps(d, ensure_ascii=False, indent=1).encode()
            atomic_write(os.path.join(directory, name), lambda f: f.write(text))


def _byte_chars() -> list:
    """GPT-2's byte-level alphabet, used by the tokenizers library's ByteLevel pre-tokenizer and decoder: one
    printable character per byte. Printable Latin-1 bytes stand for themselves ("a" -> "a"), the other 68 for
    U+0100 onwards in byte order (" " -> "Ġ", "\\n" -> "Ċ")."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_CHARS = _byte_chars()


# ----------------------------------------------------------------------------------------------------
# Corpora: documents as lists of sentences

def synthetic_corpus(seed: int = 0, n_docs: int = 2000, n_topics: int = 12) -> list:
    """A generated language in which both pre-training tasks are learnable.

    Grammar (MLM): sentence -> NP VP ["and" NP VP] "."; NP -> det adj* noun [prep NP]; VP -> verb NP.
    Number agrees: singular determiners ("a", "this", ...) take a noun without "-s" and, as subject, a verb
    with "-s" ("a vemo kires the tupas ."); plural ones the reverse. Topics (NSP): every document draws its
    nouns, verbs and adjectives mostly (85%) from one of `n_topics` vocabularies of made-up words, so
    consecutive sentences share a topic while a random sentence usually comes from another one.
    """
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    seen = set()

    def words(n):  # n new made-up words of 2-3 syllables, Zipf-weighted
        out = []
        while len(out) < n:
            w = "".join(rng.choices(syllables, k=rng.choice((2, 2, 3))))
            if w not in seen:
                seen.add(w)
                out.append(w)
        return out, [1 / (r + 1) for r in range(n)]

    kinds = {"noun": 40, "verb": 20, "adj": 15}
    shared = {k: words(n) for k, n in kinds.items()}
    topics = [{k: words(n) for k, n in kinds.items()} for _ in range(n_topics)]
    det = {False: ["a", "the", "one", "this", "every"], True: ["the", "some", "many", "these", "two"]}

    def pick(topic, kind):
        vocab, weights = topic[kind] if rng.random() < 0.85 else shared[kind]
        return rng.choices(vocab, weights)[0]

    def noun_phrase(topic, depth=0):
        plural = rng.random() < 0.4
        adjs = [pick(topic, "adj") for _ in range(rng.choice((0, 0, 1, 2)))]
        np_ = [rng.choice(det[plural]), *adjs, pick(topic, "noun") + ("s" if plural else "")]
        if depth == 0 and rng.random() < 0.25:
            np_ += [rng.choice(("in", "on", "near", "with", "under"))] + noun_phrase(topic, 1)[0]
        return np_, plural

    def clause(topic):
        subject, plural = noun_phrase(topic)
        return subject + [pick(topic, "verb") + ("" if plural else "s")] + noun_phrase(topic)[0]

    docs = []
    for _ in range(n_docs):
        topic = rng.choice(topics)
        sentences = []
        for _ in range(rng.randint(8, 24)):
            s = clause(topic) + (["and"] + clause(topic) if rng.random() < 0.2 else [])
            sentences.append(" ".join(s).capitalize() + " .")
        docs.append(sentences)
    return docs


# A sentence ends at . ! or ? (plus closing quotes/brackets) before an upper-case letter or digit, except
# after a few abbreviations and single initials ("Mr. Knightley", "H. americanus").
SENTENCE_END = regex.compile(r"(?<=[.!?]['\"’”)\]]*)(?<!\b(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|Prof|vs|etc|\p{Lu})\.)"
                             r"\s+(?=[`'\"“‘(\[]*[\p{Lu}\p{N}])")
WIKI_TITLE = regex.compile(r"^= [^=].* =$")  # " = Homarus gammarus = " (stripped) starts an article
WIKI_HEADING = regex.compile(r"^= = .* = =$")  # " = = Description = = " is a sub-heading, dropped
CORPUS_EXTENSIONS = (".txt", ".text", ".raw", ".jsonl")  # what read_corpus takes from a folder


def split_sentences(paragraph: str) -> list:
    """split_sentences("It rained. Mr. Smith left! Then?") == ["It rained.", "Mr. Smith left!", "Then?"]"""
    return [s for s in SENTENCE_END.split(" ".join(paragraph.split())) if s]


CHUNK_BYTES = 1 << 22  # plain-text input is cut into chunks of about 4 MB at document boundaries
SYNTHETIC_CHUNK_DOCS = 500  # documents per chunk of the synthetic corpus
WORKER_CACHE = 1 << 18  # a worker empties its tokenizer's pre-token cache when it grows past this many entries
BLANK_LINE = re.compile(rb"\n[ \t\r\f\v]*\n")  # ends a document of a 'lines' file
TITLE_LINE = re.compile(rb"\n[ \t\r\f\v]*= [^=\r\n][^\r\n]* =[ \t\r\f\v]*(?=\n)")  # WIKI_TITLE on raw bytes


@dataclass
class Chunk:
    """Whole documents of one input, the unit of work of reading and encoding: raw bytes of a file from
    byte `offset` (line `line`), or documents of the synthetic corpus. Chunks are read independently."""
    file_no: int  # the file's position in the corpus: with `line`, names each document for the split
    path: str
    fmt: str  # jsonl | wikitext | book | lines | synthetic
    offset: int  # where `raw` starts in the file, in bytes
    line: int  # 1-based line number of raw's first line (synthetic: index of the first document)
    raw: bytes = b""
    docs: list = None  # synthetic documents (lists of sentences)
    opens_file: bool = False  # the file's first chunk, which counts the file in the report

    def size(self) -> int:
        return len(self.raw) if self.docs is None else sum(len(s.encode()) for d in self.docs for s in d)


def _text_layout(lines: list, layout: str) -> str:
    """'lines' (BERT's format: one sentence per line, blank line between documents) or 'book' (wrapped
    paragraphs; the file is one document). 'auto' picks 'lines' when >= 60% of non-blank lines end like a
    sentence: Brown's lines do (92%), the Gutenberg books' wrapped lines don't (11-35%)."""
    if layout != "auto":
        return layout
    filled = [l for l in lines if l]
    ends = sum(l[-1] in ".!?'\"”’)`" for l in filled)
    return "lines" if ends >= 0.6 * len(filled) else "book"


def _file_format(path: str, head: bytes, layout: str) -> str:
    """The format from the extension (.jsonl -> JSON Lines, .raw -> WikiText), else from the file's first
    CHUNK_BYTES: a first line like " = Title = " -> WikiText, otherwise plain text (see _text_layout)."""
    if path.endswith(".jsonl"):
        return "jsonl"
    text = head.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
    lines = [l.strip() for l in text.split("\n")]
    first = next((l for l in lines if l), "")
    return "wikitext" if path.endswith(".raw") or WIKI_TITLE.match(first) else _text_layout(lines, layout)


def _last_boundary(buf: bytes, fmt: str) -> int:
    """Where a chunk of `buf` may end: after the last line (jsonl), the last blank line (lines), before
    the last title line (wikitext); 0 if there is none. Books are one document: never."""
    if fmt == "book":
        return 0
    if fmt == "jsonl":
        return buf.rfind(b"\n") + 1
    pattern, tail = (BLANK_LINE, 0) if fmt == "lines" else (TITLE_LINE, 1)  # a title line starts the next chunk
    for start in (max(0, len(buf) - (1 << 16)), 0):  # most often found near the end
        last = None
        for last in pattern.finditer(buf, start):
            pass
        if last:
            return last.start() + 1 if tail else last.end()
    return 0


def _file_chunks(file_no: int, path: str, layout: str):
    """The file as Chunks of whole documents, about CHUNK_BYTES each, read as a stream: memory holds a
    chunk or two, except for a document larger than that (a book is one document)."""
    with open(path, "rb") as f:
        buf = f.read(CHUNK_BYTES)
        bom = len(codecs.BOM_UTF8) if buf.startswith(codecs.BOM_UTF8) else 0
        while not buf[bom:].strip():
            more = f.read(CHUNK_BYTES)
            if not more:
                raise DataError(f"{path}: file is empty (or only whitespace); remove it from the corpus")
            buf += more
        head = buf[bom:] if not f.peek(1) else buf[bom:buf.rfind(b"\n") + 1] or buf[bom:]  # whole lines
        fmt = _file_format(path, head, layout)
        buf, offset, line, eof = buf[bom:], bom, 1, False
        while buf or not eof:
            cut = len(buf) if eof else _last_boundary(buf, fmt) if len(buf) >= CHUNK_BYTES else 0
            if not cut:
                more = f.read(CHUNK_BYTES)
                buf, eof = buf + more, not more
                continue
            yield Chunk(file_no, path, fmt, offset, line, buf[:cut], opens_file=offset == bom)
            offset, line, buf = offset + cut, line + buf.count(b"\n", 0, cut), buf[cut:]


def _decode(chunk: Chunk, decode_errors: str) -> str:
    """The chunk's text: UTF-8 (the error names the byte offset in the file); CRLF and CR become LF."""
    try:
        text = chunk.raw.decode("utf-8", errors=decode_errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{chunk.path}: not valid UTF-8 at byte offset {chunk.offset + e.start} "
                        f"(byte 0x{chunk.raw[e.start]:02x}); re-encode it (e.g. `iconv -f latin1 -t utf-8`) "
                        f"or pass --decode-errors replace") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _paragraph_documents(chunk: Chunk, decode_errors: str) -> list:
    """The chunk's documents as (line number of their first line, list of paragraphs)."""
    lines = [l.strip() for l in _decode(chunk, decode_errors).split("\n")]
    docs, start, current = [], chunk.line, []
    if chunk.fmt == "jsonl":
        for n, line in enumerate(lines, chunk.line):
            if not line:
                continue
            try:
                docs.append((n, regex.split(r"\n\s*\n", json.loads(line)["text"])))
            except (json.JSONDecodeError, TypeError, KeyError) as e:
                raise DataError(f"{chunk.path}:{n}: expected a JSON object with a string \"text\" field per "
                                f"line ({type(e).__name__}: {e})") from None
        return docs
    if chunk.fmt == "book":
        return [(chunk.line, "\n".join(lines).split("\n\n"))]
    for n, line in enumerate(lines, chunk.line):
        title = chunk.fmt == "wikitext" and WIKI_TITLE.match(line)
        if title or chunk.fmt == "lines" and not line:  # a title starts an article, a blank line ends a document
            docs.append((start, current))
            start, current = n if title else n + 1, []
        elif line and not (chunk.fmt == "wikitext" and WIKI_HEADING.match(line)):
            current.append(line)
    docs.append((start, current))
    return [(n, d) for n, d in docs if d]


def chunk_documents(chunk: Chunk, decode_errors: str = "strict") -> tuple:
    """(documents as ((file_no, line), sentences), report counts) of one chunk. Paragraphs are sentence-split
    by SENTENCE_END (for 'lines' files each line is split too, so a line holding two sentences becomes two).
    Documents with fewer than two sentences are skipped (NSP needs a next sentence) and counted."""
    report = Counter(documents=0, sentences=0, skipped_short_documents=0)
    if chunk.opens_file:
        report[f"files_{chunk.fmt}"] += 1
    found = [(chunk.line + i, d) for i, d in enumerate(chunk.docs)] if chunk.docs is not None else \
        [(n, [s for p in paragraphs for s in split_sentences(p)])
         for n, paragraphs in _paragraph_documents(chunk, decode_errors)]
    docs = []
    for n, sentences in found:
        if len(sentences) < 2:
            report["skipped_short_documents"] += 1
            continue
        docs.append(((chunk.file_no, n), sentences))
        report["documents"] += 1
        report["sentences"] += len(sentences)
    return docs, report


def _corpus_files(paths: list) -> list:
    """Files named in `paths`, folders searched recursively for CORPUS_EXTENSIONS, in sorted order."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs if f.endswith(CORPUS_EXTENSIONS))
            if not found:
                raise DataError(f"{p}: folder contains no text files ({', '.join(CORPUS_EXTENSIONS)})")
            files += found
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


def corpus_chunks(paths: list, layout: str = "auto"):
    """Every file of `paths` as Chunks, in order (see _file_chunks)."""
    for file_no, path in enumerate(_corpus_files(paths)):
        yield from _file_chunks(file_no, path, layout)


def read_corpus(paths: list, decode_errors: str = "strict", layout: str = "auto") -> tuple:
    """(documents as lists of sentences, report of counts), all in memory: for small corpora and tests.
    prepare() reads the same documents as a stream (corpus_chunks + chunk_documents)."""
    docs, report = [], Counter(documents=0, sentences=0, skipped_short_documents=0)
    for chunk in corpus_chunks(paths, layout):
        found, counts = chunk_documents(chunk, decode_errors)
        docs += [sentences for _, sentences in found]
        report.update(counts)
    return docs, dict(report)


def split_score(seed: int, key: tuple) -> float:
    """A seeded hash of a document's key (file number, line) in [0, 1): the document is for validation
    when its score is below valid_fraction. Decided per document, without seeing the others."""
    digest = hashlib.blake2b(f"{seed}:{key[0]}:{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2 ** 64


# ----------------------------------------------------------------------------------------------------
# Token cache: per split, flat token ids + sentence and document offsets, memory-mapped


@dataclass
class DataConfig:
    corpus: list = field(default_factory=list)  # files/folders of text; empty = the synthetic corpus
    cache_dir: str = "runs/data"  # where tokenizer.json, the token arrays and header.json are written
    vocab_size: int = 8192  # BPE vocabulary incl. 5 specials + 256 bytes (16384 for the shared corpus)
    lowercase: bool = True  # lower-case before BPE, as the paper does
    seed: int = 0  # seeds the synthetic corpus and the train/valid document split
    seq_len: int = 128  # tokens per example, [CLS]/[SEP] included (checked here, used by Batches)
    valid_fraction: float = 1 / 200  # share of documents held out for validation (paper: 199:1)
    tokenizer: str = ""  # path of a saved tokenizer to use instead of training one on the train split
    decode_errors: str = "strict"  # "strict": non-UTF-8 input is an error; "replace": decode it as U+FFFD
    layout: str = "auto"  # plain-text layout: "lines" (BERT's format), "book" (file = one document), "auto"
    synthetic_docs: int = 2000  # documents in the synthetic corpus (when corpus is empty)
    max_pretokens: int = 1 << 19  # BPE counts the most frequent this many distinct pre-tokens (see _count_pass)
    workers: int = 0  # processes that read and encode (0 = every core this process may use); same output


@dataclass
class Split:
    """One split as three flat arrays. Sentence i is tokens[sent_starts[i]:sent_starts[i + 1]]; document j
    is sentences doc_starts[j] .. doc_starts[j + 1] - 1. len() is the number of documents."""
    tokens: np.ndarray  # (num_tokens,) uint16 (int32 if the vocabulary needs it)
    sent_starts: np.ndarray  # (num_sentences + 1,) int64 offsets into tokens
    doc_starts: np.ndarray  # (num_docs + 1,) int64 offsets into sentences

    num_docs = property(lambda self: len(self.doc_starts) - 1)
    num_sentences = property(lambda self: len(self.sent_starts) - 1)
    num_tokens = property(lambda self: len(self.tokens))

    def __len__(self):
        return self.num_docs


@dataclass
class Prepared:
    tokenizer: Tokenizer
    train: Split
    valid: Split
    report: dict  # counts from read_corpus and the header (documents, skips, files per format, ...)
    reused: bool  # True when the cache was read instead of rebuilt
    unigram_entropy: float  # nats per token of the train split's unigram distribution (specials excluded)
    majority_accuracy: float  # MLM accuracy of always guessing the train split's most frequent token
    fingerprint: str  # a hash of the tokenizer and of every array's bytes: equal where the data are the same


CACHE_FORMAT, CACHE_VERSION = "bert-token-cache", 4  # 3: header.json holds each array's hash; 4: tokenizer v3
SPLIT_ARRAYS = ("tokens", "sent_starts", "doc_starts")  # the fields of Split, one .npy file each per split


def _fingerprint(cfg: DataConfig) -> dict:
    """Everything the cached arrays depend on; a content hash per input file (BLAKE2, ~1 s per GB)."""
    files = {}
    for path in _corpus_files(cfg.corpus):
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        files[os.path.abspath(path)] = h.hexdigest()
    if cfg.tokenizer and not os.path.isfile(cfg.tokenizer):
        raise DataError(f"{cfg.tokenizer}: tokenizer file not found; pass a tokenizer.json written by Tokenizer.save")
    given = Tokenizer.load(cfg.tokenizer).hash() if cfg.tokenizer else ""
    keys = ("vocab_size", "lowercase", "seed", "valid_fraction", "decode_errors", "layout", "synthetic_docs",
            "max_pretokens")
    return dict(files=files, tokenizer_file=given, **{k: getattr(cfg, k) for k in keys})


def tokenize_documents(docs: list, tok: Tokenizer) -> Split:
    """Encode every sentence into a Split's flat arrays. Sentences are encoded one by one, each with the space
    a v3 tokenizer puts before a text, so a sentence's first word has the spaced form (" the") it has inside a
    GLUE field or SQuAD context: a text gives the same tokens sentence by sentence as whole."""
    tokens = array("H" if tok.vocab_size <= 1 << 16 else "i")
    sent_starts, doc_starts = [0], [0]
    for doc in docs:
        for s in doc:
            tokens.extend(tok.encode(s))
            sent_starts.append(len(tokens))
        doc_starts.append(len(sent_starts) - 1)
    return Split(np.frombuffer(tokens, tokens.typecode).copy(), np.array(sent_starts, np.int64),
                 np.array(doc_starts, np.int64))


def _load_cache(cache_dir: str, key) -> tuple:
    """(tokenizer, splits, header) if cache_dir holds a complete cache built from `key` (None: from any
    inputs), else None. header.json is written last and records every array's size: if it is missing, from
    other inputs, or an array is truncated, the cache is not used."""
    header_path = os.path.join(cache_dir, "header.json")
    try:
        with open(header_path) as f:
            header = json.load(f)
        tok = Tokenizer.load(os.path.join(cache_dir, "tokenizer.json"))
    except (OSError, ValueError):
        return None
    if (header.get("format"), header.get("version")) != (CACHE_FORMAT, CACHE_VERSION) \
            or key not in (None, header["key"]):
        return None
    paths = {f"{s}.{a}": os.path.join(cache_dir, f"{s}.{a}.npy") for s in ("train", "valid") for a in SPLIT_ARRAYS}
    if tok.hash() != header["tokenizer_hash"] or any(
            not os.path.exists(p) or os.path.getsize(p) != header["sizes"].get(n) for n, p in paths.items()):
        return None
    arrays = {name: np.load(p, mmap_mode="r") for name, p in paths.items()}
    return tok, [Split(*(arrays[f"{s}.{a}"] for a in SPLIT_ARRAYS)) for s in ("train", "valid")], header


# Building the cache: two streaming passes over the corpus, in chunks of whole documents, in worker processes.
# Pass 1 reads every chunk and counts the pre-tokens of its training documents; the parent adds the counts up
# (chunk by chunk, in corpus order) and trains BPE on them. Pass 2 reads every chunk again and encodes it; the
# parent appends the arrays to the .npy files in corpus order. Each chunk's result depends on the chunk alone,
# so any number of workers writes the same bytes as one.

_task = {}  # the settings of the pass a process is reading chunks for (set by _run)


def _run(fn, chunk: Chunk, settings: dict):
    """fn(chunk) under the pass's settings: seed, valid_fraction, decode_errors, lowercase, count (pass 1),
    tokenizer and extra_valid (pass 2). A process loads them on its first chunk of a pass."""
    if _task.get("settings") != settings:
        _task.clear()
        _task.update(settings, settings=settings)
        path = settings.get("tokenizer")  # a saved tokenizer keeps its own pre-token pattern and lower-casing
        _task["tokenizer"] = Tokenizer.load(path) if path else Tokenizer([], settings["lowercase"])
    return fn(chunk)


def start_worker():
    """Set-up of a forked worker process (this module's pool, train.py's batch builder): Ctrl-C and a SIGTERM
    handler it inherited are for the parent, which ends its workers; a worker whose parent is gone (killed,
    even by kill -9) exits within 0.2 s instead of waiting for work forever, and so lets go of what it
    inherited, such as the run folder's lock."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)
    threading.Thread(target=exit_when_orphaned, daemon=True).start()


def _scored(docs: list) -> list:
    """(split score, key, sentences, is for validation) of each document."""
    extra = _task.get("extra_valid", ())
    scores = [split_score(_task["seed"], key) for key, _ in docs]
    return [(score, key, s, score < _task["valid_fraction"] or key in extra) for score, (key, s) in zip(scores, docs)]


def _count_chunk(chunk: Chunk) -> dict:
    """Pass 1 on one chunk: report counts, validation documents, pre-token counts of the training documents,
    and the two training documents of lowest split score with their counts (see _count_pass)."""
    docs, report = chunk_documents(chunk, _task["decode_errors"])
    train = [(score, key, sentences) for score, key, sentences, valid in _scored(docs) if not valid]
    tok = _task["tokenizer"]
    count = (lambda texts: count_pretokens(texts, tok)) if _task["count"] else (lambda texts: Counter())
    spare = [(score, key, count(sentences)) for score, key, sentences in heapq.nsmallest(2, train)]
    return dict(report=report, n_valid=len(docs) - len(train), spare=spare, size=chunk.size(),
                counts=count(s for _, _, sentences in train for s in sentences))


def _encode_chunk(chunk: Chunk) -> dict:
    """Pass 2 on one chunk: the training and validation documents as Splits (offsets from 0), and the token
    histogram of the training ones."""
    docs, _ = chunk_documents(chunk, _task["decode_errors"])
    tok, scored = _task["tokenizer"], _scored(docs)
    if len(tok.cache) > WORKER_CACHE:  # bounded memory: the frequent pre-tokens come back at once
        tok.cache.clear()
    splits = [tokenize_documents([s for _, _, s, valid in scored if valid == want], tok) for want in (False, True)]
    return dict(splits=splits, counts=np.bincount(splits[0].tokens, minlength=tok.vocab_size), size=chunk.size(),
                docs=len(docs))


@contextlib.contextmanager
def _worker_pool(workers: int):
    """A pool of `workers` processes (None for one: chunks are then read in this process). On leaving,
    also by an error, the chunks still queued are dropped and the workers end."""
    if workers == 1:
        yield None
        return
    pool = ProcessPoolExecutor(workers, initializer=start_worker)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ordered_map(fn, chunks, settings: dict, pool, workers: int):
    """fn(chunk) for every chunk, yielded in input order: in this process (pool None) or in the pool's
    workers, at most two chunks per worker in flight (bounded memory). An exception in a worker (bad input)
    or a worker that dies ends the map at once."""
    if pool is None:
        yield from (_run(fn, chunk, settings) for chunk in chunks)
        return
    pending = deque()
    for chunk in chunks:
        try:
            future = pool.submit(_run, fn, chunk, settings)
        except BrokenProcessPool:
            _next_result(pending)  # raises, naming where reading was
        pending.append((future, f"{chunk.path} from byte {chunk.offset} (line {chunk.line})"))
        if len(pending) > 2 * workers:
            yield _next_result(pending)
    while pending:
        yield _next_result(pending)


def _next_result(pending: deque):
    """The oldest chunk's result; a dead worker (which breaks the whole pool) becomes a DataError."""
    future, where = pending[0]
    try:
        result = future.result()
    except BrokenProcessPool:
        raise DataError(f"a worker process died (out of memory? killed?) while the chunks from {where} on were "
                        f"read; no cache was written. Retry, with fewer --workers if memory is short") from None
    pending.popleft()
    return result


class _Meter:
    """Progress of a pass: a line every 5 s (and at the end) with MB done, MB/s, documents and the ETA."""

    def __init__(self, what: str, total_bytes: int, progress):
        self.what, self.total, self.progress, self.done, self.docs = what, total_bytes, progress, 0, 0
        self.t0 = self.last = time.time()

    def add(self, n_bytes: int, n_docs: int, end: bool = False):
        self.done, self.docs, now = self.done + n_bytes, self.docs + n_docs, time.time()
        if end or now - self.last >= 5:
            self.last, rate = now, self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate if rate else 0
            self.progress(f"  {self.what}: {self.done / 1e6:,.0f}/{self.total / 1e6:,.0f} MB, {rate / 1e6:.2f} MB/s, "
                          f"{self.docs:,} documents, {now - self.t0:.0f} s, ETA {max(eta, 0):.0f} s")


def _settings(cfg: DataConfig, **more) -> dict:
    """What a worker needs of cfg to read a chunk (see _run), plus the pass's own settings."""
    return dict(seed=cfg.seed, valid_fraction=cfg.valid_fraction, decode_errors=cfg.decode_errors,
                lowercase=cfg.lowercase, **more)


def _most_frequent(counts: Counter, n: int) -> Counter:
    """The n most frequent pre-tokens (ties: the smaller string), independent of the order counts came in:
    those above the n-th largest count, then the smallest strings at that count."""
    threshold = sorted(counts.values(), reverse=True)[n - 1]
    kept = {piece: c for piece, c in counts.items() if c > threshold}
    ties = sorted(piece for piece, c in counts.items() if c == threshold)
    kept.update(dict.fromkeys(ties[:n - len(kept)], threshold))
    return Counter(kept)


def _count_pass(cfg: DataConfig, chunks, total: int, pool, workers: int, progress) -> tuple:
    """(pre-token counts of the training documents, report, keys of documents moved to validation).
    A document is for validation when its split_score is below valid_fraction; if that gives fewer than 2,
    the training documents of lowest score make up 2 (their counts are taken back). The count table keeps the
    cfg.max_pretokens most frequent pre-tokens, trimmed when it reaches twice that: bounded memory while
    distinct words grow with the corpus. Below that size the counts are exact."""
    report, counts, spare, n_valid = Counter(documents=0, sentences=0, skipped_short_documents=0), Counter(), [], 0
    meter = _Meter("pass 1/2, read + count", total, progress)
    settings = _settings(cfg, count=not cfg.tokenizer)
    for r in _ordered_map(_count_chunk, chunks, settings, pool, workers):
        report.update(r["report"])
        n_valid += r["n_valid"]
        counts.update(r["counts"])
        if len(counts) >= 2 * cfg.max_pretokens:
            counts = _most_frequent(counts, cfg.max_pretokens)
        spare = heapq.nsmallest(2, spare + r["spare"], key=lambda t: t[:2])
        meter.add(r["size"], r["report"]["documents"])
    meter.add(0, 0, end=True)
    moved = spare[:max(0, 2 - n_valid)]
    for _, _, c in moved:
        counts.subtract(c)
    n_valid += len(moved)
    if report["documents"] - n_valid < 2:
        raise DataError(f"the corpus has {report['documents']} usable documents (>= 2 sentences each); need at "
                        f"least {n_valid + 2} for {n_valid} validation + 2 training documents. Add text.")
    progress(f"read {report['documents']} documents ({n_valid} for validation), {report['sentences']} sentences")
    counts = +counts  # drops what moving documents took back
    if len(counts) > cfg.max_pretokens:
        counts = _most_frequent(counts, cfg.max_pretokens)
    return counts, dict(report), [key for _, key, _ in moved]


class _ArrayWriter:
    """A 1-D .npy file written in pieces: a header with room for any length, the data appended (and hashed, so
    that two machines can compare their caches cheaply), then the header rewritten with the final length and
    the file renamed into place. abort() removes it."""

    def __init__(self, path: str, dtype):
        self.path, self.tmp, self.dtype, self.n = path, f"{path}.tmp{os.getpid()}", np.dtype(dtype), 0
        self.digest = hashlib.blake2b(digest_size=16)
        self.f = open(self.tmp, "wb")
        self.header_len = self.f.write(self.header())

    def header(self) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                  "fortran_order": False, "shape": (self.n,)})
        return buf.getvalue()

    def append(self, values: np.ndarray):
        raw = np.ascontiguousarray(values, self.dtype).tobytes()
        self.digest.update(raw)
        self.f.write(raw)
        self.n += len(values)

    def close(self) -> int:
        """Finish the file; its size in bytes."""
        header = self.header()
        assert len(header) == self.header_len  # 128 bytes for any length below 10**40
        self.f.seek(0)
        self.f.write(header)
        self.f.close()
        os.replace(self.tmp, self.path)
        return os.path.getsize(self.path)

    def abort(self):
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _encode_pass(cfg: DataConfig, chunks, total: int, pool, workers: int, tok: Tokenizer, extra_valid: list,
                 progress) -> tuple:
    """Encode every chunk (in workers) and append its arrays to the cache's .npy files in corpus order;
    (file sizes, file hashes, token histogram of the train split)."""
    token_dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    writers = {f"{s}.{a}": _ArrayWriter(os.path.join(cfg.cache_dir, f"{s}.{a}.npy"),
                                        token_dtype if a == "tokens" else np.int64)
               for s in ("train", "valid") for a in SPLIT_ARRAYS}
    settings = _settings(cfg, tokenizer=os.path.join(cfg.cache_dir, "tokenizer.json"), tokenizer_hash=tok.hash(),
                         extra_valid=extra_valid)  # the hash tells rebuilds into the same folder apart
    counts, meter = np.zeros(tok.vocab_size, np.int64), _Meter("pass 2/2, encode", total, progress)
    try:
        for s in ("train", "valid"):
            writers[f"{s}.sent_starts"].append([0])
            writers[f"{s}.doc_starts"].append([0])
        for r in _ordered_map(_encode_chunk, chunks, settings, pool, workers):
            for s, split in zip(("train", "valid"), r["splits"]):
                n_tokens, n_sentences = writers[f"{s}.tokens"].n, writers[f"{s}.sent_starts"].n - 1
                writers[f"{s}.tokens"].append(split.tokens)
                writers[f"{s}.sent_starts"].append(split.sent_starts[1:] + n_tokens)
                writers[f"{s}.doc_starts"].append(split.doc_starts[1:] + n_sentences)
            counts += r["counts"]
            meter.add(r["size"], r["docs"])
        meter.add(0, 0, end=True)
        sizes = {name: w.close() for name, w in writers.items()}
        return sizes, {name: w.digest.hexdigest() for name, w in writers.items()}, counts
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def token_stats(counts: np.ndarray) -> dict:
    """Unigram entropy (nats) and majority-token accuracy of a token histogram, specials excluded: what a
    model that ignores context scores in MLM loss and accuracy."""
    c = counts[len(SPECIALS):].astype(np.float64)
    p = c[c > 0] / c.sum()
    return {"unigram_entropy": float(-(p * np.log(p)).sum()), "majority_accuracy": float(c.max() / c.sum())}


def reference_line(prepared: Prepared) -> str:
    """What a model that ignores context scores, to read the losses against (computed when the cache was built)."""
    return (f"reference: unigram entropy {prepared.unigram_entropy:.3f} nats (MLM loss ignoring context); guessing "
            f"the most frequent token gives MLM accuracy {prepared.majority_accuracy:.3f}; NSP chance 0.693 / 0.5")


def token_counts(tokens: np.ndarray, vocab_size: int, chunk: int = 1 << 24) -> np.ndarray:
    """np.bincount of a (memory-mapped) token array, 16M tokens at a time: never the whole array as int64."""
    counts = np.zeros(vocab_size, np.int64)
    for i in range(0, len(tokens), chunk):
        counts += np.bincount(tokens[i:i + chunk], minlength=vocab_size)
    return counts


def context_free_loss(fit: Split, vocab_size: int, scored: Optional[Split] = None) -> float:
    """The MLM loss (nats per token, specials excluded) of a model that ignores context and predicts `fit`'s
    unigram frequencies: their entropy on `fit` itself, or the cross-entropy of `scored`'s tokens (then
    add-0.5 smoothed, so that a token unseen in `fit` costs a finite loss). It is the plateau BERT training
    sits on before it uses context."""
    counts = token_counts(fit.tokens, vocab_size)
    if scored is None:
        return token_stats(counts)["unigram_entropy"]
    p = counts[len(SPECIALS):] + 0.5
    q = token_counts(scored.tokens, vocab_size)[len(SPECIALS):]
    return float(-(q * np.log(p / p.sum())).sum() / q.sum())


def _corpus(cfg: DataConfig) -> tuple:
    """(total input bytes, a function giving the corpus as Chunks in order, once per pass)."""
    if cfg.corpus:
        total = sum(os.path.getsize(p) for p in _corpus_files(cfg.corpus))
        return total, lambda: corpus_chunks(cfg.corpus, cfg.layout)
    docs = synthetic_corpus(cfg.seed, cfg.synthetic_docs)
    chunks = [Chunk(0, "synthetic corpus", "synthetic", 0, i, docs=docs[i:i + SYNTHETIC_CHUNK_DOCS])
              for i in range(0, len(docs), SYNTHETIC_CHUNK_DOCS)]
    return sum(c.size() for c in chunks), lambda: iter(chunks)


def worker_count(workers: int, total_bytes: int) -> int:
    """`workers`, 0 meaning every core this process may use, but no more than there are chunks to read."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(workers or available, -(-total_bytes // CHUNK_BYTES)))


def _build_cache(cfg: DataConfig, key: dict, progress):
    """Remove header.json, count (pass 1), train or load the tokenizer, encode (pass 2), then write
    header.json with the arrays' sizes and the train split's statistics. Until header.json is written there
    is no valid cache: an interrupted or failed build leaves none."""
    os.makedirs(cfg.cache_dir, exist_ok=True)
    header_path = os.path.join(cfg.cache_dir, "header.json")
    if os.path.exists(header_path):
        os.remove(header_path)
    remove_stale_temporaries(cfg.cache_dir)  # of a build that was killed
    total, chunks = _corpus(cfg)
    workers = worker_count(cfg.workers, total)
    progress(f"  {total / 1e6:,.1f} MB of input, {workers} worker process{'es' if workers > 1 else ''}")
    # one pool for both passes, started while this process is small: forked workers share its pages
    with _worker_pool(workers) as pool:
        counts, report, extra_valid = _count_pass(cfg, chunks(), total, pool, workers, progress)
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
        else:
            t0 = time.time()
            tok = Tokenizer.from_counts(counts, cfg.vocab_size, cfg.lowercase, progress)
            progress(f"trained BPE: {tok.vocab_size} tokens in {time.time() - t0:.1f} s")
        del counts
        tok.save(os.path.join(cfg.cache_dir, "tokenizer.json"))
        sizes, hashes, token_hist = _encode_pass(cfg, chunks(), total, pool, workers, tok, extra_valid, progress)
    header = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "tokenizer_hash": tok.hash(),
              "sizes": sizes, "hashes": hashes, "report": report, "stats": token_stats(token_hist)}
    atomic_write(header_path, lambda f: f.write(json.dumps(header, indent=1).encode()))


def _prepared(cached: tuple, reused: bool) -> Prepared:
    tok, (train, valid), header = cached
    fingerprint = hashlib.blake2b(json.dumps([header["tokenizer_hash"], header["hashes"]], sort_keys=True).encode(),
                                  digest_size=16).hexdigest()
    return Prepared(tok, train, valid, header["report"], reused, header["stats"]["unigram_entropy"],
                    header["stats"]["majority_accuracy"], fingerprint)


def open_cache(cache_dir: str) -> Prepared:
    """The complete cache in cache_dir, whichever inputs built it (no content hashing): for processes that
    waited while another one built it, e.g. the other ranks under torchrun."""
    cached = _load_cache(cache_dir, None)
    if cached is None:
        raise DataError(f"{cache_dir}: no complete token cache (header.json missing or arrays truncated)")
    return _prepared(cached, reused=True)


def prepare(cfg: DataConfig, progress=print) -> Prepared:
    """Tokenized train/valid splits for `cfg`, from cfg.cache_dir when it was built from the same inputs
    (file contents, tokenizer, settings), else rebuilt there. Arrays are memory-mapped, not loaded."""
    if cfg.seq_len < 8:
        raise DataError(f"seq_len={cfg.seq_len} is too short: [CLS] A [SEP] B [SEP] needs at least 8")
    if cfg.decode_errors not in ("strict", "replace") or cfg.layout not in ("auto", "lines", "book") or \
            cfg.workers < 0 or cfg.max_pretokens < 1 or not 0 < cfg.valid_fraction < 1:  # data.py's flags too
        raise DataError(f"decode_errors={cfg.decode_errors!r} (strict|replace), layout={cfg.layout!r} (auto|lines|"
                        f"book), workers={cfg.workers} (0: every core, or more), max_pretokens={cfg.max_pretokens} "
                        f"(1 or more), valid_fraction={cfg.valid_fraction} (in (0, 1))")
    if not cfg.tokenizer:
        check_vocab_size(cfg.vocab_size)
    key = _fingerprint(cfg)
    with _build_lock(cfg.cache_dir, progress):
        cached = _load_cache(cfg.cache_dir, key)
        reused = cached is not None
        if reused:
            progress(f"reusing token cache in {cfg.cache_dir}")
        else:
            progress(f"building token cache in {cfg.cache_dir}")
            _build_cache(cfg, key, progress)
            cached = _load_cache(cfg.cache_dir, key)  # read back memory-mapped, exactly as a later run will
    return _prepared(cached, reused)


@contextlib.contextmanager
def _build_lock(cache_dir: str, progress):
    """Hold <cache_dir>/.build.lock while the cache is checked and built, so that two processes (two runs
    started at once on one --cache-dir) never build it together, the second removing the first's temporaries:
    the second waits, naming the first's pid, then reuses the cache (or rebuilds it, for other inputs). A cache
    folder that cannot be written (a shared, prebuilt one) is read without a lock."""
    with contextlib.suppress(OSError):
        os.makedirs(cache_dir, exist_ok=True)
    if not os.access(cache_dir, os.W_OK):
        yield
        return
    with pid_lock(os.path.join(cache_dir, ".build.lock"), lambda pid: progress(
            f"waiting for process {pid}, which is building the token cache in {cache_dir}")):
        yield


@contextlib.contextmanager
def pid_lock(path: str, busy):
    """Hold an exclusive flock on the file `path`, which then holds this process's pid. If another process holds
    it, busy(its pid) is called first: it may raise (fail at once) or return (then wait for the lock). The
    kernel drops the lock when its holder dies, even by kill -9, so a file left behind never blocks. Where
    fcntl is missing (Windows) nothing is locked. The run folder's lock (train.py) and the cache's use it."""
    with open(path, "a+") as f:
        if fcntl:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                busy(f.read().strip() or "?")
                fcntl.flock(f, fcntl.LOCK_EX)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


TEMPORARY = re.compile(r".+\.tmp(\d+)")  # bert.atomic_write's temporary, named after its process id


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str) -> list:
    """Delete the temporaries that processes killed mid-write (kill -9, power loss) left in `folder` (a run folder
    at start, the token cache before a build); return their names. A live process's temporary is left alone."""
    matches = [TEMPORARY.fullmatch(n) for n in sorted(os.listdir(folder))]
    stale = [m.group(0) for m in matches if m and not process_alive(int(m.group(1)))]
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


# ----------------------------------------------------------------------------------------------------
# Batches: [CLS] A [SEP] B [SEP] with NSP labels and dynamic MLM masks


def truncate_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple:
    """Lengths after BERT's truncate_seq_pair: drop one token at a time from the longer side (B on ties).
    truncate_lengths(10, 3, 8) == (5, 3); truncate_lengths(6, 6, 8) == (4, 4); (7, 6, 8) -> (4, 4)."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return len_a, len_b
    cut = min(excess, abs(len_a - len_b))  # first the longer side down to the shorter one
    len_a, len_b = (len_a - cut, len_b) if len_a > len_b else (len_a, len_b - cut)
    excess -= cut
    return len_a - excess // 2, len_b - (excess + 1) // 2  # then alternately, B first


def bert_input(a, b=None) -> tuple:
    """BERT's input layout (Devlin et al. 2019, section 3): [CLS] a [SEP], then b [SEP] for a pair; and its
    segment ids, 0 through the first [SEP] and 1 after. a, b: token ids (lists or arrays). Returns two int64
    arrays. Pre-training (Batches), GLUE (glue.encode) and the attention maps all build their inputs here."""
    second = [] if b is None else [b, [SEP]]
    ids = np.concatenate([[CLS], a, [SEP], *second]).astype(np.int64)
    types = np.zeros(len(ids), np.int64)
    types[len(a) + 2:] = 1
    return ids, types


class Batches:
    """MLM + NSP examples drawn on the fly from a Split. Example `e` depends only on (seed, e).

    Building example e (BERT's create_instances_from_document, one instance at a time):
    1. target length = seq_len - 3, or with prob short_seq_prob a random length in [2, seq_len - 3];
    2. a random sentence s starts a chunk of consecutive sentences of its document reaching the target
       (moved back when the document ends first, so chunks near a document's end are full too);
    3. A = the chunk's first k sentences (k random); B = the rest of the chunk (NSP label 0), or with
       prob 0.5 consecutive sentences from a random start in another document (label 1);
    4. the longer of A and B is cut one token at a time, at a random end, until the pair fits;
    5. MLM: round(15%) of A and B's tokens (at least 1) are chosen; 80% -> [MASK], 10% -> a random
       ordinary token, 10% unchanged; labels hold the original ids there and IGNORE elsewhere, and
       mlm_positions lists the chosen positions in order, padded with 0 to a fixed `max_predictions`
       (BERT's max_predictions_per_seq), so the model gathers them with no data-dependent shape.
    """

    def __init__(self, split: Split, tokenizer: Tokenizer, seq_len: int, seed: int, mlm_prob: float = 0.15,
                 short_seq_prob: float = 0.1):
        if split.num_docs < 2:
            raise DataError(f"a split with {split.num_docs} document(s) cannot make NSP pairs; need >= 2")
        if seq_len < 8:
            raise DataError(f"seq_len={seq_len} is too short: [CLS] A [SEP] B [SEP] needs at least 8")
        self.split, self.vocab_size, self.seq_len, self.seed = split, tokenizer.vocab_size, seq_len, seed
        self.mlm_prob, self.short_seq_prob = mlm_prob, short_seq_prob
        self.max_predictions = max(1, int(round((seq_len - 3) * mlm_prob)))  # _example's n_pred at most
        # sentence -> its document, for O(1) lookups
        self.doc_of = np.repeat(np.arange(split.num_docs), np.diff(split.doc_starts))
        self.starts = np.asarray(split.sent_starts)
        self.doc_starts = np.asarray(split.doc_starts)

    def _window(self, s: int, target: int, min_sentences: int, doc: int) -> tuple:
        """Sentences [start, end) of document `doc` holding >= target tokens where the document allows:
        start = s, moved back when the document would end first, so that windows are full, not short."""
        first, last, starts = int(self.doc_starts[doc]), int(self.doc_starts[doc + 1]), self.starts
        latest = int(np.searchsorted(starts, starts[last] - target, side="right")) - 1  # last start that fits
        start = max(first, min(s, latest, last - min_sentences))
        end = int(np.searchsorted(starts, starts[start] + target, side="left"))
        return start, min(max(end, start + min_sentences), last)

    def _pair(self, rng) -> tuple:
        """(A, B, is_random): token arrays of the two segments, before truncation."""
        max_tokens = self.seq_len - 3
        target = max_tokens if rng.random() >= self.short_seq_prob else int(rng.integers(2, max_tokens + 1))
        is_random = bool(rng.random() < 0.5)
        s = int(rng.integers(self.split.num_sentences))
        d = int(self.doc_of[s])
        s, end = self._window(s, target, 1 if is_random else 2, d)  # a true next B needs 2+ sentences
        a_end = s + 1 if end - s == 1 else int(rng.integers(s + 1, end))
        tokens, starts = self.split.tokens, self.starts
        a = tokens[starts[s]:starts[a_end]]
        if not is_random:
            return a, tokens[starts[a_end]:starts[end]], False
        r = int(rng.integers(self.split.num_docs - 1))
        r += r >= d  # any document but d
        rs = int(rng.integers(self.doc_starts[r], self.doc_starts[r + 1]))
        rs, r_end = self._window(rs, max(1, target - len(a)), 1, r)
        return a, tokens[starts[rs]:starts[r_end]], True

    def _example(self, e: int, ids, types, labels, positions) -> int:
        """Fill row buffers (T,) and positions (max_predictions,) with example e; return its NSP label."""
        rng = np.random.default_rng([self.seed, e])
        a, b, is_random = self._pair(rng)
        la, lb = truncate_lengths(len(a), len(b), self.seq_len - 3)
        front_a, front_b = rng.binomial(len(a) - la, 0.5), rng.binomial(len(b) - lb, 0.5)  # cut at random ends
        row, segments = bert_input(a[front_a:front_a + la], b[front_b:front_b + lb])
        ids[:len(row)], types[:len(row)] = row, segments
        candidates = np.r_[1:la + 1, la + 2:la + lb + 2]  # positions of A and B tokens
        n_pred = max(1, int(round(len(candidates) * self.mlm_prob)))
        chosen = rng.permutation(candidates)[:n_pred]
        labels[chosen] = ids[chosen]
        positions[:n_pred] = np.sort(chosen)
        action = rng.random(n_pred)
        ids[chosen[action < 0.8]] = MASK
        random_pos = chosen[action >= 0.9]
        ids[random_pos] = rng.integers(len(SPECIALS), self.vocab_size, size=len(random_pos))
        return int(is_random)

    def get(self, example_ids: Sequence[int]) -> dict:
        """Batch of the given examples: input_ids, token_type_ids, attention_mask, mlm_labels (B, T),
        nsp_labels (B,), mlm_positions (B, max_predictions)."""
        n, T = len(example_ids), self.seq_len
        ids, types = np.full((n, T), PAD, np.int64), np.zeros((n, T), np.int64)
        labels, nsp = np.full((n, T), IGNORE, np.int64), np.zeros(n, np.int64)
        positions = np.zeros((n, self.max_predictions), np.int64)
        for row, e in enumerate(example_ids):
            nsp[row] = self._example(int(e), ids[row], types[row], labels[row], positions[row])
        batch = dict(input_ids=ids, token_type_ids=types, attention_mask=(ids != PAD).astype(np.int64),
                     mlm_labels=labels, nsp_labels=nsp, mlm_positions=positions)
        return {k: torch.from_numpy(v) for k, v in batch.items()}

    def for_step(self, step: int, global_batch: int, rank: int = 0, world_size: int = 1, micro: int = 0,
                 n_micro: int = 1) -> dict:
        """This rank's micro-batch of the global batch at `step` (example ids step*G .. step*G + G - 1).
        Rank r takes the contiguous share [r*G/W, (r+1)*G/W), micro-batch m the m-th of n_micro slices of it,
        so W ranks x M micro-batches see the same examples for every W*M with the same G."""
        if global_batch % (world_size * n_micro):
            raise DataError(f"global batch {global_batch} is not divisible by world_size {world_size} x "
                            f"micro-batches {n_micro}; pick a multiple of {world_size * n_micro}")
        if not (0 <= rank < world_size and 0 <= micro < n_micro):
            raise ValueError(f"rank {rank} / micro {micro} out of range ({world_size} ranks, {n_micro} micro)")
        size = global_batch // (world_size * n_micro)
        first = step * global_batch + (rank * n_micro + micro) * size
        return self.get(range(first, first + size))


def show_example(tok: Tokenizer, batch: dict, row: int = 0) -> str:
    """One example as text with its NSP label; specials are spaced out so [MASK]s stand out."""
    ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
    text = "".join(f" {SPECIALS[i]} " if i < len(SPECIALS) else tok.decode([i]) for i in ids)
    relation = "random B" if batch["nsp_labels"][row] else "true next B"
    return f"({relation}) " + " ".join(text.split())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of every command here (data.py, train.py, glue.py, experiments/): the description's layout kept,
    then each flag's default unless it is empty or the flag's help already says it."""

    def _get_help_string(self, action):
        if action.default in (None, "", []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # input
    p.add_argument("--corpus", nargs="*", default=[], help="text files/folders (.txt .raw .jsonl); none = synthetic")
    p.add_argument("--layout", choices=["auto", "lines", "book"], default="auto",
                   help="plain text: 'lines' = one sentence per line, blank line between documents (BERT); "
                        "'book' = wrapped paragraphs, one document per file; 'auto' decides per file")
    p.add_argument("--decode-errors", choices=["strict", "replace"], default="strict",
                   help="non-UTF-8 bytes: 'strict' stops with the file and offset, 'replace' decodes them as U+FFFD")
    p.add_argument("--synthetic-docs", type=int, default=2000, help="documents in the synthetic corpus")
    # tokenizer and cache
    p.add_argument("--out", dest="cache_dir", metavar="OUT", default="runs/data",
                   help="cache folder (tokenizer.json, token arrays, header.json)")
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size incl. 261 base tokens")
    p.add_argument("--lowercase", action=argparse.BooleanOptionalAction, default=True, help="lower-case text first")
    p.add_argument("--tokenizer", default="", help="use this saved tokenizer.json instead of training one")
    p.add_argument("--max-pretokens", type=int, default=DataConfig.max_pretokens,
                   help="BPE counts at most this many distinct pre-tokens, the most frequent (bounds memory)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that read and encode the corpus (0 = every core this process may use); "
                        "any number gives the same cache")
    # split and batches
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus, the split and the sample batch")
    p.add_argument("--valid-fraction", type=float, default=1 / 200, help="share of documents for validation")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per example in the sample batch")
    cfg = DataConfig(**vars(p.parse_args()))  # a flag per field, checked by prepare
    try:
        prep = prepare(cfg)
    except DataError as e:
        raise SystemExit(f"error: {e}")
    except OSError as e:  # e.g. an --out that cannot be written
        raise SystemExit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted: the cache in {cfg.cache_dir} is unfinished; the same command builds it again")
    print(f"report: {json.dumps(prep.report)}")
    for name, split in (("train", prep.train), ("valid", prep.valid)):
        print(f"{name}: {split.num_docs:,} docs, {split.num_sentences:,} sentences, {split.num_tokens:,} tokens")
    print(f"vocab: {prep.tokenizer.vocab_size}\n{reference_line(prep)}")
    batch = Batches(prep.train, prep.tokenizer, cfg.seq_len, cfg.seed).get(range(2))
    for row in range(2):
        print(show_example(prep.tokenizer, batch, row))
