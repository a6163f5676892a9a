"""Constrained rollouts: the PPO policy samples only allowed titles at item positions, and its full forward passes
(the old log-probs PPO's ratio starts from, the reference pass, the optimisation) mask the same positions."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from reward_models.encoding import prompt_ids
from rlhf.catalog import Catalog
from rlhf.constrained import PromptConstraints
from rlhf.listing import parse_and_ground
from rlhf.models import load_causal_lm, load_tokenizer, lora_config, resolve_model
from rlhf.rollout import PPOPolicy


class ForceText(LogitsProcessor):
    """Forces the first generated tokens to spell ``ids`` (a list marker), so every row opens an item line."""

    def __init__(self, ids: list[int], prompt_length: int):
        self.ids, self.prompt_length = ids, prompt_length

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_length
        if step < len(self.ids):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.ids[step]] = 0.0
            return forced
        return scores


def _policy_and_prompt():
    from rlhf.config import ModelConfig

    tok = load_tokenizer("tiny")
    policy = PPOPolicy(load_causal_lm(resolve_model("tiny"), "float32"), lora_config(ModelConfig(lora_r=4)))
    policy.generation_config.pad_token_id = tok.pad_token_id
    catalog = Catalog.builtin()
    messages = [{"role": "system", "content": "Recommend films."}, {"role": "user", "content": "I liked Heat."}]
    return tok, policy, catalog, messages


def _rollout(policy, ids, config, *processors):
    """TRL's rollout call (scores wanted), seeded."""
    torch.manual_seed(0)
    return policy.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        generation_config=config,
        return_dict_in_generate=True,
        output_scores=True,
        logits_processor=LogitsProcessorList(list(processors)),
    )


def test_constrained_rollouts_never_leave_the_candidates_and_score_as_they_sample():
    tok, policy, catalog, messages = _policy_and_prompt()
    candidates = [it.item_id for it in catalog.items[:5]]
    constraints = PromptConstraints(tok, catalog)
    prompt = prompt_ids(tok, messages)
    constraints.register(prompt, candidates)
    policy.setup_rollouts(None, merged=True, constraints=constraints)
    rows = 12
    ids = torch.tensor([prompt] * rows)
    marker = tok("1.", add_special_tokens=False)["input_ids"]
    config = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    out = _rollout(policy, ids, config, ForceText(marker, ids.shape[1]))
    responses = out.sequences[:, ids.shape[1] :]
    allowed = {catalog[c].display for c in candidates}
    for row in responses:
        text = tok.decode(row, skip_special_tokens=True)
        first = parse_and_ground(text, catalog)[0]
        assert first.item_id in candidates, text  # a random model, yet only offered titles
        assert catalog[first.item_id].display in allowed
    # the scores PPO takes its old log-probs from come from the masked full forward: every sampled token is allowed
    # there too, and the tokens the mask forbids are forbidden there
    logits = torch.stack(out.scores, 1)
    logp = torch.log_softmax(logits, -1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)
    real = responses != tok.pad_token_id
    assert torch.all(logp[real] > -1e3)
    title_step = len(marker)  # the first title token: only the candidates' first tokens may come
    first_tokens = {tok(" " + catalog[c].display, add_special_tokens=False)["input_ids"][0] for c in candidates}
    open_tokens = (logits[0, title_step] > -1e8).nonzero().flatten().tolist()
    assert set(open_tokens) == first_tokens
    # and the masked distribution puts all its mass there, as the sampler's did
    mass = torch.softmax(logits[:, title_step], -1)[:, sorted(first_tokens)].sum(-1)
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)


