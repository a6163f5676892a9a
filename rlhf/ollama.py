"""Ollama's ``Modelfile`` for a GGUF export: the weights, the ChatML chat template in Ollama's Go-template form,
the system prompt the model was trained with, and greedy decoding.

    ollama create rec-demo-ppo -f Modelfile
    ollama run rec-demo-ppo "$(cat example_user.txt)"
"""

from __future__ import annotations

from rlhf.gguf_export import GGUFError

# ChatML, as SmolLM2's template writes it: each turn `<|im_start|>ROLE\nTEXT<|im_end|>\n`, then the assistant
# header. The system prompt comes from `.System` (the SYSTEM line below, or the request's); `.Messages` holds
# the user and assistant turns.
CHATML_TEMPLATE = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
    '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
)
STOP = "<|im_end|>"


def chatml(messages: list[dict]) -> str:
    """The prompt ``CHATML_TEMPLATE`` renders for a system message followed by user/assistant turns."""
    system = "".join(m["content"] for m in messages if m["role"] == "system")
    out = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
    for m in messages:
        if m["role"] == "user":
            out += f"<|im_start|>user\n{m['content']}<|im_end|>\n<|im_start|>assistant\n"
        elif m["role"] == "assistant":
            out += f"{m['content']}<|im_end|>\n"
    return out


def is_chatml(tokenizer, system_prompt: str) -> bool:
    """Whether the tokenizer's own chat template writes exactly what ``CHATML_TEMPLATE`` writes (probed on a
    two-turn conversation), so that Ollama sees the prompts the model was trained on."""
    probe = [
        {"role": "system", "content": system_prompt or "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    if not getattr(tokenizer, "chat_template", None):
        return False
    rendered = tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    return rendered == chatml(probe)


def modelfile(gguf_file: str, system_prompt: str, max_new_tokens: int) -> str:
    """The Modelfile text: FROM the GGUF beside it, ChatML TEMPLATE, SYSTEM, greedy decoding (temperature 0, no
    repeat penalty, which Ollama otherwise applies at 1.1) and the stop token."""
    for what, text in (("system prompt", system_prompt), ("chat template", CHATML_TEMPLATE)):
        if '"""' in text:
            raise GGUFError(f'the {what} contains """, which ends a Modelfile string; remove it from the template')
    return (
        f"# Ollama: ollama create NAME -f Modelfile, then ollama run NAME (see README.md)\n"
        f"FROM ./{gguf_file}\n"
        f'TEMPLATE """{CHATML_TEMPLATE}"""\n'
        f'SYSTEM """{system_prompt}"""\n'
        f'PARAMETER stop "{STOP}"\n'
        "PARAMETER temperature 0\n"
        "PARAMETER repeat_penalty 1\n"
        f"PARAMETER num_predict {max_new_tokens}\n"
    )
