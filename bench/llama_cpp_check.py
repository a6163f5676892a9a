"""Does llama.cpp write what `rlhf recommend` writes? Loads a `rlhf export --format gguf` folder with llama.cpp,
greedy-generates for a few held-out users of the run, and prints per GGUF file (each model-*.gguf, and
base-f16.gguf + lora-f32.gguf when the export has the adapter) how many listings match `rlhf recommend` exactly,
where a mismatch starts (--verbose), whether llama.cpp tokenizes the prompt as transformers does, and tokens/s.

    rlhf export --run runs/demo --out exports/demo-gguf --format gguf
    python bench/llama_cpp_check.py --export exports/demo-gguf [--run runs/demo] [--users 5] [--threads 2]

Installs nothing itself. It uses llama-cpp-python (`llama_cpp`, which builds llama.cpp from source: many minutes
on two cores) when installed, else xllamacpp (llama.cpp's own server code, prebuilt for CPU):
    .venv/bin/pip install llama-cpp-python      or      .venv/bin/pip install xllamacpp
and exits 2 with those commands when neither is. Expect exact matches from f32 and f16 and fewer from q8_0:
llama.cpp multiplies q8_0 weights with 8-bit activations where transformers dequantizes to float32, so a near
tie between two tokens can go the other way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PIP = (
    ".venv/bin/pip install llama-cpp-python   # builds llama.cpp from source: allow 10+ minutes on 2 cores\n"
    "  or: .venv/bin/pip install xllamacpp    # llama.cpp prebuilt for CPU (not tuned for speed), seconds to install"
)


class LlamaCppPython:
    """llama-cpp-python's ``Llama``: one model (and LoRA), greedy chat completions."""

    def __init__(self, module, model: Path, lora: Path | None, threads: int, n_ctx: int):
        kwargs = {"lora_path": str(lora), "lora_scale": 1.0} if lora else {}
        self.llm = module.Llama(model_path=str(model), n_ctx=n_ctx, n_threads=threads, seed=0, verbose=False, **kwargs)

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=False, special=True))

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        out = self.llm.create_chat_completion(
            messages=messages, temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=max_tokens
        )
        return out["choices"][0]["message"]["content"] or "", out["usage"]["completion_tokens"]


class XLlamaCpp:
    """xllamacpp's in-process llama.cpp server: the same model (and LoRA) through llama-server's own chat path,
    the chat template applied from the GGUF file (jinja)."""

    def __init__(self, module, model: Path, lora: Path | None, threads: int, n_ctx: int):
        params = module.CommonParams()
        params.model.path = str(model)
        params.n_ctx, params.n_parallel, params.use_jinja, params.verbosity = n_ctx, 1, True, 0
        params.cpuparams.n_threads = threads
        params.sampling.temp, params.sampling.top_k, params.sampling.penalty_repeat = 0.0, 1, 1.0
        if lora:
            params.lora_adapters = [module.CommonAdapterLoraInfo(str(lora), 1.0)]
        self.server = module.Server(params)

    def tokenize(self, text: str) -> None:
        return None  # not exposed here; the prompt token count is in the usage figures

    def chat(self, messages: list[dict], max_tokens: int) -> tuple[str, int]:
        out = self.server.handle_chat_completions(
            {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0}
        )
        return out["choices"][0]["message"]["content"] or "", out["usage"]["completion_tokens"]


def _backend():
    """(module, runner class) of the first llama.cpp binding installed; exit 2 with the pip commands if none."""
    import importlib

    for name, runner in (("llama_cpp", LlamaCppPython), ("xllamacpp", XLlamaCpp)):
        try:
            return importlib.import_module(name), runner
        except ImportError:
            continue
    print(f"no llama.cpp binding is installed (llama_cpp or xllamacpp); install one:\n  {PIP}", file=sys.stderr)
    raise SystemExit(2)


def _variants(export: Path, manifest: dict) -> list[tuple[str, Path, Path | None]]:
    """(label, model file, LoRA file or None) for every GGUF model in the export."""
    g = manifest.get("gguf") or {}
    out = [(name, export / name, None) for name in sorted(g.get("files", {})) if name.startswith("model-")]
    if g.get("lora"):
        out.append((f"base-f16.gguf + {g['lora']}", export / "base-f16.gguf", export / g["lora"]))
    return out


