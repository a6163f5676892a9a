"""Every stage for real on the tiny model: SFT, reward, PPO (+ resume), eval, recommend, pipeline."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, TINY, read_jsonl, rlhf

from rlhf.checkpoint import latest


def test_sft_trains_and_artifacts_load(tiny_sft):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    out = tiny_sft / "sft"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert metrics["last_loss"] < metrics["first_loss"]
    assert PeftConfig.from_pretrained(out / "adapter").r == 8
    model = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert model.config.num_hidden_layers == 2
    samples = read_jsonl(out / "samples.jsonl")
    assert len(samples) == 2 and {"before", "after", "target"} <= set(samples[0])


def test_reward_model_trains_and_reports_accuracy_per_source(tiny_reward):
    from reward_models.pairs import balance, load_pairs, split_by_user
    from reward_models.train import _tokenized, pairwise_accuracy
    from rlhf.config import load_config
    from rlhf.models import load_reward_model, load_tokenizer
    from rlhf.runs import RunDir

    metrics = json.loads((tiny_reward / "reward" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert set(metrics["val_by_source"]) <= {"ratings", "clicks", "simulator"} and metrics["val_by_source"]
    assert sum(metrics["pairs"]["read"].values()) > 0
    model = load_reward_model(tiny_reward / "reward" / "model", metrics["dtype"])  # scored as the stage scored
    assert model.config.num_labels == 1
    # the reported accuracy is the saved model's on the held-out users' pairs: recomputed from the run's files
    rc, seed = load_config(TINY).reward, load_config(TINY).run.seed
    rows, _ = load_pairs(RunDir(tiny_reward), rc.sources)
    _, val_rows = split_by_user(balance(rows, rc.balance_ratio, seed) if rc.balance else rows, rc.val_fraction, seed)
    tok = load_tokenizer(str(tiny_reward / "reward" / "model"))
    val_ex, _ = _tokenized(val_rows, tok, rc.max_length, rc.use_margin)
    assert len(val_ex) == metrics["pairs"]["val"] > 0
    acc = pairwise_accuracy(model, tok, val_ex)
    assert metrics["val_accuracy"] == pytest.approx(acc["overall"])
    assert metrics["val_by_source"].keys() == acc["by_source"].keys()
    for src, v in acc["by_source"].items():
        assert metrics["val_by_source"][src] == {"accuracy": pytest.approx(v["accuracy"]), "n": v["n"]}
    log = read_jsonl(tiny_reward / "reward" / "log.jsonl")
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses and all(loss == loss for loss in losses)  # finite


def test_reward_model_loss_falls_over_two_epochs(tiny_sft, tmp_path):
    """Four steps are too few to see learning on the tiny model (their losses move by 1e-4 either way); two
    epochs over the 30 rating pairs are enough: the last four steps' mean loss is below the first four's."""
    run = tmp_path / "run"
    shutil.copytree(tiny_sft, run)
    rlhf(
        "reward",
        "--run",
        run,
        "--config",
        TINY,
        "reward.max_steps=16",
        "reward.sources=ratings",
        "reward.learning_rate=3e-3",
    )
    losses = [e["loss"] for e in read_jsonl(run / "reward" / "log.jsonl") if "loss" in e]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 1e-3


def test_reward_model_is_the_adapter_merged_on_a_fresh_base(tiny_reward):
    """reward/model = SFT model + reward/adapter (LoRA and the trained score head), merged off the trainer."""
    from peft import PeftModel

    from reward_models.encoding import encode, score_sequences
    from rlhf.models import load_reward_model, load_tokenizer

    tok_path = tiny_reward / "reward" / "model"
    tok = load_tokenizer(str(tok_path))
    msgs = [{"role": "user", "content": "I liked Alien (1979). Recommend 2 films."}]
    seqs = [encode(tok, msgs, "1. Heat (1995) - tense\n2. Fargo (1996) - dry"), encode(tok, msgs, "no idea")]
    merged = score_sequences(load_reward_model(tok_path), seqs, tok.pad_token_id)
    fresh = load_reward_model(tiny_reward / "sft" / "merged")
    fresh.config.pad_token_id = tok.pad_token_id
    untrained = score_sequences(fresh, seqs, tok.pad_token_id)
    adapted = score_sequences(
        PeftModel.from_pretrained(fresh, str(tiny_reward / "reward" / "adapter")), seqs, tok.pad_token_id
    )
    assert merged == pytest.approx(adapted, abs=1e-4)
    assert merged != pytest.approx(untrained, abs=1e-4)  # the head and LoRA were saved, not a fresh head


def test_full_finetuning_without_lora_writes_whole_models(tiny_data, tmp_path):
    """model.use_lora=false: SFT and reward save the trained model itself (no adapter) and it loads (and exports
    as GGUF, without a LoRA file)."""
    from transformers import AutoModelForCausalLM

    from rlhf.models import load_reward_model, resolve_model

    run = tmp_path / "run"
    shutil.copytree(tiny_data / "data", run / "data")
    shutil.copy(tiny_data / "config.yaml", run / "config.yaml")
    for stage in ("sft", "reward"):
        rlhf(stage, "--run", run, "--config", TINY, "model.use_lora=false", f"{stage}.max_steps=2")
    assert not (run / "sft" / "adapter").exists() and not (run / "reward" / "adapter").exists()
    tuned = AutoModelForCausalLM.from_pretrained(run / "sft" / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_model("tiny")).state_dict()
    assert any(not torch.equal(tuned[k], base[k]) for k in base)  # the trained weights, not the base re-saved
    assert load_reward_model(run / "reward" / "model").config.pad_token_id is not None
    assert json.loads((run / "reward" / "metrics.json").read_text())["val_accuracy"] is not None
    # no adapter on the base: the GGUF export has the whole model and says why there is no LoRA file
    out = rlhf("export", "--run", run, "--config", TINY, "--stage", "sft", "--out", tmp_path / "g", "--format", "gguf")
    assert sorted(p.name for p in (tmp_path / "g").glob("*.gguf")) == ["model-f16.gguf", "model-q8_0.gguf"]
    assert "no LoRA adapter GGUF" in out.stdout


def test_pairs_dedupe_balance_and_split():
    from reward_models.pairs import balance, split_by_user

    rows = [{"source": "a", "user_id": f"u{i}"} for i in range(10)] + [
        {"source": "b", "user_id": f"u{i}"} for i in range(2)
    ]
    bal = balance(rows, 2.0, seed=0)
    assert sum(r["source"] == "a" for r in bal) == 4 and sum(r["source"] == "b" for r in bal) == 2
    train, val = split_by_user(rows, 0.3, seed=0)
    assert {r["user_id"] for r in train}.isdisjoint({r["user_id"] for r in val}) and val


def test_composite_reward_through_trl_get_reward(tiny_reward):
    """The composite answers TRL's get_reward exactly as it scores texts, and its rule terms move the score."""
    from trl.experimental.utils import get_reward

    from reward_models.composite import for_run
    from reward_models.encoding import prompt_ids, response_ids
    from reward_models.terms import PromptContext
    from reward_models.trl_ppo import TRLRewardAdapter
    from rlhf.runs import RunDir

    run = RunDir(tiny_reward)
    comp = for_run(run, {}, "float32")
    tok = comp.env.reward_model.tokenizer
    adapter = TRLRewardAdapter(comp, tok, comp.env.reward_model.model.config)
    row = run.rows(run.data.prompts("train"))[0]
    good = "1. Heat (1995) — crime like Heat\n2. Fargo (1996) — crime\n3. Zodiac (2007) — crime"
    bad = "1. Nothing Real (2099) — hm\n2. Nothing Real (2099) — hm"
    ctx = PromptContext.from_row(row)
    q = prompt_ids(tok, row["prompt"])
    adapter.register(q, row["prompt"], ctx)
    seqs = [q + response_ids(tok, good), q + response_ids(tok, bad)]
    width = max(map(len, seqs))
    # TRL's layout: left-padded query, right-padded response
    ids = torch.full((2, width), tok.pad_token_id)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    _, scores, _ = get_reward(adapter, ids, tok.pad_token_id, len(q))
    by_text = comp.score([row["prompt"]] * 2, [good, bad], [ctx, ctx]).rows()
    assert scores[0].item() == pytest.approx(by_text[0]["reward"], abs=1e-3)
    assert scores[1].item() == pytest.approx(by_text[1]["reward"], abs=1e-3)
    assert by_text[0]["in_catalog"] == 1.0 and by_text[1]["in_catalog"] == 0.0
    rules = [d["reward"] - d["learned"] for d in by_text]
    assert rules[0] - rules[1] >= 1.0 + 1 / 3 - 1e-6  # in_catalog (1 vs 0) and has_k (1 vs 2/3), weight 1 each
    (record,) = adapter.take_records()  # what the trainer logs for this batch
    assert record["means"]["has_k"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert [s["text"] for s in record["samples"]] == [good, bad] and adapter.take_records() == []


def test_ppo_writes_metrics_adapter_and_checkpoints(tiny_ppo):
    out = tiny_ppo / "ppo"
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2]
    for key in (
        "objective/scores",
        "objective/kl",
        "objective/entropy",
        "loss/policy_avg",
        "loss/value_avg",
        "policy/clipfrac_avg",
        "time/generation_s",
        "time/scoring_s",
        "time/optimisation_s",
        "reward/in_catalog",
        "reward/has_k",
        "reward/learned",
        "reward/true_utility",
    ):
        assert key in rows[0], key
    assert (out / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["update-000001", "update-000002"]
    samples = read_jsonl(out / "samples.jsonl")
    assert samples and "reward" in samples[0]
    rollouts = read_jsonl(out / "rollouts.jsonl")  # sampled completions with their rewards, every sample_every updates
    assert rollouts and {r["update"] for r in rollouts} == {2}
    assert {"text", "reward", "learned", "in_catalog", "has_k"} <= set(rollouts[0])


def test_ppo_moved_the_policy_away_from_sft(tiny_ppo):
    """Two updates changed the LoRA weights (PEFT starts lora_B at zero) and so the policy's next-token
    distribution on the text it was trained on: KL(policy || SFT) > 0 while the adapter, disabled, gives SFT back."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = load_file(tiny_ppo / "ppo" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and max(float(v.abs().max()) for v in lora_b) > 0
    merged = tiny_ppo / "sft" / "merged"
    tok = AutoTokenizer.from_pretrained(merged)
    text = read_jsonl(tiny_ppo / "ppo" / "rollouts.jsonl")[0]["text"]
    ids = torch.tensor([tok(text)["input_ids"]])
    sft = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32), tiny_ppo / "ppo" / "adapter"
    )
    with torch.no_grad():  # log-probabilities in float64: the KL of two updates is below float32's rounding
        ref = torch.log_softmax(sft(input_ids=ids).logits.double(), -1)
        pol = torch.log_softmax(policy(input_ids=ids).logits.double(), -1)
        with policy.disable_adapter():
            off = torch.log_softmax(policy(input_ids=ids).logits.double(), -1)
    assert torch.allclose(off, ref, atol=1e-5)
    kl = (pol.exp() * (pol - ref)).sum(-1).mean()
    assert kl > 1e-10 and (pol - ref).abs().max() > 1e-4, f"KL(policy || SFT) = {kl}"  # 0 with lora_B still zero


def test_ppo_with_fewer_prompts_than_a_batch_is_a_config_error(tiny_reward, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_reward, run)
    proc = rlhf("ppo", "--run", run, "--config", TINY, "ppo.max_prompts=2", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 PPO prompts is fewer than ppo.batch_size=4" in proc.stderr


def test_ppo_resume_after_sigkill(tiny_reward, tmp_path):
    """Killed after its update-2 checkpoint (and during the next save), resumed: the same 5 updates, prompts,
    samples, RNG and, within float tolerance, weights as a run never killed (one seed, one thread count: PPO on CPU
    is reproducible)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_reward, run, ignore=shutil.ignore_patterns("ppo", "eval"))
    args = [
        sys.executable,
        "-m",
        "rlhf",
        "ppo",
        "--run",
        str(run),
        "--config",
        TINY,
        "ppo.total_updates=5",
        "ppo.checkpoint_every=2",
    ]
    proc = subprocess.Popen(
        args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    ckpt = run / "ppo" / "checkpoints" / "update-000002" / "state.json"
    deadline = time.time() + 400
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint appeared"
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: update 3 is in flight or about to be
    proc.wait(timeout=60)
    assert not (run / "ppo" / "adapter").exists()
    # what a kill during the next save leaves: a half-written folder (no state.json, a torn weights file)
    checkpoints = run / "ppo" / "checkpoints"
    torn = checkpoints / "update-000004.tmp"
    torn.mkdir(exist_ok=True)
    (torn / "trainable.pt").write_bytes(b"PK\x03\x04 torn")
    assert latest(checkpoints).name == "update-000002"
    rlhf("ppo", "--run", run, "--config", TINY, "ppo.total_updates=5", "ppo.checkpoint_every=2", "--resume")
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5]  # nothing lost past the checkpoint, nothing twice
    state = json.loads((checkpoints / "update-000005" / "state.json").read_text())
    assert state["update"] == 5
    assert sorted(p.name for p in checkpoints.iterdir()) == ["update-000004", "update-000005"]  # the torn one replaced

    # the same 5 updates without a kill: the resumed run must have reached the same place (deterministic on CPU)
    straight = tmp_path / "straight"
    shutil.copytree(tiny_reward, straight, ignore=shutil.ignore_patterns("ppo", "eval"))
    rlhf("ppo", "--run", straight, "--config", TINY, "ppo.total_updates=5", "ppo.checkpoint_every=2")
    other = read_jsonl(straight / "ppo" / "metrics.jsonl")
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr"):
        assert [r[key] for r in rows] == pytest.approx([r[key] for r in other], rel=1e-4, abs=1e-6), key
    mine, theirs = (read_jsonl(r / "ppo" / "rollouts.jsonl") for r in (run, straight))
    assert [(r["update"], r["text"]) for r in mine] == [(r["update"], r["text"]) for r in theirs]  # data order
    assert {r["update"] for r in mine} == {2, 4}  # one sampled after the resume
    for name in ("update-000004", "update-000005"):
        a, b = (torch.load(r / "ppo" / "checkpoints" / name / "trainable.pt") for r in (run, straight))
        assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
        ra, rb = (
            torch.load(r / "ppo" / "checkpoints" / name / "rng-0.pt", weights_only=False) for r in (run, straight)
        )
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"], name
    assert (run / "ppo" / "adapter" / "adapter_config.json").exists()
    # the learning-rate schedule continued instead of restarting: it decays to 0 at update 5 of 5
    assert rows[-1]["lr"] < rows[2]["lr"] < rows[0]["lr"]
    again = rlhf("ppo", "--run", run, "--config", TINY, "ppo.total_updates=5", "--resume")
    assert "already done" in again.stdout
    # extending a finished run: the new update trains at the new schedule's rate, not the old final 0
    rlhf("ppo", "--run", run, "--config", TINY, "ppo.total_updates=6", "--resume")
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[4]["lr"] > 0 and rows[5]["lr"] > 0


