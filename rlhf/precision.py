"""Which dtype the models compute in, and how a stage applies it.

``model.dtype: auto`` (the default) resolves to bfloat16 where the hardware runs it fast: a CUDA GPU with
bf16, or a CPU for which torch reports AMX or AVX-512 BF16 (Intel Sapphire Rapids and later, AMD Zen 4
and later). Elsewhere it resolves to float32, because bf16 matmuls emulated in software are slower than
fp32 ones. ``float32`` / ``bfloat16`` / ``float16`` are explicit choices (float16 is for CUDA; a CPU runs it, slowly,
which is what comparing against an f16 GGUF export needs).

How a stage uses bf16 (measured in ``bench/lora_dtype.py``):
- frozen weights (the LoRA base, the reference, the reward model) are stored in the compute dtype;
- trained weights (LoRA adapters, the value and reward heads, a fully fine-tuned model) and the
  optimiser state stay in float32 (``trainable_in_fp32``), and the trainers run under bf16 autocast
  (``trainer_precision``), so updates smaller than bf16's resolution are not lost;
- scores, log-probabilities and losses are read in float32.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from functools import cache

from rlhf.config import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
# what torch reports for a CPU whose bf16 matmuls run in hardware
BF16_CPU_FEATURES = ("amx", "avx512_bf16")


class PrecisionError(ConfigError):
    """A dtype or quantization this machine cannot run; the message says which to use instead."""


def choose_dtype(requested: str, cuda: bool, cuda_bf16: bool, cpu_features: Iterable[str]) -> tuple[str, str]:
    """(dtype, why) for ``model.dtype=requested`` on the given hardware. Pure, so it is tested on capability
    strings: ``cpu_features`` holds names such as ``amx`` and ``avx512_bf16``."""
    if requested not in DTYPES:
        raise PrecisionError(f"model.dtype={requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested, "set in the config"
    if cuda:
        return ("bfloat16", "CUDA GPU with bf16") if cuda_bf16 else ("float32", "CUDA GPU without bf16")
    fast = sorted(set(cpu_features) & set(BF16_CPU_FEATURES))
    if fast:
        return "bfloat16", f"CPU with {' and '.join(f.upper().replace('_', '-') for f in fast)}"
    return "float32", "CPU without AMX or AVX-512 BF16 (bf16 would be emulated, slower than float32)"


def cpu_features() -> set[str]:
    """The bf16-relevant features torch reports for this CPU (empty where torch cannot tell)."""
    import torch

    found = set()
    for name, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.add(name)
    return found


def check_hardware(model_cfg) -> None:
    """A model setting this machine cannot run stops here, before anything loads (the CLI calls it right after
    reading the config; ``resolve`` again for programs that call a stage directly)."""
    choose_dtype(model_cfg.dtype, _cuda(), False, ())  # an unknown dtype
    if model_cfg.load_in_4bit and not _cuda():
        raise PrecisionError(
            "model.load_in_4bit (QLoRA) needs a CUDA GPU with bitsandbytes; this machine has none. "
            "Drop load_in_4bit to train LoRA in full precision."
        )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@cache
def resolved(requested: str) -> tuple[str, str]:
    """(dtype, why) for ``model.dtype=requested`` on this machine (cached: the hardware does not change)."""
    import torch

    cuda = torch.cuda.is_available()
    return choose_dtype(requested, cuda, cuda and torch.cuda.is_bf16_supported(), cpu_features())


def resolve(model_cfg, stage: str | None = None) -> str:
    """The compute dtype for ``model_cfg.dtype`` on this machine; with ``stage``, prints what was chosen and why.
    Every stage that runs a model calls it before loading one, so a setting the hardware cannot run stops here."""
    check_hardware(model_cfg)
    dtype, why = resolved(model_cfg.dtype)
    if stage:  # on stderr: `rlhf recommend --json` keeps stdout to its JSON
        print(f"{stage}: computing in {dtype} (model.dtype={model_cfg.dtype}: {why})", file=sys.stderr, flush=True)
    return dtype


def base_dtype(model_cfg) -> str:
    """The dtype to load a model in for training: the compute dtype for a frozen LoRA base, float32 when every
    weight is trained (a fully fine-tuned model keeps float32 master weights and computes under autocast)."""
    return resolve(model_cfg) if model_cfg.use_lora else "float32"


def trainer_precision(model_cfg) -> dict:
    """The precision arguments of a TRL / transformers trainer config: bf16 autocast wherever bf16 was resolved
    (CPU included), fp16 only on CUDA."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = resolve(model_cfg)
    return {"bf16": dtype == "bfloat16", "fp16": cuda and dtype == "float16", "use_cpu": not cuda}


def trainable_in_fp32(model) -> int:
    """Cast every trainable parameter to float32 in place (PEFT keeps LoRA weights in float32 but copies
    ``modules_to_save`` such as a score head in the base's dtype); returns how many were cast. Call it before
    the optimiser is built, so its state is float32 too."""
    import torch

    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast
