"""Growing BERT from shallow to deep: the growth operators, which parameters train, and the schedules.

- Progressive stacking (Gong et al. 2019, section 3 and Algorithm 1): `stack` copies the whole trained
  L-layer stack on top of itself (new layer j = trained layer j mod L); 3 -> 6 -> 12 layers over 50k / 70k /
  280k of 400k steps. The baselines of section 4.1: `identity` (new top layers whose residual branches end
  in a zero linear map, so a pre-LN model computes the same function) and identity + noise (sigma 0.03).
- MSLT (Progressively Stacking 2.0, section 3.2): k stages, each adding N/k layers copied from the current
  top N/k (`mslt_grow`); only the new layers and the output layer train (`set_trainable`), the word
  embeddings stay frozen after stage 1; a final stage retrains everything. Section 3.3: the ALBERT variant
  whose k groups each share one block (`group_size = N/k`); each stage adds and trains one group.

A `Schedule` describes a whole run (depth, steps, growth op and trainable layers of each stage); train.py
builds stage 0 from `initial_config`, calls `grow_to` at each switch and builds a fresh optimizer over the
parameters that require grad. Run `python stack.py` to print every method's schedule and grow a tiny model.
"""

import copy
import itertools
from dataclasses import asdict, dataclass, replace
from typing import Optional

import torch
import torch.nn as nn

from bert import Bert, BertConfig, Block, count_parameters, init_weights

# ---------------------------------------------------------------------------------------------------------
# Growth operators: each takes a model and returns a new, fully trainable one; the input is not modified.


def layer_sources(grow: str, old_n_layer: int, new_n_layer: int) -> list[Optional[int]]:
    """For each layer of the grown model, the index of the old layer it copies, or None for a fresh layer.

    stack 3 -> 6: [0, 1, 2, 0, 1, 2];  identity 3 -> 6: [0, 1, 2, None, None, None];
    mslt 6 -> 9: [0, 1, 2, 3, 4, 5, 3, 4, 5];  retrain 6 -> 6: [0, 1, 2, 3, 4, 5].
    train.py's optimizer-carry-over ablation pairs new.layers[j] with old.layers[sources[j]].
    """
    old, n_new = list(range(old_n_layer)), new_n_layer - old_n_layer
    if grow == "stack":
        return [j % old_n_layer for j in range(new_n_layer)]
    if grow in ("identity", "identity-noise"):
        return old + [None] * n_new
    if grow == "mslt":
        return old + old[old_n_layer - n_new:]
    if grow == "retrain":
        return old
    raise ValueError(f"no layer sources for grow={grow!r}; choose stack, identity, identity-noise, mslt or retrain")


def growth_problem(grow: str, L: int, n: int, g: int) -> Optional[str]:
    """Why `grow` cannot take L layers (in groups of g sharing a block) to n layers, or None if it can.
    The operators ask before growing, and Schedule at start, so that a bad schedule fails before training."""
    if grow == "retrain":
        return None if n == L else f"retrain keeps the depth {L}"
    if grow == "mslt":
        if not 0 < n - L <= L:
            return f"copying the top {n - L} layers needs between 1 and {L} of them (at most {L}, the depth)"
        return f"copying the top {n - L} layers is not a whole number of groups of {g}" if (n - L) % g else None
    if n <= L:
        return f"must grow the depth beyond {L}; target depth {n} is not larger"
    if g > 1:
        return f"the model shares blocks in groups of {g} (ALBERT); grouped models grow with mslt"
    return f"target depth {n} is not a multiple of the previous depth {L}" if grow == "stack" and n % L else None


def _non_layer_parameters(model: Bert) -> list[torch.Tensor]:
    """Embeddings, final LayerNorm and heads: every parameter that is not in an encoder layer."""
    in_layers = {id(p) for p in model.layers.parameters()}
    return [p for p in model.parameters() if id(p) not in in_layers]


