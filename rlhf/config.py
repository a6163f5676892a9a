"""One dataclass per stage, loaded from a sectioned YAML recipe and ``section.field=value`` overrides.

A recipe has one top-level mapping per section (``run``, ``model``, ``data``, ``sft``, ``reward``,
``ppo``, ``eval``, ``label``, ``rounds``, ``track``); every section is optional and every field has a default. Values
are checked against the field's type when loaded and cross-field rules run in ``__post_init__``, so a bad
recipe fails before any model is loaded. Each stage writes the resolved config into
``RUN_DIR/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A recipe or override that does not fit the schema; the message names the field."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _choice(name: str, value, choices):
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


# the choices of every enumerated field, one Literal each: the config checks them and the CLI offers them
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
Source = Literal["builtin", "movielens-100k", "movielens", "goodbooks", "amazon", "generic"]
SplitMethod = Literal["leave-last-out", "temporal"]
Mode = Literal["generate", "rerank"]
Protocol = Literal["retrieved", "random"]
CandidateOrder = Literal["ranked", "shuffled"]
Retriever = Literal["ease", "itemknn", "popularity", "genre", "random"]
RewardInit = Literal["auto", "sft", "base"]
BehaviourName = Literal["itemknn", "ease", "popularity", "genre", "none"]
BehaviourForm = Literal["score", "percentile"]
PairSource = Literal["ratings", "clicks", "simulator", "labels"]
Algorithm = Literal["ppo", "grpo", "rloo"]
Scheduler = Literal["linear", "constant"]
KLEstimator = Literal["k1", "k3"]
LogprobSource = Literal["training", "sampler"]
HeldOut = Literal["test", "val"]
Stage = Literal["base", "sft", "ppo"]


def check_choices(section_obj, section: str) -> None:
    """Every field typed with a Literal (or a list of one) holds only its choices; the message names the field."""
    hints = typing.get_type_hints(type(section_obj))
    for f in dataclasses.fields(section_obj):
        tp, value = hints[f.name], getattr(section_obj, f.name)
        if typing.get_origin(tp) is Literal:
            _choice(f"{section}.{f.name}", value, typing.get_args(tp))
        elif (
            typing.get_origin(tp) is list
            and typing.get_args(tp)
            and typing.get_origin(typing.get_args(tp)[0]) is Literal
        ):
            choices = typing.get_args(typing.get_args(tp)[0])
            bad = sorted(set(value) - set(choices))
            if bad:
                raise ConfigError(f"{section}.{f.name} has unknown {bad}; use {', '.join(choices)}")


@dataclass
class RunConfig:
    """Where a run lives and the seed every stage starts from."""

    name: str = _f("demo", "run name; the run directory defaults to runs/<name>")
    dir: str = _f("", "run directory (overrides runs/<name>)")
    seed: int = _f(0, "global seed")

    @property
    def path(self) -> Path:
        return Path(self.dir or os.path.join("runs", self.name))


@dataclass
class ModelConfig:
    """The base model and how adapters sit on it."""

    name: str = _f("smollm2-135m", "'smollm2-135m', 'tiny', a local directory or a hub id")
    dtype: Dtype = _f(
        "auto",
        "compute dtype: auto (bfloat16 on a CUDA GPU with bf16 or a CPU with AMX / AVX-512 BF16, else float32) "
        "| float32 | bfloat16 | float16 (for CUDA); trained weights stay float32 (rlhf/precision.py)",
    )
    use_lora: bool = _f(True, "train LoRA adapters; false = full fine-tuning")
    lora_r: int = _f(16, "LoRA rank")
    lora_alpha: int = _f(32, "LoRA alpha")
    lora_dropout: float = _f(
        0.0,
        "dropout on the LoRA input; 0 (PEFT's default) skips it: at 0.05 it cost a third of a bf16 SFT step "
        "(bench/lora_dtype.py), and reward training and RL turn it off anyway",
    )
    lora_target_modules: list = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "modules that get LoRA adapters"
    )
    load_in_4bit: bool = _f(False, "QLoRA: load the frozen base in 4-bit with bitsandbytes (needs CUDA)")

    def __post_init__(self):
        check_choices(self, "model")
        if self.lora_r < 1:
            raise ConfigError(f"model.lora_r must be >= 1, got {self.lora_r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"model.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.load_in_4bit and not self.use_lora:
            raise ConfigError("model.load_in_4bit (QLoRA) trains adapters only: set model.use_lora=true")


@dataclass
class DataConfig:
    """What `rlhf data prepare` reads and how it builds the stage datasets."""

    source: Source = _f("builtin", "builtin | movielens-100k | movielens | goodbooks | amazon | generic")
    path: str = _f("", "input folder or file (not used by builtin)")
    meta_path: str = _f("", "amazon: metadata JSONL (default: meta*.jsonl beside the reviews)")
    catalog: str = _f("", "builtin: catalog JSONL (default: data/films.jsonl shipped with the project)")
    columns: dict = _f(
        {}, "generic: column mapping, e.g. {user_id: uid, item_id: iid, timestamp: ts, rating: r, title: name}"
    )
    items_path: str = _f("", "generic: optional items file with item_id/title/... columns")
    max_users: int = _f(0, "keep at most this many users (0 = all)")
    min_history: int = _f(3, "users with fewer interactions are dropped")
    history_len: int = _f(10, "most recent items shown in a prompt")
    max_prompt_tokens: int = _f(320, "prompt token budget; the oldest history items are dropped to fit")
    cold_start_max: int = _f(5, "users with at most this many training interactions are marked cold-start")
    split: SplitMethod = _f("leave-last-out", "leave-last-out | temporal")
    val_fraction: float = _f(0.1, "share of users held out for validation")
    test_fraction: float = _f(0.2, "share of users held out for testing")
    holdout: int = _f(1, "leave-last-out: most recent interactions held out per user")
    mode: Mode = _f("generate", "generate: write K titles; rerank: pick K from candidates")
    num_candidates: int = _f(20, "rerank: candidates per prompt")
    protocol: Protocol = _f(
        "retrieved",
        "rerank candidates: retrieved = the retriever's own top N (a held-out item it missed is a miss; LlamaRec) "
        "| random = the positive among N-1 random unseen items (LLaRA); training data is built the same way",
    )
    candidate_order: CandidateOrder = _f(
        "ranked",
        "rerank: the order the prompt lists candidates in: ranked = the retriever's ranking, best first (what a "
        "production reranker sees; it uses training data only) | shuffled",
    )
    windows: int = _f(
        4, "windows over each training user's history: SFT examples, RL prompts and rating pairs per user"
    )
    sft_teacher: BehaviourName = _f(
        "none",
        "SFT targets: none = each window's future positives (among the candidates in rerank mode) | genre | itemknn "
        "| ease | popularity = that model's top K for the window's history, weighted by its ratings, among the "
        "candidates: what the behaviour term with the same model rewards",
    )
    retriever: Retriever = _f("ease", "rerank: ease | itemknn | popularity | genre (the catalog's genres) | random")
    k: int = _f(5, "items per listing")
    positive_rating: float = _f(4.0, "ratings at or above count as positives (explicit feedback)")
    # simulator (builtin)
    num_users: int = _f(400, "builtin: simulated users")
    interactions_per_user: int = _f(14, "builtin: mean history length")
    impressions_per_user: int = _f(3, "builtin: click-log impressions per user")
    sim_label_pairs: int = _f(400, "builtin: preference pairs from simulated labelers")
    sim_noise: float = _f(1.0, "builtin: Bradley-Terry temperature of simulated labelers")
    seed: int = _f(0, "data seed")

    def __post_init__(self):
        check_choices(self, "data")
        if self.windows < 1:
            raise ConfigError(f"data.windows must be >= 1, got {self.windows}")
        if self.source != "builtin" and not self.path:
            raise ConfigError(f"data.source={self.source} needs data.path (the folder or file to load)")
        if self.k < 1:
            raise ConfigError(f"data.k must be >= 1, got {self.k}")
        if self.mode == "rerank" and self.num_candidates <= self.k:
            raise ConfigError(
                f"data.num_candidates ({self.num_candidates}) must exceed data.k ({self.k}) in rerank mode"
            )
        if (
            not 0 <= self.val_fraction < 1
            or not 0 < self.test_fraction < 1
            or self.val_fraction + self.test_fraction >= 1
        ):
            raise ConfigError("data.val_fraction and data.test_fraction must be in [0,1) and sum to < 1")
        if self.source == "generic" and not {"user_id", "item_id"} <= set(self.columns or {"user_id": 1, "item_id": 1}):
            raise ConfigError("data.columns must map at least user_id and item_id for the generic source")


@dataclass
class TrainCommon:
    """Fields every trainer shares."""

    learning_rate: float = _f(2e-4, "peak learning rate")
    batch_size: int = _f(4, "per-device batch size")
    grad_accum: int = _f(1, "gradient accumulation steps")
    max_steps: int = _f(20, "optimiser steps (-1 = use epochs)")
    epochs: float = _f(1.0, "epochs when max_steps is -1")
    max_length: int = _f(384, "max tokens of prompt + completion")
    logging_steps: int = _f(5, "log every N steps")
    gradient_checkpointing: bool = _f(
        False,
        "trade compute for memory (TRL turns it on by default; off here: "
        "small models on CPU have memory to spare and it costs ~30% speed)",
    )
    max_train_examples: int = _f(0, "cap on training examples (0 = all)")

    def _check_common(self, section: str):
        if self.learning_rate <= 0:
            raise ConfigError(f"{section}.learning_rate must be > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError(f"{section}.batch_size and {section}.grad_accum must be >= 1")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{section}.max_steps must be > 0, or -1 to train for {section}.epochs")


@dataclass
class SFTConfig(TrainCommon):
    """SFT on prompt -> listing. Differs from TRL's SFTConfig: fp32 on CPU, LoRA lr 2e-4, completion-only loss."""

    num_samples: int = _f(4, "held-out prompts generated before and after training")
    sample_max_new_tokens: int = _f(128, "generation budget of those samples")

    def __post_init__(self):
        self._check_common("sft")


