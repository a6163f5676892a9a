"""Reward-model stage: TRL RewardTrainer on preference pairs, LoRA with the score head saved.

    rlhf reward --run runs/demo --config recipes/demo.yaml [--sources ratings,clicks,simulator,labels]
    rlhf reward --run runs/demo --init-from runs/demo/rounds/round-001/reward/model   # a warm start

Writes RUN_DIR/reward/model (a full AutoModelForSequenceClassification: PPO's reward and the start of
its value model), reward/adapter (LoRA + head), reward/metrics.json (held-out pairwise accuracy overall,
per source and per labeling round) and reward/log.jsonl; with ``track.report_to``, the per-step logs and those
figures to the trackers (rlhf/tracking.py). ``--init-from`` (what `rlhf rounds` passes: the previous round's model)
trains a saved reward model further, score head included, instead of starting from ``reward.init``; it is read, never
written, so it must not be RUN_DIR/reward/model itself.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

from reward_models.encoding import encode, score_sequences
from reward_models.pairs import balance, load_pairs, source_family, split_by_user
from rlhf.config import Config, ConfigError, save_resolved
from rlhf.models import check_init_from, gpu_peak_gb, load_reward_model
from rlhf.runs import MissingInput, RunDir


def _tokenized(rows, tokenizer, max_length: int, use_margin: bool):
    out, too_long = [], 0
    for r in rows:
        c = encode(tokenizer, r["prompt"], r["chosen"][0]["content"])
        j = encode(tokenizer, r["prompt"], r["rejected"][0]["content"])
        if max(len(c), len(j)) > max_length:
            too_long += 1
            continue
        ex = {"chosen_ids": c, "rejected_ids": j, "source": r["source"]}
        if use_margin:
            ex["margin"] = float(r.get("margin") or 0.0)
        out.append(ex)
    return out, too_long


def pairwise_accuracy(model, tokenizer, examples: list[dict]) -> dict:
    """Share of held-out pairs where the chosen side scores higher, overall and per source family."""
    if not examples:
        return {"overall": None, "by_source": {}, "n": 0}
    chosen = score_sequences(model, [e["chosen_ids"] for e in examples], tokenizer.pad_token_id)
    rejected = score_sequences(model, [e["rejected_ids"] for e in examples], tokenizer.pad_token_id)
    hits, by, by_round = [], {}, {}
    for e, c, r in zip(examples, chosen, rejected):
        h = float(c > r)
        hits.append(h)
        by.setdefault(source_family(e["source"]), []).append(h)
        if source_family(e["source"]) != e["source"]:  # a labeling round: labels:round-NNN
            by_round.setdefault(e["source"], []).append(h)
    return {
        "overall": sum(hits) / len(hits),
        "n": len(hits),
        "by_source": _shares(by),
        "by_round": _shares(by_round),
        "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(hits),
    }


def _shares(groups: dict[str, list[float]]) -> dict:
    return {s: {"accuracy": sum(v) / len(v), "n": len(v)} for s, v in sorted(groups.items())}


def run_reward(cfg: Config, run_dir: Path, init_from: str | None = None) -> dict:
    import torch

    from rlhf.models import gather_trained, load_tokenizer, torch_dtype
    from rlhf.precision import base_dtype, resolve, trainable_in_fp32
    from rlhf.tracking import Tracker, TrackerCallback

    run = RunDir(run_dir)
    run.need(run.data.pairs_dir)
    rc, mc = cfg.reward, cfg.model
    dtype = resolve(mc, "reward")
    train_rows, val_rows, report = _pair_rows(run, rc, cfg.run.seed)
    out = run.reward
    out.dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run, ["reward", "track"])
    torch.manual_seed(cfg.run.seed)

    base_path = check_init_from(init_from, run) if init_from else _init_path(run, rc.init, mc.name)
    tokenizer = load_tokenizer(base_path)
    train_ex, long_train = _tokenized(train_rows, tokenizer, rc.max_length, rc.use_margin)
    val_ex, long_val = _tokenized(val_rows, tokenizer, rc.max_length, rc.use_margin)
    if rc.max_train_examples:
        train_ex = train_ex[: rc.max_train_examples]
    if not train_ex:
        raise ConfigError(f"every training pair is longer than reward.max_length={rc.max_length}; raise it")

    load_truncated = partial(_load_truncated, layers=rc.layers, pad_id=tokenizer.pad_token_id)
    trainer = _trainer(load_truncated(base_path, base_dtype(mc)), tokenizer, train_ex, cfg, out)
    trainable_in_fp32(trainer.model)  # the new score head too
    tracker = Tracker(cfg, run, "reward", main_process=trainer.is_world_process_zero())
    trainer.add_callback(TrackerCallback(tracker))
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    with open(out.log, "w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    # merged and saved in float32; accuracy is measured in the compute dtype PPO and eval will score in
    trained = gather_trained(trainer, load_truncated, base_path, out.adapter, out.model, mc.use_lora)
    if trained is None:  # not the main process
        return {}
    trained = trained.to(torch_dtype(dtype))
    behaviour = _fit_behaviour(run, rc.behaviour_model)
    fitted = _fit_weights(run, cfg, val_rows, dtype) if rc.fit_weights else None

    acc = pairwise_accuracy(trained, tokenizer, val_ex)
    train_acc = pairwise_accuracy(trained, tokenizer, train_ex[: rc.accuracy_on_train])
    pairs = {"read": report["read"], "dropped": report["dropped"], "train": len(train_ex), "val": len(val_ex)}
    metrics = {
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "init": base_path,
        "pairs": {**pairs, "too_long": long_train + long_val},
        "val_accuracy": acc["overall"],
        "val_by_source": acc["by_source"],
        "val_by_round": acc.get("by_round", {}),
        "val_mean_margin": acc.get("mean_margin"),
        "train_accuracy_sample": train_acc["overall"],
        "gpu_peak_gb": gpu_peak_gb(),
        "dtype": dtype,
        "behaviour_model": behaviour,
        "fitted_weights": fitted,
    }
    out.metrics.write_text(json.dumps(metrics, indent=2))
    tracker.finish(metrics)
    per = ", ".join(f"{s}={v['accuracy']:.3f} (n={v['n']})" for s, v in acc["by_source"].items())
    print(f"reward: {metrics['steps']} steps in {seconds:.0f}s; held-out accuracy {acc['overall']:.3f} [{per}]")
    print(f"reward: wrote {out.model}")
    return metrics


def _trainer(model, tokenizer, train_ex: list[dict], cfg: Config, out):
    """TRL's RewardTrainer on the tokenized pairs (with their margins under reward.use_margin), LoRA + score head."""
    from datasets import Dataset
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    from rlhf.models import lora_config
    from rlhf.trainer_args import shared_args

    rc, mc = cfg.reward, cfg.model
    args = TRLRewardConfig(
        center_rewards_coefficient=rc.center_rewards_coefficient or None,
        **shared_args(rc, mc, out.trainer, cfg.run.seed),
    )
    columns = ["chosen_ids", "rejected_ids"] + (["margin"] if rc.use_margin else [])
    return RewardTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([{c: e[c] for c in columns} for e in train_ex]),
        peft_config=lora_config(mc, task_type="SEQ_CLS") if mc.use_lora else None,
    )


