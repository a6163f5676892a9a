import pytest
from conftest import TINY, rlhf

from rlhf.cli import build_parser, main

COMMANDS = ("data", "sft", "reward", "ppo", "rl", "eval", "recommend", "label", "rounds", "export", "pipeline")
COMMANDS += ("status",)


def test_every_command_reaches_its_own_stage(tmp_path, capfd):
    """Each command runs its own stage's code: on an empty run directory every one stops at the first input
    that stage reads, names it and the command that makes it, and exits 1 without a traceback."""
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert tuple(subcommands) == COMMANDS
    run = tmp_path / "empty"
    cases = [
        (["data", "prepare", "--source", "movielens", "--path", tmp_path / "nope", "--out", run], "nope/movies.csv"),
        (["sft", "--run", run], "data/sft/train.parquet is missing; make it with: rlhf data prepare"),
        (["reward", "--run", run], "data/pairs is missing; make it with: rlhf data prepare"),
        (["ppo", "--run", run], "sft/merged is missing; make it with: rlhf sft --run"),
        (["rl", "--run", run, "--algo", "grpo"], "sft/merged is missing; make it with: rlhf sft --run"),
        (["eval", "--run", run], "data/meta.json is missing; make it with: rlhf data prepare"),
        (["recommend", "--run", run, "--history", "Alien"], "data/meta.json is missing"),
        (["label", "export", "--run", run, "--round", "2"], "data/prompts/val.parquet is missing"),
        (["label", "serve", "--run", run, "--round", "2"], "round-002/batch.jsonl is missing; make it with: rlhf la"),
        (["label", "import", "--run", run, "--round", "3"], "round-003/batch.jsonl is missing"),
        (["label", "simulate", "--run", run, "--round", "2"], "data/meta.json is missing"),
        (["rounds", "--run", run], "sft/merged is missing; make it with: rlhf sft --run"),
        (["export", "--run", run, "--out", tmp_path / "x"], "sft/merged is missing; make it with: rlhf sft --run"),
    ]
    for argv, says in cases:
        assert main([str(a) for a in argv] + ["--model", "tiny"]) == 1, argv
        err = capfd.readouterr().err
        assert f"rlhf {argv[0]}: error: " in err and says in err and "Traceback" not in err, (argv, err)
    # pipeline: the data stage runs in its own process with the overrides, fails, and the pipeline stops
    with pytest.raises(SystemExit) as stop:
        main(["pipeline", "--run", str(run), "data.source=movielens", f"data.path={tmp_path / 'nope'}"])
    assert stop.value.code == 1
    out = capfd.readouterr()
    assert "[1/5] data: running" in out.out and "nope/movies.csv: not found" in out.err
    assert "[1/5] data: failed (exit 1)" in out.err and "[2/5]" not in out.out


def test_label_and_export_on_an_empty_run_name_what_is_missing(tmp_path):
    cases = [
        (["label", "serve", "--run", tmp_path, "--round", "1"], "rlhf label export --run"),
        (["label", "import", "--run", tmp_path, "--round", "1"], "rlhf label export --run"),
        (["export", "--run", tmp_path, "--out", tmp_path / "x"], "rlhf sft --run"),
    ]
    for args, hint in cases:
        proc = rlhf(*args, "--model", "tiny", check=False)
        assert proc.returncode == 1, proc.stderr
        assert hint in proc.stderr and "Traceback" not in proc.stderr
    proc = rlhf("label", "export", "--run", tmp_path, "--round", "0", check=False)
    assert proc.returncode == 2 and "rounds are numbered" in proc.stderr


def test_missing_inputs_name_the_command_that_makes_them(tmp_path):
    proc = rlhf("sft", "--run", tmp_path / "empty", "--model", "tiny", check=False)
    assert proc.returncode == 1
    assert "rlhf data prepare --out" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = rlhf("ppo", "--run", tmp_path / "empty", "--model", "tiny", check=False)
    assert proc.returncode == 1 and "rlhf sft --run" in proc.stderr


