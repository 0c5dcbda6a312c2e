"""The ServingPool and Reconfiguration CRDs and the example manifests, checked without an API server.

Schema validation (types, bounds, enums, required fields, unknown fields) runs with jsonschema on the
openAPIV3Schema. The CEL rules (x-kubernetes-validations) are asserted by exact text here and, when
cel-python is installed, evaluated against the examples and against objects made to break each one; a real
kube-apiserver (or a kind cluster) is what finally enforces them, including CEL's cost limits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.crd_tools import (
    CRD_DIR,
    DELETE,
    EXAMPLES_DIR,
    GROUP,
    VERSION,
    apply_defaults,
    cel_errors,
    cel_rules,
    crd_path,
    iter_nodes,
    load_crd,
    load_docs,
    load_one,
    resolve_json_path,
    root_schema,
    set_path,
    structural_errors,
    to_jsonschema,
    validation_errors,
    version_of,
)

jsonschema = pytest.importorskip("jsonschema")

PLURALS = ("servingpools", "reconfigurations")

EXPECTED_NAMES = {
    "servingpools": {
        "kind": "ServingPool",
        "listKind": "ServingPoolList",
        "plural": "servingpools",
        "singular": "servingpool",
        "shortNames": ["kpool", "ksp"],
        "categories": ["kunserve"],
    },
    "reconfigurations": {
        "kind": "Reconfiguration",
        "listKind": "ReconfigurationList",
        "plural": "reconfigurations",
        "singular": "reconfiguration",
        "shortNames": ["krc", "reconf"],
        "categories": ["kunserve"],
    },
}

EXPECTED_COLUMNS = {
    "servingpools": ["Phase", "Replicas", "Ready", "Groups", "Epoch", "Model", "Age"],
    "reconfigurations": ["Pool", "Action", "Epoch", "Phase", "Manual", "Seconds", "Age"],
}

# Where x-kubernetes-preserve-unknown-fields is allowed: affinity is copied verbatim into the agents'
# StatefulSet, whose own validation then checks it.
PRESERVE_ALLOWED = {"servingpools": frozenset({"spec.affinity"}), "reconfigurations": frozenset()}

EXAMPLES = {
    "servingpool-smollm2.yaml": "servingpools",
    "servingpool-gpu.yaml": "servingpools",
    "servingpool-autoscaling.yaml": "servingpools",
    "reconfiguration-drop.yaml": "reconfigurations",
    "reconfiguration-restore.yaml": "reconfigurations",
}

# Every CEL rule, by schema path, with its exact text and message: the API server evaluates these, so a
# change to any of them must be deliberate (and mirrored by the operator's own spec checks, which kmock
# does not do for it).
EXPECTED_CEL = {
    "servingpools": [
        (
            "",
            "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 40",
            "a ServingPool name must be a DNS-1035 label of at most 40 characters (lower-case letters, digits "
            "and '-', starting with a letter): it prefixes the names of the pool's StatefulSet, Services and pods",
        ),
        (
            "spec",
            "!has(self.elasticity) || (has(self.elasticity.enabled) && !self.elasticity.enabled) || "
            "!has(self.elasticity.maxGroupSize) || self.elasticity.maxGroupSize <= self.replicas",
            "elasticity.maxGroupSize must be <= replicas: a group cannot have more members than the pool has "
            "replicas (maxGroupSize defaults to 4; lower it, or set elasticity.enabled=false for a pool of one "
            "replica)",
        ),
        (
            "spec",
            "!has(self.autoscaling) || !has(self.autoscaling.targetDemand) || !has(self.elasticity) || "
            "(has(self.elasticity.enabled) && !self.elasticity.enabled) || !has(self.elasticity.dropDemand) || "
            "self.autoscaling.targetDemand < self.elasticity.dropDemand",
            "autoscaling.targetDemand must be lower than elasticity.dropDemand: the pool is sized to carry its demand "
            "without drops, and drops only bridge the minutes new replicas need to start",
        ),
        (
            "spec.model",
            "!has(self.source) || self.path == self.source.mountPath || "
            "self.path.startsWith(self.source.mountPath + '/')",
            "model.path must lie inside model.source.mountPath, where the model volume is mounted",
        ),
        (
            "spec.model.source",
            "has(self.pvc) != has(self.hostPath)",
            "model.source needs exactly one of pvc or hostPath",
        ),
        (
            "spec.elasticity",
            "!has(self.restoreDemand) || !has(self.dropDemand) || self.restoreDemand < self.dropDemand",
            "elasticity.restoreDemand must be lower than elasticity.dropDemand (hysteresis: a group restores "
            "only once demand has fallen well below the level that made it drop)",
        ),
        (
            "spec.autoscaling",
            "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
            "autoscaling.minReplicas must be <= autoscaling.maxReplicas",
        ),
    ],
    "reconfigurations": [
        ("spec", "self == oldSelf", "spec is immutable; create a new Reconfiguration with a higher epoch instead"),
        (
            "spec",
            "self.action != 'Drop' || self.groups.all(g, size(g.members) >= 2)",
            "a Drop needs at least 2 members in every group",
        ),
        (
            "spec",
            "self.action != 'Drop' || self.groups.all(g, has(g.stages) && size(g.stages) == size(g.members))",
            "a Drop gives every group exactly one stage per member",
        ),
        (
            "spec.groups[]",
            "!has(self.stages) || self.stages.all(s, s.replica in self.members)",
            "every stage's replica must be one of the group's members",
        ),
        (
            "spec.groups[].stages[]",
            "self.layerStart < self.layerEnd",
            "a stage's layerStart must be lower than its layerEnd (ranges are [layerStart, layerEnd))",
        ),
    ],
}

SMOLLM2_LAYERS = 30


def _example(name: str) -> dict[str, Any]:
    return load_one(EXAMPLES_DIR / name)


def _schema(plural: str) -> dict[str, Any]:
    return root_schema(load_crd(plural))


# ------------------------------------------------------------------------------------------ CRD metadata


def test_crd_dir_holds_exactly_the_two_crds() -> None:
    assert sorted(p.name for p in CRD_DIR.iterdir()) == sorted(crd_path(p).name for p in PLURALS)


@pytest.mark.parametrize("plural", PLURALS)
def test_crd_identity(plural: str) -> None:
    crd = load_crd(plural)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    assert crd["metadata"]["name"] == f"{plural}.{GROUP}"
    spec = crd["spec"]
    assert spec["group"] == GROUP
    assert spec["scope"] == "Namespaced"
    assert spec["names"] == EXPECTED_NAMES[plural]
    assert [v["name"] for v in spec["versions"]] == [VERSION]
    version = version_of(crd)
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"]["status"] == {}
    assert "preserveUnknownFields" not in spec or spec["preserveUnknownFields"] is False


def test_short_names_do_not_collide() -> None:
    taken = {name for plural in PLURALS for name in [*EXPECTED_NAMES[plural]["shortNames"], plural]}
    assert len(taken) == sum(len(EXPECTED_NAMES[p]["shortNames"]) + 1 for p in PLURALS)
    # Short names of built-in resources a `kubectl get` user would type.
    builtin = {
        "po",
        "svc",
        "deploy",
        "sts",
        "ds",
        "rs",
        "cm",
        "ns",
        "no",
        "pv",
        "pvc",
        "sa",
        "ep",
        "ing",
        "hpa",
        "pdb",
        "netpol",
        "crd",
        "sc",
        "rc",
        "cs",
        "ev",
        "limits",
        "quota",
        "psp",
        "csr",
        "pc",
    }
    assert not taken & builtin


def test_servingpool_scale_subresource_points_at_schema_fields() -> None:
    crd = load_crd("servingpools")
    scale = version_of(crd)["subresources"]["scale"]
    root = root_schema(crd)
    assert scale["specReplicasPath"] == ".spec.replicas"
    assert (resolve_json_path(root, scale["specReplicasPath"]) or {}).get("type") == "integer"
    assert (resolve_json_path(root, scale["statusReplicasPath"]) or {}).get("type") == "integer"
    assert (resolve_json_path(root, scale["labelSelectorPath"]) or {}).get("type") == "string"


@pytest.mark.parametrize("plural", PLURALS)
def test_crd_validates_against_the_kubernetes_schema(plural: str) -> None:
    """Strict: every key of every JSONSchemaProps node must be one Kubernetes knows (catches typos)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = load_crd(plural)
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)

    deep_typo = set_path(
        crd,
        "spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.replicas.minimun"
        if plural == "servingpools"
        else "spec.versions[0].schema.openAPIV3Schema.properties.spec.properties.epoch.minimun",
        1,
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deep_typo, kubernetes_validate.latest_version(), strict=True)


