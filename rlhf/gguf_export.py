"""Write a LLaMA-architecture model (and a LoRA adapter on it) as GGUF, the format llama.cpp, Ollama and
LM Studio run.

    write_model(path, state_dict, config, tokenizer, "q8_0", name)   # weights + tokenizer + chat template
    write_lora(path, peft_model, config, name)                        # llama.cpp's LoRA adapter format

Everything goes through the ``gguf`` package: ``GGUFWriter`` for the file, ``get_tensor_name_map`` for the
tensor names (``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight``), ``gguf.quants`` for
bf16 and q8_0. One-dimensional tensors (the RMS norms) stay float32 in every type, as llama.cpp expects.

Rotary layout. HF's Llama rotates the two halves of each head against each other (``rotate_half``: dim ``i``
pairs with ``i + d/2``); llama.cpp's LLaMA graph rotates adjacent pairs (``2i``, ``2i + 1``). So the output
rows of every head of the Q and K projections are interleaved here (row ``i`` of a head goes to ``2i``, row
``i + d/2`` to ``2i + 1``), per query head for Q and per key/value head for K. A LoRA delta ``B @ A`` changes
the same rows, so the adapter's ``lora_b`` of Q and K gets the same reordering and ``lora_a`` none.
transformers' GGUF reader undoes exactly this on load, which is what the tests check.

Tokenizer: byte-level BPE (``tokenizer.ggml.model = gpt2``) with its tokens, token types (added special
tokens CONTROL, other added tokens USER_DEFINED), merges, special ids and chat template. The pre-tokenizer
name tells llama.cpp how to split text before BPE; it is read off the HF tokenizer, never assumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rlhf.config import ConfigError
from rlhf.models import ModelError

QUANTIZE_HINT = "for smaller files, quantize model-f16.gguf with llama.cpp's llama-quantize"


class GGUFError(ModelError):
    """A model, tokenizer or adapter the GGUF writer cannot express; the message says which field and what to do."""


def _types():
    import gguf

    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    return {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
    }


GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")


def parse_types(text: str) -> list[str]:
    """``"f16,q8_0"`` -> ``["f16", "q8_0"]``; a ConfigError names what is not a type this writer makes."""
    names = list(dict.fromkeys(t.strip().lower() for t in str(text).split(",") if t.strip()))
    bad = [n for n in names if n not in GGUF_TYPES]
    if not names or bad:
        raise ConfigError(
            f"--gguf-types {text!r}: {', '.join(bad) or 'nothing given'} is not one of {', '.join(GGUF_TYPES)} "
            f"({QUANTIZE_HINT})"
        )
    return names


def llama_hparams(config) -> dict:
    """The hyperparameters llama.cpp's LLaMA graph reads, or a GGUFError naming the config.json field it cannot
    express."""
    where = "config.json"
    if getattr(config, "model_type", None) != "llama":
        raise GGUFError(
            f"{where}: model_type={getattr(config, 'model_type', None)!r}; the GGUF writer handles LLaMA-architecture "
            "models (model_type 'llama', e.g. SmolLM2). Export --format merged and convert that folder with "
            "llama.cpp's convert_hf_to_gguf.py"
        )
    for field in ("attention_bias", "mlp_bias"):
        if getattr(config, field, False):
            raise GGUFError(f"{where}: {field}=true; llama.cpp's LLaMA graph has no such biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise GGUFError(f"{where}: hidden_act={config.hidden_act!r}; the LLaMA graph uses silu")
    # transformers 5 keeps theta and scaling in rope_parameters; older configs in rope_theta / rope_scaling
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise GGUFError(
            f"{where}: rope_type={rope_type!r} (rope scaling) is not written by this writer; export --format "
            "merged and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    if head_dim % 2:
        raise GGUFError(f"{where}: head_dim={head_dim} is odd; rotary embeddings need an even head size")
    return {
        "context_length": config.max_position_embeddings,
        "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers,
        "feed_forward_length": config.intermediate_size,
        "head_count": heads,
        "head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "rope_freq_base": float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))),
        "rms_eps": float(config.rms_norm_eps),
        "vocab_size": config.vocab_size,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }


def _rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of each head from HF's halves layout to GGML's interleaved pairs."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _to_ggml_layout(gguf_name: str, w: np.ndarray, hp: dict) -> np.ndarray:
    """Q and K rows (and the lora_b of Q and K) in GGML's rotary order; every other tensor as it is."""
    base = gguf_name.removesuffix(".lora_b")
    if base.endswith("attn_q.weight"):
        return _rotary_rows(w, hp["head_count"])
    if base.endswith("attn_k.weight"):
        return _rotary_rows(w, hp["head_count_kv"])
    return w