def test_eval_writes_metrics_report_and_plots(tiny_eval):
    out = tiny_eval / "eval"
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= {"k", "mode", "stages", "baselines", "cold_start", "notes"}
    assert set(m["stages"]) == {"base", "sft", "ppo"}
    # the classic three, and the reward's behaviour model (its own top K: a policy that only copies it shows)
    assert set(m["baselines"]) == {"popularity", "itemknn", "ease", "genre", "behaviour_model"}
    for name in (
        "hr@3",
        "ndcg@3",
        "recall@3",
        "hr@1",
        "valid_rate",
        "grounded_rate",
        "duplicate_rate",
        "history_repeat_rate",
        "coverage",
        "novelty",
        "diversity",
        "popularity_bias",
        "true_utility",
        "sim_ctr",
        "faithfulness",
        "rating_claims_correct",
        "explanation_words",
        "reward/reward",
        "reward/learned",
        "kl_to_sft",
    ):
        assert name in m["stages"]["ppo"], name
    assert m["baselines"]["ease"]["valid_rate"] == 1.0
    assert m["stages"]["ppo"]["kl_to_sft"] is not None
    paired = m["vs_sft"]["ppo"]  # PPO minus SFT on the same users, with its paired standard error
    assert set(paired) == {"true_utility", "ndcg@3", "reward"} and paired["reward"]["n"] == m["users"]
    assert paired["true_utility"]["delta"] == pytest.approx(
        m["stages"]["ppo"]["true_utility"] - m["stages"]["sft"]["true_utility"]
    )
    # each LLM stage against each baseline on the same users (true utility and ndcg, no reward for baselines)
    vs_pop = m["vs_baselines"]["ppo"]["popularity"]
    assert set(vs_pop) == {"true_utility", "ndcg@3"} and vs_pop["true_utility"]["n"] == m["users"]
    assert vs_pop["true_utility"]["delta"] == pytest.approx(
        m["stages"]["ppo"]["true_utility"] - m["baselines"]["popularity"]["true_utility"]
    )
    truth = m["reward_vs_truth"]  # composite reward and its parts against the simulator's utility, per listing
    assert truth["n"] == 3 * m["users"] and set(truth) == {"reward", "learned", "rules", "terms", "n", "by_stage"}
    assert {s: v["n"] for s, v in truth.pop("by_stage").items()} == {s: m["users"] for s in ("base", "sft", "ppo")}
    terms = {n.removeprefix("reward/") for n in m["stages"]["ppo"] if n.startswith("reward/")} - {"reward"}
    assert set(truth["terms"]) == terms and {"learned", "has_k", "in_catalog"} <= terms  # each term on its own
    expected = _reward_vs_truth_from_listings(tiny_eval, m)
    assert truth["terms"] == pytest.approx(expected.pop("terms"))  # approx compares flat dicts only
    assert {k: v for k, v in truth.items() if k != "terms"} == pytest.approx(expected)
    html = (out / "report.html").read_text()
    for section in (
        "<h2>Metrics</h2>",
        "<h2>Plots</h2>",
        "<h2>Example listings</h2>",
        "ease (baseline)",
        "ppo (LLM)",
        "ppo − sft: true_utility",
        "correlation with true utility over",
    ):
        assert section in html
    assert (out / "plots" / "ppo_curves.png").stat().st_size > 1000
    assert "| ease (baseline) |" in (out / "report.md").read_text()


