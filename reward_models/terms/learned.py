"""The learned term: the reward model's scalar for (prompt, listing), scored from text with the token layout reward
training used (reward_models/encoding.py), in batches."""

from __future__ import annotations


class LearnedScore:
    """A trained reward model (AutoModelForSequenceClassification, one label) as a term of the contract."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        model.config.pad_token_id = tokenizer.pad_token_id
        for p in model.parameters():
            p.requires_grad_(False)

    def __call__(self, prompts: list, completions: list[str], contexts=None) -> list[float]:
        from reward_models.encoding import encode, score_sequences

        seqs = [encode(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        return score_sequences(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size)


def term(env):
    """The run's reward model, or None when it has none (the composite then says the term is missing)."""
    return env.reward_model
