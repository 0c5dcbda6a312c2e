"""The operator's RBAC in the chart is exactly what the operator's code uses: no verb or resource missing
(the operator would fail with 403 in a real cluster), none extra (least privilege).

What the code uses is derived here, not copied from the chart:

1. the real operator (kopf with the production handlers, tests/operator/harness.py) runs against the
   emulated API server through a pool's whole life — create, StatefulSet status changes, a spec update, an
   invalid spec (Warning Event), the periodic resync, delete — and every request it sends (kopf's own
   included: list/watch, finalizer and annotation patches, Events) is mapped to the RBAC verb the API server
   would check (server-side apply that creates an object needs `create` as well as `patch`);
2. kopf's cluster observation, from the settings the operator gives kopf: unless scanning is disabled it
   lists and watches CustomResourceDefinitions, and namespaces when it serves a list of namespaces;
3. the operator's source: every KubeApi call whose resource can be read statically
   (`api.patch(RECONFIGURATIONS, ..., subresource="status")`, `api.create(reconfiguration_manifest(...))`),
   mapped to verbs by KUBE_API_VERBS, and the resources of its kopf handlers (list + watch, and patch for
   kopf's finalizers and progress annotations), so code paths the run does not reach (the pressure daemon
   needs live agents) still count;
4. a check that every resource kind the operator's code names was exercised by the run at all.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

kopf = pytest.importorskip("kopf")
pytest.importorskip("kmock")

from kunserve.operator import kube  # noqa: E402
from kunserve.operator.handlers import configure_settings, register  # noqa: E402
from tests.deploy.helm_tools import RELEASE_NAMESPACE, render_docs  # noqa: E402
from tests.operator.emulator import EmulatorThread  # noqa: E402
from tests.operator.harness import TEST_CONFIG, OperatorHarness  # noqa: E402
from tests.operator.kubectl import wait_for  # noqa: E402
from tests.operator.pools import example  # noqa: E402

Rule = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)
OPERATOR_SRC = Path(kube.__file__).resolve().parent
POOLS = ("kunserve.io/v1alpha1", "servingpools")
STS = ("apps/v1", "statefulsets")
RECONFIGURATIONS = ("kunserve.io/v1alpha1", "reconfigurations")
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
NAMESPACES = ("", "namespaces")


def verbs_of(request: Any) -> set[str]:
    """The RBAC verbs the API server checks for one request (kmock's parsed request)."""
    method = str(request.method.value if hasattr(request.method, "value") else request.method).upper()
    if method == "GET":
        if str(request.params.get("watch", "")).lower() in ("true", "1"):
            return {"watch"}
        return {"get"} if request.name else {"list"}
    if method == "POST":
        return {"create"}
    if method == "PATCH":  # an apply patch that creates the object is authorized as create as well
        created = str(getattr(request.action, "value", request.action)).upper() == "CREATE"
        return {"patch", "create"} if created else {"patch"}
    if method == "PUT":
        return {"update"}
    if method == "DELETE":
        return {"delete"} if request.name else {"deletecollection"}
    raise AssertionError(f"unexpected method {method}")


def rules_of_requests(requests: Iterable[Any]) -> set[Rule]:
    rules: set[Rule] = set()
    for request in requests:
        agent = next((v for k, v in request.headers.items() if k.lower() == "user-agent"), "")
        if request.resource is None or not request.resource.plural or not agent.startswith("kopf/"):
            continue  # discovery (non-resource URLs), or the test's own client
        resource = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        rules |= {(request.resource.group or "", resource, verb) for verb in verbs_of(request)}
    return rules


def run_pool_lifecycle() -> tuple[set[Rule], set[str]]:
    """(rules the operator's requests need, plurals it touched) over one pool's whole life."""
    config = dataclasses.replace(TEST_CONFIG, resync_interval_s=0.3)
    with EmulatorThread() as emulator, OperatorHarness(config=config, emulator=emulator) as h:
        k, ns = h.kubectl, h.new_namespace("rbac")
        k.create({**example(), "metadata": {"name": "smollm2"}}, namespace=ns)
        wait_for(lambda: k.get_or_none("apps/v1", "deployments", ns, "smollm2-gateway"), what="gateway")
        k.patch(*STS, ns, "smollm2-agent", {"status": {"replicas": 2, "readyReplicas": 2}}, subresource="status")
        wait_for(lambda: (k.get(*POOLS, ns, "smollm2").get("status") or {}).get("phase") == "Ready", what="Ready")
        k.patch(*POOLS, ns, "smollm2", {"spec": {"replicas": 3, "elasticity": {"maxGroupSize": 3}}})
        wait_for(lambda: k.get(*STS, ns, "smollm2-agent")["spec"]["replicas"] == 3, what="3 replicas")
        k.delete("apps/v1", "deployments", ns, "smollm2-gateway")  # drift: the resync puts it back
        wait_for(lambda: k.get_or_none("apps/v1", "deployments", ns, "smollm2-gateway"), what="resync")
        k.create({"apiVersion": "kunserve.io/v1alpha1", "kind": "Reconfiguration", "metadata": {"name": "r1"},
                  "spec": {"pool": "missing", "epoch": 1, "action": "Drop", "manual": True, "groups": [
                      {"id": "g1", "members": ["missing-agent-0", "missing-agent-1"]}]}}, namespace=ns)
        wait_for(lambda: (k.get(*RECONFIGURATIONS, ns, "r1").get("status") or {}).get("phase") == "Failed",
                 what="a reconfiguration of a missing pool fails")
        k.patch(*POOLS, ns, "smollm2", {"spec": {"replicas": 0}})  # invalid: a Warning Event
        wait_for(lambda: [e for e in k.list("v1", "events", ns) if e.get("reason") == "InvalidSpec"], what="event")
        k.delete(*POOLS, ns, "smollm2")
        wait_for(lambda: k.get_or_none(*POOLS, ns, "smollm2") is None, what="pool deleted")
        assert emulator.emulator is not None
        requests = list(emulator.emulator._requests)
    assert "Traceback" not in h.output, h.output[-3000:]
    rules = rules_of_requests(requests)
    return rules, {resource.split("/")[0] for _group, resource, _verb in rules}


def kopf_observation_rules(namespaced: bool) -> set[Rule]:
    """What kopf's cluster observation needs with the settings the operator gives it."""
    settings = kopf.OperatorSettings()
    configure_settings(settings)
    if settings.scanning.disabled:
        return set()
    rules = {(*CRDS, "list"), (*CRDS, "watch")}
    if namespaced:
        rules |= {(*NAMESPACES, "list"), (*NAMESPACES, "watch")}
    return rules


def plurals_named_in_code() -> dict[str, str]:
    """plural -> where: every ResourceKind constant of kube.py the operator's modules use, and every
    resource its kopf handlers are registered for."""
    constants = {name: value.plural for name, value in vars(kube).items() if isinstance(value, kube.ResourceKind)}
    found: dict[str, str] = {}
    for path in sorted(OPERATOR_SRC.glob("*.py")):
        if path.name == "kube.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
            if name in constants and not isinstance(getattr(node, "ctx", None), ast.Store):
                found.setdefault(constants[name], f"{path.name} ({name})")
    registry = kopf.OperatorRegistry()
    register(registry, TEST_CONFIG)
    for group in (registry._changing, registry._spawning, registry._watching, registry._indexing,
                  registry._webhooks):
        for handler in group.get_all_handlers():
            if handler.selector is not None and handler.selector.plural:
                found.setdefault(handler.selector.plural, f"kopf handler {handler.id}")
    return found


# KubeApi method -> the RBAC verbs its request needs (KopfKubeApi: GET one / GET collection / POST /
# server-side apply PATCH, which creates a missing object / merge PATCH / DELETE).
KUBE_API_VERBS = {"get": {"get"}, "list": {"list"}, "create": {"create"}, "apply": {"create", "patch"},
                  "patch": {"patch"}, "delete": {"delete"}}


def _builder_kinds(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """function name -> the `kind`s of the manifests it builds (dict literals with a "kind" string)."""
    kinds: dict[str, set[str]] = {}
    for tree in trees.values():
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Dict):
                    for key, value in zip(node.keys, node.values, strict=True):
                        if (isinstance(key, ast.Constant) and key.value == "kind" and isinstance(value, ast.Constant)
                                and isinstance(value.value, str)):
                            kinds.setdefault(fn.name, set()).add(value.value)
    return kinds


def rules_from_call_sites() -> dict[Rule, str]:
    """Rules of every KubeApi call in the operator's modules whose resource can be read from the source:
    `api.get/list/patch/delete(CONSTANT, ...)` (with `subresource="status"`), `api.create/apply(builder(...))`.
    rule -> where it is used."""
    constants = {name: value for name, value in vars(kube).items() if isinstance(value, kube.ResourceKind)}
    by_kind = {kind: resource for (_api_version, kind), resource in kube.KINDS.items()}
    trees = {p.name: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(OPERATOR_SRC.glob("*.py"))
             if p.name != "kube.py"}
    builders = _builder_kinds(trees)
    found: dict[Rule, str] = {}
    for file_name, tree in trees.items():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args
                    and node.func.attr in KUBE_API_VERBS):
                continue
            method, first = node.func.attr, node.args[0]
            resources: list[tuple[kube.ResourceKind, str]] = []
            if method in ("create", "apply") and isinstance(first, ast.Call):
                builder = first.func.id if isinstance(first.func, ast.Name) else getattr(first.func, "attr", "")
                resources = [(by_kind[k], "") for k in builders.get(builder, ()) if k in by_kind]
            elif isinstance(first, ast.Name | ast.Attribute):
                name = first.id if isinstance(first, ast.Name) else first.attr
                sub = next((str(kw.value.value) for kw in node.keywords if kw.arg == "subresource"
                            and isinstance(kw.value, ast.Constant)), None)
                if name in constants:
                    resources = [(constants[name], f"/{sub}" if sub else "")]
            for resource, suffix in resources:
                group = resource.api_version.rpartition("/")[0]
                for verb in KUBE_API_VERBS[method]:
                    found.setdefault((group, resource.plural + suffix, verb), f"{file_name}:{node.lineno}")
    return found


