"""Install the dependencies pyproject.toml declares (plus the named extras), not the project.

The Dockerfiles run this on pyproject.toml alone, before the source is copied, so that layer
(torch and its CUDA wheels: gigabytes) is rebuilt only when the dependencies change, not at
every code change; ``pip install --no-deps .`` then adds the project itself.

    python docker/install_deps.py [EXTRA ...]           # install
    python docker/install_deps.py --print [EXTRA ...]   # list the requirements only
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def requirements(extras: list[str], pyproject: Path = PYPROJECT) -> list[str]:
    """The base dependencies and those of ``extras`` (an extra naming the project itself,
    ``ichigo-batch[...]``, is expanded)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    out: list[str] = list(project["dependencies"])
    todo, seen = list(extras), set()
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"no extra [{extra}] in {pyproject}")
        seen.add(extra)
        for req in optional[extra]:
            if req.startswith(f"{project['name']}["):
                todo.extend(e.strip() for e in req.split("[", 1)[1].rstrip("]").split(","))
            else:
                out.append(req)
    return list(dict.fromkeys(out))


def main(argv: list[str]) -> int:
    dry = "--print" in argv
    reqs = requirements([a for a in argv if a != "--print"])
    if dry:
        print("\n".join(reqs))
        return 0
    return subprocess.call([sys.executable, "-m", "pip", "install", *reqs])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
