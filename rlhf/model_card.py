"""The model card (README.md) of an export: Hugging Face Hub metadata as YAML front matter, then a manual for
the form the folder holds (PEFT adapter, merged transformers model or GGUF files), the system prompt, data,
evaluation and example conversations.

The front matter is written with ``yaml.safe_dump``, so any text from the data (item titles in the example
widget, a run name) is quoted as YAML needs and cannot end the header or add keys.
"""

from __future__ import annotations

import re

import yaml

# base model name -> (Hub id, license); names not here (a local folder) give no base_model / license
HUB = {"smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")}
DATASETS = {
    "builtin": "rec-rlhf built-in films (simulated users)",
    "movielens-100k": "MovieLens 100K",
    "movielens": "MovieLens",
    "goodbooks": "goodbooks-10k",
    "amazon": "Amazon reviews",
    "generic": "user interaction logs",
}
LIBRARY = {"peft": "peft", "merged": "transformers", "gguf": "gguf"}


def metric_rows(k: int) -> list[tuple[str, str]]:
    """(name, key in eval/metrics.json) of the figures the card reports."""
    return [
        ("valid listing rate", "valid_rate"),
        ("grounded in catalog", "grounded_rate"),
        ("duplicate rate", "duplicate_rate"),
        ("simulator true utility", "true_utility"),
        (f"HR@{k}", f"hr@{k}"),
        (f"NDCG@{k}", f"ndcg@{k}"),
        ("composite reward", "reward/reward"),
        ("KL to SFT (nats/response)", "kl_to_sft"),
    ]


def hub_base(model_name: str) -> tuple[str | None, str | None]:
    """(Hub id, license) of the base model: known for the built-in default, the name itself for a Hub id."""
    if model_name in HUB:
        return HUB[model_name]
    if model_name.count("/") == 1 and not model_name.startswith((".", "/", "~")):
        return model_name, None
    return None, None


def _figures(info: dict) -> list[tuple[str, str, float]]:
    m = info["metrics"].get(info["stage"]) or {}
    return [(name, key, m[key]) for name, key in metric_rows(info["k"]) if isinstance(m.get(key), (int, float))]


def front_matter(info: dict) -> dict:
    """The Hub metadata: base model, library, task, tags, data, license, a chat widget and the eval figures."""
    hub_id, license_id = hub_base(info["model_name"])
    tags = ["recommendation", "rlhf", "trl", "rec-rlhf", "sft", "lora"]
    tags += ["ppo"] if info["stage"] == "ppo" else []
    tags += ["gguf", "llama-cpp", "ollama"] if info["format"] == "gguf" else []
    meta = {"base_model": hub_id, "library_name": LIBRARY[info["format"]], "pipeline_tag": "text-generation"}
    meta["license"] = license_id
    meta["tags"] = tags
    meta["datasets"] = [DATASETS.get(info["source"], str(info["source"]))]
    if info["examples"]:
        meta["widget"] = [{"messages": [m for m in info["examples"][0]["messages"] if m["role"] != "assistant"]}]
    figures = _figures(info)
    if figures:
        meta["model-index"] = [
            {
                "name": f"rec-rlhf {info['run_name']} {info['stage']}",
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Ranked recommendations with reasons"},
                        "dataset": {
                            "type": str(info["source"]),
                            "name": f"{meta['datasets'][0]}, held-out {info['eval_split']} users",
                            "split": str(info["eval_split"]),
                        },
                        "metrics": [
                            {"type": key.replace("@", "_at_").replace("/", "_"), "name": name, "value": round(value, 4)}
                            for name, key, value in figures
                        ],
                    }
                ],
            }
        ]
    return {key: value for key, value in meta.items() if value is not None}


def yaml_header(meta: dict) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=100) + "---\n"


def _generate_snippet(info: dict, model_line: str, extra_import: str = "", tokenizer_arg: str = "") -> str:
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer{extra_import}

