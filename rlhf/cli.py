"""The `rlhf` command: a subcommand per stage. Parsing only; each stage lives in its own module.

    rlhf data prepare --source builtin --out runs/demo
    rlhf sft --run runs/demo --config recipes/demo.yaml sft.max_steps=40
    rlhf rl --algo grpo --run runs/demo
    rlhf rounds --run runs/demo --rounds 2
    accelerate launch --config_file accelerate_configs/multi_cpu.yaml -m rlhf ppo --run runs/demo

Every stage takes ``--config FILE.yaml`` and trailing ``section.field=value`` overrides (a bare
``field=value`` applies to the stage's own section), validates them before loading anything, and
writes the resolved config to RUN_DIR/config.yaml.
"""

from __future__ import annotations

import argparse
import sys
from typing import get_args

from rlhf.config import Algorithm, HeldOut, Mode, Protocol, Retriever, Source, Stage

EXIT_ERROR, EXIT_USAGE = 1, 2
INIT_ADAPTER = "a saved LoRA adapter the policy's adapter starts from (RL continues it; the reference stays SFT)"


def _common(p: argparse.ArgumentParser, run_flag: str = "--run"):
    p.add_argument(
        "--config", help="recipe YAML (sections: run, model, data, sft, reward, ppo, eval, label, rounds, track)"
    )
    p.add_argument(run_flag, dest="run", help="run directory (default: runs/<run.name> from the config)")
    p.add_argument("--model", help="base model: smollm2-135m (default), tiny, a local path or a hub id")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="RLHF fine-tuning of an LLM recommender: data -> SFT -> reward model -> PPO -> eval."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="prepare datasets from logs or the built-in simulator")
    dsub = data.add_subparsers(dest="action", required=True, metavar="ACTION")
    prep = dsub.add_parser("prepare", help="source -> catalog, interactions, splits, SFT examples, pairs, prompts")
    _common(prep, "--out")
    prep.add_argument("--source", choices=get_args(Source))
    prep.add_argument("--path", help="input folder or file (not for builtin)")
    prep.add_argument("--max-users", type=int)
    prep.add_argument("--min-history", type=int)
    prep.add_argument("--mode", choices=get_args(Mode))
    prep.add_argument("--num-candidates", type=int)
    prep.add_argument("--retriever", choices=get_args(Retriever))
    prep.add_argument("--protocol", choices=get_args(Protocol), help="rerank candidates (see data.protocol)")
    prep.add_argument("--k", type=int)
    prep.add_argument("--seed", type=int)

    sft = sub.add_parser("sft", help="supervised fine-tuning (TRL SFTTrainer, LoRA)")
    _common(sft)

    reward = sub.add_parser("reward", help="train the reward model on preference pairs (TRL RewardTrainer)")
    _common(reward)
    reward.add_argument("--sources", help="comma list of ratings,clicks,labels,simulator")
    reward.add_argument(
        "--init-from", help="a saved reward model to train further (a warm start) instead of reward.init"
    )

    ppo = sub.add_parser("ppo", help="PPO with LoRA against the composite reward (TRL PPOTrainer); = rl --algo ppo")
    _common(ppo)
    ppo.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    ppo.add_argument("--init-adapter", help=INIT_ADAPTER)

    rl = sub.add_parser("rl", help="the RL stage with ppo.algorithm: PPO, or critic-free GRPO / RLOO (TRL)")
    _common(rl)
    rl.add_argument("--algo", choices=get_args(Algorithm), help="sets ppo.algorithm (default: the config's, ppo)")
    rl.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    rl.add_argument("--init-adapter", help=INIT_ADAPTER)

    ev = sub.add_parser("eval", help="evaluate stages and baselines on held-out users")
    _common(ev)
    ev.add_argument("--stages", help="comma list of base,sft,ppo")
    ev.add_argument("--split", choices=get_args(HeldOut))
    ev.add_argument("--max-users", type=int)
    ev.add_argument("--k", type=int, help="cut-off for accuracy metrics (default: the run's K)")

    rec = sub.add_parser("recommend", help="write a ranked, explained list for one user or history")
    _common(rec)
    rec.add_argument("--stage", choices=get_args(Stage), default="ppo")
    who = rec.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="a user id from the run's data")
    who.add_argument("--history", help='titles separated by ";", e.g. "The Matrix; Alien (1979)"')
    rec.add_argument("--k", type=int)
    rec.add_argument("--constrained", action="store_true", help="only catalog titles at item positions")
    rec.add_argument("--json", action="store_true", help="print one JSON object")
    rec.add_argument("--max-new-tokens", type=int, default=160)

    _label_parser(sub)
    _rounds_parser(sub)
    _export_parser(sub)
    pipe = sub.add_parser("pipeline", help="data -> sft -> reward -> ppo -> eval, skipping finished stages")
    _common(pipe)

    status = sub.add_parser("status", help="which stages of a run are done, interrupted or missing, and what next")
    status.add_argument("--run", required=True, help="run directory")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _label_parser(sub) -> None:
    label = sub.add_parser("label", help="offline preference-labeling rounds")
    lsub = label.add_subparsers(dest="action", required=True, metavar="ACTION")
    helps = {
        "export": "sample held-out prompts and candidate listings into labels/round-NNN/batch.jsonl",
        "serve": "the labeling page and JSON API on 127.0.0.1",
        "import": "judgments -> preference pairs",
        "simulate": "simulated labelers judge the batch, then import (built-in data)",
    }
    lp = {}
    for name, text in helps.items():
        lp[name] = lsub.add_parser(name, help=text)
        _common(lp[name])
        lp[name].add_argument("--round", type=int, required=True)
    lp["export"].add_argument("--stages", dest="label_stages", help="comma list of base,sft,ppo (default sft,ppo)")
    lp["export"].add_argument("--prompts", type=int, help="prompts in the batch")
    lp["export"].add_argument("--candidates", type=int, help="candidate listings per prompt, 2-4")
    lp["serve"].add_argument("--host")
    lp["serve"].add_argument("--port", type=int)
    auth = lp["serve"].add_mutually_exclusive_group()
    auth.add_argument("--token", help="one labeler's token (default: a random one, printed)")
    auth.add_argument("--tokens-file", help="a file of `labeler,token` lines")
    lp["simulate"].add_argument("--labelers", type=int)
    lp["simulate"].add_argument("--noise", type=float)


