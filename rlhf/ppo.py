"""PPO stage: TRL 1.12's PPOTrainer with a LoRA policy on the SFT-merged model, against the composite reward.

    rlhf ppo --run runs/demo --config recipes/demo.yaml            # one CPU
    rlhf ppo --run runs/demo --resume                              # continue after an interruption
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m rlhf ppo --run runs/demo
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf ppo --run runs/demo

Policy: RUN_DIR/sft/merged + a new LoRA adapter; reference: the same model with the adapter disabled
(no second copy); value model: the reward model with its own LoRA adapter and trainable head (its
frozen base is not optimised, which is most of PPO's CPU time with a fully trained value model);
reward: learned RM + rule terms (reward_models/composite.py).

Writes RUN_DIR/ppo/adapter (PEFT), metrics.jsonl (one line per update), samples.jsonl, and
checkpoints/update-NNNNNN/ every ``ppo.checkpoint_every`` updates (written to a temporary folder, then
renamed, so a killed run never leaves a half checkpoint). ``--resume`` continues from the newest one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from rlhf.config import Config, save_resolved
from rlhf.models import gpu_peak_gb, head_in_fp32
from rlhf.runs import RunDir, fsync_dir

KEEP_CHECKPOINTS = 2


# -- checkpoints -------------------------------------------------------------------------------
def latest_checkpoint(ckpt_root: Path) -> Path | None:
    if not ckpt_root.exists():
        return None
    done = sorted(
        p
        for p in ckpt_root.iterdir()
        if p.is_dir() and p.name.startswith("update-") and not p.name.endswith(".tmp") and (p / "state.json").exists()
    )
    return done[-1] if done else None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- the trainer -------------------------------------------------------------------------------
def _trainer_class():
    from transformers import TrainerCallback, get_scheduler
    from trl.experimental.ppo import PPOTrainer

    class _SkipFirst:
        """Wraps the prompt dataloader: on resume, consume the batches the first run already used in
        the current epoch, then restore the RNG state saved with the checkpoint."""

        def __init__(self, loader, skip: int, rng_state: dict | None):
            self.loader, self.skip, self.rng_state = loader, skip, rng_state

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            it = iter(self.loader)
            while self.skip > 0:
                next(it)
                self.skip -= 1
            if self.rng_state is not None:
                _set_rng_state(self.rng_state)
                self.rng_state = None
            yield from it

    class CheckpointCallback(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer

        def on_step_end(self, args, state, control, **kwargs):
            t = self.trainer
            update = t.update_offset + state.global_step
            if update % t.stage_cfg.checkpoint_every == 0 or update == t.total_updates:
                t.save_checkpoint(update)
            return control

    class RecPPOTrainer(PPOTrainer):
        """TRL's PPOTrainer plus: per-term reward and per-phase timing in the logged metrics,
        atomic resumable checkpoints, and the two fixes TRL 1.12 needs under DDP."""

        def __init__(
            self,
            *a,
            stage_cfg,
            run_dir: Path,
            composite,
            total_updates: int,
            update_offset: int,
            resume_from: Path | None,
            **kw,
        ):
            super().__init__(*a, **kw)
            # TRL 1.12 uses gradient_accumulation_steps twice: to size the rollout batch (per-device x G)
            # and as accelerate's accumulation count. With num_mini_batches M > 1 the optimiser then steps
            # once per G micro-batches, i.e. once per rollout batch instead of once per mini-batch, and
            # the stats tensors (sized by G) are only 1/M filled, so approxkl, losses and the ratio read
            # M times too small. The rollout batch is sized by now; accumulate per mini-batch only.
            micro_per_mini = self.args.local_mini_batch_size // self.args.per_device_train_batch_size
            if self.accelerator.distributed_type != "DEEPSPEED":  # DeepSpeed fixed its count at prepare
                self.args.gradient_accumulation_steps = micro_per_mini
                self.accelerator.gradient_accumulation_steps = micro_per_mini
            self.stage_cfg, self.run_dir, self.composite = stage_cfg, run_dir, composite
            self.total_updates, self.update_offset = total_updates, update_offset
            unwrapped = self.accelerator.unwrap_model(self.model)
            # TRL 1.12 reads `model.policy` on the prepared model; a DDP wrapper has none. Expose the
            # unwrapped policy on the wrapper without registering it as a submodule.
            if not hasattr(self.model, "policy"):
                object.__setattr__(self.model, "policy", unwrapped.policy)
            # the schedule spans the whole run, also when this process does only the remaining updates
            self.lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                self.optimizer,
                num_warmup_steps=self.args.get_warmup_steps(total_updates),
                num_training_steps=total_updates,
            )
            self._timing = {"generation": 0.0}
            self._phase_start = time.time()
            self._rollout_end = None
            policy = unwrapped.policy
            if self.args.bf16 and getattr(policy, "is_loaded_in_4bit", False):
                head_in_fp32(policy)  # QLoRA: TRL's bf16 casting left rollouts failing at lm_head
            original_generate = policy.generate

            def timed_generate(*ga, **gk):
                t0 = time.time()
                try:
                    return original_generate(*ga, **gk)
                finally:
                    self._timing["generation"] += time.time() - t0

            policy.generate = timed_generate
            original_forward = unwrapped.forward

            def marked_forward(*fa, **fk):
                if torch.is_grad_enabled() and self._rollout_end is None:
                    self._rollout_end = time.time()
                return original_forward(*fa, **fk)

            unwrapped.forward = marked_forward
            self._terms: list[dict] = []
            original_per_position = composite.per_position_reward

            self._samples: list[dict] = []

            def recorded(*ra, **rk):
                out = original_per_position(*ra, **rk)
                self._terms.append(dict(composite.last_terms))
                self._samples.extend(composite.last_samples)
                return out

            composite.per_position_reward = recorded
            self.add_callback(CheckpointCallback(self))
            if resume_from is not None:
                self._load_checkpoint(resume_from)

        @contextmanager
        def null_ref_context(self):
            # TRL's version unwraps `self.model.policy`, which fails under DDP; unwrap the model first.
            policy = self.accelerator.unwrap_model(self.model).policy
            with policy.disable_adapter() if self.is_peft_model and not self.ref_adapter_name else nullcontext():
                yield

        def log(self, logs, start_time=None):
            now = time.time()
            if "objective/scores" in logs:
                rollout_end = self._rollout_end or now
                gen = self._timing["generation"]
                logs["time/generation_s"] = round(gen, 3)
                logs["time/scoring_s"] = round(max(rollout_end - self._phase_start - gen, 0.0), 3)
                logs["time/optimisation_s"] = round(now - rollout_end, 3)
                logs["time/update_s"] = round(now - self._phase_start, 3)
                if (peak := gpu_peak_gb()) is not None:
                    logs["memory/gpu_peak_gb"] = peak
                if self._terms:
                    for name in self._terms[0]:
                        logs[f"reward/{name}"] = float(np.mean([t[name] for t in self._terms]))
                logs["update"] = update = self.update_offset + self.state.global_step
                if self.accelerator.is_main_process and update % self.stage_cfg.sample_every == 0:
                    with open(self.run_dir / "ppo" / "rollouts.jsonl", "a") as f:  # read these: metrics hide hacking
                        for sample in self._samples[:4]:
                            f.write(json.dumps({"update": update, **sample}) + "\n")
                self._samples = []
                if self.accelerator.is_main_process:
                    with open(self.run_dir / "ppo" / "metrics.jsonl", "a") as f:
                        f.write(
                            json.dumps({k: (v.item() if hasattr(v, "item") else v) for k, v in logs.items()}) + "\n"
                        )
                self._terms, self._timing = [], {"generation": 0.0}
                self._rollout_end = None
            super().log(logs, start_time) if start_time is not None else super().log(logs)
            self._phase_start = time.time()

        # -- checkpoint / resume --------------------------------------------------------------
        def _trainable(self):
            model = self.accelerator.unwrap_model(self.model)
            return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}

        def save_checkpoint(self, update: int) -> None:
            acc = self.accelerator
            root = self.run_dir / "ppo" / "checkpoints"
            final = root / f"update-{update:06d}"
            tmp = root / f"update-{update:06d}.tmp"
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            acc.wait_for_everyone()
            torch.save(_rng_state(), tmp / f"rng-{acc.process_index}.pt")
            if acc.is_main_process:
                torch.save(self._trainable(), tmp / "trainable.pt")
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {
                    "update": update,
                    "episode": update * self.args.batch_size,
                    "world_size": acc.num_processes,
                    "batch_size": self.args.batch_size,
                    "total_updates": self.total_updates,
                    "time": time.time(),
                }
                (tmp / "state.json").write_text(json.dumps(state))
                for f in tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                fsync_dir(tmp)
                os.replace(tmp, final)
                fsync_dir(root)
                for old in sorted(p for p in root.glob("update-*") if not p.name.endswith(".tmp"))[:-KEEP_CHECKPOINTS]:
                    shutil.rmtree(old, ignore_errors=True)
            acc.wait_for_everyone()

        def _load_checkpoint(self, path: Path) -> None:
            model = self.accelerator.unwrap_model(self.model)
            saved = torch.load(path / "trainable.pt", map_location="cpu", weights_only=False)
            params = dict(model.named_parameters())
            missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
            if missing:
                raise RuntimeError(
                    f"{path}: checkpoint lacks trainable parameters {missing[:3]}...; "
                    "was it written with another model or LoRA config?"
                )
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v.to(params[n].device))
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
            self.lr_scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
            # the optimizer state carries the learning rate of the saved schedule; when the run's length
            # changed on resume, take the rate the current schedule gives at this step instead
            current = self.lr_scheduler.get_lr()
            for group, lr in zip(self.optimizer.param_groups, current):
                group["lr"] = lr
            self.lr_scheduler._last_lr = list(current)
            rng_file = path / f"rng-{self.accelerator.process_index}.pt"
            rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.exists() else None
            skip = self.update_offset % max(len(self.dataloader), 1)
            self.dataloader = _SkipFirst(self.dataloader, skip, rng)

    return RecPPOTrainer


# -- the stage ---------------------------------------------------------------------------------
def simulator_truth(catalog, meta: dict):
    """The simulator's list utility for logging, when the run's data came from the simulator."""
    if meta.get("simulator_seed") is None:
        return None
    from rlhf.simulator import Simulator

    sim = Simulator(catalog, seed=meta["simulator_seed"])
    k = meta["k"]
    return lambda user_id, item_ids, history_ids: sim.list_utility(sim.user(user_id), item_ids, set(history_ids), k)


def _tokenized_prompts(rows, tokenizer, max_prompts: int):
    from reward_models.encoding import prompt_ids

    rows = rows[:max_prompts] if max_prompts else rows
    return [{"input_ids": prompt_ids(tokenizer, r["prompt"]), "row": r} for r in rows]


def run_ppo(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    from accelerate import PartialState
    from datasets import Dataset
    from peft import get_peft_model
    from trl.experimental.ppo import PPOConfig

    from reward_models.composite import CompositeReward, PromptContext
    from reward_models.train import load_reward_model
    from rlhf.models import load_causal_lm, load_tokenizer, lora_config, truncate_layers
    from rlhf.sft import trainer_precision

    run = RunDir(run_dir)
    sft_path = run.require("sft", run_dir / "sft" / "merged")
    rm_path = run.require("reward", run_dir / "reward" / "model")
    pc, mc = cfg.ppo, cfg.model
    meta, catalog = run.meta(), run.catalog()
    out = run_dir / "ppo"
    ckpt_root = out / "checkpoints"
    state = PartialState(cpu=not torch.cuda.is_available())
    resume_from = latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        print(f"ppo: --resume found no complete checkpoint under {ckpt_root}; starting from update 0")
    done = json.loads((resume_from / "state.json").read_text())["update"] if resume_from else 0
    if state.is_main_process:
        if not resume_from and out.exists():
            # a fresh run replaces metrics and checkpoints of an earlier one
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        save_resolved(cfg, run_dir, ["ppo"])
        if resume_from:  # lines logged after the checkpoint belong to lost work
            for mpath in (out / "metrics.jsonl", out / "rollouts.jsonl"):
                if mpath.exists():
                    kept = [
                        line
                        for line in mpath.read_text().splitlines()
                        if line.strip() and json.loads(line).get("update", 0) <= done
                    ]
                    mpath.write_text("".join(line + "\n" for line in kept))
    state.wait_for_everyone()
    if done >= pc.total_updates:
        print(f"ppo: {done} of {pc.total_updates} updates already done")
        return {"updates": done}
    torch.manual_seed(cfg.run.seed)

    tokenizer = load_tokenizer(str(sft_path))
    prompts = _tokenized_prompts(run.rows("prompts/train.parquet"), tokenizer, pc.max_prompts)
    if len(prompts) < pc.batch_size:
        from rlhf.config import ConfigError

        raise ConfigError(f"{len(prompts)} PPO prompts is fewer than ppo.batch_size={pc.batch_size}; lower it")

    policy = load_causal_lm(str(sft_path), mc.dtype, mc.load_in_4bit)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    reward_model = load_reward_model(rm_path, mc.dtype)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    value_model = truncate_layers(load_reward_model(rm_path, mc.dtype), pc.value_layers)
    value_model.config.pad_token_id = tokenizer.pad_token_id
    if mc.use_lora:
        value_model = get_peft_model(value_model, lora_config(mc, task_type="SEQ_CLS"))
        value_model.base_model_prefix = value_model.get_base_model().base_model_prefix  # TRL reads these
        value_model.score = value_model.get_base_model().score
        setattr(
            value_model,
            value_model.base_model_prefix,
            getattr(value_model.get_base_model(), value_model.base_model_prefix),
        )
    composite = CompositeReward(
        reward_model,
        tokenizer,
        catalog,
        meta["k"],
        pc.rules,
        pc.reward_model_weight,
        truth=simulator_truth(catalog, meta),
    )
    for p in prompts:
        r = p["row"]
        composite.register(p["input_ids"], PromptContext.from_row(r))

    remaining = pc.total_updates - done
    world = state.num_processes
    # TRL: the rollout batch per process is per_device_train_batch_size x gradient_accumulation_steps, split
    # into num_mini_batches; one micro-batch per mini-batch
    args = PPOConfig(
        output_dir=str(out / "trainer"),
        learning_rate=pc.learning_rate,
        per_device_train_batch_size=pc.batch_size // pc.mini_batches,
        gradient_accumulation_steps=pc.mini_batches,
        num_mini_batches=pc.mini_batches,
        num_ppo_epochs=pc.ppo_epochs,
        total_episodes=remaining * pc.batch_size * world,
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
    dataset = Dataset.from_list([{"input_ids": p["input_ids"]} for p in prompts])
    trainer = _trainer_class()(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=composite,
        value_model=value_model,
        train_dataset=dataset,
        peft_config=lora_config(mc) if mc.use_lora else None,
        stage_cfg=pc,
        run_dir=run_dir,
        composite=composite,
        total_updates=pc.total_updates,
        update_offset=done,
        resume_from=resume_from,
    )
    if resume_from:
        print(f"ppo: resuming from {resume_from.name} ({done} of {pc.total_updates} updates done)")
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    acc = trainer.accelerator
    (out / f"rank-{acc.process_index}.json").write_text(json.dumps({"rank": acc.process_index, "pid": os.getpid()}))
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return {}
    rank_files = sorted(out.glob("rank-*.json"))
    (out / "ranks.json").write_text(json.dumps([json.loads(f.read_text())["rank"] for f in rank_files]))
    for f in rank_files:
        f.unlink()
    policy_model = trainer.accelerator.unwrap_model(trainer.model).policy
    policy_model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    _write_samples(policy_model, tokenizer, run, composite, out / "samples.jsonl", pc)
    summary = {"updates": pc.total_updates, "resumed_at": done or None, "seconds": round(seconds, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"ppo: {remaining} updates in {seconds:.0f}s (total {pc.total_updates}); wrote {out / 'adapter'}")
    return summary


def _write_samples(policy, tokenizer, run: RunDir, composite, path: Path, pc) -> None:
    """Greedy completions for a few validation users with their reward terms: read them."""
    from reward_models.composite import PromptContext
    from rlhf.generation import generate

    rows = run.rows("prompts/val.parquet")[:6]
    if not rows:
        return
    texts = generate(policy, tokenizer, [r["prompt"] for r in rows], max_new_tokens=pc.response_length)
    scores = composite.score_texts([r["prompt"] for r in rows], texts, [PromptContext.from_row(r) for r in rows])
    with open(path, "w") as f:
        for r, t, s in zip(rows, texts, scores):
            f.write(json.dumps({"user_id": r["user_id"], "text": t, **s}) + "\n")