def _reward_vs_truth_from_listings(run, m) -> dict:
    """Correlations of each listing's composite reward, its rule part and each term with its true utility,
    recomputed from eval/listings.jsonl with the run's composite: what eval's reward_vs_truth must be."""
    from reward_models.composite import for_run
    from reward_models.terms import PromptContext
    from rlhf.config import load_config
    from rlhf.evaluate import HeldOutUsers
    from rlhf.listing import parse_and_ground
    from rlhf.metrics import pearson
    from rlhf.runs import RunDir

    cfg = load_config(TINY, run_config=RunDir(run).config)
    users = HeldOutUsers(RunDir(run), cfg.eval.split, cfg.eval.max_users)
    composite = for_run(RunDir(run), cfg.ppo.reward_weights, m["dtype"], cfg.reward)
    listings = read_jsonl(run / "eval" / "listings.jsonl")
    reward, rules, terms, util = [], [], {}, []
    for stage in m["stages"]:
        text = {r["user_id"]: r["text"] for r in listings if r["stage"] == stage}
        texts = [text[r["user_id"]] for r in users.rows]
        scored = composite.score(
            [r["prompt"] for r in users.rows], texts, [PromptContext.from_row(r) for r in users.rows]
        )
        assert m["stages"][stage]["reward/reward"] == pytest.approx(sum(scored.total) / len(scored.total))
        reward += scored.total
        rules += composite.rule_part(scored)
        for name, values in scored.terms.items():
            terms.setdefault(name, []).extend(values)
        for row, t in zip(users.rows, texts):
            items = [e.item_id for e in parse_and_ground(t, users.catalog)][: m["k"]]
            util.append(users.sim.list_utility(users.sim.user(row["user_id"]), items, set(row["history_ids"]), m["k"]))
    return {
        "reward": pearson(reward, util),
        "learned": pearson(terms["learned"], util),
        "rules": pearson(rules, util),
        "terms": {name: pearson(values, util) for name, values in terms.items()},
        "n": len(util),
    }