def test_without_candidates_the_whole_catalog_is_allowed_and_free_text_is_untouched():
    tok, policy, catalog, messages = _policy_and_prompt()
    constraints = PromptConstraints(tok, catalog)
    prompt = prompt_ids(tok, messages)
    text = tok("1. Heat (1995) — crime like Heat", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + text])
    with torch.no_grad():
        free = policy(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    masked = constraints.mask(free, ids, torch.ones_like(ids))
    start = len(prompt)
    marker = len(tok("1.", add_special_tokens=False)["input_ids"])
    # the position predicting the first title token keeps exactly the catalog titles' first tokens
    open_tokens = set((masked[0, start + marker - 1] > -1e8).nonzero().flatten().tolist())
    firsts = {tok(" " + it.display, add_special_tokens=False)["input_ids"][0] for it in catalog.items}
    assert open_tokens == firsts
    # the prompt and the explanation after the title are left as they were
    assert torch.equal(masked[0, : start - 1], free[0, : start - 1])
    assert torch.equal(masked[0, -3:], free[0, -3:])


def _reachable(rule, allowed, prefix: list[int], after_title: set[int]) -> set[str]:
    """Every title the rule lets a listing line finish, by following each allowed token from ``prefix``."""
    found, stack = set(), [prefix]
    while stack:
        tokens = stack.pop()
        options = rule.allowed(tokens, allowed)
        assert options, f"a dead end after {tokens}"  # the rule never leads into a path it cannot finish
        for t in options:
            if t in after_title:
                node, _ = allowed.trie.walk(rule._title_tokens(rule._lines(tokens)[-1]))
                found.add(node.item)
            else:
                stack.append(tokens + [t])
    return found


def test_a_listing_cannot_repeat_a_title_or_list_what_the_user_has():
    from rlhf.constrained import Allowed, ListingRule, TitleTrie

    tok = load_tokenizer("tiny")
    catalog = Catalog.builtin()
    ids = {t: catalog.ground(t).item_id for t in ("Alien", "Aliens", "Heat", "Fargo")}
    trie = TitleTrie.from_items(catalog, list(ids.values()), tok)
    rule = ListingRule(tok)
    after = set(rule.after_title)
    start = tok("1.", add_special_tokens=False)["input_ids"]
    assert _reachable(rule, Allowed(trie), start, after) == set(ids.values())
    banned = Allowed(trie, frozenset({ids["Heat"]}))  # in the user's history
    assert _reachable(rule, banned, start, after) == {ids["Alien"], ids["Aliens"], ids["Fargo"]}
    line1 = tok("1. Alien (1979) — tense\n2.", add_special_tokens=False)["input_ids"]
    assert _reachable(rule, banned, line1, after) == {ids["Aliens"], ids["Fargo"]}  # Alien listed, Heat seen


def test_after_k_lines_and_a_line_break_only_eos_may_come():
    """Sampled rollouts wrote a second listing after the third line ('\n\n1. WALL-E (2008'), which was scored as a
    fourth, unfinished item: with K set, the token after line K's break is EOS and nothing else."""
    from rlhf.constrained import Allowed, ListingRule, TitleTrie

    tok = load_tokenizer("tiny")
    catalog = Catalog.builtin()
    ids = [catalog.ground(t).item_id for t in ("Alien", "Heat", "Fargo")]
    trie = TitleTrie.from_items(catalog, ids, tok)
    rule = ListingRule(tok)
    two = tok("1. Alien (1979) — tense\n2. Heat (1995) — crime\n", add_special_tokens=False)["input_ids"]
    assert rule.allowed(two, Allowed(trie, k=2)) == [tok.eos_token_id]
    assert rule.allowed(two, Allowed(trie, k=3)) is None  # the third line's marker is free text
    assert rule.allowed(two, Allowed(trie)) is None  # no K: no limit
    unfinished = two[:-1]  # line 2's explanation may go on until its line break
    assert rule.allowed(unfinished, Allowed(trie, k=2)) is None


def test_listing_stop_ends_where_first_k_item_lines_cuts():
    """Generation with ``k`` stops after the K-th item line's newline, and first_k_item_lines (llama.cpp's text in
    bench/llama_cpp_check.py) cuts an EOS-only text at the same line: prose and blank lines are not items."""
    from rlhf.generation import ListingStop, first_k_item_lines

    tok = load_tokenizer(resolve_model("tiny"))
    text = "Here you go:\n\n1. Alien (1979) — sci-fi\n2) Heat (1995) — crime\n- Up (2009) — animation\n4. Extra\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    prompt = tok("Recommend", add_special_tokens=False)["input_ids"]
    for k, cut in ((1, 3), (2, 4), (3, 5)):
        stop = ListingStop(tok, len(prompt), k, batch=1)
        at = next(n for n in range(1, len(ids) + 1) if stop(torch.tensor([prompt + ids[:n]]), None)[0])
        written = tok.decode(ids[:at])
        assert written.rstrip("\n") == first_k_item_lines(text, k) == "\n".join(text.split("\n")[:cut])
        assert written.endswith("\n")  # the K-th line is complete before generation stops


def test_title_exploration_mixes_a_uniform_share_into_title_choices_only():
    """ppo.title_explore: at a title choice the sampler's distribution (after the temperature) is exactly
    (1 - e) * p + e / n over the n allowed tokens, however sure the policy is; inside a finished title (where the
    separator, a line break or EOS may come) and in free text nothing is mixed."""
    from rlhf.constrained import Allowed, TitleProcessor, TitleTrie

    tok = load_tokenizer("tiny")
    catalog = Catalog.builtin()
    ids = [catalog.ground(t).item_id for t in ("Alien", "Heat", "Fargo", "Up")]
    trie = TitleTrie.from_items(catalog, ids, tok)
    marker = tok("1.", add_special_tokens=False)["input_ids"]
    firsts = sorted({tok(" " + catalog[i].display, add_special_tokens=False)["input_ids"][0] for i in ids})
    assert len(firsts) == 4
    sure = torch.full((1, len(tok)), -5.0)
    sure[0, firsts[0]] = 30.0  # the policy all but certain of one title
    prompt = [0, 1, 2]

    def sampled(explore: float, generated: list[int], temperature: float = 0.7) -> torch.Tensor:
        proc = TitleProcessor([Allowed(trie)], tok, len(prompt), explore=explore, temperature=temperature)
        out = proc(torch.tensor([prompt + generated]), sure.clone())
        return torch.softmax(out[0] / temperature, -1), proc.explored

    plain, n_plain = sampled(0.0, marker)
    assert plain[firsts[0]] > 0.999 and n_plain == 0
    mixed, n_mixed = sampled(0.4, marker)
    assert n_mixed == 1
    p = plain[firsts]
    assert torch.allclose(mixed[firsts], 0.6 * p + 0.4 / 4, atol=1e-5)
    assert float(mixed[firsts].sum()) == pytest.approx(1.0, abs=1e-5)
    assert all(float(mixed[t]) >= 0.1 - 1e-6 for t in firsts)  # every offered title keeps e / n
    # a finished title: its continuations are not explored (an explored EOS would cut the listing short)
    title = tok(" " + catalog[ids[0]].display, add_special_tokens=False)["input_ids"]
    done_plain, _ = sampled(0.0, marker + title)
    done_mixed, n_done = sampled(1.0, marker + title)
    assert n_done == 0 and torch.equal(done_plain, done_mixed)
    # free text (the explanation) is untouched
    free = marker + title + tok(" — tense", add_special_tokens=False)["input_ids"]
    text_mixed, n_text = sampled(1.0, free)
    assert n_text == 0 and torch.allclose(text_mixed, torch.softmax(sure[0] / 0.7, -1))
    with pytest.raises(ValueError, match="explore"):
        TitleProcessor([Allowed(trie)], tok, len(prompt), explore=1.5)


def test_explored_rollouts_spread_over_the_candidates_while_the_ratio_reads_the_policy():
    """A sampler made sure of one title writes it every time; with title_explore = 1 its first titles spread over all
    the candidates. The log-probabilities PPO takes as old ones stay the constrained policy's own (the masked full
    forward), not the mixture's."""
    tok, policy, catalog, messages = _policy_and_prompt()
    first_token = {it.item_id: tok(" " + it.display, add_special_tokens=False)["input_ids"][0] for it in catalog.items}
    by_first = {}
    for item, t in first_token.items():  # five titles that part at their first token: one choice picks the title
        by_first.setdefault(t, item)
    candidates = list(by_first.values())[:5]
    constraints = PromptConstraints(tok, catalog)
    prompt = prompt_ids(tok, messages)
    constraints.register(prompt, candidates)
    marker = tok("1.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt] * 40)
    config = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.7, top_k=0, top_p=1.0)
    favourite = first_token[candidates[2]]

    class Sure(LogitsProcessor):  # runs before the constraints' processor: the sampler all but certain of one title
        def __call__(self, input_ids, scores):
            scores[:, favourite] += 40.0
            return scores

    def rollout(explore: float):
        constraints.explore = explore
        policy.setup_rollouts(None, merged=True, constraints=constraints)
        out = _rollout(policy, ids, config, ForceText(marker, ids.shape[1]), Sure())
        responses = out.sequences[:, ids.shape[1] :]
        firsts = [parse_and_ground(tok.decode(r, skip_special_tokens=True), catalog)[0].item_id for r in responses]
        return firsts, out.scores[len(marker)], responses

    assert set(rollout(0.0)[0]) == {candidates[2]}
    explored, scores, responses = rollout(1.0)
    assert set(explored) == set(candidates)  # 40 uniform draws over 5 candidates reach all of them
    # the old log-probabilities' logits at the title step are the masked policy forward's, not the uniform mixture
    with torch.no_grad():
        full = torch.cat([ids, responses], 1)
        policy_logits = policy(input_ids=full, attention_mask=torch.ones_like(full)).logits[:, ids.shape[1] - 1 :]
    step = len(marker)
    assert torch.allclose(scores, policy_logits[:, step].float() / 0.7, atol=1e-3)
    assert PromptConstraints(tok, catalog).explore == 0.0  # eval and recommend build their own: no exploration
