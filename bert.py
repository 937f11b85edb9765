"""A pure-PyTorch BERT for pre-training (MLM + NSP), numerically equal to HuggingFace's BertForPreTraining.

This is the model both papers grow (Gong et al. 2019, "Efficient Training of BERT by Progressively
Stacking", section 3; MSLT, "Progressively Stacking 2.0", section 3.2). Two layouts:

- post-LN (`pre_norm=False`): the original BERT, LayerNorm after each residual add. Same weights, same
  numbers as `transformers.BertForPreTraining` (see `save_hf` / `load_hf` and the equivalence test).
- pre-LN (`pre_norm=True`): LayerNorm before each sub-layer and a final LayerNorm, the layout of the
  stacking paper's own code. A layer whose two output projections are zero is then an exact identity,
  which is what the paper's *identity* baseline relies on (section 4.1). transformers has this layout as
  `RobertaPreLayerNormForMaskedLM`, which `save_hf` writes (without pooler and NSP head, which it lacks).

The encoder layers are a plain `nn.ModuleList` of blocks, so growth operators (stack.py) can stack, copy
and share them; with `group_size > 1` consecutive layers share one block (ALBERT-style, per group).
Layers whose parameters are all frozen and whose input needs no gradient build no autograd graph, so
backward stops at the first trainable layer: MSLT's speed comes from that alone.

Run `python bert.py` for a tiny forward/backward smoke test and a parameter count of each preset.
"""

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass, fields, replace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE = -100  # MLM label of a position that is not predicted (HuggingFace's convention)


@dataclass
class BertConfig:
    vocab_size: int = 30522  # word-piece / BPE vocabulary, special tokens included ([PAD] = 0)
    max_position: int = 512  # learned position embeddings: the longest input
    n_layer: int = 12  # encoder layers (depth)
    n_head: int = 12  # attention heads per layer
    d_model: int = 768  # hidden size
    d_ff: int = 3072  # feed-forward inner size
    dropout: float = 0.1  # dropout on embeddings and on each residual branch
    attn_dropout: float = 0.1  # dropout on attention probabilities
    ln_eps: float = 1e-12  # LayerNorm epsilon (BERT's 1e-12)
    n_segment: int = 2  # segment (token type) vocabulary: A = 0, B = 1
    pre_norm: bool = False  # False: original post-LN BERT; True: pre-LN with a final LayerNorm
    group_size: int = 1  # consecutive layers sharing one block (1 = no sharing; ALBERT groups > 1)

    def __post_init__(self):
        """Refuse, in one line, a config that no BERT has, before anything is built from it: a config may come
        from a file (a checkpoint, a config.json), retyped or damaged. A size is at most 2^24 (a vocabulary of
        16.7M tokens, say), so that no product of two overflows a tensor's byte count, even on the meta device."""
        kinds = {f.name: f.type for f in fields(self)}
        bad = [f"{k}={v!r}" for k, v in vars(self).items() if kinds[k] is int and (type(v) is not int or
               not 0 < v <= 1 << 24) or kinds[k] is float and (type(v) not in (int, float) or not 0 <= v < 1)]
        if bad:  # NaN fails the rates' test too
            raise ValueError(f"config has {', '.join(bad)}: sizes must be integers in [1, 2^24], rates in [0, 1)")
        # At most a few thousand layers: the deepest Transformers trained have about 1,000 (DeepNet, 2022).
        if self.n_layer > 4096 or self.n_layer % self.group_size or self.d_model % self.n_head:
            raise ValueError(f"config says {self.n_layer} layers in groups of {self.group_size}, {self.n_head} heads, "
                             f"d_model {self.d_model}: want at most 4096 layers, whole groups, heads dividing d_model")

