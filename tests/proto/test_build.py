"""Stub generation: stubs land beside the .proto files, import package-relatively, and are regenerated when missing
or older than their .proto (the editable-checkout fallback). Works on a copy, never on the package's own folder."""

from __future__ import annotations

import os
import shutil

from moemesh.proto import build


def _copy_protos(tmp_path, checkout: bool = True):
    """A copy of the proto folder, inside a fake source checkout (repository root = package root) or not."""
    folder = tmp_path / "proto"
    folder.mkdir()
    for proto in build.proto_files():
        shutil.copyfile(proto, folder / proto.name)
    if checkout:
        (tmp_path / "pyproject.toml").write_text("")
    return folder


def test_package_ships_its_protos_and_fresh_stubs():
    names = {p.stem for p in build.proto_files()}
    assert {"tensor", "expert", "engram", "health"} <= names
    assert build.stale() == []  # importing moemesh.proto made them current


def test_generate_writes_three_stubs_per_proto_with_package_imports(tmp_path):
    folder = _copy_protos(tmp_path)
    written = build.generate(folder)
    assert sorted(p.name for p in written) == sorted(p.name for proto in build.proto_files(folder)
                                                     for p in build.stub_paths(proto))
    assert build.stale(folder) == []
    assert "from moemesh.proto import tensor_pb2" in (folder / "expert_pb2.py").read_text()
    assert "from moemesh.proto import expert_pb2" in (folder / "expert_pb2_grpc.py").read_text()
    assert "class DispatchRequest" in (folder / "expert_pb2.pyi").read_text()
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_ensure_stubs_regenerates_missing_and_outdated_stubs(tmp_path):
    folder = _copy_protos(tmp_path)
    assert [p.name for p in build.stale(folder)] == sorted(p.name for p in build.proto_files(folder))
    build.ensure_stubs(folder)
    assert build.stale(folder) == []

    (folder / "health_pb2.pyi").unlink()
    stub = folder / "expert_pb2_grpc.py"
    old = stub.stat().st_mtime - 100
    os.utime(stub, (old, old))  # older than expert.proto, as after editing the .proto
    assert [p.name for p in build.stale(folder)] == ["expert.proto", "health.proto"]
    build.ensure_stubs(folder)
    assert build.stale(folder) == [] and (folder / "health_pb2.pyi").exists()
    assert stub.stat().st_mtime > old


def test_installed_packages_are_never_regenerated(tmp_path):
    folder = _copy_protos(tmp_path, checkout=False)
    build.ensure_stubs(folder)
    assert len(build.stale(folder)) == len(build.proto_files(folder))  # untouched