def _config_cases():
    import importlib.util

    import torch

    cases = [  # (overrides, or a recipe's text as {"recipe": ...}; what the message must say)
        (["model.dtype=fp8"], "model.dtype='fp8' is not one of"),
        (["model.lora_r=0"], "model.lora_r must be >= 1"),
        (["model.lora_dropout=1"], "model.lora_dropout must be in [0, 1)"),
        (["model.load_in_4bit=true", "model.use_lora=false"], "model.load_in_4bit (QLoRA) trains adapters only"),
        (["data.source=csv"], "data.source='csv' is not one of"),
        (["data.mode=rank"], "data.mode='rank' is not one of"),
        (["data.retriever=bm25"], "data.retriever='bm25' is not one of"),
        (["data.split=random"], "data.split='random' is not one of"),
        (["data.source=goodbooks"], "data.source=goodbooks needs data.path"),
        (["data.k=0"], "data.k must be >= 1"),
        (["data.mode=rerank", "data.num_candidates=5"], "data.num_candidates (5) must exceed data.k (5)"),
        (["data.val_fraction=0.5", "data.test_fraction=0.5"], "data.val_fraction and data.test_fraction"),
        (["data.source=generic", "data.path=x", "data.columns={user_id: u}"], "data.columns must map at least"),
        (["sft.learning_rate=0"], "sft.learning_rate must be > 0"),
        (["reward.grad_accum=0"], "reward.batch_size and reward.grad_accum must be >= 1"),
        (["sft.max_steps=-5"], "sft.max_steps must be > 0, or -1"),
        (["reward.init=random"], "reward.init='random' is not one of"),
        (["reward.sources=ratings,votes"], "reward.sources=['ratings', 'votes'] must name"),
        (["reward.sources="], "reward.sources=[] must name one or more"),
        (["ppo.kl_estimator=k2"], "ppo.kl_estimator='k2' is not one of"),
        (["ppo.lr_scheduler=cosine"], "ppo.lr_scheduler='cosine' is not one of"),
        (["track.report_to=mlflow"], "track.report_to='mlflow' is not one of"),
        (["ppo.batch_size=6", "ppo.mini_batches=4"], "ppo.batch_size (6) must be divisible by ppo.mini_batches (4)"),
        (["ppo.total_updates=0"], "ppo.total_updates and ppo.checkpoint_every must be >= 1"),
        (["ppo.checkpoint_every=0"], "ppo.total_updates and ppo.checkpoint_every must be >= 1"),
        (["ppo.kl_coef=-0.1"], "ppo.kl_coef must be >= 0"),
        (["ppo.value_layers=-1"], "ppo.value_layers must be >= 0"),
        (["ppo.gamma=1.5"], "ppo.gamma must be in [0, 1], got 1.5"),
        (["ppo.lam=-0.1"], "ppo.lam must be in [0, 1], got -0.1"),
        (["ppo.reward_weights=5"], "ppo.reward_weights expects dict"),
        (["ppo.reward_weights.bogus=1"], "ppo.reward_weights has unknown term(s) ['bogus']"),
        (["ppo.reward_weights.learned=high"], "ppo.reward_weights.learned expects a number"),
        (["ppo.rollout_logprobs=old"], "ppo.rollout_logprobs='old' is not one of"),
        (["ppo.title_explore=0.2", "ppo.constrained=false"], "ppo.title_explore explores among the allowed titles"),
        (["ppo.title_explore=1.5", "ppo.constrained=true"], "ppo.title_explore must be in [0, 1]"),
        (["data.protocol=injected"], "data.protocol='injected' is not one of"),
        (["data.windows=0"], "data.windows must be >= 1"),
        (["reward.behaviour_model=svd"], "reward.behaviour_model='svd' is not one of"),
        (["reward.behaviour_form=rank"], "reward.behaviour_form='rank' is not one of"),
        (["eval.split=train"], "eval.split='train' is not one of"),
        (["eval.stages=base,dpo"], "eval.stages has unknown ['dpo']"),
        (["label.split=train"], "label.split='train' is not one of"),
        (["label.candidates=5"], "label.candidates=5 must be 2, 3 or 4"),
        (["label.stages=dpo"], "label.stages=['dpo'] must be a non-empty list"),
        (["label.noise=-1"], "label.noise >= 0"),
        (["label.labelers=0"], "label.labelers must be >= 1"),
        (["label.port=70000"], "label.port=70000 is not a TCP port"),
        (["rounds.labelers=robots"], "rounds.labelers='robots' is not one of"),
        (["rounds.rounds=0"], "rounds.rounds must be >= 1"),
        (["rounds.rl_updates=-1"], "rounds.rl_updates must be >= 0"),
        (["rounds.deadline_s=-1"], "rounds.deadline_s must be >= 0"),
        (["sft.max_steps=abc"], "sft.max_steps expects int, got 'abc'"),
        (["run.seed=1.5"], "run.seed expects int, got 1.5"),
        (["model.use_lora=maybe"], "model.use_lora expects bool"),
        (["data.columns=abc"], "data.columns expects dict"),
        (["sft.lr=1"], "unknown field(s) sft.lr"),
        (["lr=1"], "unknown field(s) sft.lr"),  # a bare field means the stage's own section
        (["nonsense"], "override 'nonsense' must look like section.field=value"),
        ({"recipe": "sft: [1, 2]\n"}, "recipe.yaml: section sft must be a mapping of fields, got list"),
        ({"recipe": "sft: [1, 2\n"}, "is not valid YAML"),
        ({"recipe": "- sft\n- ppo\n"}, "must be a mapping of sections"),
        ({"recipe": "training:\n  x: 1\n"}, "unknown section(s) ['training']"),
        ({"recipe": "ppo:\n  batch_size: 7\n"}, "ppo.batch_size (7) must be divisible"),
        ({"recipe": "eval:\n  stages: [[sft]]\n"}, "eval.stages expects a list of single values, got [['sft']]"),
        (["ppo.max_seconds=-1"], "ppo.max_seconds must be >= 0"),
        (["track.project="], "track.project must not be empty"),
        ({"recipe": None}, "does not exist"),
    ]
    if not torch.cuda.is_available():
        cases.append((["model.load_in_4bit=true"], "model.load_in_4bit (QLoRA) needs a CUDA GPU"))
    if importlib.util.find_spec("wandb") is None:  # wandb is an optional extra, not in the test install
        cases.append((["track.report_to=wandb"], "needs the package(s) wandb, not installed: pip install wandb"))
    return cases


