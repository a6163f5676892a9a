"""PPO stage: TRL 1.12's PPOTrainer with a LoRA policy on the SFT-merged model, against the composite reward.

    rlhf ppo --run runs/demo --config recipes/demo.yaml            # one CPU
    rlhf ppo --run runs/demo --resume                              # continue after an interruption
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m rlhf ppo --run runs/demo
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf ppo --run runs/demo

Policy: RUN_DIR/sft/merged + a new LoRA adapter (rlhf/rollout.py: how its rollouts are sampled and scored);
reference: the same model with the adapter disabled (no second copy); value model: the reward model with its own
LoRA adapter and trainable head; reward: the composite of registered terms (reward_models/composite.py). The
trainer and its TRL fixes are in rlhf/ppo_trainer.py, the resume record in rlhf/checkpoint.py.

Writes RUN_DIR/ppo/adapter (PEFT), metrics.jsonl (one line per update), rollouts.jsonl (sampled completions with
their reward terms), samples.jsonl, summary.json and checkpoints/update-NNNNNN/ every ``ppo.checkpoint_every``
updates. ``--resume`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from rlhf import checkpoint
from rlhf.config import Config, save_resolved
from rlhf.runs import RunDir


def run_ppo(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    from accelerate import PartialState
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig

    from reward_models.composite import for_run
    from reward_models.encoding import prompt_ids
    from reward_models.trl_ppo import TRLRewardAdapter
    from rlhf.models import load_causal_lm, load_tokenizer, lora_config
    from rlhf.ppo_trainer import RecPPOTrainer
    from rlhf.precision import base_dtype, resolve, trainer_precision
    from rlhf.rollout import PPOPolicy
    from rlhf.simulator import listing_truth

    run = RunDir(run_dir)
    sft_path = run.require("sft", run_dir / "sft" / "merged")
    rm_path = run.require("reward", run_dir / "reward" / "model")
    pc, mc = cfg.ppo, cfg.model
    dtype = resolve(mc, "ppo")
    out = run_dir / "ppo"
    state = PartialState(cpu=not torch.cuda.is_available())
    resume_from = checkpoint.latest(out / "checkpoints") if resume else None
    if resume and resume_from is None:
        print(f"ppo: --resume found no complete checkpoint under {out / 'checkpoints'}; starting from update 0")
    done = json.loads((resume_from / "state.json").read_text())["update"] if resume_from else 0
    if state.is_main_process:
        _prepare_output(out, resume_from, done)
        save_resolved(cfg, run_dir, ["ppo"])
    state.wait_for_everyone()
    if done >= pc.total_updates:
        print(f"ppo: {done} of {pc.total_updates} updates already done")
        return {"updates": done}
    torch.manual_seed(cfg.run.seed)

    tokenizer = load_tokenizer(str(sft_path))
    rows = run.rows("prompts/train.parquet")
    rows = rows[: pc.max_prompts] if pc.max_prompts else rows
    if len(rows) < pc.batch_size:
        raise ValueError(f"{len(rows)} PPO prompts is fewer than ppo.batch_size={pc.batch_size}")
    ids = [prompt_ids(tokenizer, r["prompt"]) for r in rows]

    policy = load_causal_lm(str(sft_path), base_dtype(mc), mc.load_in_4bit)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    if mc.use_lora:
        policy = PPOPolicy(policy, lora_config(mc))
    value_model = _value_model(rm_path, cfg, tokenizer.pad_token_id)
    reward = TRLRewardAdapter(
        for_run(run, pc.reward_weights, dtype, rm_path),
        tokenizer,
        policy.config,
        truth=listing_truth(run.catalog(), run.meta()),
    )
    for r, prompt in zip(rows, ids):
        reward.register(prompt, r["prompt"], _context(r))

    remaining = pc.total_updates - done
    # TRL: the rollout batch per process is per_device_train_batch_size x gradient_accumulation_steps, split into
    # num_mini_batches; one micro-batch per mini-batch
    args = PPOConfig(
        output_dir=str(out / "trainer"),
        learning_rate=pc.learning_rate,
        per_device_train_batch_size=pc.batch_size // pc.mini_batches,
        gradient_accumulation_steps=pc.mini_batches,
        num_mini_batches=pc.mini_batches,
        num_ppo_epochs=pc.ppo_epochs,
        total_episodes=remaining * pc.batch_size * state.num_processes,
        local_rollout_forward_batch_size=pc.batch_size,
        response_length=pc.response_length,
        temperature=pc.temperature,
        kl_coef=pc.kl_coef,
        kl_estimator=pc.kl_estimator,
        missing_eos_penalty=pc.missing_eos_penalty,
        cliprange=pc.cliprange,
        cliprange_value=pc.cliprange_value,
        vf_coef=pc.vf_coef,
        whiten_rewards=pc.whiten_rewards,
        gamma=pc.gamma,
        lam=pc.lam,
        stop_token="eos",
        num_sample_generations=0,
        logging_steps=1,
        save_strategy="no",
        report_to=[] if pc.report_to == "none" else [pc.report_to],
        seed=cfg.run.seed + done,
        lr_scheduler_type=pc.lr_scheduler,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        **trainer_precision(mc),
    )
    trainer = RecPPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward,
        value_model=value_model,
        train_dataset=Dataset.from_list([{"input_ids": i} for i in ids]),
        peft_config=None,  # the LoRA policy is built above (PPOPolicy); without LoRA TRL copies a reference
        stage_cfg=pc,
        out=out,
        reward=reward,
        total_updates=pc.total_updates,
        update_offset=done,
        resume_from=resume_from,
        merged_rollouts=pc.merged_rollouts,
    )
    if resume_from:
        print(f"ppo: resuming from {resume_from.name} ({done} of {pc.total_updates} updates done)")
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:  # TRL fix: saving on another rank fails in TRL 1.12
        return {}
    policy = trainer.policy_module
    policy.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    _write_samples(policy, tokenizer, run, reward.composite, out / "samples.jsonl", pc)
    summary = {
        "updates": pc.total_updates,
        "resumed_at": done or None,
        "seconds": round(seconds, 1),
        "processes": trainer.accelerator.num_processes,
        "dtype": dtype,
        "merged_rollouts": trainer.merged_rollouts,
        "reward_weights": pc.reward_weights,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"ppo: {remaining} updates in {seconds:.0f}s (total {pc.total_updates}); wrote {out / 'adapter'}")
    return summary


def _context(row: dict):
    from reward_models.terms import PromptContext

    return PromptContext.from_row(row)


def _prepare_output(out: Path, resume_from: Path | None, done: int) -> None:
    """A fresh run replaces an earlier run's metrics and checkpoints; a resumed one drops the lines logged after
    its checkpoint (they belong to lost work)."""
    if not resume_from and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume_from:
        for path in (out / "metrics.jsonl", out / "rollouts.jsonl"):
            if path.exists():
                lines = [x for x in path.read_text().splitlines() if x.strip()]
                path.write_text("".join(x + "\n" for x in lines if json.loads(x).get("update", 0) <= done))


def _value_model(rm_path: Path, cfg: Config, pad_id: int):
    """The reward model's first ``ppo.value_layers`` layers and head, with a LoRA adapter; trained parts in fp32."""
    from peft import get_peft_model

    from rlhf.models import load_reward_model, lora_config, truncate_layers
    from rlhf.precision import base_dtype, trainable_in_fp32

    mc = cfg.model
    model = truncate_layers(load_reward_model(rm_path, base_dtype(mc)), cfg.ppo.value_layers)
    model.config.pad_token_id = pad_id
    if mc.use_lora:
        model = get_peft_model(model, lora_config(mc, task_type="SEQ_CLS"))
        # TRL reads base_model_prefix, score and the backbone on the value model itself
        base = model.get_base_model()
        model.base_model_prefix = base.base_model_prefix
        model.score = base.score
        setattr(model, base.base_model_prefix, getattr(base, base.base_model_prefix))
    trainable_in_fp32(model)
    # TRL scores rollouts outside autocast, where the bf16 backbone's output would meet the fp32 head
    for head in model.score.modules():
        if isinstance(head, torch.nn.Linear):
            head.register_forward_pre_hook(_input_in_weight_dtype)
    return model


def _input_in_weight_dtype(module, args):
    return (args[0].to(module.weight.dtype), *args[1:])


def _write_samples(policy, tokenizer, run: RunDir, composite, path: Path, pc) -> None:
    """Greedy completions for a few validation users with their reward terms: read them."""
    from rlhf.generation import generate

    rows = run.rows("prompts/val.parquet")[:6]
    if not rows:
        return
    texts = generate(policy, tokenizer, [r["prompt"] for r in rows], max_new_tokens=pc.response_length)
    scored = composite.score([r["prompt"] for r in rows], texts, [_context(r) for r in rows])
    with open(path, "w") as f:
        for r, t, s in zip(rows, texts, scored.rows()):
            f.write(json.dumps({"user_id": r["user_id"], "text": t, **s}) + "\n")
