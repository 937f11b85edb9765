"""The project's test suite: `python -m pytest -q test_all.py` (CPU only, a few minutes on 2 cores).

Each test asserts a property that would catch a real bug: equivalence with a trusted reference
(HuggingFace's BertForPreTraining), an invariant an operator promises, a round trip, a loss going down.
Tests that need the optional reference packages (transformers) are skipped when those are missing.
"""

import math
import os

import pytest
import torch

import bert
from bert import IGNORE, Bert, BertConfig

SMALL = dict(vocab_size=97, max_position=32, n_layer=3, n_head=4, d_model=32, d_ff=64)


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
               "c": torch.randn(5).to(torch.bfloat16), "empty": torch.zeros(0, 2)}
    st.save_file(tensors, str(tmp_path / "x.safetensors"))
    back = bert.read_safetensors(str(tmp_path / "x.safetensors"))
    assert back.keys() == tensors.keys()
    for k in tensors:
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k])


def test_pre_ln_model_refuses_hf_export(tmp_path):
    with pytest.raises(ValueError, match="post-LN"):
        bert.save_hf(small_model(pre_norm=True), str(tmp_path))


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


def test_sparse_mlm_equals_dense_head():
    """The loss from the head run at labelled positions only equals the head over every position."""
    model = small_model()
    batch = random_batch()
    with torch.no_grad():
        out = model(**batch)
        full = model(**{k: batch[k] for k in ("input_ids", "token_type_ids", "attention_mask")})
    labels = batch["mlm_labels"]
    dense = torch.nn.functional.cross_entropy(full.mlm_logits.view(-1, SMALL["vocab_size"]), labels.view(-1), ignore_index=IGNORE)
    torch.testing.assert_close(out.mlm_loss, dense)
    torch.testing.assert_close(out.mlm_logits, full.mlm_logits[labels != IGNORE])
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
    torch.save({"config": bert.asdict(model.config), "model": model.state_dict()}, path)
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
    assert abs(model.tok_emb.weight.std().item() - 0.02) < 1e-3
    assert abs(model.layers[0].ffn.inner.weight.std().item() - 0.02) < 1e-3
    assert torch.all(model.layers[0].ffn.inner.bias == 0) and torch.all(model.mlm_bias == 0)
    out = model(**random_batch(vocab=3000))
    assert abs(out.mlm_loss.item() - math.log(3000)) < 0.5  # an untrained head is close to uniform


# ----------------------------------------------------------------------------------------------------------
# train.py: LAMB


def lamb_by_the_paper(params, grads_per_step, lr, b1, b2, eps, wd, excluded, max_grad_norm=None):
    """You et al. 2019, Algorithm 2, transcribed directly in float64 numpy, one tensor at a time."""
    import numpy as np
    w = [p.detach().double().numpy().copy() for p in params]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, grads in enumerate(grads_per_step, start=1):
        g = [x.double().numpy() for x in grads]
        if max_grad_norm:
            total = math.sqrt(sum(float((x ** 2).sum()) for x in g))
            g = [x * min(1.0, max_grad_norm / (total + 1e-12)) for x in g]
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


@pytest.mark.parametrize("with_exclusions", [True, False])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
def test_lamb_matches_the_paper(with_exclusions, max_grad_norm):
    import train
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, dtype=torch.float64)),
              torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))]  # zero weight: trust ratio 1
    excluded = {1} if with_exclusions else set()
    groups = [{"params": [p for i, p in enumerate(params) if i not in excluded], "weight_decay": 0.01, "trust": True},
              {"params": [p for i, p in enumerate(params) if i in excluded], "weight_decay": 0.0, "trust": False}]
    start = [p.detach().clone() for p in params]
    opt = train.Lamb(groups, lr=0.01, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=max_grad_norm)
    steps = [[torch.randn_like(p) for p in params] for _ in range(5)]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = lamb_by_the_paper(start, steps, 0.01, 0.9, 0.999, 1e-6, 0.01, excluded, max_grad_norm)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), torch.from_numpy(e), rtol=1e-10, atol=1e-12)
    assert not torch.equal(params[2].detach(), start[2])  # the zero tensor moved (trust ratio fell back to 1)


