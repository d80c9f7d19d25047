"""Generation of the Python gRPC stubs (`*_pb2.py`, `*_pb2.pyi`, `*_pb2_grpc.py`) from the `.proto` files beside
this module.

Stubs are build outputs, never committed. They are made:
- by `setup.py`'s `build_py` hook, into this folder, on every build: `pip install .` then copies them into the
  wheel, `pip install -e .` uses them in place;
- by `ensure_stubs()`, called when `moemesh` is imported from a source checkout, when a stub is missing or
  older than its `.proto` (a clean clone, an edited `.proto`). Needs `grpcio-tools` (the `dev` extra) only then.

The `.proto` files import each other as `moemesh/proto/<name>.proto`, and protoc runs over a temporary copy laid out
that way, so generated code imports `moemesh.proto.<name>_pb2` (package-relative, never a top-level `tensor_pb2`).
Files are written to a temporary folder and moved in with `os.replace`, so concurrent importers never read a
half-written stub.

Standard library only (plus `grpc_tools` when generating): `setup.py` loads this file by path, before `moemesh` or
its dependencies are importable.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
_PACKAGE_PATH = ("moemesh", "proto")  # where the .proto files sit in protoc's import namespace
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    """The `.proto` files of the package, sorted."""
    return sorted(Path(proto_dir).glob("*.proto"))


def stub_paths(proto: Path, out_dir: Path | None = None) -> list[Path]:
    """The three generated files of one `.proto`."""
    out = Path(out_dir) if out_dir is not None else proto.parent
    return [out / f"{proto.stem}{suffix}" for suffix in _SUFFIXES]


def stale(proto_dir: Path = PROTO_DIR, out_dir: Path | None = None) -> list[Path]:
    """The `.proto` files whose stubs are missing or older than the `.proto` itself."""
    result = []
    for proto in proto_files(proto_dir):
        mtime = proto.stat().st_mtime
        stubs = stub_paths(proto, out_dir)
        if any(not s.exists() or s.stat().st_mtime < mtime for s in stubs):
            result.append(proto)
    return result


def generate(proto_dir: Path = PROTO_DIR, out_dir: Path | None = None) -> list[Path]:
    """Run grpcio-tools' protoc over every `.proto` in `proto_dir`; write the stubs to `out_dir` (default: beside
    the `.proto` files). Returns the written paths. Raises RuntimeError when protoc fails."""
    from grpc_tools import protoc  # build-time dependency only

    protos = proto_files(proto_dir)
    out = Path(out_dir) if out_dir is not None else Path(proto_dir)
    if not protos:
        return []
    with tempfile.TemporaryDirectory(prefix="moemesh-protoc-") as tmp:
        src, gen = Path(tmp, "src"), Path(tmp, "gen")
        pkg_src = src.joinpath(*_PACKAGE_PATH)
        pkg_src.mkdir(parents=True)
        gen.mkdir()
        for proto in protos:
            shutil.copyfile(proto, pkg_src / proto.name)
        rel = [str(Path(*_PACKAGE_PATH, p.name)) for p in protos]
        well_known = Path(protoc.__file__).parent / "_proto"
        args = ["grpc_tools.protoc", f"-I{src}", f"-I{well_known}", f"--python_out={gen}", f"--pyi_out={gen}",
                f"--grpc_python_out={gen}", *rel]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(rel)} (see its messages above)")
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for proto in protos:
            for generated, target in zip(stub_paths(proto, gen.joinpath(*_PACKAGE_PATH)), stub_paths(proto, out)):
                staged = out / f".{target.name}.{os.getpid()}.tmp"
                shutil.copyfile(generated, staged)
                os.replace(staged, target)  # atomic: importers see the old file or the new one
                written.append(target)
    return written


def ensure_stubs(proto_dir: Path = PROTO_DIR) -> None:
    """In a source checkout (the folder above `proto_dir` holds pyproject.toml: the repository root is the package),
    generate the stubs when missing or older than their `.proto`. Installed wheels carry their stubs and are left
    alone, whatever the file times say."""
    if not (Path(proto_dir).parent / "pyproject.toml").is_file() or not stale(proto_dir):
        return
    try:
        generate(proto_dir)
    except ImportError:
        missing = [s for p in proto_files(proto_dir) for s in stub_paths(p) if not s.exists()]
        if missing:
            raise ImportError(f"moemesh.proto: stubs {[m.name for m in missing]} are missing and grpcio-tools is not "
                              "installed to generate them; `pip install grpcio-tools` or reinstall moemesh") from None
    except OSError:
        if any(not s.exists() for p in proto_files(proto_dir) for s in stub_paths(p)):
            raise  # read-only folder and nothing to fall back on


if __name__ == "__main__":  # python proto/build.py: regenerate unconditionally
    for path in generate():
        print(path)