def _grow(model: Bert, grow: str, n_layer: int) -> Bert:
    """A new model with copies of `model`'s embeddings and heads and layer j a deep copy of old layer
    layer_sources(grow, ...)[j] (a fresh block where None); each group of `group_size` layers shares one
    block, as in `model`. Copied module by module: no state-dict key is renamed. Asserts the promise of
    every growth op: copies equal the old tensors in value but are new tensors, and groups share a block."""
    c, g = model.config, model.config.group_size
    problem = growth_problem(grow, c.n_layer, n_layer, g)
    if problem:
        raise ValueError(f"{grow}: {problem}")
    sources = layer_sources(grow, c.n_layer, n_layer)
    new = copy.deepcopy(model)  # embeddings, final LN, heads; the tied decoder stays tied to tok_emb
    new.config = replace(c, n_layer=n_layer)
    ref = next(model.parameters())
    blocks = [copy.deepcopy(model.layers[s]) if s is not None else Block(c).apply(init_weights).to(ref)
              for s in sources[::g]]
    new.layers = nn.ModuleList(blocks[j // g] for j in range(n_layer))
    pairs = [(new.layers[j].parameters(), model.layers[s].parameters(), f"layer {j} (from old layer {s})")
             for j, s in enumerate(sources) if s is not None]
    pairs.append((_non_layer_parameters(new), _non_layer_parameters(model), "embeddings and heads"))
    for new_params, old_params, what in pairs:
        for p, q in zip(new_params, old_params, strict=True):
            assert p is not q and torch.equal(p, q), f"{what} is not an exact, separate copy"
    assert all(new.layers[j] is new.layers[j - j % g] for j in range(n_layer)), "group sharing broken"
    return new.train(model.training).requires_grad_(True)


def stack(model: Bert, n_layer: int) -> Bert:
    """Progressive stacking's operator: L -> n_layer layers (a multiple of L), new layer j = copy of old
    layer j mod L (Gong et al. section 3; 3 -> 12 in one step repeats the stack four times)."""
    return _grow(model, "stack", n_layer)


def identity(model: Bert, n_layer: int, noise_std: float = 0.0, generator: Optional[torch.Generator] = None) -> Bert:
    """The identity baseline (Gong et al. section 4.1): the trained L layers at the bottom, fresh layers on
    top (global RNG) whose residual branches end in zero (attn.out, ffn.out), or with `noise_std` (paper:
    0.03) in Gaussian noise drawn from `generator`. With zeros a pre-LN model computes exactly the same
    function; a post-LN one does not (each new layer still applies its two LayerNorms)."""
    new = _grow(model, "identity", n_layer)
    residual_outputs = [p for layer in new.layers[model.config.n_layer:] for linear in (layer.attn.out, layer.ffn.out)
                        for p in linear.parameters()]
    with torch.no_grad():
        for p in residual_outputs:
            p.copy_(torch.randn(p.shape, generator=generator) * noise_std)  # zero when noise_std = 0
    assert noise_std or not any(p.any() for p in residual_outputs)
    return new


def mslt_grow(model: Bert, n_new: int) -> Bert:
    """MSLT's growth (section 3.2): add n_new layers on top, new layer L+i = copy of old layer L-n_new+i.
    In a grouped (ALBERT, section 3.3) model n_new is a whole number of groups (the paper: one group), so
    the new group's block is a copy of the top group's block, shared by the new group's layers."""
    return _grow(model, "mslt", model.config.n_layer + n_new)


# ---------------------------------------------------------------------------------------------------------
# Which parameters train (MSLT: the top layers and the output layer; everything else forward only).


def set_trainable(model: Bert, trainable_top: Optional[int]) -> Bert:
    """None: every parameter trains. t: only the top t layers (their blocks, in a grouped model) and the
    output layer train: MLM transform (mlm_dense, mlm_ln), mlm_bias, NSP head, pooler and final_ln. The word
    embeddings (also the tied MLM decoder), position and segment embeddings and emb_ln are frozen.

    Frozen layers below the first trainable one build no autograd graph, so backward stops there."""
    c = model.config
    model.requires_grad_(trainable_top is None)
    if trainable_top is None:
        return model
    if not 0 < trainable_top <= c.n_layer or trainable_top % c.group_size:
        raise ValueError(f"trainable_top={trainable_top} must be a whole number of groups of {c.group_size} "
                         f"layers between 1 and {c.n_layer}")
    output_layer = (model.mlm_dense, model.mlm_ln, model.nsp, model.pooler, model.final_ln)
    for module in (*model.layers[c.n_layer - trainable_top:], *output_layer):
        module.requires_grad_(True)
    model.mlm_bias.requires_grad_(True)
    return model


def trainable_summary(model: Bert) -> str:
    """One line, e.g. 'trainable: layers 9,10,11 of 12 + output layer, 0.96M of 11.50M parameters'."""
    layers = [str(j) for j, layer in enumerate(model.layers) if any(p.requires_grad for p in layer.parameters())]
    trainable, total = count_parameters(model)
    what = "everything" if trainable == total else \
        f"layers {','.join(layers) or 'none'} of {len(model.layers)} + output layer"
    return f"trainable: {what}, {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters"


# ---------------------------------------------------------------------------------------------------------
# Schedules: a whole run as a list of stages, printable and stored in checkpoints as a plain dict.

GROWS = ("init", "stack", "identity", "identity-noise", "mslt", "retrain")


@dataclass
class Stage:
    n_layer: int  # depth during this stage
    steps: int  # optimizer steps in this stage
    grow: str  # how this stage's model is made from the previous one: one of GROWS ("init" = the first stage)
    trainable_top: Optional[int] = None  # None = all parameters train; t = only the top t layers + output layer

    def spec(self) -> str:
        """The stage in parse_schedule's syntax, e.g. '6:200:mslt:3'."""
        parts = [self.n_layer, self.steps] + ([self.grow] if self.grow != "init" else [])
        return ":".join(map(str, parts + ([self.trainable_top] if self.trainable_top is not None else [])))


@dataclass
class Schedule:
    method: str  # a name for logs: baseline, stack, identity, identity-noise, mslt, albert-mslt, or custom
    stages: list[Stage]  # in order; stage 0 is built from scratch
    group_size: int = 1  # consecutive layers sharing a block (1, or N/k for ALBERT-group MSLT)
    noise_std: float = 0.03  # std of the noise on the zero maps of "identity-noise" (paper: 0.03)
    long_steps: int = 0  # the run's last steps, at a longer sequence (BERT, MSLT: the last 10% at 512); not a growth
    long_cost: float = 1.0  # a step there costs this many of its stage's steps at the run's length (length_cost)

    def __post_init__(self):
        """Raise ValueError naming the stage if the schedule cannot be run, so a bad flag fails at start."""
        if not self.stages:
            raise ValueError("a schedule needs at least one stage")
        if self.noise_std < 0:
            raise ValueError(f"noise_std={self.noise_std} is negative")
        for i, s in enumerate(self.stages):
            problem = _stage_problem(s, self.stages[i - 1] if i else None, self.group_size)
            if problem:
                raise ValueError(f"schedule {self.spec()!r}, stage {i} ({s.spec()}): {problem}")
        if not 0 <= self.long_steps <= self.stages[-1].steps:
            raise ValueError(f"its last {self.long_steps} steps, at a longer sequence, are not all in its last stage")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    @property
    def switch_steps(self) -> list[int]:
        """The steps at which stages 1, 2, ... begin, i.e. where the model grows."""
        return list(itertools.accumulate(s.steps for s in self.stages[:-1]))

    def stage_at(self, step: int) -> tuple[int, int]:
        """(index of the stage that optimizer step `step` (0-based) belongs to, first step of that stage).
        step == total_steps, a finished run, belongs to the last stage."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step {step} is outside the schedule's {self.total_steps} steps")
        starts = [0] + self.switch_steps
        index = max(i for i, start in enumerate(starts) if start <= step)
        return index, starts[index]

    def step_cost(self, stage: int) -> int:
        """A rough cost of one step of `stage`, in forward passes through one layer: 3 for each trainable layer
        (forward + backward), 3 for the output layer, 1 for each frozen layer (MSLT: forward only). The output
        layer and embeddings as one layer is a round guess; the default run's speeds fit it (3 -> 12 layers:
        32.8k -> 9.9k tokens/s, 3.3x; this rule: 39 / 12 = 3.25x)."""
        s = self.stages[stage]
        trainable = s.n_layer if s.trainable_top is None else s.trainable_top
        return 3 * (trainable + 1) + (s.n_layer - trainable)

    def steps_left_at_cost_of(self, stage: int, step: int, long: bool = False) -> float:
        """The steps from `step` (0-based) to the end, each weighted by its stage's step_cost (times long_cost in the
        long phase) relative to a step of `stage` (in the long phase if `long`): the ETA is this times the time per
        step measured there. '3:10,12:10' from 0 at 0: 10 + 10 x 39 / 12; with long_steps 5 and long_cost 4.3,
        the last 5 steps count 4.3 x 39 / 12 each."""
        starts = [0] + self.switch_steps
        left = [max(0, min(s.steps, start + s.steps - step)) for s, start in zip(self.stages, starts)]
        long_left = min(self.long_steps, self.total_steps - step) * (self.long_cost - 1) * self.step_cost(-1)
        cost = sum(n * self.step_cost(i) for i, n in enumerate(left)) + long_left
        return cost / (self.step_cost(stage) * (self.long_cost if long else 1))

    def spec(self) -> str:
        """The stages in parse_schedule's syntax, e.g. '3:50,6:70:stack,12:280:stack'."""
        return ",".join(s.spec() for s in self.stages)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        return cls(**{**d, "stages": [Stage(**s) for s in d["stages"]]})  # older dicts: no long phase

    def __str__(self):
        """e.g. 'stack: 3L x 50 -> 6L x 70 (stack) -> 12L x 280 (stack)'."""
        def one(s):
            top = f", top {s.trainable_top}" if s.trainable_top is not None else ""
            return f"{s.n_layer}L x {s.steps}" + (f" ({s.grow}{top})" if s.grow != "init" else "")
        groups = f" (groups of {self.group_size})" if self.group_size > 1 else ""
        long = f"; the last {self.long_steps} longer, {self.long_cost:.1f}x the cost" if self.long_steps else ""
        return f"{self.method}{groups}: " + " -> ".join(one(s) for s in self.stages) + long