# -------------------------------------------------------------------------------------- printer columns


@pytest.mark.parametrize("plural", PLURALS)
def test_printer_columns(plural: str) -> None:
    crd = load_crd(plural)
    root = root_schema(crd)
    columns = version_of(crd)["additionalPrinterColumns"]
    assert [c["name"] for c in columns] == EXPECTED_COLUMNS[plural]
    compatible = {
        "integer": {"integer"},
        "number": {"number", "integer"},
        "string": {"string"},
        "boolean": {"boolean"},
        "date": {"date"},
    }
    for column in columns:
        node = resolve_json_path(root, column["jsonPath"])
        assert node is not None, f"{column['name']}: {column['jsonPath']} is not a field of the schema"
        node_type = "date" if node.get("format") == "date-time" else node.get("type")
        assert node_type in compatible[column["type"]], f"{column['name']}: {column['type']} vs {node}"
        assert column.get("priority", 0) in (0, 1)
        if column["name"] != "Age":
            assert column.get("description"), column["name"]
    assert columns[-1] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def test_resolve_json_path_rejects_what_is_not_there() -> None:
    root = _schema("servingpools")
    assert resolve_json_path(root, ".status.groupz") is None
    assert resolve_json_path(root, ".spec.replicas.value") is None
    assert resolve_json_path(root, ".status.groups[0].id") is None  # not a simple path
    assert resolve_json_path(root, ".metadata.labels") is None
    assert resolve_json_path(root, ".status.groupCount") == root["properties"]["status"]["properties"]["groupCount"]


