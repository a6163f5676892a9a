"""Export: a fresh process with only transformers + peft loads the export and, greedy, writes exactly what
`rlhf recommend` writes for the same prompt; the adapter form is one LoRA on the original base."""

from __future__ import annotations

import json
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
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()

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
