"""The committed gRPC/protobuf stubs match the .proto files, and every .proto element is commented."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"
PROTO_DIR = PROTO_ROOT / "kunserve" / "rpc" / "v1"
PROTOS = sorted(PROTO_DIR.glob("*.proto"))


def _load_gen_stubs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kunserve_gen_stubs", PROTO_ROOT / "gen_stubs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen_stubs = _load_gen_stubs()


def test_protos_exist() -> None:
    assert {p.name for p in PROTOS} >= {"tensor.proto", "inference.proto"}


def test_committed_stubs_are_up_to_date(tmp_path: Path) -> None:
    generated = gen_stubs.generate(tmp_path)
    assert generated, "generate() produced nothing"
    stale = []
    for path in generated:
        rel = path.relative_to(tmp_path)
        committed = PROTO_ROOT / rel
        if not committed.is_file():
            stale.append(f"missing: {rel}")
        elif committed.read_bytes() != path.read_bytes():
            stale.append(f"stale: {rel}")
    # Generated files without a .proto left behind.
    fresh = {p.relative_to(tmp_path) for p in generated}
    for path in PROTO_DIR.iterdir():
        if path.name.endswith(gen_stubs.GENERATED_SUFFIXES) and path.relative_to(PROTO_ROOT) not in fresh:
            stale.append(f"orphaned: {path.relative_to(PROTO_ROOT)}")
    assert not stale, "stubs out of date, run `python proto/gen_stubs.py`:\n" + "\n".join(stale)


def test_check_mode_passes() -> None:
    assert gen_stubs.main(["--check"]) == 0


_DECLARATION = re.compile(
    r"""^\s*(?:
        (?:message|service|enum|oneof)\s+\w+\s*\{        # message / service / enum / oneof
      | rpc\s+\w+\s*\(                                  # rpc
      | (?:(?:optional|repeated)\s+)?                   # field: [label] type name = N;
        (?:map\s*<[^>]*>|[\w.]+)\s+\w+\s*=\s*\d+\s*(?:\[[^\]]*\])?\s*;
      | \w+\s*=\s*-?\d+\s*(?:\[[^\]]*\])?\s*;             # enum value: NAME = N;
    )""",
    re.VERBOSE,
)


def _uncommented(text: str) -> list[str]:
    missing = []
    previous = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if _DECLARATION.match(line) and not stripped.startswith("option ") and not previous.startswith("//"):
            missing.append(f"{lineno}: {stripped}")
        previous = stripped
    return missing


def test_comment_checker_catches_uncommented_field() -> None:
    text = "// m\nmessage M {\n  // a\n  int32 a = 1;\n\n  repeated string b = 2;\n}\n"
    assert _uncommented(text) == ["6: repeated string b = 2;"]
    assert _uncommented("enum E {\n  E_X = 0;\n}\n") == ["1: enum E {", "2: E_X = 0;"]
    assert _uncommented("service S {\n  // r\n  rpc R(A) returns (stream B);\n}\n") == ["1: service S {"]


@pytest.mark.parametrize("proto", PROTOS, ids=lambda p: p.name)
def test_every_declaration_is_commented(proto: Path) -> None:
    text = proto.read_text()
    declarations = [line for line in text.splitlines() if _DECLARATION.match(line)]
    assert declarations, f"{proto.name}: found no declarations; the checker is broken"
    missing = _uncommented(text)
    assert not missing, f"{proto.name}: declarations without a // comment directly above:\n" + "\n".join(
        missing
    )