def test_recommend_plain_and_bad_input(tiny_ppo):
    proc = rlhf(
        "recommend",
        "--run",
        tiny_ppo,
        "--config",
        TINY,
        "--stage",
        "sft",
        "--history",
        "The Matrix; Alien (1979)",
        "--json",
        "--max-new-tokens",
        "24",
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"prompt", "text", "items"}
    assert "The Matrix (1999)" in out["prompt"][1]["content"]
    bad = rlhf("recommend", "--run", tiny_ppo, "--config", TINY, "--history", "Blorp the Movie", check=False)
    assert bad.returncode == 1 and "not in the catalog: 'Blorp the Movie'" in bad.stderr


@pytest.fixture(scope="module")
def list_opener(tiny_sft, tmp_path_factory):
    """A copy of the SFT run whose model was taught to open its answer with "1. " on four training users'
    prompts (the tiny SFT model writes noise, never a list marker, so there would be nothing to constrain).
    Returns (run, one of those users)."""
    import pyarrow.parquet as pq
    from transformers import AutoModelForCausalLM

    from reward_models.encoding import pad_left
    from rlhf.generation import encode_prompts
    from rlhf.models import load_tokenizer

    run = tmp_path_factory.mktemp("list-opener") / "run"
    shutil.copytree(tiny_sft, run)
    path = run / "sft" / "merged"
    tok, model = load_tokenizer(str(path)), AutoModelForCausalLM.from_pretrained(path)
    rows = pq.read_table(run / "data" / "prompts" / "train.parquet").to_pylist()[:4]
    target = tok("1. ", add_special_tokens=False)["input_ids"]
    ids, mask = pad_left([p + target for p in encode_prompts(tok, [r["prompt"] for r in rows])], tok.pad_token_id)
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(200):  # the loss on the last positions only: the 49k-token head on 3 positions, not 250
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -len(target) - 1 : -1]
        logits = model.lm_head(hidden)
        if bool((logits.argmax(-1) == ids[:, -len(target) :]).all()) and step >= 30:
            break  # greedy writes "1. " for every prompt (30 steps at least, as many as the SFT model needs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, -len(target) :].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(path)
    return run, rows[0]["user_id"]