@pytest.mark.parametrize("given, says", _config_cases())
def test_config_errors_name_the_field_and_exit_2(tmp_path, capsys, given, says):
    """Every check in rlhf/config.py, through the CLI: `rlhf sft: config error: <message naming the field>`,
    exit 2 (a usage error, as argparse's own), no traceback, and nothing written."""
    run = tmp_path / "run"
    if isinstance(given, dict):
        recipe = tmp_path / "recipe.yaml"
        if given["recipe"] is not None:
            recipe.write_text(given["recipe"])
        argv = ["sft", "--run", str(run), "--config", str(recipe)]
    else:
        argv = ["sft", "--run", str(run), *given]
    assert main(argv) == 2  # a traceback would raise here instead
    err = capsys.readouterr().err
    assert err.startswith("rlhf sft: config error: ") and says in err, err
    assert not run.exists()


def test_config_errors_exit_2_without_traceback(tmp_path):
    proc = rlhf("sft", "--run", tmp_path, "max_steps=-5", check=False)
    assert proc.returncode == 2
    assert "sft.max_steps" in proc.stderr and "Traceback" not in proc.stderr
    proc = rlhf("nosuchstage", check=False)
    assert proc.returncode == 2
    # commands without a section of their own take section.field only
    proc = rlhf("export", "--run", tmp_path, "--out", tmp_path / "x", "foo=1", check=False)
    assert proc.returncode == 2 and "override 'foo=1': unknown section 'foo'" in proc.stderr