# Sizes used by the papers and by the CPU experiments; the vocabulary comes from the tokenizer.
PRESETS = {
    "tiny": BertConfig(n_layer=12, n_head=2, d_model=64, d_ff=256, max_position=128),  # default CPU smoke run
    "cpu-12x128": BertConfig(n_layer=12, n_head=2, d_model=128, d_ff=512, max_position=128),
    "cpu-12x256": BertConfig(n_layer=12, n_head=4, d_model=256, d_ff=1024),
    "bert-base": BertConfig(n_layer=12, n_head=12, d_model=768, d_ff=3072),  # both papers
    "bert-large": BertConfig(n_layer=24, n_head=16, d_model=1024, d_ff=4096),  # MSLT, Table 1
}


def preset(name: str, **overrides) -> BertConfig:
    """A named size with fields overridden, e.g. preset("bert-base", vocab_size=32000, pre_norm=True)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


@dataclass
class BertOutput:
    """What `Bert.forward` returns, the same fields whatever arguments are given."""

    loss: Optional[torch.Tensor]  # mlm_loss + nsp_loss (of those whose labels were given), else None
    mlm_loss: Optional[torch.Tensor]  # mean cross-entropy over labelled positions, None without mlm_labels
    nsp_loss: Optional[torch.Tensor]  # mean cross-entropy of the 2-way NSP head, None without nsp_labels
    mlm_logits: torch.Tensor  # (B, T, V) without mlm_labels; (B, P, V) at the P mlm_positions of each row with them
    nsp_logits: torch.Tensor  # (B, 2); class 0 = "B follows A"


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused q/k/v projection and two paths to the same numbers.

    The fast path is `F.scaled_dot_product_attention`; the explicit path computes softmax(q k^T / sqrt(d))
    itself and also returns the probabilities, for attention maps. Nothing is stored on the module.
    """

    def __init__(self, c: BertConfig):
        super().__init__()
        self.n_head = c.n_head
        self.qkv = nn.Linear(c.d_model, 3 * c.d_model)
        self.out = nn.Linear(c.d_model, c.d_model)  # the residual branch's last linear map
        self.attn_dropout = c.attn_dropout

    def forward(self, x, keep, need_weights: bool = False):
        """x: (B, T, D); keep: (B, 1, 1, T) bool, True at real tokens, or None when no token is padding (no
        mask lets SDPA pick the flash kernel). Returns (output, probs or None)."""
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, D // self.n_head).permute(2, 0, 3, 1, 4)  # 3 x (B, nh, T, hs)
        p_drop = self.attn_dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, T)
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            probs = scores.softmax(dim=-1)
            y = F.dropout(probs, p_drop, self.training) @ v  # (B, nh, T, hs)
        else:
            probs = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p_drop)  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.out(y), probs