def length_cost(seq_len: int, long_seq_len: int, d_model: int) -> float:
    """What a step of sequences of long_seq_len tokens costs relative to one of seq_len tokens, the same number of
    sequences and the same model (Schedule.long_cost). The rule: per token, a layer's matrix products take 12 d^2
    multiply-adds (q, k, v and output 4 d^2, feed-forward 8 d^2 at BERT's d_ff = 4 d) and attention 2 T d (scores
    and their weighted sum over T tokens), so a sequence of T tokens costs T (1 + T / 6d), in proportion to
    T (6d + T). BERT-Base (d = 768), 128 -> 512: 4 x 1.08 = 4.3x; the tiny preset (d = 64), 64 -> 128: 2.3x.
    Embeddings and the MLM head (15% of the tokens) grow with the tokens alone, as the rule's first term."""
    return long_seq_len * (6 * d_model + long_seq_len) / (seq_len * (6 * d_model + seq_len))


def _stage_problem(s: Stage, prev: Optional[Stage], g: int) -> Optional[str]:
    """What makes stage `s` impossible after stage `prev` (None: s is the first) with groups of g layers."""
    if s.grow not in GROWS:
        return f"unknown grow {s.grow!r}; choose one of {', '.join(GROWS)}"
    if (s.grow == "init") != (prev is None):
        return "the first stage, and only it, is 'init'"
    if s.steps < 1 or s.n_layer < 1:
        return "depth and steps must be positive"
    if s.n_layer % g:
        return f"depth {s.n_layer} is not a multiple of group_size {g}"
    t = s.trainable_top
    if t is not None and (prev is None or s.grow == "retrain" or not 0 < t <= s.n_layer or t % g):
        return f"trainable_top={t} must be None in the first and retrain stages, else groups of {g} in 1..{s.n_layer}"
    return None if prev is None else growth_problem(s.grow, prev.n_layer, s.n_layer, g)