def rules_of_kopf_handlers() -> set[Rule]:
    """kopf watches (list + watch) every resource it has handlers for, and patches (finalizers, progress
    annotations) those with changing handlers (create/update/delete/resume) or daemons and timers."""
    registry = kopf.OperatorRegistry()
    register(registry, TEST_CONFIG)
    rules: set[Rule] = set()
    for group, writes in ((registry._changing, True), (registry._spawning, True), (registry._watching, False),
                          (registry._indexing, False), (registry._webhooks, False)):
        for handler in group.get_all_handlers():
            selector = handler.selector
            if selector is None or not selector.plural:
                continue
            api_group = selector.group or ""
            rules |= {(api_group, selector.plural, "list"), (api_group, selector.plural, "watch")}
            if writes:
                rules.add((api_group, selector.plural, "patch"))
    return rules


def required_rules(lifecycle_rules: set[Rule]) -> set[Rule]:
    return lifecycle_rules | set(rules_from_call_sites()) | rules_of_kopf_handlers()


def test_every_kube_api_method_has_its_verbs() -> None:
    methods = {name for name, value in vars(kube.KubeApi).items() if callable(value) and not name.startswith("_")}
    assert methods == set(KUBE_API_VERBS), "map the new KubeApi method to RBAC verbs in KUBE_API_VERBS"