def _name_map(hp: dict):
    import gguf

    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp["block_count"])


def model_tensors(state_dict: dict, hp: dict) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in GGML's layout) for every weight; lm_head is left out when tied."""
    names = _name_map(hp)
    out = []
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hp["tied"]:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(
                f"weight {hf_name!r} has no GGUF name in the LLaMA architecture; the GGUF writer handles plain "
                "LlamaForCausalLM checkpoints (export --format merged for anything else)"
            )
        out.append((gguf_name, _to_ggml_layout(gguf_name, tensor.detach().float().cpu().numpy(), hp)))
    return out


def _encode(w: np.ndarray, type_name: str):
    """(data, GGML type) for one tensor: 1-D tensors stay float32; a row that does not fill whole quantization
    blocks falls back to f16, as llama.cpp's converter does."""
    import gguf

    qtype = _types()[type_name][0]
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if qtype != gguf.GGMLQuantizationType.F16 and w.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = gguf.GGMLQuantizationType.F16
    return gguf.quants.quantize(w, qtype), qtype


def _byte_level(p: dict) -> bool:
    """A ByteLevel pre-tokenizer splitting with GPT-2's regex and adding no prefix space."""
    return p.get("type") == "ByteLevel" and p.get("use_regex", True) and not p.get("add_prefix_space", False)


def _pre_tokenizer(spec: dict) -> str:
    """llama.cpp's name for how this tokenizer splits text before BPE (``tokenizer.ggml.pre``)."""
    pre = spec.get("pre_tokenizer") or {}
    if _byte_level(pre):
        return "gpt-2"  # GPT-2's split regex, digits in runs: what the rec-rlhf SmolLM2 tokenizer does
    parts = pre.get("pretokenizers") or []
    if (
        pre.get("type") == "Sequence"
        and len(parts) == 2
        and parts[0].get("type") == "Digits"
        and parts[0].get("individual_digits")
        and _byte_level(parts[1])
    ):
        return "smollm"  # the hub SmolLM2 tokenizer: one digit at a time, then GPT-2's regex
    raise GGUFError(
        f"tokenizer.json pre_tokenizer {json.dumps(pre)[:200]} is not one the GGUF writer can name for llama.cpp "
        "(byte-level GPT-2 split, optionally with single digits); export --format merged and convert with "
        "llama.cpp's convert_hf_to_gguf.py"
    )