@dataclass
class RewardConfig(TrainCommon):
    """Reward model on preference pairs. Differs from TRL's RewardConfig: LoRA with the score head saved."""

    sources: list[PairSource] = _f(["ratings", "clicks", "simulator", "labels"], "pair sources to train on")
    layers: int = _f(
        0,
        "keep the first N decoder layers of the starting model (0 = all): a shallower reward "
        "model trains several times faster per step on CPU",
    )
    init: RewardInit = _f("auto", "start from: sft (RUN_DIR/sft/merged), base (model.name), auto = sft when it exists")
    accuracy_on_train: int = _f(64, "training pairs also scored after training, to tell under- from over-fitting")
    balance: bool = _f(True, "cap every source at the size of the smallest non-empty one x balance_ratio")
    balance_ratio: float = _f(3.0, "with balance: a source may have at most this many times the smallest")
    val_fraction: float = _f(0.15, "share of pairs held out for accuracy")
    center_rewards_coefficient: float = _f(0.01, "TRL's reward-centring term (0 = off)")
    use_margin: bool = _f(False, "use the pair's margin field in the loss")
    learning_rate: float = _f(3e-4, "peak learning rate")
    max_length: int = _f(448, "max tokens of prompt + response")
    behaviour_model: BehaviourName = _f(
        "itemknn",
        "the behaviour term's model, fit on the training interactions: itemknn | ease | genre | popularity | none",
    )
    behaviour_form: BehaviourForm = _f(
        "score",
        "how the behaviour term reads its model: score (DCG of each item's score scaled over the user's catalog, "
        "over the catalog's best) | percentile (DCG of each item's percentile among the candidates)",
    )
    behaviour_power: float = _f(1.0, "form percentile: each item's percentile to this power (>1: the top)")
    behaviour_ratings: bool = _f(
        True,
        "the behaviour term weighs the user's history by their ratings (centred: a disliked film pulls away); "
        "false: every history item weighs 1, as the classic baselines read it (implicit feedback: on MovieLens's "
        "random protocol EASE orders the candidates 0.750 ndcg@3 unweighted, 0.670 rating-weighted)",
    )
    fit_weights: bool = _f(
        False,
        "fit the composite's term weights on the held-out pairs (Bradley-Terry, w >= 0) into reward/weights.json",
    )

    def __post_init__(self):
        self._check_common("reward")
        if not self.sources or set(self.sources) - set(typing.get_args(PairSource)):
            raise ConfigError(
                f"reward.sources={self.sources} must name one or more of {', '.join(typing.get_args(PairSource))}"
            )
        check_choices(self, "reward")


