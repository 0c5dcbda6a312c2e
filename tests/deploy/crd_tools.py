"""Offline checks of the CRDs in deploy/helm/kunserve/crds/ without an API server.

- `structural_errors`: the rules the API server applies to a v1 CRD schema (every node typed, objects
  with properties / additionalProperties, preserve-unknown-fields only where allowed, descriptions).
- `to_jsonschema` / `validation_errors`: the OpenAPI v3 subset translated to JSON Schema draft 4 (whose
  boolean exclusiveMinimum matches OpenAPI 3.0), with unknown fields rejected as `kubectl apply`'s
  default strict field validation does.
- `apply_defaults` and `cel_errors`: structural defaulting and the x-kubernetes-validations rules,
  evaluated with cel-python when it is installed. Kubernetes' CEL environment is a superset of standard
  CEL; the rules here use only standard CEL, so both agree on them.
"""

from __future__ import annotations

import copy
import functools
import importlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "deploy" / "helm" / "kunserve" / "crds"
EXAMPLES_DIR = REPO / "deploy" / "examples"

GROUP = "kunserve.io"
VERSION = "v1alpha1"

Schema = dict[str, Any]


class _K8sLoader(yaml.SafeLoader):
    """YAML as Kubernetes reads it into JSON: timestamps stay strings."""


_K8sLoader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_docs(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=_K8sLoader) if doc is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict)
    return docs[0]


def crd_path(plural: str) -> Path:
    return CRD_DIR / f"{plural}.{GROUP}.yaml"


@functools.cache
def _load_crd_cached(plural: str) -> dict[str, Any]:
    return load_one(crd_path(plural))


def load_crd(plural: str) -> dict[str, Any]:
    """The parsed CRD (a fresh copy: callers may change it)."""
    return copy.deepcopy(_load_crd_cached(plural))


def version_of(crd: dict[str, Any], name: str = VERSION) -> dict[str, Any]:
    for version in crd["spec"]["versions"]:
        if version["name"] == name:
            return version
    raise KeyError(name)


def root_schema(crd: dict[str, Any]) -> Schema:
    schema: Schema = version_of(crd)["schema"]["openAPIV3Schema"]
    return schema


# ---------------------------------------------------------------------------------------------- structure

_JSON_TYPES = {"object", "array", "string", "integer", "number", "boolean"}
_COMBINATORS = ("anyOf", "allOf", "oneOf", "not")
# Keys a schema under anyOf/allOf/oneOf/not may not set in a structural schema.
_FORBIDDEN_IN_COMBINATORS = ("description", "type", "default", "additionalProperties", "nullable", "properties")


def _is_int_or_string_anyof(node: Schema) -> bool:
    return node.get("anyOf") == [{"type": "integer"}, {"type": "string"}]