def _rounds_parser(sub) -> None:
    rounds = sub.add_parser("rounds", help="label -> reward -> RL -> eval, round after round; a rerun resumes")
    _common(rounds)
    rounds.add_argument("--rounds", type=int, help="rounds to have done (rounds.rounds, default 2)")
    rounds.add_argument("--labelers", dest="round_labelers", choices=["simulated", "people"])
    rounds.add_argument("--deadline", type=float, help="people: seconds of serving per round (rounds.deadline_s)")
    auth = rounds.add_mutually_exclusive_group()
    auth.add_argument("--token", help="people: one labeler's token (default: a random one, printed)")
    auth.add_argument("--tokens-file", help="people: a file of `labeler,token` lines (rounds.tokens_file)")
    rounds.add_argument("--stop", action="store_true", help="close the round being judged by people; the loop goes on")


def _export_parser(sub) -> None:
    exp = sub.add_parser("export", help="package a stage for chat assistants: PEFT adapter, merged model or GGUF")
    _common(exp)
    exp.add_argument("--out", required=True)
    exp.add_argument("--stage", choices=["sft", "ppo"], default="ppo")
    exp.add_argument(
        "--format",
        choices=["peft", "merged", "gguf"],
        help="peft: LoRA adapter on the original base (default); merged: a standalone transformers model; "
        "gguf: GGUF files + Ollama Modelfile for llama.cpp, Ollama, LM Studio",
    )
    exp.add_argument("--merge", action="store_true", help="the same as --format merged")
    exp.add_argument("--gguf-types", help="comma list of f32, f16, bf16, q8_0 (default f16,q8_0)")
    exp.add_argument(
        "--gguf-lora",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="with --format gguf: also the LoRA adapter as a llama.cpp adapter GGUF with its base (default on)",
    )


def _flag_overrides(args) -> list[str]:
    """Map explicit flags onto config fields (they win over the recipe, as overrides do)."""
    section_of = {"data": "data", "eval": "eval"}.get(args.command)
    fields = {
        "source": "data.source",
        "path": "data.path",
        "min_history": "data.min_history",
        "mode": "data.mode",
        "num_candidates": "data.num_candidates",
        "retriever": "data.retriever",
        "protocol": "data.protocol",
        "seed": "data.seed",
        "sources": "reward.sources",
        "algo": "ppo.algorithm",
        "split": "eval.split",
        "stages": "eval.stages",
        "label_stages": "label.stages",
        "prompts": "label.prompts",
        "candidates": "label.candidates",
        "host": "label.host",
        "port": "label.port",
        "labelers": "label.labelers",
        "noise": "label.noise",
        "rounds": "rounds.rounds",
        "round_labelers": "rounds.labelers",
        "deadline": "rounds.deadline_s",
    }
    if section_of:  # --max-users means the data stage's cap or eval's, by command
        fields["max_users"] = f"{section_of}.max_users"
    if args.command == "data":
        fields["k"] = "data.k"
    if args.command == "rounds":  # label serve reads its tokens file directly; the loop keeps it in its section
        fields["tokens_file"] = "rounds.tokens_file"
    out = [f"{key}={getattr(args, attr)}" for attr, key in fields.items() if getattr(args, attr, None) is not None]
    if args.model:
        out.append(f"model.name={args.model}")
    if args.command == "ppo":  # `rlhf ppo` runs PPO whatever algorithm the run's config last named
        out.append("ppo.algorithm=ppo")
    return out


