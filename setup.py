"""Build hook: generate the gRPC code from proto/ at install time.

All metadata lives in pyproject.toml; this file only adds a ``build_proto`` command that
runs ``grpc_tools.protoc`` (a build requirement) on ``proto/vpp/v1/*.proto`` and writes
``vpp/v1/*_pb2.py``, ``*_pb2.pyi`` and ``*_pb2_grpc.py`` next to the hand-written
``vpp/v1/__init__.py``.  The generated files are not committed (see .gitignore).

``build_proto`` is the first sub-command of ``build``, so it runs for a wheel
(``pip install .``) before ``build_py`` copies the package, and for a PEP 660 editable
install (``pip install -e .``), whose ``editable_wheel`` runs each of ``build``'s
sub-commands; the editable install then imports the files from the source tree.
After editing a .proto file, run ``pip install -e .`` (or ``python setup.py build_proto``)
again.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build
from setuptools.command.sdist import sdist
from setuptools.errors import ExecError, FileError

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
PACKAGE = "vpp/v1"


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


class build_proto(Command):
    description = f"generate {PACKAGE}/*_pb2*.py[i] from proto/{PACKAGE}/*.proto with grpc_tools.protoc"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        from importlib.resources import files

        from grpc_tools import protoc

        protos = proto_files()
        if not protos:
            raise FileError(f"no .proto files under {PROTO_ROOT / PACKAGE}")
        well_known = str(files("grpc_tools") / "_proto")  # google/protobuf/*.proto
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}",
                f"--python_out={ROOT}", f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}",
                *map(str, protos)]
        self.announce(f"generating gRPC code for {len(protos)} proto files", level=2)
        if protoc.main(args) != 0:
            raise ExecError("grpc_tools.protoc failed: " + " ".join(args[1:]))
        # setuptools >= 69 ships *.pyi with the package by itself; older ones need this.
        build_lib = getattr(self.get_finalized_command("build_py"), "build_lib", None)
        if build_lib:
            self.mkpath(str(Path(build_lib, PACKAGE)))
            for stub in (ROOT / PACKAGE).glob("*_pb2.pyi"):
                self.copy_file(str(stub), str(Path(build_lib, PACKAGE, stub.name)))

    def get_outputs(self) -> list[str]:
        return []  # written into the source tree; build_py picks them up from there


class build_with_proto(build):
    sub_commands = [("build_proto", None), *build.sub_commands]


class sdist_with_proto(sdist):
    """Ship proto/ in the sdist so a wheel built from it can generate the code again."""

    def make_release_tree(self, base_dir, files) -> None:
        protos = [str(p.relative_to(ROOT)) for p in proto_files()]
        super().make_release_tree(base_dir, [*files, *(p for p in protos if p not in files)])


setup(cmdclass={"build": build_with_proto, "build_proto": build_proto, "sdist": sdist_with_proto})
