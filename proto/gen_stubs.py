"""Generate (or check) the committed Python stubs for proto/kunserve/rpc/v1/*.proto.

Usage, from anywhere:
    python proto/gen_stubs.py           # regenerate the stubs in place
    python proto/gen_stubs.py --check   # exit 1 if committed stubs are stale or missing

Produces, next to each .proto: ``*_pb2.py`` (protoc), ``*_pb2.pyi`` (mypy-protobuf's
protoc-gen-mypy) and ``*_pb2_grpc.py`` (grpc_tools). Imports are absolute
(``from kunserve.rpc.v1 import tensor_pb2``) because protoc runs with ``-I proto``.
The output depends on the grpcio-tools (bundled protoc) and mypy-protobuf versions.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE_DIR = Path("kunserve") / "rpc" / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[Path]:
    """The .proto sources, relative to PROTO_ROOT, sorted."""
    return sorted(p.relative_to(PROTO_ROOT) for p in (PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))


def _mypy_plugin() -> str:
    """Path to protoc-gen-mypy: next to the running interpreter, else on PATH."""
    candidate = Path(sys.executable).parent / "protoc-gen-mypy"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("protoc-gen-mypy")
    if found is None:
        raise RuntimeError("protoc-gen-mypy not found; install mypy-protobuf in this environment")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Run grpc_tools.protoc on every proto into out_dir; return the generated files (sorted)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = proto_files()
    if not protos:
        raise RuntimeError(f"no .proto files under {PROTO_ROOT / PROTO_PACKAGE_DIR}")
    well_known = resources.files("grpc_tools") / "_proto"
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(p.as_posix() for p in protos),
    ]
    result = subprocess.run(cmd, cwd=PROTO_ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    outputs = sorted(out_dir / p.parent / (p.stem + suffix) for p in protos for suffix in GENERATED_SUFFIXES)
    missing = [str(p) for p in outputs if not p.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not produce: {', '.join(missing)}")
    return outputs


def stale_files(committed_root: Path = PROTO_ROOT) -> list[str]:
    """Generate into a temp dir and list committed stubs that differ, are missing or are orphaned."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kunserve-stubs-") as tmp:
        tmp_root = Path(tmp)
        fresh = {p.relative_to(tmp_root) for p in generate(tmp_root)}
        for rel in sorted(fresh):
            committed = committed_root / rel
            if not committed.is_file():
                problems.append(f"missing: {rel.as_posix()}")
            elif not filecmp.cmp(tmp_root / rel, committed, shallow=False):
                problems.append(f"stale: {rel.as_posix()}")
    existing = {
        p.relative_to(committed_root)
        for p in (committed_root / PROTO_PACKAGE_DIR).glob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }
    problems.extend(f"orphaned (no .proto): {rel.as_posix()}" for rel in sorted(existing - fresh))
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed stubs instead of writing them"
    )
    args = parser.parse_args(argv)
    if args.check:
        problems = stale_files()
        for line in problems:
            print(line)
        if problems:
            print("stubs are out of date; run: python proto/gen_stubs.py", file=sys.stderr)
            return 1
        print("stubs are up to date")
        return 0
    for path in generate(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
