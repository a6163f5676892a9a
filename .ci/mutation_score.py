"""Per-module mutation scores of the last `mutmut run`: `python .ci/mutation_score.py [--min 85]` (`make mutation`).

mutmut prints one total; this reads its results (mutants/<module>.meta) for each module of `[tool.mutmut]
only_mutate` in pyproject.toml and prints killed / total and the percentage, as mutmut's badge counts them: a
mutant that times out is killed (the tests did not pass), skipped ones are left out of the total. A survivor
listed in .ci/mutation_equivalents.txt (`mutant-name  # why no test can tell it apart`) still counts as
survived; the score without those is printed beside. Exit 1 when a module's score is below --min, or when a
listed equivalent is killed or gone (the list is out of date). `--survivors` lists every survivor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

KILLED = {1, 3, 36, 24, -24, 152, 255}  # mutmut's "killed" and "timeout" exit codes (mutmut/stats.py)
SURVIVED = {0}
SKIPPED = {34}


def equivalents(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            name, _, why = line.partition("#")
            if name.strip():
                out[name.strip()] = why.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min", type=float, default=0.0, help="fail when a module scores below this percentage")
    ap.add_argument("--survivors", action="store_true", help="list the mutants that survived")
    args = ap.parse_args(argv)
    modules = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]
    listed = equivalents(Path(".ci/mutation_equivalents.txt"))
    seen, failed = set(), False
    print(f"{'module':32} {'killed / total':>15} {'score':>7}   {'without equivalents':>19}")
    for module in modules:
        meta = Path("mutants") / f"{module}.meta"
        if not meta.exists():
            print(f"{module:32} no results (run mutmut first)")
            failed = True
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        total = sum(code not in SKIPPED for code in codes.values())
        killed = sum(code in KILLED for code in codes.values())
        survivors = sorted((k for k, code in codes.items() if code not in KILLED | SKIPPED), key=_natural)
        equiv = [k for k in survivors if k in listed]
        seen.update(k for k in codes if k in listed)
        for k in codes:
            if k in listed and codes[k] in KILLED:
                print(f"  {k} is listed as equivalent but was killed: take it off the list")
                failed = True
        score = 100.0 * killed / total if total else 0.0
        rest = total - len(equiv)
        without = f"{killed}/{rest} {100.0 * killed / rest:5.1f}%" if rest else ""
        print(f"{module:32} {f'{killed}/{total}':>15} {score:6.1f}%   {without:>19}")
        if args.survivors:
            for k in survivors:
                print(f"    {k}  exit {codes[k]}" + (f"  (equivalent: {listed[k]})" if k in listed else ""))
        if score < args.min:
            failed = True
    for k in sorted(set(listed) - seen):
        print(f"  {k} is listed as equivalent but is no mutant any more: take it off the list")
        failed = True
    if args.min and failed:
        print(f"mutation: below {args.min:g}% or an out-of-date equivalents list (above)")
    return 1 if failed else 0


def _natural(name: str) -> tuple[str, int]:
    head, _, n = name.rpartition("_")
    return head, int(n) if n.isdigit() else 0


if __name__ == "__main__":
    sys.exit(main())