def test_stage_input_errors_are_one_message_not_a_traceback(tmp_path):
    """Prepared data a stage cannot use (no validation users), and reward options
    that leave nothing to train on: one message naming the file or field, exit 1 (data) or 2 (config)."""
    run = tmp_path / "run"
    rlhf("data", "prepare", "--out", run, "--config", TINY, "data.val_fraction=0")
    cases = [
        (["eval", "--run", run, "--split", "val"], 1, "no held-out prompts in"),
        (["reward", "--run", run, "--sources", "labels"], 1, "no preference pairs for sources ['labels']"),
        (["reward", "--run", run, "reward.max_length=10"], 2, "longer than reward.max_length=10; raise it"),
    ]
    for argv, code, says in cases:
        proc = rlhf(*argv, "--config", TINY, check=False)
        assert proc.returncode == code and says in proc.stderr and "Traceback" not in proc.stderr, (argv, proc.stderr)


def test_histories_too_short_to_cut_leave_sft_nothing_and_say_so(tmp_path):
    """Every user has 3 ratings: no (prefix, future) window exists, so SFT has no examples and stops on the file."""
    d = tmp_path / "ml"
    d.mkdir()
    movies = ["movieId,title,genres"] + [f"{i},Film {i} ({1980 + i}),Drama" for i in range(1, 21)]
    (d / "movies.csv").write_text("\n".join(movies) + "\n")
    ratings = ["userId,movieId,rating,timestamp"]
    ratings += [f"{u},{(u + n * 5) % 20 + 1},4,{100 * u + n}" for u in range(1, 31) for n in range(3)]
    (d / "ratings.csv").write_text("\n".join(ratings) + "\n")
    run = tmp_path / "run"
    rlhf(
        "data",
        "prepare",
        "--source",
        "movielens",
        "--path",
        d,
        "--out",
        run,
        "--model",
        "tiny",
        "--k",
        "2",
        "data.min_history=3",
    )
    proc = rlhf("sft", "--run", run, "--config", TINY, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data/sft/train.parquet has no examples: no training window has K items" in proc.stderr


def test_k_beyond_half_the_catalog_is_refused_before_anything_is_written(tmp_path):
    proc = rlhf("data", "prepare", "--out", tmp_path / "run", "--config", TINY, "data.k=300", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "data.k=300 asks for more items than the catalog can give a user (444 items)" in proc.stderr


def test_after_a_prepare_the_stages_need_no_config(tmp_path):
    """The recipe given to `rlhf data prepare` is stored in the run: `rlhf sft --run R` alone trains the tiny model
    for the tiny recipe's 4 steps (the defaults would load SmolLM2 and train 20)."""
    import json

    run = tmp_path / "run"
    rlhf("data", "prepare", "--out", run, "--config", TINY)
    rlhf("sft", "--run", run)
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["steps"] == 4
    config = json.loads((run / "sft" / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_a_stage_pointed_at_a_run_of_another_model_is_one_message(tiny_sft, tmp_path):
    """reward / eval with a model whose tokenizer differs from the one the run's data was prepared with, and a run
    whose SFT model has another vocabulary: exit 1 naming the run and the model, before any forward pass."""
    import json
    import shutil

    from rlhf.models import load_tokenizer, resolve_model

    other = tmp_path / "other-model"  # the tiny model with five tokens added to its tokenizer
    shutil.copytree(resolve_model("tiny"), other)
    tok = load_tokenizer(str(other))
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save_pretrained(other)
    run = tmp_path / "run"
    shutil.copytree(tiny_sft, run)
    for command in ("reward", "eval"):
        proc = rlhf(command, "--run", run, "--model", other, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"{run} was prepared for model 'tiny'" in proc.stderr and "whose tokenizer differs" in proc.stderr
    config = run / "sft" / "merged" / "config.json"  # the same tokenizer, but an SFT model of another vocabulary
    config.write_text(json.dumps({**json.loads(config.read_text()), "vocab_size": 32000}))
    proc = rlhf("reward", "--run", run, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "has a vocabulary of 32000 tokens but model.name='tiny'" in proc.stderr
    assert not (run / "reward").exists()
