"""Plain TRL 1.12 PPO, as a user gets it from TRL directly: the baseline bench/ppo_step.py times ours against.

    python bench/plain_trl_ppo.py RUN UPDATES BATCH RESPONSE_LENGTH EPOCHS MINI_BATCHES OUT_DIR TEMPERATURE DTYPE

LoRA policy on RUN/sft/merged, the full reward model RUN/reward/model as reward, and a full copy of it, trained in
full, as value model; TRL's defaults elsewhere. Prints one JSON line: medians over the updates after the first of
seconds per update, generation, scoring (the reward model's forward) and the rest, and the GPU peak.
"""

import json
import statistics
import sys
import time

import pyarrow.parquet as pq
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Clock(TrainerCallback):
    """Seconds per update, and the generation / scoring seconds accumulated during it."""

    def __init__(self):
        self.times, self.phases, self.mark = [], [], time.time()
        self.spent = {"generation": 0.0, "scoring": 0.0}

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.time() - self.mark)
        self.mark = time.time()
        self.phases.append(dict(self.spent))
        self.spent.update(generation=0.0, scoring=0.0)

    def timed(self, fn, key):
        def wrapper(*a, **k):
            t = time.time()
            try:
                return fn(*a, **k)
            finally:
                self.spent[key] += time.time() - t

        return wrapper


def main() -> None:
    run, updates, batch, resp, epochs, minis, out, temp, dtype_name = sys.argv[1:10]
    updates, batch, resp, epochs, minis = map(int, (updates, batch, resp, epochs, minis))
    cuda = torch.cuda.is_available()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    tok = AutoTokenizer.from_pretrained(f"{run}/sft/merged")
    tok.padding_side = "left"
    rows = pq.read_table(f"{run}/data/prompts/train.parquet").to_pylist()
    ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True) for r in rows]
    ids = [list(i["input_ids"] if hasattr(i, "keys") else i) for i in ids]
    policy = AutoModelForCausalLM.from_pretrained(f"{run}/sft/merged", dtype=dtype)
    rm = AutoModelForSequenceClassification.from_pretrained(f"{run}/reward/model", num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(f"{run}/reward/model", num_labels=1, dtype=dtype)
    for m in (rm, value):
        m.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(
        output_dir=out,
        learning_rate=1e-4,
        per_device_train_batch_size=batch // minis,
        gradient_accumulation_steps=minis,
        num_mini_batches=minis,
        num_ppo_epochs=epochs,
        total_episodes=updates * batch,
        local_rollout_forward_batch_size=batch,
        response_length=resp,
        temperature=float(temp),
        stop_token="eos",
        num_sample_generations=0,
        save_strategy="no",
        report_to=[],
        bf16=dtype == torch.bfloat16,
        use_cpu=not cuda,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, task_type="CAUSAL_LM", target_modules=LORA_TARGETS)
    clock = Clock()
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=None,
        reward_model=rm,
        value_model=value,
        train_dataset=Dataset.from_list([{"input_ids": i} for i in ids]),
        peft_config=lora,
        callbacks=[clock],
    )
    policy_model = trainer.accelerator.unwrap_model(trainer.model).policy
    policy_model.generate = clock.timed(policy_model.generate, "generation")
    rm.model.forward = clock.timed(rm.model.forward, "scoring")  # TRL scores through the backbone, then .score
    clock.mark = time.time()
    trainer.train()
    steady = slice(1, None) if len(clock.times) > 1 else slice(None)
    gen = statistics.median([p["generation"] for p in clock.phases][steady])
    score = statistics.median([p["scoring"] for p in clock.phases][steady])
    upd = statistics.median(clock.times[steady])
    gpu = round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None
    result = {"update_s": upd, "generation_s": gen, "scoring_s": score, "optimisation_s": upd - gen - score}
    print(json.dumps({**result, "gpu_peak_gb": gpu}))


if __name__ == "__main__":
    main()