class FeedForward(nn.Module):
    """Position-wise dense -> exact (erf) GELU -> dense."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.inner = nn.Linear(c.d_model, c.d_ff)
        self.out = nn.Linear(c.d_ff, c.d_model)  # the residual branch's last linear map

    def forward(self, x):
        return self.out(F.gelu(self.inner(x)))


class Block(nn.Module):
    """One encoder layer: attention and feed-forward, each a residual branch with dropout and LayerNorm.

    post-LN (BERT):  x = LN(x + drop(attn(x)));     x = LN(x + drop(ffn(x)))
    pre-LN (paper):  x = x + drop(attn(LN(x)));     x = x + drop(ffn(LN(x)))
    """

    def __init__(self, c: BertConfig):
        super().__init__()
        self.pre_norm = c.pre_norm
        self.attn = SelfAttention(c)
        self.ln_attn = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.ffn = FeedForward(c)
        self.ln_ffn = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x, keep, need_weights: bool = False):
        """Returns (new x, attention probabilities or None)."""
        if self.pre_norm:
            a, probs = self.attn(self.ln_attn(x), keep, need_weights)
            x = x + self.drop(a)
            return x + self.drop(self.ffn(self.ln_ffn(x))), probs
        a, probs = self.attn(x, keep, need_weights)
        x = self.ln_attn(x + self.drop(a))
        return self.ln_ffn(x + self.drop(self.ffn(x))), probs


class Bert(nn.Module):
    """Embeddings, encoder layers, tanh pooler, MLM head (tied decoder) and NSP head."""

    def __init__(self, config: BertConfig):
        super().__init__()
        c = self.config = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.max_position, c.d_model)
        self.seg_emb = nn.Embedding(c.n_segment, c.d_model)
        self.emb_ln = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.emb_drop = nn.Dropout(c.dropout)
        blocks = [Block(c) for _ in range(c.n_layer // c.group_size)]
        self.layers = nn.ModuleList(blocks[i // c.group_size] for i in range(c.n_layer))  # shared per group
        self.final_ln = nn.LayerNorm(c.d_model, eps=c.ln_eps) if c.pre_norm else nn.Identity()
        self.pooler = nn.Linear(c.d_model, c.d_model)
        self.mlm_dense = nn.Linear(c.d_model, c.d_model)  # MLM transform: dense + GELU + LayerNorm
        self.mlm_ln = nn.LayerNorm(c.d_model, eps=c.ln_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(c.vocab_size))  # decoder bias; the weight is tok_emb's
        self.nsp = nn.Linear(c.d_model, 2)
        self.apply(init_weights)

    def encode(self, input_ids, token_type_ids=None, attention_mask=None, need_weights: bool = False):
        """Run embeddings and encoder. Returns (hidden (B, T, D), pooled (B, D), list of per-layer probs).

        The list is empty unless `need_weights`, in which case each entry is (B, n_head, T, T). Without an
        `attention_mask` no position is padding and attention runs unmasked (the same numbers as an all-ones
        mask, and SDPA may use the flash kernel).
        """
        B, T = input_ids.shape
        if T > self.config.max_position:
            raise ValueError(f"input length {T} exceeds max_position={self.config.max_position}")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        keep = None if attention_mask is None else attention_mask.bool().view(B, 1, 1, T)  # the one padding mask
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok_emb(input_ids) + self.pos_emb(pos) + self.seg_emb(token_type_ids)  # (B, T, D)
        x = self.emb_drop(self.emb_ln(x))
        maps = []
        for layer in self.layers:
            x, probs = layer(x, keep, need_weights)
            if need_weights:
                maps.append(probs)
        x = self.final_ln(x)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, D) from [CLS]
        return x, pooled, maps

    def mlm_head(self, h):
        """Transform hidden states (..., D) and project onto the vocabulary with the tied embedding."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(h)))
        return F.linear(h, self.tok_emb.weight, self.mlm_bias)

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, mlm_labels=None, nsp_labels=None,
                mlm_positions=None):
        """Pre-training forward pass. With `mlm_labels` ((B, T), IGNORE where not predicted) the MLM head
        runs only at the labelled positions (~15%): at small hidden sizes the vocabulary projection is most
        of the FLOPs, so this is the largest single speed-up over computing it everywhere.

        `mlm_positions` (B, P) names those positions, padded with positions whose label is IGNORE (such
        as 0, the [CLS]); data.Batches gives it with a fixed P, so that the step has fixed shapes and never
        waits for the device. Without it the positions are read from the labels, which waits for them.
        """
        h, pooled, _ = self.encode(input_ids, token_type_ids, attention_mask)
        nsp_logits = self.nsp(pooled)
        mlm_loss = nsp_loss = None
        if mlm_labels is None:
            mlm_logits = self.mlm_head(h)  # (B, T, V)
        else:
            if mlm_positions is None:
                mlm_positions = labelled_positions(mlm_labels)
            picked = h.gather(1, mlm_positions.unsqueeze(-1).expand(-1, -1, h.size(-1)))  # (B, P, D)
            mlm_logits = self.mlm_head(picked)  # (B, P, V)
            targets = mlm_labels.gather(1, mlm_positions)  # (B, P), IGNORE in the padding
            mlm_loss = F.cross_entropy(mlm_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
        if nsp_labels is not None:
            nsp_loss = F.cross_entropy(nsp_logits.float(), nsp_labels)
        losses = [l for l in (mlm_loss, nsp_loss) if l is not None]
        loss = sum(losses) if losses else None
        return BertOutput(loss, mlm_loss, nsp_loss, mlm_logits, nsp_logits)

    @torch.no_grad()
    def attention_maps(self, input_ids, token_type_ids=None, attention_mask=None):
        """Per layer, the (B, n_head, T, T) attention probabilities (explicit softmax, same weights)."""
        return self.encode(input_ids, token_type_ids, attention_mask, need_weights=True)[2]


def labelled_positions(mlm_labels):
    """(B, P) positions of each row's labelled tokens, in order, P = the most labels in a row; shorter rows
    are padded with unlabelled positions. labelled_positions([[-100, 7, -100, 9], [5, -100, -100, -100]])
    == [[1, 3], [0, 1]]. Reading P waits for the device: the training loop takes them from the data."""
    labelled = mlm_labels != IGNORE
    n = int(labelled.sum(1).max())
    return labelled.int().argsort(dim=1, descending=True, stable=True)[:, :n]


def init_weights(module):
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ---------------------------------------------------------------------------------------------------------
# HuggingFace interop: transformers' names and layouts, no run-time dependency on it. A post-LN model is
# BertForPreTraining. A pre-LN model is RobertaPreLayerNormForMaskedLM: the same embeddings, pre-LN blocks,
# final LayerNorm and MLM head, but no pooler and no NSP head (RoBERTa pre-trains without NSP), so those two
# are not exported. Shared (ALBERT-group) blocks are written once per layer and load back unshared.

HF_PAD = 0  # [PAD]'s id (data.PAD); RoBERTa's position ids start after it: our position i is its row HF_PAD + 1 + i
ROBERTA_POSITIONS = "roberta_prelayernorm.embeddings.position_embeddings.weight"
# Weights transformers may write although they are tied to others (or buffers): never read, only checked.
HF_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
           "lm_head.decoder.weight": "roberta_prelayernorm.embeddings.word_embeddings.weight",
           "cls.predictions.decoder.bias": "cls.predictions.bias", "lm_head.decoder.bias": "lm_head.bias"}
