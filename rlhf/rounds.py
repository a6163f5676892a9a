"""`rlhf rounds`: label -> reward -> RL -> eval, round after round, resumable (iterative RLHF, as in Llama 2's rounds).

    rlhf rounds --run runs/demo --rounds 2                                # simulated labelers (built-in data)
    rlhf rounds --run runs/demo --rounds 3 --labelers people --tokens-file labelers.csv [--deadline 86400]
    rlhf rounds --run runs/demo --stop                                    # close the round being judged; go on

Needs a run with sft/ and reward/ (and ppo/ when the loop should start from a trained policy). Round 0 keeps where
the loop began (the reward model, the RL adapter if any) and evaluates it; then each round r:

1. export  labels/round-LLL/: label.prompts prompts of label.split (val: the test users stay unseen), label.candidates
           listings each from the current policy (the RL adapter once there is one, else SFT) at label.temperature
2. judge   simulated: the simulator's labelers (label.labelers at label.noise); people: the labeling server on
           label.host:label.port until the queue is judged, rounds.deadline_s passes or a stop (labeling/session.py)
3. import  judgments -> pairs ``labels:round-LLL``, each judgment counted once (the store and the importer ensure it)
4. reward  `rlhf reward --init-from rounds/round-(r-1)/reward/model`: the previous round's model trained further on
           every pair so far (reward.sources; labels = every imported round), kept as rounds/round-r/reward/
5. rl      `rlhf rl --init-adapter rounds/round-(r-1)/ppo/adapter`, rounds.rl_updates updates: the policy continues,
           the reference stays the SFT model; kept as rounds/round-r/ppo/. Round r's RL samples with seed run.seed +
           r - 1, so rounds do not replay the first batches of one shuffle
6. eval    `rlhf eval --stages sft,ppo` on eval.split; kept as rounds/round-r/eval/; the report gains the round table

Model stages run in their own process (as in `rlhf pipeline`), killed with this one; judging and import run here.
rounds/state.json (atomic writes) records each finished step, so the same command run again resumes at the step it
stopped in: an RL step that had begun resumes from its checkpoint, any other is done again (each is idempotent:
export never replaces a batch that has judgments, the judgment log keeps every acknowledged judgment once). Loop
round r labels round r + the highest label round the run had when the loop began, so rounds made by hand are kept.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from rlhf.config import Config, ConfigError, save_resolved
from rlhf.runs import RunDir, atomic_write

START_STEPS = ("keep", "eval")  # round 0: where the loop began
ROUND_STEPS = ("export", "judge", "import", "reward", "rl", "eval")


class RoundsStopped(RuntimeError):
    """The loop stopped cleanly before its rounds were done (e.g. a deadline with nothing judged); the message says
    why and how to go on."""


class LoopState:
    """rounds/state.json: the label-round offset and, per round, its finished steps and what each reported."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {"label_offset": None, "rounds": {}}

    def entry(self, r: int) -> dict:
        return self.data["rounds"].setdefault(str(r), {"steps": []})

    def done(self, r: int) -> list[str]:
        return list(self.entry(r)["steps"])

    def finish(self, r: int, step: str, info: dict | None = None) -> None:
        entry = self.entry(r)
        entry["steps"].append(step)
        if info:
            entry[step] = info
        self.save()

    def note(self, r: int, **values) -> None:
        self.entry(r).update(values)
        self.save()

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=2))


