"""SFT stage: TRL SFTTrainer on prompt -> ranked-list examples, loss on the completion only, LoRA by default.

    rlhf sft --run runs/demo --config recipes/demo.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m rlhf sft --run runs/demo

Writes RUN_DIR/sft/adapter (LoRA), RUN_DIR/sft/merged (the model PPO starts from and its KL reference),
log.jsonl, samples.jsonl (held-out generations before and after training) and metrics.json; with
``track.report_to``, the per-step logs and those figures to the trackers (rlhf/tracking.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf.config import Config, save_resolved
from rlhf.runs import RunDir


def listing_stats(texts: list[str], catalog, k: int) -> dict:
    from rlhf.listing import parse_and_ground

    parsed = [parse_and_ground(t, catalog) for t in texts]
    n = max(len(texts), 1)
    items = [e for p in parsed for e in p]
    return {
        "valid_rate": sum(len(p) == k for p in parsed) / n,
        "parsed_rate": sum(len(p) > 0 for p in parsed) / n,
        "grounded_rate": sum(e.in_catalog for e in items) / max(len(items), 1),
    }


def _samples(model, tokenizer, rows, catalog, k, max_new_tokens):
    from rlhf.generation import generate

    texts = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)
    return texts, listing_stats(texts, catalog, k)


def run_sft(cfg: Config, run_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from rlhf.models import gather_trained, load_causal_lm, load_tokenizer, lora_config, resolve_model, torch_dtype
    from rlhf.precision import base_dtype, resolve, trainable_in_fp32
    from rlhf.tracking import Tracker, TrackerCallback
    from rlhf.trainer_args import shared_args

    run = RunDir(run_dir)
    rows = run.rows(run.data.sft("train"))
    val_rows = run.rows(run.data.sft("val"))
    if not rows:
        from rlhf.data.loaders import DataError

        raise DataError(
            f"{run.data.sft('train')} has no examples: no training window has K items to list "
            "(lower data.k or data.min_history and prepare the data again)"
        )
    meta, catalog = run.meta(), run.catalog()
    out = run.sft
    out.dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run, ["model", "sft", "track"])
    torch.manual_seed(cfg.run.seed)

    sc, mc = cfg.sft, cfg.model
    dtype = resolve(mc, "sft")
    base_path = resolve_model(mc.name)
    tokenizer = load_tokenizer(base_path)
    model = load_causal_lm(base_path, base_dtype(mc), mc.load_in_4bit)
    if sc.max_train_examples:
        rows = rows[: sc.max_train_examples]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    sample_rows = (val_rows or rows)[: sc.num_samples]
    gen_tokens = sc.sample_max_new_tokens
    before_texts, before = _samples(model, tokenizer, sample_rows, catalog, meta["k"], gen_tokens)

    args = SFTConfig(completion_only_loss=True, **shared_args(sc, mc, out.trainer, cfg.run.seed))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(mc) if mc.use_lora else None,
    )
    trainable_in_fp32(trainer.model)
    tracker = Tracker(cfg, run, "sft", main_process=trainer.is_world_process_zero())
    trainer.add_callback(TrackerCallback(tracker))
    t0 = time.time()
    result = trainer.train()
    seconds = time.time() - t0
    with open(out.log, "w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")

    # the merge runs in float32 and sft/merged is saved in float32, whatever the compute dtype: each later
    # stage loads it in its own
    merged = gather_trained(
        trainer, lambda p: load_causal_lm(p, "float32"), base_path, out.adapter, out.merged, mc.use_lora
    )
    if merged is None:  # not the main process
        return {}
    merged = merged.to(torch_dtype(dtype))

    after_texts, after = _samples(merged, tokenizer, sample_rows, catalog, meta["k"], gen_tokens)
    _write_samples(out.samples, sample_rows, before_texts, after_texts)
    metrics = _metrics(trainer.state, result, seconds, before, after, len(rows), dtype)
    out.metrics.write_text(json.dumps(metrics, indent=2))
    tracker.finish(metrics)
    print(
        f"sft: {metrics['steps']} steps in {seconds:.0f}s, loss {metrics['first_loss']} -> {metrics['last_loss']}; "
        f"valid listings on {len(sample_rows)} held-out prompts: "
        f"{before['valid_rate']:.2f} -> {after['valid_rate']:.2f}"
    )
    print(f"sft: wrote {out.adapter} and {out.merged}")
    return metrics


def _write_samples(path: Path, rows: list[dict], before: list[str], after: list[str]) -> None:
    """Held-out prompts' targets and what the model wrote before and after training: read them."""
    with open(path, "w") as f:
        for r, b, a in zip(rows, before, after):
            row = {"user_id": r["user_id"], "target": r["completion"][0]["content"], "before": b, "after": a}
            f.write(json.dumps(row) + "\n")


def _metrics(state, result, seconds: float, before: dict, after: dict, examples: int, dtype: str) -> dict:
    """What sft/metrics.json holds: steps, losses, time, held-out valid listings before and after."""
    from rlhf.models import gpu_peak_gb

    losses = [e["loss"] for e in state.log_history if "loss" in e]
    return {
        "steps": state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(state.global_step, 1), 2),
        "samples_before": before,
        "samples_after": after,
        "examples": examples,
        "gpu_peak_gb": gpu_peak_gb(),
        "dtype": dtype,
    }