def _load(args):
    """The config a command runs with: the run's resolved config.yaml (when the run exists), the recipe over it
    (except the sections of finished stages), then the flags and overrides. The data stage starts from the recipe."""
    from rlhf.config import load_config
    from rlhf.models import check_init_adapter, check_init_from, check_model_fits_run
    from rlhf.precision import check_hardware
    from rlhf.runs import RunDir

    section = {
        "data": "data",
        "sft": "sft",
        "reward": "reward",
        "ppo": "ppo",
        "rl": "ppo",
        "eval": "eval",
        "label": "label",
        "rounds": "rounds",
    }.get(args.command)
    overrides = [*args.overrides, *_flag_overrides(args)]
    run = RunDir(args.run or load_config(args.config, overrides, default_section=section).run.path)
    later = args.command not in ("data", "pipeline")
    frozen = {"run", "data"} if later and run.done("data") else set()
    cfg = load_config(args.config, overrides, section, run.config if later else None, frozen)
    cfg.run.dir = str(run.root)
    # flags naming saved models are checked here, before torch and the tokenizer load: a wrong path fails in a second
    if getattr(args, "init_from", None):
        check_init_from(args.init_from, run)
    if getattr(args, "init_adapter", None):
        check_init_adapter(args.init_adapter, cfg.model)
    if args.command != "data":
        check_hardware(cfg.model)
    if later:
        check_model_fits_run(cfg.model.name, run)
    return cfg


def dispatch(args) -> int:
    if args.command == "status":  # reads the run's files only: no config, nothing loaded
        from rlhf.status import run_status

        return run_status(args.run, as_json=args.json)
    if args.command == "rounds" and args.stop:  # a file the running loop watches: no config needed
        from rlhf.rounds import request_stop

        request_stop(args.run)
        return 0
    cfg = _load(args)
    run_dir = cfg.run.path
    cmd = args.command
    if cmd == "data":
        from rlhf.data.prepare import run_data

        run_data(cfg, run_dir)
    elif cmd == "sft":
        from rlhf.sft import run_sft

        run_sft(cfg, run_dir)
    elif cmd == "reward":
        from reward_models.train import run_reward

        run_reward(cfg, run_dir, init_from=args.init_from)
    elif cmd in ("ppo", "rl"):
        from rlhf.rl import run_rl

        run_rl(cfg, run_dir, resume=args.resume, init_adapter=args.init_adapter)
    elif cmd == "eval":
        from rlhf.evaluate import run_eval

        run_eval(cfg, run_dir, k=args.k)
    elif cmd == "recommend":
        from rlhf.recommend import run_recommend

        run_recommend(cfg, run_dir, args)
    elif cmd == "label":
        from rlhf.labeling import run_label

        run_label(cfg, run_dir, args)
    elif cmd == "export":
        from rlhf.export import export_options, run_export

        run_export(
            cfg, run_dir, args.out, args.stage, export_options(args.format, args.merge, args.gguf_types, args.gguf_lora)
        )
    elif cmd == "rounds":
        from rlhf.rounds import run_rounds

        run_rounds(cfg, run_dir, args.config, [*args.overrides, *_flag_overrides(args)], token=args.token)
    elif cmd == "pipeline":
        from rlhf.pipeline import run_pipeline

        run_pipeline(cfg, run_dir, args.config, [*args.overrides, *_flag_overrides(args)])
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rlhf.config import ConfigError
    from rlhf.data.loaders import DataError
    from rlhf.models import ModelError
    from rlhf.rounds import RoundsStopped
    from rlhf.runs import MissingInput

    prog = f"rlhf {args.command}"
    try:
        return dispatch(args)
    except ConfigError as e:
        print(f"{prog}: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, MissingInput, ModelError, FileNotFoundError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except RoundsStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