def _reward_weights(given: dict, where: str) -> dict:
    """The composite's weights: the registered terms' defaults (reward_models/terms) with ``given`` over them."""
    from reward_models.terms import DEFAULT_WEIGHTS

    unknown = sorted(set(given) - set(DEFAULT_WEIGHTS))
    if unknown:
        raise ConfigError(f"{where} has unknown term(s) {unknown}; known: {', '.join(DEFAULT_WEIGHTS)}")
    out = dict(DEFAULT_WEIGHTS)
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}.{name} expects a number, got {value!r}")
        out[name] = float(value)
    return out


@dataclass
class PPOStageConfig:
    """The RL stage against the composite reward: PPO (default), or GRPO / RLOO (``algorithm``; rlhf/rl.py), which
    read the same fields where they mean the same thing. Differs from TRL's PPOConfig: the value model is the reward
    model with a LoRA adapter, old log-probabilities come from a training-like forward, and rollouts sample a merged
    copy. Differs from TRL's GRPOConfig / RLOOConfig: the KL penalty is on (``kl_coef``; GRPO's default beta is 0)
    and an update is one generation batch of ``batch_size`` completions, like PPO's."""

    algorithm: Algorithm = _f(
        "ppo",
        "ppo (a value model: GAE advantages) | grpo | rloo (critic-free: num_generations listings per user, each "
        "user's own baseline: GRPO the group mean / std, RLOO the mean of the other listings)",
    )
    num_generations: int = _f(
        4, "grpo / rloo: listings sampled per user prompt and compared with each other; batch_size / this = users"
    )
    max_seconds: float = _f(0.0, "stop after the update during which this many seconds of training passed (0 = none)")
    learning_rate: float = _f(1e-4, "policy/value learning rate")
    lr_scheduler: Scheduler = _f("linear", "linear (decays to 0 at the last update) | constant")
    total_updates: int = _f(10, "updates (each: generate a batch, score, optimise)")
    batch_size: int = _f(8, "completions sampled per update and process")
    mini_batches: int = _f(2, "mini-batches per PPO epoch")
    ppo_epochs: int = _f(2, "optimisation passes over each batch (GRPO / RLOO: num_iterations)")
    response_length: int = _f(96, "max new tokens per response")
    temperature: float = _f(0.8, "sampling temperature")
    kl_coef: float = _f(0.05, "KL penalty coefficient towards the SFT model (GRPO / RLOO: beta)")
    kl_estimator: KLEstimator = _f("k1", "ppo: k1 | k3 (GRPO: k3 in the loss; RLOO: k1 in the reward, as TRL has them)")
    missing_eos_penalty: float = _f(
        1.0, "subtracted from the reward of a response that does not end within response_length"
    )
    cliprange: float = _f(0.2, "policy ratio clip (GRPO / RLOO: epsilon)")
    cliprange_value: float = _f(0.2, "ppo: value clip")
    vf_coef: float = _f(0.1, "ppo: value loss weight")
    whiten_rewards: bool = _f(False, "ppo: whiten rewards per batch")
    gamma: float = _f(1.0, "ppo: discount over response tokens")
    lam: float = _f(
        0.95,
        "ppo: GAE lambda: below 1 the final score reaches a token ~lam^(tokens to the end) weak, "
        "so early lines of a long response learn mostly from the value model",
    )
    reward_weights: dict = _f(
        {},
        "weights of the composite reward's terms over their defaults (reward_models/terms/__init__.py: TERMS), "
        "e.g. {learned: 0.25, no_duplicates: 2.0}; the learned reward model is the term 'learned'",
    )
    value_layers: int = _f(
        0,
        "ppo: value model = the reward model's first N decoder layers + its head (0 = all); "
        "fewer layers make PPO's optimisation much cheaper on CPU",
    )
    checkpoint_every: int = _f(2, "save a resumable checkpoint every N updates")
    sample_every: int = _f(2, "log a table of sample completions every N updates")
    max_prompts: int = _f(0, "cap on RL prompts (0 = all)")
    merged_rollouts: bool = _f(
        True,
        "sample rollouts from a copy of the policy with its LoRA adapter merged, refreshed every update (one more "
        "copy of the weights; generation ~2x faster on CPU than through the unmerged adapter)",
    )
    constrained: bool = _f(
        False,
        "rollouts may write only allowed titles at item positions (the prompt's candidates in rerank mode, the "
        "catalog otherwise), and every policy forward is masked the same way (rlhf/constrained.py)",
    )
    title_explore: float = _f(
        0.0,
        "with constrained: in rollouts, the share of each title choice drawn uniformly among the allowed titles "
        "(exploration beyond the temperature; the policy's own log-probabilities stay in the ratio; eval, recommend "
        "and labeling never explore)",
    )
    rollout_logprobs: LogprobSource = _f(
        "training",
        "ppo: where the old log-probabilities in its ratio come from: training = a forward pass like the "
        "optimisation's (ratio 1 at the first step in any dtype; GRPO / RLOO always) | sampler = the sampler's own "
        "scores (TRL's default)",
    )

    def __post_init__(self):
        self.reward_weights = _reward_weights(self.reward_weights, "ppo.reward_weights")
        check_choices(self, "ppo")
        if self.algorithm != "ppo" and (self.num_generations < 2 or self.batch_size % self.num_generations):
            raise ConfigError(
                f"ppo.algorithm={self.algorithm} compares ppo.num_generations >= 2 listings per user: "
                f"ppo.batch_size ({self.batch_size}) must be a multiple of it (got {self.num_generations})"
            )
        if self.max_seconds < 0:
            raise ConfigError("ppo.max_seconds must be >= 0 (0 = no time limit)")
        if not 0.0 <= self.title_explore <= 1.0:
            raise ConfigError(f"ppo.title_explore must be in [0, 1] (got {self.title_explore})")
        if self.title_explore and not self.constrained:
            raise ConfigError("ppo.title_explore explores among the allowed titles: it needs ppo.constrained: true")
        if self.batch_size % self.mini_batches:
            raise ConfigError(
                f"ppo.batch_size ({self.batch_size}) must be divisible by ppo.mini_batches ({self.mini_batches})"
            )
        if self.total_updates < 1 or self.checkpoint_every < 1:
            raise ConfigError("ppo.total_updates and ppo.checkpoint_every must be >= 1")
        if self.kl_coef < 0:
            raise ConfigError("ppo.kl_coef must be >= 0")
        if self.value_layers < 0:
            raise ConfigError("ppo.value_layers must be >= 0 (0 keeps every layer)")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class EvalConfig:
    """Held-out evaluation of stages and baselines."""

    stages: list[Stage] = _f(["base", "sft", "ppo"], "stages to evaluate (those not trained are skipped with a note)")
    split: HeldOut = _f("test", "test | val")
    max_users: int = _f(100, "held-out users evaluated (0 = all)")
    batch_size: int = _f(16, "generation batch")
    max_new_tokens: int = _f(128, "generation budget per listing")
    do_sample: bool = _f(False, "sample (seeded) instead of greedy")
    constrained: bool = _f(False, "item positions may hold only allowed titles (candidates, else the catalog)")
    num_examples: int = _f(4, "users whose listings appear in the report")

    def __post_init__(self):
        check_choices(self, "eval")