def keep(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a stage's folder (less ``skip``) to ``dst`` through a temporary folder and a rename: ``dst`` is the whole
    copy or absent, never half of one."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(*skip) if skip else None)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def _die_with_parent() -> None:
    """Linux: a stage process gets SIGKILL when the rounds process dies, even by SIGKILL, so no orphan keeps writing
    the run while a rerun resumes it."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _qualified(overrides: list[str]) -> list[str]:
    """A bare ``field=value`` given to `rlhf rounds` means rounds.field; the stages it starts get it qualified."""
    from rlhf.config import SECTIONS

    return [o if o.split("=", 1)[0].split(".")[0] in SECTIONS else f"rounds.{o}" for o in overrides]


def _on_sigterm(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: the stage process is killed, the labeling server stopped


def run_rounds(cfg: Config, run_dir: Path, config: str | None = None, overrides=(), token: str | None = None) -> list:
    """Run the loop until rounds.rounds rounds are done (resuming a stopped one); returns the round table's rows."""
    loop = RoundLoop(cfg, RunDir(run_dir), config, _qualified(list(overrides)), token)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return loop.run_all()
    finally:
        signal.signal(signal.SIGTERM, previous)


def request_stop(run_dir: Path) -> None:
    """`rlhf rounds --stop`: the round being judged by people closes with what is judged; the loop goes on."""
    if not run_dir:
        raise ConfigError("rlhf rounds --stop needs --run: the run whose loop is serving a round")
    run = RunDir(run_dir)
    run.need(run.rounds.state)
    atomic_write(run.rounds.stop, "stop\n")
    print(f"rounds: wrote {run.rounds.stop}; the labeling server closes the round within a second")


class RoundLoop:
    """The loop's steps over one run; each is a method that may run again after an interruption."""

    def __init__(self, cfg: Config, run: RunDir, config: str | None, overrides: list[str], token: str | None):
        self.cfg, self.run, self.config, self.overrides = cfg, run, config, overrides
        self.tokens = self._check(token)
        self.state = LoopState(run.rounds.state)

    def _check(self, token: str | None) -> dict | None:
        """Everything the loop needs, before anything runs; the labelers' tokens (people) or None."""
        cfg, run = self.cfg, self.run
        run.need(run.sft.merged)
        run.need(run.reward.model / "config.json")
        if "labels" not in cfg.reward.sources:
            raise ConfigError(
                "reward.sources has no 'labels': the rounds' judgments would never reach the reward model"
            )
        if not cfg.model.use_lora:
            raise ConfigError(
                "rlhf rounds continues the policy's LoRA adapter from round to round: model.use_lora=true"
            )
        if not run.rounds.round(0).dir.exists() and run.state("ppo") == "interrupted":
            raise ConfigError(
                f"{run.ppo.dir} holds an unfinished RL stage; finish it (`rlhf rl --run {run.root} --resume`) or "
                "remove it, then start the rounds"
            )
        if cfg.rounds.labelers == "simulated":
            if run.meta().get("simulator_seed") is None:
                raise ConfigError("rounds.labelers=simulated needs the built-in simulator (data.source=builtin)")
            return None
        from rlhf.labeling.server import labeler_tokens

        return labeler_tokens(token, cfg.rounds.tokens_file or None)

    def run_all(self) -> list[dict]:
        from rlhf.round_table import render, round_rows

        save_resolved(self.cfg, self.run, ["rounds"])
        if self.state.data["label_offset"] is None:
            made = [int(p.name[6:]) for p in self.run.labels.dir.glob("round-*") if p.name[6:].isdigit()]
            self.state.data["label_offset"] = max(made, default=0)
            self.state.save()
        target = self.cfg.rounds.rounds
        for r in range(target + 1):
            self._round(r)
        rows = round_rows(self.run)
        print(render(rows))
        return rows

    def _round(self, r: int) -> None:
        steps = START_STEPS if r == 0 else ROUND_STEPS
        done = self.state.done(r)
        todo = [s for s in steps if s not in done]
        if not todo:
            return
        where = f"round {r}" + (f" (labels round {self.label_round(r)})" if r else " (the start)")
        if done:
            print(f"rounds: {where}: resuming at step {todo[0]} (done: {', '.join(done)})", flush=True)
        for step in todo:
            print(f"rounds: {where}: {step}", flush=True)
            info = getattr(self, f"step_{step}")(r)
            self.state.finish(r, step, info)

    def label_round(self, r: int) -> int:
        return self.state.data["label_offset"] + r

    def stage(self, command: list[str], flags: list[str] = (), overrides: list[str] = ()) -> None:
        """One `rlhf` stage in its own process on this run, with the recipe and overrides the loop was given (the step's
        own ``overrides`` after them: they win)."""
        config = ["--config", self.config] if self.config else []
        where = ["--run", str(self.run.root), *config, *flags]
        cmd = [sys.executable, "-m", "rlhf", *command, *where, *self.overrides, *overrides]
        linux = sys.platform.startswith("linux")
        rc = subprocess.call(cmd, preexec_fn=_die_with_parent if linux else None)
        if rc:
            raise RoundsStopped(
                f"`rlhf {' '.join(command)}` failed (exit {rc}); fix the error above and run the same command again: "
                "the loop resumes at this step"
            )

    # ---- the steps: each returns what state.json keeps about it
    def step_keep(self, r: int) -> dict:
        """Round 0: the reward model (and RL adapter) the loop starts from, copied where round 1 reads them."""
        snap = self.run.rounds.round(0)
        snap.dir.mkdir(parents=True, exist_ok=True)
        keep(self.run.reward.dir, snap.reward.dir, ("trainer",))
        policy = "sft"
        if self.run.done("ppo"):
            keep(self.run.ppo.dir, snap.ppo.dir, ("checkpoints", "trainer"))
            policy = "ppo"
        return {"policy": policy}

    def step_export(self, r: int) -> dict:
        policy = "ppo" if self.run.rounds.round(r - 1).ppo.adapter.exists() else "sft"
        self.stage(["label", "export"], ["--round", str(self.label_round(r)), "--stages", policy])
        return {"policy": policy, "label_round": self.label_round(r)}

    def step_judge(self, r: int) -> dict:
        from rlhf.labeling.simulate import judge_simulated

        if self.tokens is None:
            return {"how": "simulated", **judge_simulated(self.cfg, self.run.root, self.label_round(r))}
        return self._judge_people(r)

    def _judge_people(self, r: int) -> dict:
        from dataclasses import asdict

        from rlhf.labeling.session import ServerFailed, serve_until_judged

        rc = self.cfg.rounds
        self.run.rounds.stop.unlink(missing_ok=True)  # a stop meant for an earlier round
        try:
            judging = serve_until_judged(
                self.cfg, self.run.root, self.label_round(r), self.tokens, self.run.rounds.stop, bool(rc.tokens_file)
            )
        except ServerFailed as e:
            raise RoundsStopped(str(e)) from None
        why = {
            "judged": "the queue is judged",
            "stop": "stopped",
            "deadline": f"the deadline ({rc.deadline_s:g} s) passed",
        }
        said = f"round {r}: {why[judging.why]}: {judging.judgments} judgments on {judging.prompts_judged} of "
        said += f"{judging.prompts} prompts; the labeling server has stopped"
        if not judging.judgments:
            raise RoundsStopped(
                f"{said}. Nothing to import: run the same command to serve round {r} again"
                + (" (raise rounds.deadline_s, or --deadline 0 for none)" if judging.why == "deadline" else "")
            )
        print(f"rounds: {said}; importing them", flush=True)
        return asdict(judging)

    def step_import(self, r: int) -> dict:
        from rlhf.labeling.importer import run_import

        summary = run_import(self.cfg, self.run.root, self.label_round(r))
        if self.cfg.track.report_to:
            from rlhf.tracking import log_round

            log_round(self.cfg, self.run, summary)
        if not summary["pairs"]:
            print(f"rounds: round {r}: no pairs (ties, both bad or even splits); the reward model retrains on the rest")
        return {"pairs": summary["pairs"], "judgments": summary["judgments"].get("used", 0)}

    def step_reward(self, r: int) -> dict:
        init = self.run.rounds.round(r - 1).reward.model
        steps = [f"reward.max_steps={self.cfg.rounds.reward_steps}"] if self.cfg.rounds.reward_steps else []
        self.stage(["reward"], ["--init-from", str(init)], steps)
        keep(self.run.reward.dir, self.run.rounds.round(r).reward.dir, ("trainer",))
        return {"init": str(init)}

    def step_rl(self, r: int) -> dict:
        run, previous = self.run, self.run.rounds.round(r - 1).ppo.adapter
        if not self.state.entry(r).get("rl_started"):
            # ppo/ holds the previous round's stage, kept under rounds/; this round's starts afresh from its adapter
            if run.ppo.adapter.exists() and not previous.exists():
                raise RoundsStopped(f"{run.ppo.adapter} is not kept under {previous.parent}: refusing to replace it")
            shutil.rmtree(run.ppo.dir, ignore_errors=True)
            self.state.note(r, rl_started=True)
        flags = ["--resume", *(["--init-adapter", str(previous)] if previous.exists() else [])]
        overrides = [f"run.seed={self.cfg.run.seed + r - 1}"]
        if self.cfg.rounds.rl_updates:
            overrides.append(f"ppo.total_updates={self.cfg.rounds.rl_updates}")
        self.stage(["rl"], flags, overrides)
        keep(run.ppo.dir, run.rounds.round(r).ppo.dir, ("checkpoints", "trainer"))
        return {"init_adapter": str(previous) if previous.exists() else None}

    def step_eval(self, r: int) -> dict:
        from rlhf.report import report_from_files

        self.stage(["eval"], ["--stages", "sft,ppo"])
        keep(self.run.eval.dir, self.run.rounds.round(r).eval.dir)
        report_from_files(self.run, self.cfg.eval.num_examples)  # the report again, with this round's row
        return {}