def _reference(run_dir: Path, cfg, stage: str, rows: list[dict], k: int, max_new_tokens: int) -> list[str]:
    """What `rlhf recommend` writes for each row's prompt (greedy, in cfg.model.dtype), the model loaded once."""
    from rlhf.models import load_stage
    from rlhf.precision import resolve
    from rlhf.recommend import recommend

    loaded = load_stage(run_dir, stage, cfg.model, resolve(cfg.model, "recommend"))
    return [
        recommend(
            run_dir, cfg.model, stage, r["history_ids"], k, False, max_new_tokens, prompt=r["prompt"], loaded=loaded
        )["text"]
        for r in rows
    ]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _check(backend, label: str, model: Path, lora: Path | None, rows, refs, tokenizer, args, k: int) -> None:
    """One GGUF model (and LoRA) against `rlhf recommend`'s listings; prints one line. llama.cpp stops only at EOS:
    its text is cut where `rlhf recommend` stops, after the K-th item line."""
    from rlhf.generation import first_k_item_lines

    module, runner = backend
    llm = runner(module, model, lora, args.threads, args.n_ctx)
    matches, tokens, seconds, same_ids = 0, 0, 0.0, []
    for row, ref in zip(rows, refs):
        prompt = _render(tokenizer, row["prompt"])
        ids = llm.tokenize(prompt)
        if ids is not None:
            same_ids.append(ids == tokenizer(prompt, add_special_tokens=False)["input_ids"])
        t0 = time.perf_counter()
        text, n = llm.chat(row["prompt"], args.max_new_tokens)
        seconds, tokens = seconds + time.perf_counter() - t0, tokens + n
        text = first_k_item_lines(text, k).strip()
        matches += text == ref
        if text != ref and args.verbose:
            at = _common_prefix(text, ref)
            print(
                f"  {row['user_id']}: differs at char {at}: llama.cpp {text[at : at + 40]!r} vs {ref[at : at + 40]!r}"
            )
    same = f"; prompt tokenized as by transformers {sum(same_ids)}/{len(same_ids)}" if same_ids else ""
    print(
        f"{label}: {matches}/{len(rows)} listings match rlhf recommend{same}; "
        f"{tokens / max(seconds, 1e-9):.1f} tokens/s ({tokens} tokens in {seconds:.1f} s)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True, help="a folder written by `rlhf export --format gguf`")
    p.add_argument("--run", help="the run it came from (default: the run named in rec_rlhf.json)")
    p.add_argument("--config", help="recipe the run was made with (default: RUN/config.yaml)")
    p.add_argument("--users", type=int, default=5, help="held-out test users to compare on")
    p.add_argument("--max-new-tokens", type=int, help="default: the export's max_new_tokens")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument(
        "--dtype",
        default="float32",
        help="rlhf recommend's model.dtype (float32: the precision the export holds; auto: the run's bf16 on CPU)",
    )
    p.add_argument("--verbose", action="store_true", help="print where each mismatch starts")
    args = p.parse_args()
    backend = _backend()

    from rlhf.config import load_config
    from rlhf.models import load_tokenizer
    from rlhf.runs import RunDir

    export = Path(args.export)
    manifest = json.loads((export / "rec_rlhf.json").read_text())
    if manifest.get("format") != "gguf":
        raise SystemExit(f"{export / 'rec_rlhf.json'}: format is {manifest.get('format')!r}; export with --format gguf")
    run_dir = Path(args.run or manifest["run"])
    cfg = load_config(args.config or (run_dir / "config.yaml"), [f"model.dtype={args.dtype}"])
    run, stage = RunDir(run_dir), manifest["stage"]
    args.max_new_tokens = args.max_new_tokens or manifest["max_new_tokens"]
    rows = run.rows(run.data.prompts("test"))[: args.users]
    tokenizer = load_tokenizer(str(run_dir / "sft" / "merged"))
    print(
        f"{stage} stage of {run_dir}, {len(rows)} test users, greedy, up to {args.max_new_tokens} new tokens, "
        f"{backend[0].__name__} {getattr(backend[0], '__version__', '')}, {args.threads} threads"
    )
    refs = _reference(run_dir, cfg, stage, rows, run.meta()["k"], args.max_new_tokens)
    for label, model, lora in _variants(export, manifest):
        _check(backend, label, model, lora, rows, refs, tokenizer, args, run.meta()["k"])


if __name__ == "__main__":
    main()
