"""The Helm chart (deploy/helm/kunserve), rendered by Helm's own engine: lint, Kubernetes schemas, the values
schema, security settings, and agreement with the code it configures (operator naming, flags, settings)."""

from __future__ import annotations

import argparse
import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kunserve.gateway import gateway_cmd
from kunserve.operator import config as operator_config
from kunserve.operator import operator_cmd
from kunserve.operator.config import OperatorConfig
from kunserve.operator.manifests import pool_children
from kunserve.operator.naming import (
    AGENT_GRPC_PORT,
    AGENT_METRICS_PORT,
    GATEWAY_HTTP_PORT,
    LABEL_POOL,
    Component,
    labels,
)
from kunserve.operator.validation import parse_pool
from tests.deploy.crd_tools import EXAMPLES_DIR, load_crd, validation_errors
from tests.deploy.helm_tools import (
    CHART,
    RELEASE_NAMESPACE,
    VALUES_ALL,
    by_kind,
    one,
    render,
    render_docs,
    render_module,
    values_file,
)

KUBE_VERSIONS = ("1.30.0", "1.37.0")  # the oldest the chart supports (Chart.yaml kubeVersion) and the newest known
VALUES_KIND = EXAMPLES_DIR / "values-kind.yaml"
# Flags and settings the chart passes for gRPC TLS; the commands do not parse them yet (docs/kubernetes.md).
PENDING_TLS_FLAGS: set[str] = set()  # every --tls-* flag is read by the commands now
PENDING_TLS_ENV: set[str] = set()
CASES = {"defaults": lambda: {}, "all-on": lambda: values_file(VALUES_ALL), "kind": lambda: values_file(VALUES_KIND)}


def _values(case: str) -> dict[str, Any]:
    return CASES[case]()