HF_BUFFERS = {"bert.embeddings.position_ids", "roberta_prelayernorm.embeddings.position_ids"}


def _hf_views(model: Bert) -> dict:
    """HF names -> live views of our parameters; q, k and v, separate there, are row blocks of our fused qkv.
    The LayerNorms sit after each residual add in BERT and before each sub-layer in RobertaPreLayerNorm."""
    m, pre = model, model.config.pre_norm
    base = "roberta_prelayernorm." if pre else "bert."
    modules = {base + "embeddings.word_embeddings": m.tok_emb, base + "embeddings.position_embeddings": m.pos_emb,
               base + "embeddings.token_type_embeddings": m.seg_emb, base + "embeddings.LayerNorm": m.emb_ln}
    ln_attn, ln_ffn = ("attention.LayerNorm", "intermediate.LayerNorm") if pre else \
        ("attention.output.LayerNorm", "output.LayerNorm")
    views = {}
    for i, block in enumerate(m.layers):
        p = f"{base}encoder.layer.{i}."
        modules.update({p + "attention.output.dense": block.attn.out, p + ln_attn: block.ln_attn,
                        p + "intermediate.dense": block.ffn.inner, p + "output.dense": block.ffn.out,
                        p + ln_ffn: block.ln_ffn})
        for name, w, b in zip(("query", "key", "value"), block.attn.qkv.weight.chunk(3), block.attn.qkv.bias.chunk(3)):
            views.update({f"{p}attention.self.{name}.weight": w, f"{p}attention.self.{name}.bias": b})
    if pre:
        modules.update({base + "LayerNorm": m.final_ln, "lm_head.dense": m.mlm_dense, "lm_head.layer_norm": m.mlm_ln})
    else:
        modules.update({"bert.pooler.dense": m.pooler, "cls.predictions.transform.dense": m.mlm_dense,
                        "cls.predictions.transform.LayerNorm": m.mlm_ln, "cls.seq_relationship": m.nsp})
    views.update({f"{name}.{k}": v for name, module in modules.items() for k, v in module.named_parameters()})
    views["lm_head.bias" if pre else "cls.predictions.bias"] = m.mlm_bias
    return views