def test_recommend_constrained_writes_only_catalog_titles(list_opener):
    """The same model and prompt: free, it opens a list and writes no catalog title; with --constrained every
    title it writes after a marker is a catalog title."""
    run, user = list_opener
    args = ["recommend", "--run", run, "--config", TINY, "--stage", "sft", "--user", user, "--json"]
    free = json.loads(rlhf(*args, "--max-new-tokens", "40").stdout.strip().splitlines()[-1])
    assert free["text"].startswith("1"), free["text"]  # it opens a list ...
    assert not any(it["in_catalog"] for it in free["items"]), free  # ... but writes no catalog title on its own
    out = json.loads(rlhf(*args, "--max-new-tokens", "40", "--constrained").stdout.strip().splitlines()[-1])
    assert out["items"] and all(it["in_catalog"] for it in out["items"]), (free["text"], out["text"])


def test_constrained_decoding_forces_catalog_titles():
    """A random model that would write noise writes only catalog titles after each list marker."""
    from transformers import AutoModelForCausalLM, LogitsProcessorList

    from rlhf.catalog import Catalog
    from rlhf.constrained import TitleProcessor, TitleTrie
    from rlhf.listing import parse_and_ground
    from rlhf.models import load_tokenizer, resolve_model

    tok = load_tokenizer("tiny")
    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny"))
    catalog = Catalog.builtin()
    trie = TitleTrie.from_catalog(catalog, tok)
    prefix = tok("1.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix])
    proc = TitleProcessor(trie, tok, prompt_length=0)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=20,
        do_sample=False,
        logits_processor=LogitsProcessorList([proc]),
        pad_token_id=tok.pad_token_id,
    )
    text = tok.decode(out[0], skip_special_tokens=True)
    entries = parse_and_ground(text, catalog)
    assert entries and entries[0].in_catalog, text