def _pods(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
            for d in docs if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")]


def _container(docs: list[dict[str, Any]], name_suffix: str) -> dict[str, Any]:
    container: dict[str, Any] = one(docs, "Deployment", name_suffix)["spec"]["template"]["spec"]["containers"][0]
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# ----------------------------------------------------------------------------------------- render and lint


@pytest.mark.parametrize("case", sorted(CASES))
def test_chart_renders_and_lints_clean(case: str) -> None:
    assert render_module().lint(_values(case)) == []
    docs = render_docs(_values(case))
    assert one(docs, "Deployment", "-operator")
    names = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects of the same kind and name"


def test_default_render_is_the_minimal_install() -> None:
    kinds = sorted(d["kind"] for d in render_docs({}))
    assert kinds == sorted(["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "Deployment",
                            "PodDisruptionBudget", "Service", "ServiceAccount", "StatefulSet"])


def test_all_on_renders_every_template() -> None:
    rendered = render(values_file(VALUES_ALL))
    templates = {p.name for p in (CHART / "templates").glob("*.yaml")}
    empty = sorted(name.rsplit("/", 1)[-1] for name, text in rendered.items()
                   if name.rsplit("/", 1)[-1] in templates and not any(yaml.safe_load_all(text)))
    assert empty == [], "values-all.yaml must turn every option on"
    assert {name.rsplit("/", 1)[-1] for name in rendered} >= templates


def test_template_files_are_named_kind_component() -> None:
    for path in (CHART / "templates").glob("*.yaml"):
        docs = [d for d in yaml.safe_load_all(render(values_file(VALUES_ALL))[f"kunserve/templates/{path.name}"]) if d]
        kinds = {d["kind"].lower() for d in docs}
        assert path.stem.split("-")[0] in kinds, f"{path.name} holds {kinds}"


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(case: str, kube_version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    custom = {"ServingPool", "ServiceMonitor", "Certificate"}
    for doc in render_docs(_values(case)):
        if doc["kind"] in custom:
            continue  # checked below against their own schemas
        try:
            kubernetes_validate.validate(doc, kube_version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({kube_version}): {exc}")


def test_the_operators_manifests_validate_against_the_kubernetes_schemas() -> None:
    """What the chart's operator creates for the examples (the agents' StatefulSet etc.) is valid too."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    config = OperatorConfig.from_env({"KUNSERVE_GATEWAY_API_KEYS": "kunserve-api-keys/keys"})
    for example in ("servingpool-smollm2.yaml", "servingpool-gpu.yaml"):
        body = yaml.safe_load((EXAMPLES_DIR / example).read_text(encoding="utf-8"))
        body["metadata"].update(namespace="serving", uid="00000000-0000-0000-0000-000000000001")
        for manifest in pool_children(parse_pool(body), config):
            for version in KUBE_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize(("case", "expected"), [
    ("all-on", [("llama-8b", RELEASE_NAMESPACE), ("smollm2", "staging")]),
    ("kind", [("smollm2", RELEASE_NAMESPACE)]),
])
def test_pools_render_as_servingpools_valid_under_the_crd(case: str, expected: list[tuple[str, str]]) -> None:
    pools = by_kind(render_docs(_values(case)), "ServingPool")
    assert [(p["metadata"]["name"], p["metadata"]["namespace"]) for p in pools] == expected
    for pool in pools:
        assert validation_errors(load_crd("servingpools"), pool) == []
        parse_pool({**pool, "metadata": {**pool["metadata"], "uid": "u"}})  # and the operator accepts it


def test_servicemonitors_select_what_the_operator_creates() -> None:
    """Selectors and port names agree with the Services that manifests.py builds."""
    body = yaml.safe_load((EXAMPLES_DIR / "servingpool-smollm2.yaml").read_text(encoding="utf-8"))
    body["metadata"].update(namespace="serving", uid="u")
    services = {m["metadata"]["name"]: m for m in pool_children(parse_pool(body), OperatorConfig())
                if m["kind"] == "Service"}
    docs = render_docs(values_file(VALUES_ALL))
    for monitor, service_name in (("-agents", "smollm2-agents"), ("-gateways", "smollm2-gateway")):
        sm = one(docs, "ServiceMonitor", monitor)
        assert sm["apiVersion"] == "monitoring.coreos.com/v1"
        service = services[service_name]
        selector = sm["spec"]["selector"]["matchLabels"]
        assert selector.items() <= service["metadata"]["labels"].items(), (selector, service["metadata"]["labels"])
        (endpoint,) = sm["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["relabelings"][0]["sourceLabels"] == [
            "__meta_kubernetes_service_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", LABEL_POOL)]
        assert LABEL_POOL in service["metadata"]["labels"]
        assert sm["spec"]["namespaceSelector"] == {"matchNames": ["serving", "staging"]}
    gateway_service = one(docs, "Service", "ks-gateway")
    assert {"app.kubernetes.io/component": "gateway", "app.kubernetes.io/part-of": "kunserve"}.items() <= \
        gateway_service["metadata"]["labels"].items()


def test_certificate_is_a_server_and_client_certificate() -> None:
    cert = one(render_docs(values_file(VALUES_ALL)), "Certificate")
    assert cert["apiVersion"] == "cert-manager.io/v1"
    spec = cert["spec"]
    assert spec["secretName"] == "ks-tls"
    assert {"server auth", "client auth"} <= set(spec["usages"])
    assert spec["dnsNames"][0] == spec["commonName"] == "kunserve-internal"
    assert spec["issuerRef"] == {"name": "kunserve-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


# -------------------------------------------------------------------------- agreement with the code


def test_ports_and_labels_match_the_operators_naming() -> None:
    docs = render_docs(values_file(VALUES_ALL))
    agent_labels = labels("llama-8b", Component.AGENT)
    gateway_labels = labels("llama-8b", Component.GATEWAY)
    for policy in [d for d in by_kind(docs, "NetworkPolicy") if d["metadata"]["name"].endswith("-agents")]:
        ports = [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]]
        assert ports == [AGENT_GRPC_PORT, AGENT_METRICS_PORT]
    policy = one(docs, "NetworkPolicy", "llama-8b-agents")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= agent_labels.items()
    peers = policy["spec"]["ingress"][0]["from"]
    assert peers[0]["podSelector"]["matchLabels"].items() <= agent_labels.items()
    assert peers[1]["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert not peers[0]["podSelector"]["matchLabels"].items() <= labels("smollm2", Component.AGENT).items()
    fallback = one(docs, "NetworkPolicy", "ks-agents")["spec"]["podSelector"]
    assert fallback["matchLabels"].items() <= labels("other", Component.AGENT).items()
    assert fallback["matchExpressions"] == [{"key": LABEL_POOL, "operator": "NotIn", "values": ["llama-8b"]}]
    pdb = one(docs, "PodDisruptionBudget", "llama-8b-agents")["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= agent_labels.items()
    gateway = _container(docs, "ks-gateway")
    assert gateway["ports"] == [{"name": "http", "containerPort": GATEWAY_HTTP_PORT, "protocol": "TCP"}]


def _parse(add_arguments: Any, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    try:
        return parser.parse_args(argv)
    except (argparse.ArgumentError, SystemExit) as exc:
        raise AssertionError(f"the command rejects {argv}: {exc}") from exc


def _split_pending(command: list[str], tls: bool) -> list[str]:
    pending = [a for a in command if a.split("=", 1)[0] in PENDING_TLS_FLAGS]
    assert {a.split("=", 1)[0] for a in pending} == (PENDING_TLS_FLAGS if tls else set())
    return [a for a in command if a not in pending]


@pytest.mark.parametrize("case", ["defaults", "all-on"])
def test_the_operator_command_and_settings_are_ones_the_operator_reads(case: str) -> None:
    docs = render_docs(_values(case))
    container = _container(docs, "-operator")
    command = container["command"]
    assert command[:2] == ["kunserve", "operator"]
    args = _parse(operator_cmd.add_arguments, _split_pending(command[2:], tls=case == "all-on"))
    assert args.standalone and args.liveness.endswith(":8080/healthz")
    env = _env(container)
    read = set(re.findall(r'"(KUNSERVE_[A-Z_]+)"', Path(operator_config.__file__).read_text(encoding="utf-8")))
    chart_env = {name for name in env if name.startswith("KUNSERVE_")}
    assert chart_env - read <= PENDING_TLS_ENV, chart_env - read
    plain = {name: e["value"] for name, e in env.items() if name in read and "value" in e}
    config = OperatorConfig.from_env(plain)
    if case == "defaults":
        assert config.agent_image == "kunserve:0.1.0"
        assert config.effective_gateway_image == "kunserve-control:0.1.0"
        assert config.redis_url == f"redis://kunserve-redis.{RELEASE_NAMESPACE}.svc:6379/0"
        assert config.gateway_api_keys is None
    else:
        assert config.agent_image == "registry.example/kunserve:0.1.0-cuda"
        assert config.effective_gateway_image == "registry.example/kunserve-control:0.1.0"
        assert config.image_pull_policy is not None and config.image_pull_policy.value == "IfNotPresent"
        assert (config.gateway_api_keys.name, config.gateway_api_keys.key) == ("ks-api-keys", "keys")  # type: ignore[union-attr]
        assert config.resync_interval_s == 30


def test_the_release_gateway_command_is_one_kunserve_gateway_accepts() -> None:
    docs = render_docs(values_file(VALUES_ALL))
    container = _container(docs, "ks-gateway")
    command = [a.replace("$(KUNSERVE_REDIS_URL)", "redis://r:6379/0") for a in container["command"]]
    assert command[:2] == ["kunserve", "gateway"]
    args = _parse(gateway_cmd.add_arguments, _split_pending(command[2:], tls=True))
    assert (args.pool, args.model_name, args.port, args.max_model_len) == (
        "llama-8b", "meta-llama/Llama-3.1-8B-Instruct", GATEWAY_HTTP_PORT, 8192)
    assert str(args.api_keys_file) == "/etc/kunserve/api-keys/keys"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", "/etc/kunserve/api-keys", "/etc/kunserve/tls"} <= mounts
    assert "KUNSERVE_REDIS_URL" in _env(container)


# ---------------------------------------------------------------------------------------------- security


@pytest.mark.parametrize("case", sorted(CASES))
def test_pods_run_as_non_root_with_a_read_only_root_filesystem(case: str) -> None:
    for name, pod in _pods(render_docs(_values(case))):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["containers"]:
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, name
            assert container.get("resources", {}).get("requests"), f"{name}: no resource requests"


def test_tls_secret_is_mounted_read_only_where_grpc_clients_run() -> None:
    docs = render_docs(values_file(VALUES_ALL))
    for suffix in ("-operator", "ks-gateway"):
        deployment = one(docs, "Deployment", suffix)
        (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == "ks-tls"
        (mount,) = [m for m in _container(docs, suffix)["volumeMounts"] if m["name"] == "tls"]
        assert mount["readOnly"] is True
    env = _env(_container(docs, "-operator"))
    assert env["KUNSERVE_TLS_SECRET"]["value"] == "ks-tls" and env["KUNSERVE_TLS_MUTUAL"]["value"] == "true"


def test_redis_is_reachable_only_from_kunserve_pods() -> None:
    policy = one(render_docs(values_file(VALUES_ALL)), "NetworkPolicy", "ks-redis")
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/part-of": "kunserve"}}}]
    for component in Component:
        assert labels("p", component)["app.kubernetes.io/part-of"] == "kunserve"


# ----------------------------------------------------------------------------------- Redis and API keys


def test_bundled_redis_keeps_its_data_on_a_claim() -> None:
    sts = one(render_docs({}), "StatefulSet", "-redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    command = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"


def test_external_redis_url_and_secret() -> None:
    docs = render_docs({"redis": {"enabled": False, "externalUrl": "rediss://cache.example:6380/2"}})
    assert not by_kind(docs, "StatefulSet")
    assert _env(_container(docs, "-operator"))["KUNSERVE_REDIS_URL"]["value"] == "rediss://cache.example:6380/2"
    docs = render_docs({"redis": {"enabled": False, "existingSecret": {"name": "redis-url", "key": "url"}}})
    assert _env(_container(docs, "-operator"))["KUNSERVE_REDIS_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-url", "key": "url"}}


def test_api_keys_generated_given_or_existing() -> None:
    import base64

    docs = render_docs({"apiKeys": {"enabled": True}})
    secret = one(docs, "Secret", "-api-keys")
    key = base64.b64decode(secret["data"]["keys"]).decode()
    assert re.fullmatch(r"sk-[A-Za-z0-9]{40}\n", key)
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert _env(_container(docs, "-operator"))["KUNSERVE_GATEWAY_API_KEYS"]["value"] == "kunserve-api-keys/keys"
    secret = one(render_docs(values_file(VALUES_ALL)), "Secret", "-api-keys")
    assert base64.b64decode(secret["data"]["keys"]).decode().splitlines() == [
        "sk-test-0123456789abcdef", "sk-test-fedcba9876543210"]
    docs = render_docs({"apiKeys": {"enabled": True, "existingSecret": "mine", "key": "k"}})
    assert not by_kind(docs, "Secret")
    assert _env(_container(docs, "-operator"))["KUNSERVE_GATEWAY_API_KEYS"]["value"] == "mine/k"


# ---------------------------------------------------------------------------------------- values schema

GOOD_GATEWAY = {"enabled": True, "pool": "p", "model": {"name": "m", "path": "/models/m"}}
MODEL = {"name": "m", "path": "/m"}
SCHEMA_VIOLATIONS: list[tuple[str, dict[str, Any], str]] = [
    ("negative operator replicas", {"operator": {"replicas": -1}}, "/operator/replicas"),
    ("two operator replicas", {"operator": {"replicas": 2}}, "/operator/replicas"),
    ("negative gateway replicas", {"gateway": {**GOOD_GATEWAY, "replicas": -1}}, "/gateway/replicas"),
    ("gateway without a model", {"gateway": {"enabled": True, "pool": "p"}}, "/gateway/model"),
    ("gateway with a relative model path", {"gateway": {**GOOD_GATEWAY, "model": {"name": "m", "path": "m"}}},
     "/gateway/model/path"),
    ("gateway without a pool", {"gateway": {"enabled": True, "model": {"name": "m", "path": "/m"}}}, "/gateway/pool"),
    ("image without a repository", {"images": {"control": {"repository": ""}}}, "/images/control/repository"),
    ("image repository null", {"images": {"agent": {"repository": None}}}, "/images/agent"),
    ("pool without a model", {"pools": [{"name": "p", "spec": {"replicas": 1}}]}, "/pools/0/spec"),
    ("pool model without a path", {"pools": [{"name": "p", "spec": {"replicas": 1, "model": {"name": "m"}}}]},
     "/pools/0/spec/model"),
    ("pool with 0 replicas", {"pools": [{"name": "p", "spec": {"replicas": 0, "model": MODEL}}]},
     "/pools/0/spec/replicas"),
    ("pool name with capitals", {"pools": [{"name": "P", "spec": {"replicas": 1, "model": MODEL}}]},
     "/pools/0/name"),
    ("no Redis at all", {"redis": {"enabled": False}}, "/redis"),
    ("Redis URL of another scheme", {"redis": {"enabled": False, "externalUrl": "http://x"}}, "/redis/externalUrl"),
    ("cert-manager without an issuer", {"tls": {"enabled": True, "certManager": {"enabled": True}}},
     "/tls/certManager/issuerRef"),
    ("short API key", {"apiKeys": {"enabled": True, "keys": ["sk-short"]}}, "/apiKeys/keys/0"),
    ("misspelt key", {"operator": {"replica": 1}}, "replica"),
    ("unknown top-level key", {"agents": {}}, "agents"),
    ("pull policy", {"images": {"control": {"pullPolicy": "Sometimes"}}}, "/images/control/pullPolicy"),
    ("resync of 0 s", {"operator": {"resyncSeconds": 0}}, "/operator/resyncSeconds"),
    ("PDB of 0", {"podDisruptionBudget": {"agentsMaxUnavailable": 0}}, "/podDisruptionBudget/agentsMaxUnavailable"),
    ("scrape interval", {"serviceMonitor": {"interval": "often"}}, "/serviceMonitor/interval"),
]


@pytest.mark.parametrize(("values", "fragment"), [(v, f) for _n, v, f in SCHEMA_VIOLATIONS],
                         ids=[n for n, _v, _f in SCHEMA_VIOLATIONS])
def test_values_schema_rejects(values: dict[str, Any], fragment: str) -> None:
    module = render_module()
    with pytest.raises(module.RenderError) as info:
        module.render(values)
    assert "values don't meet the specifications of the schema" in str(info.value)
    assert fragment in str(info.value), str(info.value)


def test_values_schema_accepts_the_examples() -> None:
    render_module().render(values_file(VALUES_ALL))
    render_module().render(values_file(VALUES_KIND))
    render_module().render({"gateway": GOOD_GATEWAY, "operator": {"replicas": 0}})


# ------------------------------------------------------------------------------------- documentation


def _values_keys_without_doc(text: str) -> list[str]:
    """Keys of values.yaml with no `# --` comment block right above them or above a map that holds them
    (helm-docs' format: a documented map documents its default content)."""
    missing: list[str] = []
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        if not m:
            continue
        indent, key, rest = len(m.group(1)), m.group(2), m.group(3).strip()
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = (bool(block) and block[-1].startswith("# --")) or any(d for _, _, d in stack)
        stack.append((indent, key, documented))
        nxt = next((ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("#")), "")
        is_parent = not rest and len(nxt) - len(nxt.lstrip()) > indent
        if not is_parent and not documented:
            missing.append(".".join(k for _, k, _ in stack))
    return missing


def test_every_value_has_a_doc_comment() -> None:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    assert _values_keys_without_doc(text) == []
    assert _values_keys_without_doc("a:\n  b: 1\n# -- c\nc:\n  d: 2\n") == ["a.b"]  # the check itself can fail


def test_values_yaml_and_schema_agree() -> None:
    """Every key in values.yaml is in the schema (whose objects reject unknown keys) and the defaults pass."""
    schema = yaml.safe_load((CHART / "values.schema.json").read_text(encoding="utf-8"))
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))

    def walk(node: dict[str, Any], value: Any, path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in values.schema.json"
                walk(node["properties"][key], child, f"{path}.{key}")

    walk(schema, defaults, "")
    render_module().render(copy.deepcopy(defaults))


def test_notes_tell_how_to_apply_a_pool_and_call_the_api() -> None:
    notes = render({"apiKeys": {"enabled": True}})["kunserve/templates/NOTES.txt"]
    assert "kubectl apply -n kunserve-system -f deploy/examples/servingpool-smollm2.yaml" in notes
    assert "/v1/chat/completions" in notes and "authorization: Bearer $KEY" in notes


def test_render_script_writes_one_file_per_template(tmp_path: Path) -> None:
    module = render_module()
    assert module.main(["-f", str(VALUES_ALL), "--out", str(tmp_path), "--include-crds"]) == 0
    written = {p.name for p in tmp_path.rglob("*.yaml")}
    assert {"deployment-operator.yaml", "servingpools.kunserve.io.yaml", "reconfigurations.kunserve.io.yaml"} <= written


# ------------------------------------------------------------------------------------------------ images


def test_dockerfile_builds_the_images_the_chart_names() -> None:
    text = (CHART.parents[2] / "Dockerfile").read_text(encoding="utf-8")
    stages = dict(re.findall(r"^FROM \S+ AS (\w+)\n(.*?)(?=^FROM |\Z)", text, flags=re.M | re.S))
    assert {"control", "cpu", "cuda"} <= set(stages)
    for target in ("control", "cpu", "cuda"):
        assert "USER 10001:10001" in stages[target], f"{target} must not run as root"
    assert "torch" not in stages["control"].replace("without torch", "")
    defaults = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))["images"]
    assert f"-t {defaults['control']['repository']}:" in text and f"-t {defaults['agent']['repository']}:" in text
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert (CHART.parents[2] / source).exists(), source
    ignore = (CHART.parents[2] / ".dockerignore").read_text(encoding="utf-8")
    for source in re.findall(r"^COPY (?!--from)(\S+)", text, flags=re.M):
        assert f"!{source}" in ignore, f".dockerignore leaves out {source}"