def test_the_static_scan_finds_the_operators_calls() -> None:
    found = rules_from_call_sites()
    assert ("kunserve.io", "servingpools/status", "patch") in found  # reconcile.refresh_pool_status
    assert ("kunserve.io", "servingpools", "get") in found


@pytest.fixture(scope="module")
def lifecycle() -> tuple[set[Rule], set[str]]:
    return run_pool_lifecycle()


def expand(rules: list[dict[str, Any]]) -> set[Rule]:
    out: set[Rule] = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    out.add((group, resource, verb))
    return out


def _rbac(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _diff(got: set[Rule], want: set[Rule]) -> str:
    return f"missing from the chart: {sorted(want - got)}; not used by the operator: {sorted(got - want)}"


def test_the_scenario_exercises_every_resource_the_operator_code_names(lifecycle: tuple[set[Rule], set[str]]) -> None:
    _rules, touched = lifecycle
    named = plurals_named_in_code()
    unexercised = {plural: where for plural, where in named.items() if plural not in touched}
    assert not unexercised, (
        f"operator code uses {unexercised} but the RBAC scenario never reached it: extend run_pool_lifecycle "
        "and the chart's RBAC (templates/clusterrole-operator.yaml)")


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(lifecycle: tuple[set[Rule], set[str]]) -> None:
    rules, _ = lifecycle
    docs = render_docs({})
    (role,) = _rbac(docs, "ClusterRole")
    assert not _rbac(docs, "Role")
    want = required_rules(rules) | kopf_observation_rules(namespaced=False)
    got = expand(role["rules"])
    assert got == want, _diff(got, want)
    (binding,) = _rbac(docs, "ClusterRoleBinding")
    (account,) = _rbac(docs, "ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": RELEASE_NAMESPACE}]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_rbac_grants_the_namespaced_rules_only_in_the_watched_namespaces(
        lifecycle: tuple[set[Rule], set[str]]) -> None:
    rules, _ = lifecycle
    docs = render_docs({"operator": {"watchNamespaces": ["serving", "staging"]}})
    roles = _rbac(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["serving", "staging"]
    want = required_rules(rules)
    for role in roles:
        assert expand(role["rules"]) == want, _diff(expand(role["rules"]), want)
    bindings = _rbac(docs, "RoleBinding")
    assert sorted((b["metadata"]["namespace"], b["roleRef"]["name"]) for b in bindings) == sorted(
        (r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles)
    (cluster_role,) = _rbac(docs, "ClusterRole")
    want = kopf_observation_rules(namespaced=True)
    assert expand(cluster_role["rules"]) == want, _diff(expand(cluster_role["rules"]), want)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"].endswith("-operator")]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--namespace=serving" in command and "--namespace=staging" in command and "--all-namespaces" not in command


def test_no_rbac_when_disabled() -> None:
    docs = render_docs({"operator": {"rbac": {"create": False}}})
    assert not [d for d in docs if d["apiVersion"].startswith("rbac.authorization.k8s.io/")]


def test_the_derivation_sees_what_an_operator_request_needs() -> None:
    """The request-to-verb mapping itself (so that the comparison above can fail for the right reason)."""

    @dataclasses.dataclass
    class Resource:
        group: str
        plural: str

    @dataclasses.dataclass
    class Request:
        method: str
        name: str | None
        resource: Resource | None
        params: dict[str, str] = dataclasses.field(default_factory=dict)
        subresource: str | None = None
        action: str = ""
        headers: dict[str, str] = dataclasses.field(default_factory=lambda: {"User-Agent": "kopf/1.45.2"})

    sts = Resource("apps", "statefulsets")
    requests = [
        Request("GET", None, sts, {"watch": "true"}), Request("GET", None, sts), Request("GET", "a", sts),
        Request("PATCH", "a", sts, action="CREATE"), Request("PATCH", "a", Resource("kunserve.io", "servingpools"),
                                                             subresource="status", action="UPDATE"),
        Request("DELETE", "a", sts), Request("POST", None, Resource("", "events")),
        Request("GET", None, None), Request("DELETE", "b", sts, headers={"User-Agent": "Python-urllib/3.11"}),
    ]
    assert rules_of_requests(requests) == {
        ("apps", "statefulsets", "watch"), ("apps", "statefulsets", "list"), ("apps", "statefulsets", "get"),
        ("apps", "statefulsets", "patch"), ("apps", "statefulsets", "create"),
        ("kunserve.io", "servingpools/status", "patch"), ("apps", "statefulsets", "delete"),
        ("", "events", "create")}
