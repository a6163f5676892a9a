"""SFT stage: TRL SFTTrainer on prompt -> ranked-list examples, loss on the completion only, LoRA by default.

    rlhf sft --run runs/demo --config recipes/demo.yaml
    accelerate launch --config_file accelerate_configs/single_gpu.yaml -m rlhf sft --run runs/demo

Writes RUN_DIR/sft/adapter (LoRA), RUN_DIR/sft/merged (the model PPO starts from and its KL reference),
log.jsonl, samples.jsonl (held-out generations before and after training) and metrics.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf.config import Config, save_resolved
from rlhf.runs import RunDir


def trainer_precision(model_cfg) -> dict:
    """TRL configs default to bf16, which stops on CPU; say what the hardware supports."""
    import torch

    cuda = torch.cuda.is_available()
    return {
        "bf16": cuda and model_cfg.dtype == "bfloat16",
        "fp16": cuda and model_cfg.dtype == "float16",
        "use_cpu": not cuda,
    }


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

    from rlhf.models import gather_trained, gpu_peak_gb, load_causal_lm, load_tokenizer, lora_config, resolve_model

    run = RunDir(run_dir)
    rows = run.rows("sft/train.parquet")
    val_rows = run.rows("sft/val.parquet")
    if not rows:
        from rlhf.interactions import DataError

        raise DataError(
            f"{run.data / 'sft/train.parquet'} has no examples; users need at least K+2 interactions "
            "(lower data.k or data.min_history and prepare the data again)"
        )
    meta, catalog = run.meta(), run.catalog()
    out = run_dir / "sft"
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, run_dir, ["sft"])
    torch.manual_seed(cfg.run.seed)

    sc, mc = cfg.sft, cfg.model
    base_path = resolve_model(mc.name)
    tokenizer = load_tokenizer(base_path)
    model = load_causal_lm(base_path, mc.dtype, mc.load_in_4bit)
    if sc.max_train_examples:
        rows = rows[: sc.max_train_examples]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows])
    sample_rows = (val_rows or rows)[: sc.num_samples]
    gen_tokens = sc.sample_max_new_tokens
    before_texts, before = _samples(model, tokenizer, sample_rows, catalog, meta["k"], gen_tokens)

    args = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=sc.max_steps,
        num_train_epochs=sc.epochs,
        per_device_train_batch_size=sc.batch_size,
        gradient_accumulation_steps=sc.grad_accum,
        learning_rate=sc.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, sc.max_steps // 10),
        logging_steps=sc.logging_steps,
        logging_first_step=True,
        max_length=sc.max_length,
        completion_only_loss=True,
        save_strategy="no",
        report_to="none",
        seed=cfg.run.seed,
        data_seed=cfg.run.seed,
        dataloader_num_workers=0,
        gradient_checkpointing=sc.gradient_checkpointing,
        **trainer_precision(mc),
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(mc) if mc.use_lora else None,
    )
    t0 = time.time()
    result = trainer.train()
    seconds = time.time() - t0
    logs = trainer.state.log_history
    with open(out / "log.jsonl", "w") as f:
        for entry in logs:
            f.write(json.dumps(entry) + "\n")

    merged = gather_trained(
        trainer, lambda p: load_causal_lm(p, mc.dtype), base_path, out / "adapter", out / "merged", mc.use_lora
    )
    if merged is None:  # not the main process
        return {}

    after_texts, after = _samples(merged, tokenizer, sample_rows, catalog, meta["k"], gen_tokens)
    with open(out / "samples.jsonl", "w") as f:
        for r, b, a in zip(sample_rows, before_texts, after_texts):
            f.write(
                json.dumps({"user_id": r["user_id"], "target": r["completion"][0]["content"], "before": b, "after": a})
                + "\n"
            )
    losses = [e["loss"] for e in logs if "loss" in e]
    metrics = {
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 2),
        "samples_before": before,
        "samples_after": after,
        "examples": len(rows),
        "gpu_peak_gb": gpu_peak_gb(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(
        f"sft: {metrics['steps']} steps in {seconds:.0f}s, loss {metrics['first_loss']} -> {metrics['last_loss']}; "
        f"valid listings on {len(sample_rows)} held-out prompts: "
        f"{before['valid_rate']:.2f} -> {after['valid_rate']:.2f}"
    )
    print(f"sft: wrote {out / 'adapter'} and {out / 'merged'}")
    return metrics