# ----------------------------------------------------------------------------------------------------------
# train.py: resume, switches, DDP, flags

TINY_RUN = ["--preset", "tiny", "--batch-size", "8", "--seq-len", "32", "--warmup", "2", "--log-every", "1",
            "--eval-every", "1000", "--eval-batches", "2", "--save-every", "1000", "--vocab-size", "300"]


@pytest.fixture(scope="module")
def run_cache(tmp_path_factory):
    """One token cache (synthetic corpus) shared by the training tests."""
    return str(tmp_path_factory.mktemp("cache"))


def train_losses(out) -> dict:
    import train
    return {r["step"]: r["loss"] for r in train.read_log(str(out)) if "loss" in r}


def test_interrupted_and_resumed_run_gives_the_same_losses(tmp_path, run_cache):
    """Stops at a switch boundary, one step after a switch, and mid-stage; each resume continues exactly."""
    import train
    args = TINY_RUN + ["--schedule", "3:3,6:3,12:4", "--steps", "10", "--cache-dir", run_cache]
    assert train.main(args + ["--out", str(tmp_path / "whole")]) == 0
    broken = ["--out", str(tmp_path / "broken")]
    assert train.main(args + broken + ["--stop-after", "3"]) == 0
    for stop in ("4", "8", "0"):
        assert train.main(args + broken + ["--resume", "--stop-after", stop]) == 0
    whole, resumed = train_losses(tmp_path / "whole"), train_losses(tmp_path / "broken")
    assert sorted(whole) == sorted(resumed) == list(range(1, 11))
    for step in whole:
        assert whole[step] == pytest.approx(resumed[step], rel=1e-6, abs=1e-6), step
    ckpt = train.load_checkpoint(str(tmp_path / "broken" / "checkpoint.pt"))
    assert ckpt["step"] == 10 and ckpt["config"]["n_layer"] == 12
    assert os.path.exists(tmp_path / "broken" / "stage1_end.pt") and os.path.exists(tmp_path / "whole" / "val_loss.svg")


def test_switch_resets_optimizer_keeps_lr_and_leaves_frozen_out(tmp_path, run_cache):
    import stack
    import train
    cfg, _ = train.parse_args(TINY_RUN + ["--method", "mslt", "--steps", "10", "--cache-dir", run_cache, "--out", str(tmp_path)])
    cfg = train.finish_config(cfg, world=1)
    t = train.Trainer(cfg, train.Dist())
    t.start()
    switch = t.schedule.switch_steps[0]
    lrs = []
    for _ in range(switch):
        lrs.append(t.train_step()["lr"])
        t.step += 1
    assert all(len(s) > 0 for s in t.optimizer.state.values())
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


def test_bad_flags_fail_at_once_naming_them(tmp_path):
    import time
    import train
    for argv, flag in ([["--batch-size", "30", "--micro-batch", "4"], "--batch-size"],
                       [["--schedule", "3:50,6:50", "--steps", "100"], "--schedule"],
                       [["--method", "mslt", "--k", "5"], "--k"],
                       [["--warmup", "700"], "--warmup"]):
        start = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            train.main(argv + ["--out", str(tmp_path)])
        assert flag in str(e.value) and time.perf_counter() - start < 1.0, (argv, str(e.value))


def test_torchrun_two_processes_equal_one_process(tmp_path, run_cache):
    """2 gloo ranks x 4 examples give the losses of 1 process x 2 micro-batches of 4 (MSLT: frozen layers too)."""
    import subprocess
    import sys
    args = TINY_RUN + ["--method", "mslt", "--steps", "6", "--k", "2", "--dropout", "0", "--cache-dir", run_cache]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                    "train.py", *args, "--out", str(tmp_path / "ddp")], cwd=here, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "train.py", *args, "--micro-batch", "4", "--out", str(tmp_path / "one")],
                   cwd=here, env=env, check=True, capture_output=True)
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == sorted(one) == list(range(1, 7))
    for step in one:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-5), step