@dataclass
class LabelConfig:
    """Offline preference-labeling rounds: which prompts and candidates a batch holds, and the server."""

    split: HeldOut = _f("val", "held-out users the prompts come from (val keeps the test users unseen)")
    prompts: int = _f(20, "prompts per round")
    candidates: int = _f(2, "candidate listings per prompt (2-4)")
    stages: list[Stage] = _f(["sft", "ppo"], "stages that write candidates, taken in turn (untrained ones skipped)")
    temperature: float = _f(0.8, "sampling temperature for candidates")
    max_new_tokens: int = _f(112, "generation budget per candidate")
    host: str = _f("127.0.0.1", "address the labeling server binds")
    port: int = _f(8765, "port of the labeling server")
    max_body_bytes: int = _f(16384, "largest request body the server accepts")
    labelers: int = _f(3, "simulated labelers in `rlhf label simulate`")
    noise: float = _f(1.0, "Bradley-Terry noise of simulated labelers (0 = always the better list)")

    def __post_init__(self):
        if not self.stages or set(self.stages) - set(typing.get_args(Stage)):
            raise ConfigError(
                f"label.stages={self.stages} must be a non-empty list of {', '.join(typing.get_args(Stage))}"
            )
        check_choices(self, "label")
        if not 2 <= self.candidates <= 4:
            raise ConfigError(f"label.candidates={self.candidates} must be 2, 3 or 4")
        if self.prompts < 1 or self.labelers < 1 or self.noise < 0:
            raise ConfigError("label.prompts and label.labelers must be >= 1, label.noise >= 0")
        if not 0 < self.port < 65536:
            raise ConfigError(f"label.port={self.port} is not a TCP port")