# ---------------------------------------------------------------------------------------- structural


@pytest.mark.parametrize("plural", PLURALS)
def test_schema_is_structural(plural: str) -> None:
    assert structural_errors(_schema(plural), PRESERVE_ALLOWED[plural]) == []


@pytest.mark.parametrize("plural", PLURALS)
def test_every_list_is_bounded_and_has_a_list_type(plural: str) -> None:
    """CEL's cost estimate needs bounded lists; a list type tells server-side apply how to merge."""
    for path, node in iter_nodes(_schema(plural)):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path}: unbounded list"
            assert "x-kubernetes-list-type" in node, f"{path}: no x-kubernetes-list-type"


def test_structural_checker_finds_violations() -> None:
    bad = {
        "type": "object",
        "properties": {
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "description": "d",
                "properties": {
                    "untyped": {"description": "no type"},
                    "undescribed": {"type": "string"},
                    "free": {"type": "object", "description": "d", "x-kubernetes-preserve-unknown-fields": True},
                    "empty": {"type": "object", "description": "d"},
                    "list": {"type": "array", "description": "d"},
                    "both": {"type": "object", "description": "d", "properties": {}, "additionalProperties": {}},
                    "qty": {"description": "d", "x-kubernetes-int-or-string": True, "type": "string"},
                    "combo": {"type": "string", "description": "d", "anyOf": [{"type": "string"}]},
                    "enum": {"type": "integer", "description": "d", "enum": ["a"]},
                    "uniq": {"type": "array", "description": "d", "uniqueItems": True, "items": {"type": "string"}},
                },
                "required": ["missing"],
            },
        },
    }
    errors = "\n".join(structural_errors(bad))
    for expected in (
        "spec.untyped: missing or invalid type",
        "spec.undescribed: property has no description",
        "spec.free: x-kubernetes-preserve-unknown-fields is not allowed here",
        "spec.empty: object without properties or additionalProperties",
        "spec.list: array without an items schema",
        "spec.both: properties and additionalProperties are mutually exclusive",
        "spec.both.{}: missing or invalid type",
        "spec.qty: x-kubernetes-int-or-string must not set a type",
        "spec.combo: anyOf item sets ['type']",
        "spec.enum: enum values",
        "spec.uniq: uniqueItems is forbidden",
        "spec: required field 'missing' is not a property",
    ):
        assert expected in errors
    assert "spec.free" not in "\n".join(structural_errors(bad, frozenset({"spec.free"})))


@pytest.mark.parametrize("plural", PLURALS)
def test_defaults_satisfy_their_own_schema(plural: str) -> None:
    checked = 0
    for path, node in iter_nodes(_schema(plural)):
        if "default" in node:
            schema = to_jsonschema(node)
            assert not list(jsonschema.Draft4Validator(schema).iter_errors(node["default"])), path
            checked += 1
    assert checked >= (10 if plural == "servingpools" else 1)