def test_multi_cpu_launch_two_ranks(tiny_sft, tmp_path):
    """`accelerate launch --config_file accelerate_configs/multi_cpu.yaml` starts 2 real ranks (gloo): reward
    training (a Trainer, as SFT is) and PPO (its own rank-aware rollouts and resume record), from the SFT model."""
    if shutil.which("mpirun") is None:
        pytest.fail("Open MPI is missing: `make test` installs openmpi-bin (apt-get); install it to run this test")
    run = tmp_path / "run"
    shutil.copytree(tiny_sft, run)
    env = {
        **os.environ,
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_btl": "self,tcp",
        "OMPI_MCA_btl_tcp_if_include": "lo",
        "OMPI_MCA_oob_tcp_if_include": "lo",
    }
    accel = [
        os.path.join(os.path.dirname(sys.executable), "accelerate"),
        "launch",
        "--config_file",
        "accelerate_configs/multi_cpu.yaml",
        "-m",
        "rlhf",
    ]

    def launch(stage, *args):  # both ranks; a failure shows the launch's own stderr
        proc = subprocess.run(
            accel + [stage, "--run", str(run), "--config", TINY, "track.report_to=none", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]

    launch("reward")
    launch("ppo", "ppo.total_updates=2")
    rows = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert [r["update"] for r in rows] == [1, 2]
    # each update's rollout batch spans both ranks: 2 processes x 4 prompts
    assert rows[0]["episode"] == 8
    assert json.loads((run / "ppo" / "summary.json").read_text())["processes"] == 2
    # each rank saved its own RNG state into the resume record
    (last,) = sorted((run / "ppo" / "checkpoints").glob("update-000002"))
    assert sorted(p.name for p in last.glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    assert sorted(p.name for p in last.glob("order-*.pt")) == ["order-0.pt", "order-1.pt"]  # each rank's prompt order
    launch("ppo", "ppo.total_updates=3", "--resume")  # and both ranks resume from it
    assert [r["update"] for r in read_jsonl(run / "ppo" / "metrics.jsonl")] == [1, 2, 3]


def test_pipeline_skips_finished_stages(tiny_eval, tmp_path):
    from rlhf.pipeline import plan

    run = tmp_path / "run"
    shutil.copytree(tiny_eval, run)
    assert [s for s, done in plan(run)] == ["data", "sft", "reward", "ppo", "eval"]
    assert all(done for _, done in plan(run))
    shutil.rmtree(run / "eval")
    proc = rlhf("pipeline", "--config", TINY, "--run", run)
    assert "[2/5] sft: already complete" in proc.stdout and "[5/5] eval: running" in proc.stdout
    assert "[4/5] ppo: already complete" in proc.stdout
    assert (run / "eval" / "report.html").exists()
    assert json.loads((run / "pipeline.json").read_text())["stage_seconds"].keys() == {"eval"}