@dataclass
class RoundsConfig:
    """`rlhf rounds`: label -> reward -> RL -> eval, round after round (rlhf/rounds.py). Each round's labels come from
    the ``label`` section (prompts from label.split, label.candidates listings of the current policy each, sampled at
    label.temperature; label.host / label.port for people)."""

    rounds: int = _f(2, "rounds to have done: a rerun with more adds rounds, one with as many resumes the last")
    labelers: str = _f(
        "simulated",
        "simulated (the simulator's labelers, label.labelers of them at label.noise: built-in data) | people (the "
        "labeling server on label.host:label.port until the round's queue is judged, the deadline or a stop)",
    )
    rl_updates: int = _f(0, "RL updates per round (0 = ppo.total_updates)")
    reward_steps: int = _f(0, "reward-model steps per round, from the previous round's model (0 = reward.max_steps)")
    deadline_s: float = _f(
        0.0, "people: close a round's judging after this many seconds of serving, with what was judged (0 = none)"
    )
    judgments_per_prompt: int = _f(
        0, "people: the queue is judged when every prompt has this many judgments (0 = every labeler judged all)"
    )
    tokens_file: str = _f("", "people: a file of `labeler,token` lines (default: one random token, printed)")

    def __post_init__(self):
        _choice("rounds.labelers", self.labelers, ("simulated", "people"))
        if self.rounds < 1:
            raise ConfigError(f"rounds.rounds must be >= 1, got {self.rounds}")
        for name in ("rl_updates", "reward_steps", "judgments_per_prompt"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rounds.{name} must be >= 0 (0 = the default), got {getattr(self, name)}")
        if self.deadline_s < 0:
            raise ConfigError(f"rounds.deadline_s must be >= 0 (0 = no deadline), got {self.deadline_s}")


# tracker -> the package it needs (rlhf/tracking.py writes the logs)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def missing_packages(packages) -> list[str]:
    """The ones of ``packages`` that cannot be imported here (looked up, not imported)."""
    import importlib.util

    return [p for p in packages if importlib.util.find_spec(p) is None]


@dataclass
class TrackConfig:
    """Experiment trackers. One list for every stage (sft, reward, ppo, eval, labeling rounds), not a field per
    stage: a run's stages then line up as one group, named after the run directory. Not in ``run``, whose
    section is frozen once the data is prepared: trackers can be switched on for any later stage."""

    report_to: list = _f(
        [],
        "trackers every stage logs to, under RUN_DIR/logs/<tracker>/: tensorboard | trackio (local store) | "
        "wandb (offline; `wandb sync` uploads later); [] or none = no tracker",
    )
    project: str = _f("rec-rlhf", "trackio and wandb project; each run directory is one group in it")

    def __post_init__(self):
        self.report_to = list(dict.fromkeys(r for r in self.report_to if r != "none"))
        for name in self.report_to:
            _choice("track.report_to", name, tuple(TRACKER_PACKAGES))
        missing = missing_packages(TRACKER_PACKAGES[name] for name in self.report_to)
        if missing:
            raise ConfigError(
                f"track.report_to={','.join(self.report_to)} needs the package(s) {', '.join(missing)}, not installed: "
                f"pip install {' '.join(missing)} (every tracker: pip install 'rec-rlhf[track]')"
            )
        if not self.project.strip():
            raise ConfigError("track.project must not be empty")


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "model": ModelConfig,
    "data": DataConfig,
    "sft": SFTConfig,
    "reward": RewardConfig,
    "ppo": PPOStageConfig,
    "eval": EvalConfig,
    "label": LabelConfig,
    "rounds": RoundsConfig,
    "track": TrackConfig,
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOStageConfig = field(default_factory=PPOStageConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, tp, where: str):
    origin = typing.get_origin(tp) or tp
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if origin is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if origin is list and isinstance(value, list) and any(isinstance(v, (list, dict)) for v in value):
        raise ConfigError(f"{where} expects a list of single values, got {value!r}")
    if dataclasses.is_dataclass(tp):  # a nested section, e.g. ppo.rules: a mapping or nothing
        return _build(tp, value, where)
    expected = {int: int, float: float, str: str, bool: bool, list: list, dict: dict}.get(origin)
    if expected is not None:
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{where} expects {expected.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"section {where} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(
            f"unknown field(s) {', '.join(f'{where}.{u}' for u in sorted(unknown))}; known: {', '.join(sorted(known))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip().split("."), value


def read_sections(path: str | os.PathLike) -> dict:
    """A YAML file of config sections (a recipe or a run's config.yaml), checked for shape, not yet validated."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(f"{p}: unknown section(s) {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    for k, v in raw.items():
        if v is not None and not isinstance(v, dict):
            raise ConfigError(f"{p}: section {k} must be a mapping of fields, got {type(v).__name__}")
    return _moved_fields({k: dict(v or {}) for k, v in raw.items()}, p)


def _moved_fields(sections: dict, path: Path) -> dict:
    """Fields that moved, read from older recipes and runs' config.yaml: ppo.report_to (none | tensorboard, PPO
    only) is now track.report_to, for every stage."""
    old = sections.get("ppo", {}).pop("report_to", None)
    if old not in (None, "none"):
        sections.setdefault("track", {}).setdefault("report_to", [old])
        print(f"config: {path}: ppo.report_to is now track.report_to (every stage); read as [{old}]", file=sys.stderr)
    return sections


def _layer(run_sections: dict, recipe: dict, frozen: set[str]) -> dict:
    """The run's resolved config with the recipe over it, field by field, except the ``frozen`` sections (what
    finished stages made, e.g. the prepared data): those stay as the run has them, and a recipe that differs is
    said to be ignored."""
    raw = {k: dict(v) for k, v in run_sections.items()}
    for section, values in recipe.items():
        if section in frozen:
            differ = sorted(f for f, v in values.items() if raw.get(section, {}).get(f, v) != v)
            if differ:
                print(
                    f"config: the run's {section} section is kept (its stage is done); the recipe's "
                    f"{', '.join(differ)} ignored",
                    file=sys.stderr,
                )
            continue
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | tuple = (),
    default_section: str | None = None,
    run_config: str | os.PathLike | None = None,
    frozen: set[str] = frozenset(),
) -> Config:
    """Recipe file + overrides -> validated Config. ``default_section`` qualifies bare ``field=value``. With
    ``run_config`` (a run's config.yaml, when it exists) the run's resolved config comes first and the recipe is
    layered over it (``frozen`` sections excepted), so a later stage needs no ``--config``; overrides always win."""
    recipe = read_sections(path) if path else {}
    run_sections = read_sections(run_config) if run_config and Path(run_config).exists() else {}
    raw = _layer(run_sections, recipe, set(frozen)) if run_sections else recipe
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] not in SECTIONS:
            if default_section is None:
                raise ConfigError(f"override {text!r}: unknown section {keys[0]!r}; known: {', '.join(SECTIONS)}")
            keys = [default_section, *keys]
        node = raw.setdefault(keys[0], {})
        for k in keys[1:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    try:
        return Config(**{name: _build(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items()})
    except TypeError as e:  # a nested value of a shape no check above names
        raise ConfigError(f"a config value of the wrong shape: {e}") from None


def save_resolved(cfg: Config, run, sections: list[str]) -> Path:
    """Write a stage's own ``sections`` of ``cfg`` into the run's config.yaml, keeping every other section as it
    is. The first stage to write it stores every section, so the later stages read the recipe from the run and
    need no ``--config``."""
    from rlhf.runs import atomic_write

    current = yaml.safe_load(run.config.read_text()) if run.config.exists() else None
    full = cfg.to_dict()
    if not current:
        current = full
    for s in sections:
        current[s] = full[s]
    return atomic_write(run.config, yaml.safe_dump(current, sort_keys=False))