def tokenizer_fields(tokenizer, vocab_size: int) -> dict:
    """Tokens, token types, merges, pre-tokenizer and special ids of a byte-level BPE tokenizer, as GGUF holds them."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("normalizer") or None) is not None:
        raise GGUFError(
            "the tokenizer is not a byte-level BPE without normalizer (tokenizer.json model.type / normalizer); "
            "the GGUF writer writes GPT-2-style vocabularies only"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(
            f"the tokenizer has ids up to {max(vocab.values())} but config.json vocab_size={vocab_size}; "
            "resize the model's embeddings to the tokenizer first"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # llama.cpp's name for ids no token uses
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in vocab.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        if added["id"] < vocab_size:
            types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tokenizer("a")["input_ids"]
    return {
        "pre": _pre_tokenizer(spec),
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "unk": tokenizer.unk_token_id,
            "pad": tokenizer.pad_token_id,
        },
        "add_bos": tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id],
        "add_eos": tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id],
        "chat_template": tokenizer.chat_template,
    }


def _writer(path: Path, kind: str, name: str):
    import gguf

    w = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(kind)
    w.add_name(name)
    return w


def _add_hparams(w, hp: dict) -> None:
    w.add_context_length(hp["context_length"])
    w.add_embedding_length(hp["embedding_length"])
    w.add_block_count(hp["block_count"])
    w.add_feed_forward_length(hp["feed_forward_length"])
    w.add_head_count(hp["head_count"])
    w.add_head_count_kv(hp["head_count_kv"])
    w.add_rope_dimension_count(hp["head_dim"])
    w.add_rope_freq_base(hp["rope_freq_base"])
    w.add_layer_norm_rms_eps(hp["rms_eps"])
    w.add_vocab_size(hp["vocab_size"])
    if hp["head_dim"] != hp["embedding_length"] // hp["head_count"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _add_tokenizer(w, tok: dict) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    adders = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id}
    adders["pad"] = w.add_pad_token_id
    for key, add in adders.items():
        if tok["ids"][key] is not None:
            add(tok["ids"][key])
    w.add_add_bos_token(tok["add_bos"])
    w.add_add_eos_token(tok["add_eos"])
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])


def _finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_model(path: Path, state_dict: dict, config, tokenizer, type_name: str, name: str) -> Path:
    """One GGUF file holding the whole model in ``type_name`` (f32, f16, bf16, q8_0), its tokenizer and chat
    template. Checks everything before writing a byte."""
    import gguf

    parse_types(type_name)
    hp = llama_hparams(config)
    tok = tokenizer_fields(tokenizer, hp["vocab_size"])
    tensors = model_tensors(state_dict, hp)
    w = _writer(path, gguf.GGUFType.MODEL, name)
    _add_hparams(w, hp)
    w.add_file_type(_types()[type_name][1])
    if type_name in ("bf16", "q8_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(w, tok)
    for gguf_name, arr in tensors:
        data, qtype = _encode(arr, type_name)
        w.add_tensor(gguf_name, data, raw_dtype=qtype)
    return _finish(w, path)


def lora_pairs(peft_model, hp: dict) -> tuple[float, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(alpha, [(GGUF weight name, lora_a, lora_b)]) of the active LoRA adapter, with ``B`` rescaled where needed
    so that llama.cpp's scale ``alpha / rank`` gives each module PEFT's own scaling."""
    names = _name_map(hp)
    adapter = peft_model.active_adapter
    found = []
    for module_name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or adapter not in module.lora_A:
            continue
        if getattr(module, "use_dora", {}).get(adapter) or module.lora_B[adapter].bias is not None:
            raise GGUFError(f"{module_name}: DoRA and LoRA biases have no llama.cpp adapter form; export --format peft")
        hf_name = module_name.removeprefix("base_model.model.") + ".weight"
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight",))
        if gguf_name is None:
            raise GGUFError(f"LoRA on {hf_name!r}: no GGUF name in the LLaMA architecture; export --format peft")
        a = module.lora_A[adapter].weight.detach().float().cpu().numpy()
        b = module.lora_B[adapter].weight.detach().float().cpu().numpy()
        found.append((gguf_name, a, b, float(module.scaling[adapter])))
    if not found:
        raise GGUFError("the adapter has no LoRA layers on linear weights; nothing to write as a GGUF adapter")
    alpha = found[0][3] * found[0][1].shape[0]
    out = []
    for gguf_name, a, b, scaling in found:
        factor = scaling * a.shape[0] / alpha
        b = b if factor == 1.0 else b * np.float32(factor)
        out.append((gguf_name, a, _to_ggml_layout(gguf_name + ".lora_b", b, hp)))
    return alpha, out


def write_lora(path: Path, peft_model, config, name: str) -> Path:
    """The active LoRA adapter of ``peft_model`` in llama.cpp's adapter format (float32): ``general.type =
    adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, tensors ``<weight>.lora_a`` [r, in] and
    ``<weight>.lora_b`` [out, r] as PEFT stores them (GGUF lists dimensions in reverse)."""
    import gguf

    hp = llama_hparams(config)
    alpha, pairs = lora_pairs(peft_model, hp)
    w = _writer(path, gguf.GGUFType.ADAPTER, name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for gguf_name, a, b in pairs:
        w.add_tensor(gguf_name + ".lora_a", a.astype(np.float32))
        w.add_tensor(gguf_name + ".lora_b", b.astype(np.float32))
    return _finish(w, path)


def base_state_dict(peft_model) -> dict:
    """The weights a LoRA adapter applies to: the PEFT model's base without the adapter's tensors."""
    out = {}
    for key, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" in key:
            continue
        if "modules_to_save" in key or "original_module" in key:
            raise GGUFError(f"{key}: the adapter trains whole modules (modules_to_save); export --format peft")
        out[key.replace(".base_layer.", ".")] = tensor
    return out