def structural_errors(root: Schema, preserve_allowed: frozenset[str] = frozenset()) -> list[str]:
    """Violations of the structural-schema rules (plus this project's: a description on every property).

    Paths are dotted from the root, array items written as `[]`, additionalProperties as `{}`."""
    errors: list[str] = []

    def walk(node: Schema, path: str, is_property: bool) -> None:
        where = path or "<root>"
        if not isinstance(node, dict):
            errors.append(f"{where}: schema is not a mapping")
            return
        int_or_string = node.get("x-kubernetes-int-or-string") is True
        preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
        if preserve and path not in preserve_allowed:
            errors.append(f"{where}: x-kubernetes-preserve-unknown-fields is not allowed here")
        if "x-kubernetes-preserve-unknown-fields" in node and not preserve:
            errors.append(f"{where}: x-kubernetes-preserve-unknown-fields must be true when present")
        typ = node.get("type")
        if int_or_string:
            if typ is not None:
                errors.append(f"{where}: x-kubernetes-int-or-string must not set a type")
            if "anyOf" in node and not _is_int_or_string_anyof(node):
                errors.append(f"{where}: int-or-string anyOf must be [integer, string]")
        elif typ not in _JSON_TYPES:
            errors.append(f"{where}: missing or invalid type {typ!r}")
        if is_property and not node.get("description") and path != "metadata":
            errors.append(f"{where}: property has no description")
        for combinator in _COMBINATORS:
            if combinator in node and not (combinator == "anyOf" and int_or_string):
                subs = node[combinator] if isinstance(node[combinator], list) else [node[combinator]]
                for sub in subs:
                    bad = [k for k in _FORBIDDEN_IN_COMBINATORS if k in sub]
                    if bad:
                        errors.append(f"{where}: {combinator} item sets {bad}")
        if "enum" in node:
            pytypes: dict[str, type | tuple[type, ...]] = {
                "string": str,
                "integer": int,
                "number": (int, float),
                "boolean": bool,
            }
            pytype = pytypes.get(typ or "")
            if pytype is None or not all(isinstance(v, pytype) for v in node["enum"]):
                errors.append(f"{where}: enum values {node['enum']!r} do not match type {typ!r}")
        if typ == "object":
            props = node.get("properties")
            addl = node.get("additionalProperties")
            if props is not None and addl is not None:
                errors.append(f"{where}: properties and additionalProperties are mutually exclusive")
            if props is None and addl is None and not preserve and path != "metadata":
                errors.append(f"{where}: object without properties or additionalProperties")
            for name in node.get("required", []):
                if name not in (props or {}):
                    errors.append(f"{where}: required field {name!r} is not a property")
            for name, sub in (props or {}).items():
                walk(sub, f"{path}.{name}" if path else name, True)
            if isinstance(addl, dict):
                walk(addl, f"{path}.{{}}", False)
            if path == "metadata" and props:
                errors.append("metadata: only name and generateName may be constrained (via CEL)")
        elif typ == "array":
            items = node.get("items")
            if not isinstance(items, dict):
                errors.append(f"{where}: array without an items schema")
            else:
                walk(items, f"{path}[]", False)
            list_type = node.get("x-kubernetes-list-type")
            if list_type == "map":
                keys = node.get("x-kubernetes-list-map-keys") or []
                item_required = set((items or {}).get("required", []))
                if not keys:
                    errors.append(f"{where}: list-type map without list-map-keys")
                for key in keys:
                    key_node = (items or {}).get("properties", {}).get(key, {})
                    if key not in item_required and "default" not in key_node:
                        errors.append(f"{where}: list-map key {key!r} must be required or defaulted")
            elif list_type == "set" and (items or {}).get("type") not in {"string", "integer", "number", "boolean"}:
                errors.append(f"{where}: list-type set needs scalar items")
            if node.get("uniqueItems"):
                errors.append(f"{where}: uniqueItems is forbidden in CRDs (use x-kubernetes-list-type: set)")
        elif any(k in node for k in ("properties", "additionalProperties", "items")):
            errors.append(f"{where}: non-object/array node with properties/items")

    walk(root, "", False)
    return errors


def iter_nodes(node: Schema, path: str = "") -> Iterator[tuple[str, Schema]]:
    """Every schema node with its dotted path (as in structural_errors)."""
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from iter_nodes(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("additionalProperties"), dict):
        yield from iter_nodes(node["additionalProperties"], f"{path}.{{}}")
    if isinstance(node.get("items"), dict):
        yield from iter_nodes(node["items"], f"{path}[]")


def resolve_json_path(root: Schema, json_path: str) -> Schema | None:
    """The schema node a simple printer-column JSONPath (`.a.b.c`) points at, or None."""
    if not re.fullmatch(r"(\.[A-Za-z_][A-Za-z0-9_]*)+", json_path):
        return None
    parts = json_path.split(".")[1:]
    if parts[0] == "metadata":
        # ObjectMeta is not in the CRD schema; only the fields printer columns commonly use are accepted.
        known = {"name": "string", "namespace": "string", "creationTimestamp": "date", "generation": "integer"}
        return {"type": known[parts[1]]} if len(parts) == 2 and parts[1] in known else None
    node: Schema | None = root
    for part in parts:
        if node is None or node.get("type") != "object":
            return None
        node = (node.get("properties") or {}).get(part)
    return node


# ------------------------------------------------------------------------------------- JSON Schema view


def to_jsonschema(node: Schema, strict: bool = True) -> Schema:
    """The openAPIV3Schema as a JSON Schema draft 4 document (x-kubernetes-* extensions translated away)."""
    out: Schema = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key in ("description", "default", "example", "nullable"):
            continue
        if key == "properties":
            out[key] = {name: to_jsonschema(sub, strict) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_jsonschema(value, strict)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_jsonschema(sub, strict) for sub in value]
        else:
            out[key] = copy.deepcopy(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if (
        strict
        and node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _jsonschema() -> Any:
    """jsonschema, imported on first use (a test-only dependency; its stubs are not installed)."""
    return importlib.import_module("jsonschema")


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")


def format_checker() -> Any:
    jsonschema = _jsonschema()

    checker = jsonschema.FormatChecker(formats=())

    @checker.checks("date-time")
    def _date_time(value: object) -> bool:
        return not isinstance(value, str) or bool(_RFC3339.match(value))

    @checker.checks("int32")
    def _int32(value: object) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: object) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    return checker


def validator(crd: dict[str, Any]) -> Any:
    jsonschema = _jsonschema()

    schema = to_jsonschema(root_schema(crd))
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema, format_checker=format_checker())