def hf_state_dict(model: Bert) -> dict:
    """Our weights under transformers' names (see _hf_views), as separate contiguous tensors. The pre-LN
    position table gets HF_PAD + 1 zero rows in front: RoBERTa's first real position is row HF_PAD + 1."""
    sd = {k: v.detach().clone().contiguous() for k, v in _hf_views(model).items()}
    if model.config.pre_norm:
        pos = sd[ROBERTA_POSITIONS]
        sd[ROBERTA_POSITIONS] = torch.cat([pos.new_zeros(HF_PAD + 1, pos.size(1)), pos])
    return sd


# BertConfig's fields under transformers' names in config.json (max_position and pre_norm aside: see hf_config).
HF_FIELDS = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layer": "num_hidden_layers",
             "n_head": "num_attention_heads", "d_ff": "intermediate_size", "dropout": "hidden_dropout_prob",
             "attn_dropout": "attention_probs_dropout_prob", "n_segment": "type_vocab_size", "ln_eps": "layer_norm_eps"}


def hf_config(c: BertConfig) -> dict:
    """transformers' config.json for a BertConfig (a pre-LN model's position table is HF_PAD + 1 rows longer)."""
    common = {**{theirs: getattr(c, ours) for ours, theirs in HF_FIELDS.items()}, "hidden_act": "gelu",
              "initializer_range": 0.02, "pad_token_id": HF_PAD, "tie_word_embeddings": True}
    if c.pre_norm:
        return {"architectures": ["RobertaPreLayerNormForMaskedLM"], "model_type": "roberta-prelayernorm",
                "max_position_embeddings": c.max_position + HF_PAD + 1, "position_embedding_type": "absolute",
                "bos_token_id": 2, "eos_token_id": 3, **common}  # [CLS] and [SEP] in data.py's layout
    return {"architectures": ["BertForPreTraining"], "model_type": "bert", "max_position_embeddings": c.max_position,
            **common}


def save_hf(model: Bert, directory: str):
    """Write config.json and model.safetensors, which transformers' AutoModelForMaskedLM loads."""
    os.makedirs(directory, exist_ok=True)
    config = json.dumps(hf_config(model.config), indent=2).encode()
    atomic_write(os.path.join(directory, "config.json"), lambda f: f.write(config))
    write_safetensors(os.path.join(directory, "model.safetensors"), hf_state_dict(model))