def _split(total: int, weights: list[int]) -> list[int]:
    """`total` split in proportion to `weights`, rounded so the parts sum to `total` exactly.

    _split(1000, [50, 70, 280]) == [125, 175, 700]; _split(10, [1, 1, 1]) == [3, 4, 3]."""
    bounds = [(2 * total * cum + sum(weights)) // (2 * sum(weights)) for cum in itertools.accumulate([0] + weights)]
    parts = [b - a for a, b in zip(bounds, bounds[1:])]  # bounds: round(total * cumulative weight / sum)
    if min(parts) < 1:
        raise ValueError(f"total_steps={total} is too few to split into {len(weights)} stages")
    return parts


METHODS = ("baseline", "stack", "identity", "identity-noise", "mslt", "albert-mslt")


def make_schedule(method: str, total_steps: int, n_layer: int = 12, k: int = 4, noise_std: float = 0.03) -> Schedule:
    """The papers' schedules scaled to `total_steps` and `n_layer`.

    baseline: n_layer throughout. stack / identity / identity-noise: n_layer/4, n_layer/2, n_layer over
    50k / 70k / 280k of 400k steps (Gong et al. section 4.1). mslt: k + 1 equal parts, k growing stages of
    n_layer/k layers each training only the new top n_layer/k after the first, then a retrain of everything
    (MSLT section 4.2: 200k steps each). albert-mslt: the same on groups of n_layer/k shared layers."""
    if method == "baseline":
        return Schedule(method, [Stage(n_layer, total_steps, "init")])
    if method in ("stack", "identity", "identity-noise"):
        if n_layer % 4:
            raise ValueError(f"{method}: n_layer={n_layer} must be divisible by 4 (depths n/4, n/2, n)")
        depths, steps = [n_layer // 4, n_layer // 2, n_layer], _split(total_steps, [50, 70, 280])
        return Schedule(method, [Stage(*a) for a in zip(depths, steps, ["init", method, method])], noise_std=noise_std)
    if method in ("mslt", "albert-mslt"):
        if n_layer % k:
            raise ValueError(f"{method}: n_layer={n_layer} must be divisible by k={k}")
        d, steps = n_layer // k, _split(total_steps, [1] * (k + 1))
        stages = [Stage(d, steps[0], "init")] + [Stage(i * d, steps[i - 1], "mslt", d) for i in range(2, k + 1)]
        stages.append(Stage(n_layer, steps[k], "retrain"))
        return Schedule(method, stages, group_size=d if method == "albert-mslt" else 1)
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


def parse_schedule(text: str, grow: str = "stack", method: Optional[str] = None, group_size: int = 1,
                   noise_std: float = 0.03) -> Schedule:
    """Stages from 'depth:steps[:grow[:trainable_top]]' tokens, comma-separated.

    '3:50000,6:70000,12:280000' grows with `grow` at each switch; '3:100,6:100:identity,12:200:mslt:6'
    names each op. An mslt stage trains its new layers unless told otherwise."""
    stages = []
    for i, token in enumerate(text.split(",")):
        fields = token.strip().split(":")
        if not 2 <= len(fields) <= 4 or not all(f.strip().isdigit() for f in fields[:2] + fields[3:]):
            raise ValueError(f"bad stage {token!r} in schedule {text!r}: expected depth:steps[:grow[:trainable_top]] "
                             "with whole numbers")
        n, steps = int(fields[0]), int(fields[1])
        op = fields[2].strip() if len(fields) > 2 else ("init" if i == 0 else grow)
        top = int(fields[3]) if len(fields) > 3 else (n - stages[-1].n_layer if op == "mslt" and stages else None)
        stages.append(Stage(n, steps, op, top))
    return Schedule(method or grow, stages, group_size, noise_std)


# ---------------------------------------------------------------------------------------------------------
# The two calls train.py makes.


def initial_config(schedule: Schedule, base_config: BertConfig) -> BertConfig:
    """The config of stage 0: width and the rest from `base_config`, depth and group size from the schedule."""
    return replace(base_config, n_layer=schedule.stages[0].n_layer, group_size=schedule.group_size)


def grow_to(model: Bert, schedule: Schedule, stage_index: int, generator: Optional[torch.Generator] = None) -> Bert:
    """The model of stage `stage_index` made from `model`, the previous stage's, with its trainability set.

    Growth returns a new model (retrain returns `model` itself); build a fresh optimizer afterwards."""
    if not 0 < stage_index < len(schedule.stages):
        raise ValueError(f"stage {stage_index} is not a switch of a {len(schedule.stages)}-stage schedule; "
                         "stage 0 is Bert(initial_config(...))")
    prev, stage = schedule.stages[stage_index - 1], schedule.stages[stage_index]
    if (model.config.n_layer, model.config.group_size) != (prev.n_layer, schedule.group_size):
        raise ValueError(f"grow_to stage {stage_index}: the model has {model.config.n_layer} layers in groups of "
                         f"{model.config.group_size}, stage {stage_index - 1} has {prev.n_layer} in groups of "
                         f"{schedule.group_size}")
    if stage.grow == "stack":
        model = stack(model, stage.n_layer)
    elif stage.grow in ("identity", "identity-noise"):
        model = identity(model, stage.n_layer, schedule.noise_std if stage.grow == "identity-noise" else 0.0, generator)
    elif stage.grow == "mslt":
        model = mslt_grow(model, stage.n_layer - prev.n_layer)
    return set_trainable(model, stage.trainable_top)


if __name__ == "__main__":
    for method in METHODS:
        print(make_schedule(method, 1_000_000 if "mslt" in method else 400_000))  # the papers' step counts
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (2, 16))
    config = BertConfig(vocab_size=1000, n_head=2, d_model=64, d_ff=256, pre_norm=True)
    for method in ("identity", "mslt"):
        schedule = make_schedule(method, total_steps=100)
        model = Bert(initial_config(schedule, config)).eval()
        print(f"\n{schedule}")
        for i in range(1, len(schedule.stages)):
            before = model(ids).mlm_logits
            model = grow_to(model, schedule, i).eval()
            change = (model(ids).mlm_logits - before).abs().max().item()
            summary = trainable_summary(model)
            print(f"  stage {i}: {model.config.n_layer} layers, max change in MLM logits {change:.1e}; {summary}")