def validation_errors(crd: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    """Schema violations of obj (apiVersion/kind are checked against the CRD too)."""
    errors = [
        f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}" for e in validator(crd).iter_errors(obj)
    ]
    expected_api = f"{crd['spec']['group']}/{VERSION}"
    if obj.get("apiVersion") != expected_api:
        errors.append(f"apiVersion: {obj.get('apiVersion')!r} is not {expected_api!r}")
    if obj.get("kind") != crd["spec"]["names"]["kind"]:
        errors.append(f"kind: {obj.get('kind')!r} is not {crd['spec']['names']['kind']!r}")
    return errors


# ---------------------------------------------------------------------------------- defaulting and CEL


def apply_defaults(node: Schema, value: Any) -> Any:
    """Structural defaulting as the API server does it: a missing property with a default gets it,
    recursively (a defaulted `{}` object then gets its own properties' defaults)."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and node.get("type") == "object":
        for name, sub in (node.get("properties") or {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
        if isinstance(node.get("additionalProperties"), dict):
            for key in value:
                value[key] = apply_defaults(node["additionalProperties"], value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        value = [apply_defaults(node["items"], item) for item in value]
    return value


def _coerce_numbers(node: Schema, value: Any) -> Any:
    """CEL sees `type: number` as double even when the JSON holds an integer."""
    if node.get("type") == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, dict):
        props = node.get("properties") or {}
        addl: Schema = node["additionalProperties"] if isinstance(node.get("additionalProperties"), dict) else {}
        return {k: _coerce_numbers(props.get(k, addl), v) for k, v in value.items()}
    if isinstance(value, list):
        items = node.get("items") or {}
        return [_coerce_numbers(items, v) for v in value]
    return value


def cel_rules(root: Schema) -> list[tuple[str, dict[str, Any]]]:
    """(schema path, rule) for every x-kubernetes-validations entry."""
    return [(path, rule) for path, node in iter_nodes(root) for rule in node.get("x-kubernetes-validations", [])]


def cel_errors(root: Schema, obj: Any, old: Any = None) -> list[str]:
    """Messages of the CEL rules obj violates (after defaulting), evaluated with cel-python.
    Transition rules (those that use oldSelf) run only where `old` has a value at the same place."""
    import celpy

    env = celpy.Environment()
    errors: list[str] = []

    def evaluate(rule: dict[str, Any], node: Schema, value: Any, old_value: Any, where: str) -> None:
        text = rule["rule"]
        uses_old = "oldSelf" in text
        if uses_old and old_value is None:
            return
        activation = {"self": celpy.json_to_cel(_coerce_numbers(node, value))}
        if uses_old:
            activation["oldSelf"] = celpy.json_to_cel(_coerce_numbers(node, old_value))
        result = env.program(env.compile(text)).evaluate(activation)
        if isinstance(result, Exception):
            errors.append(f"{where}: rule {text!r} raised {result!r}")
        elif not bool(result):
            errors.append(f"{where}: {rule.get('message', text)}")

    def walk(node: Schema, value: Any, old_value: Any, where: str) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            evaluate(rule, node, value, old_value, where or "<root>")
        if isinstance(value, dict) and node.get("type") == "object":
            old_map = old_value if isinstance(old_value, dict) else {}
            for name, sub in (node.get("properties") or {}).items():
                if name in value:
                    walk(sub, value[name], old_map.get(name), f"{where}.{name}" if where else name)
            if isinstance(node.get("additionalProperties"), dict):
                for key, item in value.items():
                    walk(node["additionalProperties"], item, old_map.get(key), f"{where}.{key}")
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            # Kubernetes pairs old and new items of map lists by key; by index is enough for these checks.
            old_list = old_value if isinstance(old_value, list) else []
            for i, item in enumerate(value):
                walk(node["items"], item, old_list[i] if i < len(old_list) else None, f"{where}[{i}]")

    walk(root, apply_defaults(root, obj), None if old is None else apply_defaults(root, old), "")
    return errors


def set_path(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of obj with `a.b[0].c` set to value (or deleted when value is DELETE)."""
    out = copy.deepcopy(obj)
    tokens = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    target: Any = out
    for token in tokens[:-1]:
        target = target[int(token[1:-1])] if token.startswith("[") else target.setdefault(token, {})
    last = tokens[-1]
    key: Any = int(last[1:-1]) if last.startswith("[") else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return out


DELETE = object()