def _load_truncated(path: str, dtype: str = "float32", *, layers: int, pad_id: int):
    """The reward model (or the model it starts from) with its first ``layers`` decoder layers and a pad id."""
    from rlhf.models import truncate_layers

    model = truncate_layers(load_reward_model(path, dtype), layers)
    model.config.pad_token_id = pad_id
    return model


def _pair_rows(run: RunDir, rc, seed: int) -> tuple[list, list, dict]:
    """Training and held-out pairs (split by user) of the configured sources, and what loading them counted."""
    rows, report = load_pairs(run, rc.sources)
    if not rows:
        raise MissingInput(
            f"no preference pairs for sources {rc.sources} under {run.data.pairs_dir}; "
            "run `rlhf data prepare` (and `rlhf label import` for labels)"
        )
    if rc.balance:
        rows = balance(rows, rc.balance_ratio, seed)
    train_rows, val_rows = split_by_user(rows, rc.val_fraction, seed)
    return train_rows, val_rows, report


def _init_path(run: RunDir, init: str, model_name: str) -> str:
    """The model the reward model starts from: the SFT model already reads these prompts, so a reward head on it
    learns faster than on the base (reward.init: auto = SFT when it exists)."""
    from rlhf.models import resolve_model

    if init == "sft":
        run.need(run.sft.merged)
    if init == "sft" or (init == "auto" and run.sft.merged.exists()):
        return str(run.sft.merged)
    return resolve_model(model_name)


def _fit_behaviour(run: RunDir, name: str) -> str | None:
    """The behaviour term's model, fit on the run's training interactions and saved beside the reward model."""
    from reward_models.terms.behaviour import BehaviourModel
    from rlhf.data.splits import stored_training_triples

    if name == "none":
        run.reward.behaviour.unlink(missing_ok=True)
        return None
    from rlhf.baselines import MissingGenres, catalog_genres

    catalog = run.catalog()
    item_ids = [it.item_id for it in catalog.items]
    try:
        model = BehaviourModel.fit(name, item_ids, stored_training_triples(run.data.splits), catalog_genres(catalog))
    except MissingGenres as e:
        raise ConfigError(f"reward.behaviour_model={name}: {e} ({run.data.catalog}); choose another model") from e
    model.save(run.reward.behaviour)
    return name


def _fit_weights(run: RunDir, cfg: Config, pairs: list[dict], dtype: str) -> dict:
    """Bradley-Terry weights of the composite's terms on the held-out pairs (reward_models/weights.py), written to
    reward/weights.json beside each term's own pairwise accuracy."""
    from reward_models.composite import for_run
    from reward_models.weights import fit_weights

    composite = for_run(run, cfg.ppo.reward_weights, dtype, cfg.reward)
    fitted = fit_weights(composite, pairs)
    run.reward.weights.write_text(json.dumps(fitted, indent=2))
    shown = ", ".join(f"{t} {w:.2f}" for t, w in fitted["weights"].items() if w)
    n, accuracy = fitted["pairs"], fitted["accuracy"]
    print(f"reward: Bradley-Terry weights on {n} held-out pairs (accuracy {accuracy:.3f}): {shown}")
    return fitted