def test_condition_schema_is_the_same_in_both_crds_and_has_the_metav1_shape() -> None:
    sp = _schema("servingpools")["properties"]["status"]["properties"]["conditions"]
    rc = _schema("reconfigurations")["properties"]["status"]["properties"]["conditions"]
    assert sp["items"] == rc["items"]
    item = sp["items"]
    assert sorted(item["required"]) == sorted(["type", "status", "lastTransitionTime", "reason", "message"])
    assert set(item["properties"]) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert item["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert sp["x-kubernetes-list-type"] == "map" and sp["x-kubernetes-list-map-keys"] == ["type"]


def test_servingpool_fields_bounds_and_defaults() -> None:
    spec = _schema("servingpools")["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["model", "replicas"]
    assert props["model"]["required"] == ["name", "path"]
    assert props["model"]["properties"]["dtype"]["enum"] == ["float32", "bfloat16", "float16"]
    assert props["model"]["properties"]["dtype"]["default"] == "float32"
    assert (props["replicas"]["minimum"], props["replicas"]["maximum"]) == (1, 1024)
    assert props["devicesPerReplica"]["minimum"] == 1
    el = props["elasticity"]["properties"]
    assert (el["dropDemand"]["minimum"], el["dropDemand"]["maximum"], el["dropDemand"]["default"]) == (0, 4, 0.9)
    assert (el["restoreDemand"]["minimum"], el["restoreDemand"]["maximum"], el["restoreDemand"]["default"]) == (
        0,
        1,
        0.5,
    )
    assert (el["restoreWindowSeconds"]["minimum"], el["restoreWindowSeconds"]["default"]) == (0, 30)
    assert (el["maxGroupSize"]["minimum"], el["maxGroupSize"]["maximum"], el["maxGroupSize"]["default"]) == (2, 64, 4)
    assert el["enabled"]["default"] is True
    eng = props["engine"]["properties"]
    assert eng["blockSize"]["enum"] == [8, 16, 32] and eng["blockSize"]["default"] == 16
    assert (eng["gpuMemoryUtilization"]["minimum"], eng["gpuMemoryUtilization"]["maximum"]) == (0.1, 0.99)
    assert eng["memoryBudgetBytes"]["format"] == "int64"
    for slo in ("ttftSeconds", "tpotSeconds"):
        assert props["slo"]["properties"][slo]["exclusiveMinimum"] is True
    assert props["gateway"]["properties"]["replicas"]["default"] == 1
    assert props["gateway"]["properties"]["apiKeySecretRef"]["required"] == ["name", "key"]
    for kind in ("requests", "limits"):
        quantity = props["resources"]["properties"][kind]["additionalProperties"]
        assert quantity["x-kubernetes-int-or-string"] is True
    status = _schema("servingpools")["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Ready", "Degraded", "Reconfiguring", "Failed"]


def test_reconfiguration_fields_bounds() -> None:
    spec = _schema("reconfigurations")["properties"]["spec"]
    props = spec["properties"]
    assert spec["required"] == ["pool", "epoch", "action", "groups"]
    assert props["epoch"]["minimum"] == 1
    assert props["action"]["enum"] == ["Drop", "Restore"]
    assert props["groups"]["minItems"] == 1
    stage = props["groups"]["items"]["properties"]["stages"]["items"]["properties"]
    assert stage["layerStart"]["minimum"] == 0 and stage["layerEnd"]["minimum"] == 1
    status = _schema("reconfigurations")["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == ["Pending", "Preparing", "Committed", "Completed", "Failed", "RolledBack"]
    assert set(status["timings"]["properties"]) == {
        "startedAt",
        "preparedAt",
        "committedAt",
        "completedAt",
        "prepareSeconds",
        "commitSeconds",
        "totalSeconds",
    }


# ------------------------------------------------------------------------------------------------ CEL


@pytest.mark.parametrize("plural", PLURALS)
def test_cel_rules_are_exactly_the_expected_ones(plural: str) -> None:
    found = [(path, rule["rule"], rule["message"]) for path, rule in cel_rules(_schema(plural))]
    assert found == EXPECTED_CEL[plural]


@pytest.mark.parametrize("plural", PLURALS)
def test_cel_rules_reference_fields_that_exist(plural: str) -> None:
    """Every `self.a.b` chain in a rule names properties of the node the rule sits on."""
    methods = {"all", "exists", "exists_one", "map", "filter", "startsWith", "endsWith", "matches", "contains", "size"}
    root = _schema(plural)
    nodes = dict(iter_nodes(root))
    checked = 0
    for path, rule in cel_rules(root):
        for chain in re.findall(r"\b(?:self|oldSelf)((?:\.[A-Za-z_]\w*)+)", rule["rule"]):
            node: dict[str, Any] | None = nodes[path]
            for part in chain.split(".")[1:]:
                if part in methods:
                    break
                if path == "" and part == "metadata":
                    break  # metadata.name is always available to root rules
                assert node is not None and node.get("type") == "object", f"{path}: {chain}"
                node = (node.get("properties") or {}).get(part)
                assert node is not None, f"{path}: {chain} names no field ({part})"
                checked += 1
    assert checked > 0


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_pass_the_cel_rules(name: str) -> None:
    pytest.importorskip("celpy")
    assert cel_errors(_schema(EXAMPLES[name]), _example(name)) == []


CEL_VIOLATIONS: list[tuple[str, str, Any, str]] = [
    # (example, path, value, message fragment): each object passes the schema and breaks one CEL rule
    ("servingpool-smollm2.yaml", "spec.elasticity.restoreDemand", 0.95, "restoreDemand must be lower"),
    ("servingpool-smollm2.yaml", "spec.elasticity.dropDemand", 0.5, "restoreDemand must be lower"),
    ("servingpool-gpu.yaml", "spec.replicas", 3, "maxGroupSize must be <= replicas"),
    ("servingpool-smollm2.yaml", "spec.elasticity", DELETE, "maxGroupSize must be <= replicas"),  # default 4 > 2
    ("servingpool-smollm2.yaml", "spec.model.path", "/data/smollm2-135m", "must lie inside model.source.mountPath"),
    ("servingpool-smollm2.yaml", "spec.model.path", "/models-old/smollm2", "must lie inside model.source.mountPath"),
    ("servingpool-smollm2.yaml", "spec.model.source.pvc", {"claimName": "models"}, "exactly one of pvc or hostPath"),
    ("servingpool-smollm2.yaml", "spec.model.source.hostPath", DELETE, "exactly one of pvc or hostPath"),
    ("servingpool-smollm2.yaml", "metadata.name", "a" * 41, "DNS-1035 label of at most 40"),
    ("servingpool-smollm2.yaml", "metadata.name", "2pool", "DNS-1035 label of at most 40"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.minReplicas", 7, "minReplicas must be <= autoscaling.max"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.targetDemand", 0.95, "targetDemand must be lower"),
    (
        "reconfiguration-drop.yaml",
        "spec.groups[0]",
        {
            "id": "g1",
            "members": ["smollm2-agent-0"],
            "stages": [{"replica": "smollm2-agent-0", "layerStart": 0, "layerEnd": 30}],
        },
        "at least 2 members",
    ),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages", DELETE, "one stage per member"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[1].replica", "smollm2-agent-7", "one of the group's members"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[1].layerStart", 30, "layerStart must be lower"),
    ("reconfiguration-restore.yaml", "spec.groups[0].stages[0].layerEnd", 0, "layerStart must be lower"),
]


@pytest.mark.parametrize(("name", "path", "value", "fragment"), CEL_VIOLATIONS)
def test_cel_rules_reject(name: str, path: str, value: Any, fragment: str) -> None:
    pytest.importorskip("celpy")
    plural = EXAMPLES[name]
    obj = set_path(_example(name), path, value)
    schema_errors = validation_errors(load_crd(plural), obj)
    # layerEnd 0 breaks the schema's minimum too; every other case is schema-valid and only CEL catches it.
    if not (path.endswith("layerEnd") and value == 0):
        assert schema_errors == []
    errors = cel_errors(_schema(plural), obj)
    assert len(errors) == 1 and fragment in errors[0], errors


def test_cel_allows_one_replica_pools_with_elasticity_off() -> None:
    pytest.importorskip("celpy")
    obj = set_path(_example("servingpool-smollm2.yaml"), "spec.replicas", 1)
    assert cel_errors(_schema("servingpools"), obj)  # maxGroupSize 2 > 1 replica
    obj = set_path(obj, "spec.elasticity", {"enabled": False})
    assert cel_errors(_schema("servingpools"), obj) == []
    assert validation_errors(load_crd("servingpools"), obj) == []


def test_cel_reconfiguration_spec_is_immutable() -> None:
    pytest.importorskip("celpy")
    schema = _schema("reconfigurations")
    old = _example("reconfiguration-drop.yaml")
    assert cel_errors(schema, old, old=old) == []
    status_only = set_path(old, "status", {"phase": "Preparing"})
    assert cel_errors(schema, status_only, old=old) == []
    changed = set_path(old, "spec.epoch", 5)
    assert cel_errors(schema, changed, old=old) == [
        "spec: spec is immutable; create a new Reconfiguration with a higher epoch instead"
    ]


def test_defaulting_fills_nested_defaults_of_an_omitted_elasticity() -> None:
    obj = set_path(_example("servingpool-smollm2.yaml"), "spec.elasticity", DELETE)
    obj = set_path(obj, "spec.engine", DELETE)
    spec = apply_defaults(_schema("servingpools"), obj)["spec"]
    assert spec["elasticity"] == {
        "enabled": True,
        "dropDemand": 0.9,
        "restoreDemand": 0.5,
        "restoreWindowSeconds": 30,
        "maxGroupSize": 4,
    }
    assert "engine" not in spec  # engine has no default of its own: the agent's defaults apply
    assert spec["model"]["source"]["mountPath"] == "/models"


# ------------------------------------------------------------------------------------------- examples


def test_examples_dir_holds_the_documented_examples() -> None:
    assert set(EXAMPLES) <= {p.name for p in EXAMPLES_DIR.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_validates_against_its_crd(name: str) -> None:
    docs = load_docs(EXAMPLES_DIR / name)
    assert len(docs) == 1
    assert validation_errors(load_crd(EXAMPLES[name]), docs[0]) == []


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_explains_its_fields(name: str) -> None:
    text = (EXAMPLES_DIR / name).read_text(encoding="utf-8")
    assert text.startswith("#")
    assert text.count("#") >= 8, "examples explain the fields a user changes in comments"
    assert "kubectl apply -f deploy/examples/" + name in text


def test_smollm2_example_is_a_cpu_pool_of_two() -> None:
    spec = _example("servingpool-smollm2.yaml")["spec"]
    assert spec["replicas"] == 2
    assert spec["model"]["dtype"] == "float32"
    assert spec["engine"]["memoryBudgetBytes"] > 542_000_000  # above the fp32 weights
    assert "gpuMemoryUtilization" not in spec["engine"]
    assert not any("nvidia.com/gpu" in spec["resources"].get(k, {}) for k in ("requests", "limits"))


def test_gpu_example_asks_for_one_gpu_per_replica() -> None:
    spec = _example("servingpool-gpu.yaml")["spec"]
    assert spec["replicas"] == 8
    assert spec["devicesPerReplica"] == 1
    assert spec["elasticity"]["maxGroupSize"] == 4
    assert spec["resources"]["limits"]["nvidia.com/gpu"] == spec["devicesPerReplica"]


@pytest.mark.parametrize("name", ["reconfiguration-drop.yaml", "reconfiguration-restore.yaml"])
def test_reconfiguration_examples_split_smollm2_in_two(name: str) -> None:
    pool = _example("servingpool-smollm2.yaml")
    spec = _example(name)["spec"]
    assert spec["pool"] == pool["metadata"]["name"]
    assert spec["manual"] is True
    (group,) = spec["groups"]
    replicas = {f"{pool['metadata']['name']}-agent-{i}" for i in range(pool["spec"]["replicas"])}
    assert len(group["members"]) == 2 and set(group["members"]) <= replicas
    stages = group["stages"]
    assert [s["replica"] for s in stages] == group["members"]
    assert [(s["layerStart"], s["layerEnd"]) for s in stages] == [(0, 15), (15, SMOLLM2_LAYERS)]


def test_restore_example_undoes_the_drop_example() -> None:
    drop = _example("reconfiguration-drop.yaml")["spec"]
    restore = _example("reconfiguration-restore.yaml")["spec"]
    assert (drop["action"], restore["action"]) == ("Drop", "Restore")
    assert restore["epoch"] > drop["epoch"]
    assert restore["groups"] == drop["groups"]


# ---------------------------------------------------------------------------- what the schema rejects

SCHEMA_VIOLATIONS: list[tuple[str, str, Any, str]] = [
    # (example, path, value, message fragment)
    ("servingpool-smollm2.yaml", "spec.replicas", 0, "less than the minimum of 1"),
    ("servingpool-smollm2.yaml", "spec.replicas", 1025, "greater than the maximum of 1024"),
    ("servingpool-smollm2.yaml", "spec.replicas", "2", "is not of type 'integer'"),
    ("servingpool-smollm2.yaml", "spec.replicas", DELETE, "'replicas' is a required property"),
    ("servingpool-smollm2.yaml", "spec.model.path", DELETE, "'path' is a required property"),
    ("servingpool-smollm2.yaml", "spec.model.name", "", "should be non-empty"),
    ("servingpool-smollm2.yaml", "spec.model.dtype", "int8", "is not one of"),
    ("servingpool-smollm2.yaml", "spec.model.source.mountPath", "models", "does not match"),
    ("servingpool-smollm2.yaml", "spec.devicesPerReplica", 0, "less than the minimum of 1"),
    ("servingpool-smollm2.yaml", "spec.elasticity.restoreDemand", 1.5, "greater than the maximum of 1"),
    ("servingpool-smollm2.yaml", "spec.elasticity.dropDemand", -0.1, "less than the minimum of 0"),
    ("servingpool-smollm2.yaml", "spec.elasticity.dropDemand", 4.5, "greater than the maximum of 4"),
    ("servingpool-smollm2.yaml", "spec.elasticity.restoreWindowSeconds", -1, "less than the minimum of 0"),
    ("servingpool-smollm2.yaml", "spec.elasticity.maxGroupSize", 1, "less than the minimum of 2"),
    ("servingpool-smollm2.yaml", "spec.elasticity.maxGroupSize", 65, "greater than the maximum of 64"),
    ("servingpool-smollm2.yaml", "spec.elasticity.enabled", "yes", "is not of type 'boolean'"),
    ("servingpool-smollm2.yaml", "spec.engine.blockSize", 12, "is not one of [8, 16, 32]"),
    ("servingpool-smollm2.yaml", "spec.engine.memoryBudgetBytes", 1.5e9, "is not of type 'integer'"),
    ("servingpool-smollm2.yaml", "spec.engine.memoryBudgetBytes", 2**63, "is not a 'int64'"),
    ("servingpool-gpu.yaml", "spec.engine.gpuMemoryUtilization", 1.0, "greater than the maximum of 0.99"),
    ("servingpool-gpu.yaml", "spec.engine.gpuMemoryUtilization", 0.05, "less than the minimum of 0.1"),
    ("servingpool-gpu.yaml", "spec.slo.ttftSeconds", 0, "less than or equal to the minimum of 0"),
    ("servingpool-gpu.yaml", "spec.resources.limits.memory", "lots", "does not match"),
    ("servingpool-gpu.yaml", "spec.resources.limits.nvidia.com/gpu", [1], "is not valid under any of the given"),
    ("servingpool-gpu.yaml", "spec.gateway.apiKeySecretRef.key", DELETE, "'key' is a required property"),
    ("servingpool-gpu.yaml", "spec.gateway.replicas", 0, "less than the minimum of 1"),
    ("servingpool-gpu.yaml", "spec.tolerations[0].operator", "Matches", "is not one of"),
    ("servingpool-smollm2.yaml", "spec.replica", 2, "Additional properties are not allowed ('replica'"),
    ("servingpool-smollm2.yaml", "spec.elasticity.dropDemmand", 0.8, "Additional properties are not allowed"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.maxReplicas", DELETE, "'maxReplicas' is a required"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.maxReplicas", 1025, "greater than the maximum of 1024"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.targetDemand", 0, "less than or equal to the minimum of 0"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.driver", "KEDA", "is not one of"),
    ("servingpool-autoscaling.yaml", "spec.autoscaling.scaleDownStabilizationSeconds", -1, "less than the minimum"),
    ("servingpool-smollm2.yaml", "status.phase", "Running", "is not one of"),
    ("servingpool-smollm2.yaml", "status.epoch", -1, "less than the minimum of 0"),
    (
        "servingpool-smollm2.yaml",
        "status.conditions",
        [
            {
                "type": "Ready",
                "status": "Maybe",
                "reason": "X",
                "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        ],
        "is not one of",
    ),
    (
        "servingpool-smollm2.yaml",
        "status.conditions",
        [{"type": "Ready", "status": "True", "reason": "X", "message": "", "lastTransitionTime": "yesterday"}],
        "is not a 'date-time'",
    ),
    ("servingpool-smollm2.yaml", "status.groups", [{"id": "g1", "members": ["a", "b"]}], "'epoch' is a required"),
    ("servingpool-smollm2.yaml", "kind", "ServingPools", "is not 'ServingPool'"),
    ("servingpool-smollm2.yaml", "apiVersion", "kunserve.io/v1", "is not 'kunserve.io/v1alpha1'"),
    ("reconfiguration-drop.yaml", "spec.action", "Explode", "'Explode' is not one of ['Drop', 'Restore']"),
    ("reconfiguration-drop.yaml", "spec.action", DELETE, "'action' is a required property"),
    ("reconfiguration-drop.yaml", "spec.epoch", 0, "less than the minimum of 1"),
    ("reconfiguration-drop.yaml", "spec.pool", DELETE, "'pool' is a required property"),
    ("reconfiguration-drop.yaml", "spec.pool", "SmolLM2", "does not match"),
    ("reconfiguration-drop.yaml", "spec.groups", [], "should be non-empty"),
    ("reconfiguration-drop.yaml", "spec.groups[0].members", [], "should be non-empty"),
    ("reconfiguration-drop.yaml", "spec.groups[0].members", ["smollm2-agent-0", "smollm2-agent-0"], "non-unique"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[0].layerStart", -1, "less than the minimum of 0"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[1].layerEnd", 0, "less than the minimum of 1"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[0].layerStart", "0", "is not of type 'integer'"),
    ("reconfiguration-drop.yaml", "spec.groups[0].stages[0].replica", DELETE, "'replica' is a required property"),
    (
        "reconfiguration-drop.yaml",
        "spec.pressure",
        [{"replica": "smollm2-agent-0", "blocksNeeded": 10, "blocksTotal": 8, "demand": -1.0}],
        "less than the minimum of 0",
    ),
    ("reconfiguration-drop.yaml", "spec.pressure", [{"replica": "smollm2-agent-0"}], "'blocksNeeded' is a required"),
    ("reconfiguration-drop.yaml", "status.phase", "Done", "is not one of"),
    ("reconfiguration-drop.yaml", "status.timings.prepareSeconds", -0.5, "less than the minimum of 0"),
    ("reconfiguration-drop.yaml", "status.timings.preparedAt", "not a time", "is not a 'date-time'"),
    ("reconfiguration-drop.yaml", "status.attempts", -1, "less than the minimum of 0"),
]


@pytest.mark.parametrize(("name", "path", "value", "fragment"), SCHEMA_VIOLATIONS)
def test_schema_rejects(name: str, path: str, value: Any, fragment: str) -> None:
    obj = set_path(_example(name), path, value) if "nvidia.com/gpu" not in path else _set_gpu(name, value)
    errors = validation_errors(load_crd(EXAMPLES[name]), obj)
    assert errors, f"{path}={value!r} was accepted"
    assert any(fragment in e for e in errors), errors


def _set_gpu(name: str, value: Any) -> dict[str, Any]:
    obj = _example(name)
    obj["spec"]["resources"]["limits"]["nvidia.com/gpu"] = value
    return obj


def test_a_full_status_written_by_the_operator_validates() -> None:
    """The status shapes the operator writes (see the CRD descriptions) pass their schemas."""
    pool = _example("servingpool-smollm2.yaml")
    pool["status"] = {
        "phase": "Reconfiguring",
        "observedGeneration": 3,
        "epoch": 1,
        "replicas": 2,
        "readyReplicas": 2,
        "selector": "kunserve.io/pool=smollm2,app.kubernetes.io/component=agent",
        "modelLayers": 30,
        "groupCount": 1,
        "lastReconfiguration": "smollm2-drop-1",
        "groups": [
            {
                "id": "g1",
                "members": ["smollm2-agent-0", "smollm2-agent-1"],
                "epoch": 1,
                "state": "Cooperative",
                "reconfiguration": "smollm2-drop-1",
                "stages": [
                    {"replica": "smollm2-agent-0", "layerStart": 0, "layerEnd": 15},
                    {"replica": "smollm2-agent-1", "layerStart": 15, "layerEnd": 30},
                ],
            }
        ],
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "AllReplicasReady",
                "message": "2/2 replicas ready",
                "lastTransitionTime": "2026-11-25T10:00:00Z",
                "observedGeneration": 3,
            },
            {
                "type": "Reconfiguring",
                "status": "True",
                "reason": "Drop",
                "message": "epoch 1",
                "lastTransitionTime": "2026-11-25T10:05:00.123456+00:00",
            },
        ],
    }
    assert validation_errors(load_crd("servingpools"), pool) == []
    rc = _example("reconfiguration-drop.yaml")
    rc["status"] = {
        "phase": "Completed",
        "observedGeneration": 1,
        "message": "2 members committed epoch 1",
        "attempts": 1,
        "timings": {
            "startedAt": "2026-11-25T10:05:00Z",
            "preparedAt": "2026-11-25T10:05:00.2Z",
            "committedAt": "2026-11-25T10:05:00.3Z",
            "completedAt": "2026-11-25T10:05:02Z",
            "prepareSeconds": 0.2,
            "commitSeconds": 0.1,
            "totalSeconds": 2,
        },
        "conditions": [
            {
                "type": "Completed",
                "status": "True",
                "reason": "KVExchanged",
                "message": "",
                "lastTransitionTime": "2026-11-25T10:05:02Z",
            }
        ],
    }
    assert validation_errors(load_crd("reconfigurations"), rc) == []


def test_yaml_timestamps_stay_strings(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("at: 2026-11-25T10:00:00Z\n", encoding="utf-8")
    assert load_one(path) == {"at": "2026-11-25T10:00:00Z"}
