"""Project wiring: README's quick-start commands, CI, packaging."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_quick_start_commands():
    commands = _quick_start_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert "moemesh " in commands[0] and "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _quick_start_commands()[1] in ci
    assert "set -euo pipefail" in ci  # a failing (or empty: exit 5) pytest fails CI


def test_code_folders_install_under_the_moemesh_namespace_only():
    import moemesh
    import moemesh.actors
    import moemesh.cluster
    import moemesh.kernels
    import moemesh.proto

    for sub, folder in (("actors", "actors"), ("cluster", "cluster"), ("kernels", "kernels"), ("proto", "proto")):
        assert Path(getattr(moemesh, sub).__file__).resolve().parent == ROOT / folder
    text = (ROOT / "pyproject.toml").read_text()
    assert '"moemesh.kernels" = "kernels"' in text and "packages = [" in text
