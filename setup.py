"""Build hook only (everything else is in pyproject.toml): generate the gRPC stubs from proto/*.proto before
`build_py` collects the package, for wheels (`pip install .`) and editable installs (`pip install -e .`) alike.
See proto/build.py."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _proto_build():
    # Loaded by path: moemesh and its dependencies are not importable inside the isolated build environment.
    spec = importlib.util.spec_from_file_location("_moemesh_proto_build", ROOT / "proto" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    """`build_py` that first writes `*_pb2.py`, `*_pb2.pyi` and `*_pb2_grpc.py` next to the `.proto` files."""

    def finalize_options(self):
        super().finalize_options()
        # Ship the .proto files in sdists (a wheel built from one regenerates the stubs) and wheels (for other
        # languages' clients). Here rather than in pyproject's package-data, which would replace setup.py's.
        self.package_data.setdefault("moemesh.proto", []).append("*.proto")

    def run(self):
        _proto_build().generate(ROOT / "proto")
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