def atomic_write(path: str, write):
    """Write a file by `write(binary file object)` into a temporary beside it, then rename it into place:
    a crash leaves the old file or none, never half a file. A failed write (disk full, say) removes the
    temporary before the error goes on, so it cannot keep the disk full; a killed process's temporary is
    left for data.remove_stale_temporaries, which finds it by the pid in its name."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def read_safetensors(path: str) -> dict:
    """Read a .safetensors file with torch alone: 8-byte little-endian header length, JSON header, raw bytes.

    The file is checked as the safetensors package checks it, before anything is allocated for it: a header of
    at most 100 MB inside the file; a JSON object of tensors, each of a known dtype, a shape of non-negative
    integers and data_offsets [begin, end] holding dtype size x the shape's product bytes; the tensors' bytes in
    order, one after another, filling the file. A file that fails is refused in one ValueError line naming it (and
    the tensor): nothing is read beyond what the file holds, whatever its header says."""
    with open(path, "rb") as f:
        size, n = os.fstat(f.fileno()).st_size, int.from_bytes(f.read(8), "little")
        if size < 8 or n > min(100_000_000, size - 8):  # the safetensors package's limit: 100 MB
            raise ValueError(f"{path}: header length {n} does not fit a file of {size} bytes (nor 100 MB): "
                             f"truncated or not a safetensors file")
        try:
            header = dict(json.loads(f.read(n)))  # TypeError or ValueError unless JSON of an object (or of pairs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: the header is not a JSON object of tensors ({e})") from None
        data = bytearray(f.read())
    spans = []
    for name, t in header.items():
        ok = (name == "__metadata__" or isinstance(t, dict) and str(t.get("dtype")) in _SAFETENSORS_DTYPES and
              _naturals(t.get("shape")) and _naturals(t.get("data_offsets")) and len(t["data_offsets"]) == 2)
        if ok and name != "__metadata__":
            dtype, (begin, end) = _SAFETENSORS_DTYPES[t["dtype"]], t["data_offsets"]
            ok = end - begin == math.prod(t["shape"]) * dtype.itemsize
            spans.append((begin, end, name, dtype, t["shape"]))
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} is {str(t)[:100]}, not {{'dtype': one of "
                             f"{'/'.join(_SAFETENSORS_DTYPES)}, 'shape': [size, ...], 'data_offsets': "
                             f"[begin, begin + dtype size x the shape's product]}}")
    out, at = {}, 0
    for begin, end, name, dtype, shape in sorted(spans):  # in the file's order: each must begin where one ended
        if begin != at or end > len(data):
            raise ValueError(f"{path}: tensor {name!r}: data_offsets [{begin}, {end}] " + ("overlap another tensor "
                             "or leave a gap" if begin != at else f"lie beyond the {len(data)} bytes of data"))
        flat = torch.frombuffer(data[begin:end], dtype=dtype) if end > begin else torch.empty(0, dtype=dtype)
        out[name], at = flat.reshape(shape).clone(), end
    if at != len(data):  # the safetensors package refuses them too: a shifted header length leaves one, say
        raise ValueError(f"{path}: {len(data) - at} bytes after the last tensor's: damaged or not a safetensors file")
    return out


def _naturals(x) -> bool:
    """x is a list of integers >= 0 (JSON's true and false are not integers here)."""
    return isinstance(x, list) and all(type(v) is int and v >= 0 for v in x)


def write_safetensors(path: str, tensors: dict):
    """Write tensors in the layout read_safetensors reads (atomically): the header names each tensor's dtype,
    shape and byte range; the data follows, little-endian, 8-byte aligned."""
    names = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little") + head)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    atomic_write(path, write)


LAYER = re.compile(r"\blayers?\.(\d+)\.")  # a layer's weights: "layers.3." (ours), "encoder.layer.3." (transformers')


def check_weights(c: BertConfig, weights, hf: bool = False):
    """Refuse, in one ValueError line, weights that are not exactly those of Bert(c), in dtype (floating point),
    names and shapes: our names (a checkpoint's state dict) or, with `hf`, transformers' (see _hf_views; the
    RoBERTa position table without the rows before the first position, and tied copies may be present).

    Every loader calls it before it builds a model, so that a config damaged or at odds with its weights builds
    nothing: the layers are counted from the names first ("config says 1000000 layers, the weights hold 12"),
    then a model on the meta device (no memory, no initialisation) gives every name and shape to compare. Layers
    of one shared block (group_size > 1) must hold equal weights. The heads leave no trace in the weights:
    BertConfig checks that they divide the hidden size."""
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise ValueError("the weights are not a dict of named tensors")
    held = len({m[1] for m in map(LAYER.search, weights) if m})
    if held != c.n_layer:
        raise ValueError(f"config says {c.n_layer} layers, the weights hold {held}")
    with torch.device("meta"):
        model = Bert(c)
    expected = {k: v.shape for k, v in (_hf_views(model) if hf else model.state_dict()).items()}
    unexpected = [k for k in weights if k not in expected and not (hf and k in {*HF_TIED, *HF_BUFFERS})]
    if unexpected:
        raise ValueError(f"the weights hold {unexpected[0]}, which the config's model has not")
    wrong = next((k for k, shape in expected.items() if k not in weights or weights[k].shape != shape
                  or not weights[k].is_floating_point()), None)
    if wrong:
        held = f"{weights[wrong].dtype} {list(weights[wrong].shape)}" if wrong in weights else "missing"
        raise ValueError(f"the weights' {wrong} is {held}, the config's model has float {list(expected[wrong])} "
                         f"({c.vocab_size} tokens, {c.max_position} positions, d_model x d_ff {c.d_model} x {c.d_ff})")
    group_first = lambda k: LAYER.sub(lambda m: f"layers.{int(m[1]) - int(m[1]) % c.group_size}.", k, count=1)
    same = [(k, v) for k, v in HF_TIED.items() if k in weights] if hf else \
        [(k, group_first(k)) for k in weights if group_first(k) != k]  # tied copies; layers of one shared block
    for k, v in same:
        if not torch.equal(weights[k], weights[v]):
            raise ValueError(f"the weights' {k} differs from {v}, which the config's model shares with it (tied "
                             f"weights, or group_size {c.group_size})")


def load_hf(directory: str) -> Bert:
    """Read a HuggingFace folder, ours or one written by transformers (config.json and model.safetensors, its
    format since 4.35; an older folder's pytorch_model.bin can be written as one by save_pretrained). A pre-LN
    model's pooler and NSP head, absent there, keep their fresh initialisation.
    Nothing is built before config and weights are checked to fit (check_weights); a folder that fails is
    refused in one ValueError (or OSError) line."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        hc = json.load(f)
    try:
        kind, act, pos = (hc.get(k, v) for k, v in (("model_type", "bert"), ("hidden_act", "gelu"),
                                                    ("position_embedding_type", "absolute")))
        if kind not in ("bert", "roberta-prelayernorm") or act != "gelu" or pos != "absolute":
            raise ValueError(f"{path}: model_type {kind!r}, hidden_act {act!r}, position_embedding_type {pos!r}; only "
                             f"'bert' or 'roberta-prelayernorm' with exact 'gelu' and 'absolute' are supported")
        pre_norm = kind == "roberta-prelayernorm"
        skip = max(hc["pad_token_id"] + 1, 0) if pre_norm else 0  # RoBERTa's rows before the first real position
        config = BertConfig(**{ours: hc[theirs] for ours, theirs in HF_FIELDS.items()}, pre_norm=pre_norm,
                            max_position=hc["max_position_embeddings"] - skip)
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a BERT config.json: {type(e).__name__} {e}") from None
    theirs = read_safetensors(os.path.join(directory, "model.safetensors"))
    if pre_norm and ROBERTA_POSITIONS in theirs:
        theirs[ROBERTA_POSITIONS] = theirs[ROBERTA_POSITIONS][skip:]
    check_weights(config, theirs, hf=True)
    model = Bert(config)
    with torch.no_grad():
        for name, target in _hf_views(model).items():
            target.copy_(theirs[name])
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared block is counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe(model: Bert) -> str:
    """One line: layout, depth, width and parameter counts (shared blocks counted once)."""
    c = model.config
    trainable, total = count_parameters(model)
    share = f", {c.n_layer // c.group_size} shared groups" if c.group_size > 1 else ""
    return (f"{'pre' if c.pre_norm else 'post'}-LN BERT {c.n_layer} layers x {c.d_model} hidden ({c.n_head} heads, FFN "
            f"{c.d_ff}{share}): {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trainable")


if __name__ == "__main__":
    torch.manual_seed(0)
    for name in PRESETS:
        print(f"{name:>11}: {describe(Bert(preset(name, vocab_size=30522)))}")
    model = Bert(preset("tiny", vocab_size=1000))
    ids = torch.randint(5, 1000, (2, 16))
    labels = torch.full_like(ids, IGNORE)
    labels[:, 3] = ids[:, 3]
    out = model(ids, mlm_labels=labels, nsp_labels=torch.tensor([0, 1]))
    out.loss.backward()
    print(f"forward/backward: loss {out.loss.item():.3f} (log V = {math.log(1000):.3f} + log 2 = {math.log(2):.3f})")