EXPORT = "path/to/this/folder"
tokenizer = AutoTokenizer.from_pretrained(EXPORT{tokenizer_arg})
model = {model_line}
messages = [
    {{"role": "system", "content": open(f"{{EXPORT}}/system_prompt.txt").read()}},
    {{"role": "user", "content": open(f"{{EXPORT}}/example_user.txt").read()}},  # a user's history, see below
]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens={info["max_new_tokens"]}, do_sample=False)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def _gguf_usage(info: dict) -> str:
    g = info["gguf"]
    n = info["max_new_tokens"]
    files = "\n".join(f"- `{f}` — {what}" for f, what in g["files"].items())
    ollama = (
        f"""### Ollama

```bash
ollama create {g["ollama_name"]} -f Modelfile
ollama run {g["ollama_name"]} "$(cat example_user.txt)"
```

`Modelfile` runs `{g["main"]}` with the chat template, the system prompt below, greedy decoding (temperature 0,
repeat penalty 1) and `<|im_end|>` as the stop token.
"""
        if g["modelfile"]
        else "No `Modelfile`: the chat template is not ChatML; write a TEMPLATE for Ollama by hand.\n"
    )
    lora = (
        f"""
The LoRA adapter on its own (llama.cpp's adapter format) applies to `base-f16.gguf`, the model it was trained on:

```bash
llama-cli -m base-f16.gguf --lora {g["lora"]} -sys "$(cat system_prompt.txt)" --temp 0 --repeat-penalty 1.0 -n {n}
```
"""
        if g["lora"]
        else ""
    )
    gguf_arg = f', gguf_file="{g["main"]}"'
    snippet = _generate_snippet(info, f"AutoModelForCausalLM.from_pretrained(EXPORT{gguf_arg})", "", gguf_arg)
    return f"""{files}

{ollama}
### llama.cpp

```bash
llama-cli -m {g["main"]} -sys "$(cat system_prompt.txt)" --temp 0 --repeat-penalty 1.0 -n {n}
# then paste the user message (example_user.txt); or serve it with an OpenAI-compatible API:
llama-server -m {g["main"]} --temp 0 --repeat-penalty 1.0 -n {n} --port 8080
```
{lora}
### transformers

{snippet}

Greedy decoding in llama.cpp and Ollama follows the same model, but not the same arithmetic as transformers in
float32 (f16 weights, quantized matrix products): a listing can differ after a near tie between two tokens.
`python bench/llama_cpp_check.py --export EXPORT --run RUN` measures how often.
"""


def usage(info: dict) -> str:
    """How to load and run the folder's form."""
    if info["format"] == "gguf":
        return _gguf_usage(info)
    if info["format"] == "merged":
        return _generate_snippet(info, "AutoModelForCausalLM.from_pretrained(EXPORT)")
    return _generate_snippet(info, info["load"], "\nfrom peft import PeftModel")


def code_block(text: str) -> str:
    """``text`` as a Markdown code block whose fence is longer than any run of backticks in it, so a title holding
    a fence cannot close the block and have the rest of the text read as Markdown (or HTML)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text}\n{fence}"


def render(info: dict) -> str:
    """The whole README.md."""
    table = "\n".join(f"| {name} | {value:.3f} |" for name, _, value in _figures(info))
    examples = "\n\n".join(
        "\n".join(f"**{msg['role']}**:\n\n{code_block(msg['content'])}" for msg in ex["messages"])
        for ex in info["examples"]
    )
    base_line = (
        f"`{info['base_model']}` — {info['base_origin']}"
        if info["base_model"]
        else "none: this folder is a whole model"
    )
    other = ", ".join(f"`--format {f}`" for f in LIBRARY if f != info["format"])
    return f"""{yaml_header(front_matter(info))}
# rec-rlhf recommender ({info["stage"].upper()} stage)

An LLM that writes a ranked list of {info["k"]} {info["noun"]} with a short reason for each, from the user's
history. Trained with rec-rlhf: {", ".join(info["stages_trained"])}.

- **Form**: {info["form"]}
- **Base model it needs**: {base_line}
- **Exported**: {info["exported"]} from run `{info["run"]}`

## Base model
{info["base_note"]}

## How to use

{usage(info)}
The same run exports as {other} with `rlhf export --run RUN --out DIR --format ...`.

`messages` must be built the way training built them: the system prompt below, then the history as the
user message (templates in `prompts/`, rendered by `rlhf.prompts.PromptBuilder`; `example_user.txt` is one).
Item text in the history is fenced in `<history>` and quoted, so a hostile title reads as data.

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
