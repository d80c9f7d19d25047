"""Project wiring: README's quick-start commands, CI, packaging."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    # a fresh virtual environment, activated before the command: newest releases within our ranges, nothing inherited
    venv = next(i for i, line in enumerate(ci) if " -m venv " in line)
    activate = next(i for i, line in enumerate(ci) if line.startswith("source ") and "/bin/activate" in line)
    assert venv < activate < ci.index(_quick_start_commands()[1])


def test_code_folders_install_under_the_moemesh_namespace_only():
    import moemesh
    import moemesh.actors
    import moemesh.cluster
    import moemesh.kernels
    import moemesh.proto

    for folder in ("actors", "cluster", "kernels", "proto"):
        assert [Path(p).resolve() for p in getattr(moemesh, folder).__path__] == [ROOT / folder]
        # no __init__.py: a regular package `kernels/` in the root would shadow the `kernels` distribution
        assert not (ROOT / folder / "__init__.py").exists()
    text = (ROOT / "pyproject.toml").read_text()
    assert '"moemesh.kernels" = "kernels"' in text and "packages = [" in text


# Run in a fresh interpreter whose working directory is the repository root, so that sys.path[0] is the root: the place
# where our `kernels/` and `proto/` folders could shadow the distributions of the same names.
_WHERE_FROM = """
import json
import kernels, proto
from transformers.models.deepseek_v4 import modeling_deepseek_v4
import moemesh.kernels.model, moemesh.proto.codec
print(json.dumps({"kernels": kernels.__file__, "proto": proto.__file__,
                  "moemesh_kernels": list(moemesh.kernels.__path__), "moemesh": moemesh.__file__,
                  "reference": modeling_deepseek_v4.DeepseekV4ForCausalLM.__name__}))
"""


def _imports_from_root(extra_path: str | None = None) -> dict:
    import json
    import os

    env = dict(os.environ)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    run = subprocess.run([sys.executable, "-c", _WHERE_FROM], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_repository_root_does_not_shadow_the_kernels_and_proto_distributions():
    """Python started in the repository root (`python -m pytest`, a notebook, a script) imports Hugging Face's
    `kernels` (which transformers' DeepSeek-V4 module imports) and proto-plus's `proto`, not our folders; and
    `moemesh.kernels` still resolves to our `kernels/` (editable install)."""
    import importlib.metadata

    seen = _imports_from_root()
    dist = importlib.metadata.distribution("kernels")
    assert Path(seen["kernels"]).resolve() == Path(dist.locate_file("kernels/__init__.py")).resolve()
    assert ROOT not in Path(seen["kernels"]).resolve().parents
    assert ROOT not in Path(seen["proto"]).resolve().parents
    assert [Path(p).resolve() for p in seen["moemesh_kernels"]] == [ROOT / "kernels"]
    assert seen["reference"] == "DeepseekV4ForCausalLM"


def test_a_regular_install_keeps_the_code_folders_under_moemesh(tmp_path):
    """A wheel (what `pip install .` installs) holds moemesh/kernels/... and the generated stubs, no top-level
    `kernels`/`proto`; installed ahead of the editable checkout on sys.path, it imports from the repository root
    without shadowing anything."""
    import shutil

    pytest.importorskip("grpc_tools")  # the build dependency (dev extra), not our module
    # built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__",
                                                                 "*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("moemesh-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
    assert tops == {"moemesh"}, tops
    for needed in ("moemesh/__init__.py", "moemesh/kernels/data/", "moemesh/proto/expert_pb2.py",
                   "moemesh/proto/expert.proto"):
        assert any(n.startswith(needed) for n in names), needed
    sources = {"moemesh/" + str(p.relative_to(ROOT)) for folder in ("kernels", "proto", "actors", "cluster")
               for p in (ROOT / folder).rglob("*.py") if "_pb2" not in p.name}
    assert sources - set(names) == set(), "modules the wheel leaves out (pyproject's packages list)"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    seen = _imports_from_root(str(site))
    assert Path(seen["moemesh"]).resolve() == (site / "moemesh" / "__init__.py").resolve()
    assert [Path(p).resolve() for p in seen["moemesh_kernels"]] == [(site / "moemesh" / "kernels").resolve()]
    assert ROOT not in Path(seen["kernels"]).resolve().parents
