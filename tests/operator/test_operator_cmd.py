"""`kunserve operator`: flags, settings, the real process against the emulator, and the layering rule."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from kunserve.cli import SUBCOMMANDS, build_parser
from kunserve.operator.config import DEFAULT_IMAGE, ConfigError, OperatorConfig
from kunserve.operator.operator_cmd import build_config, kopf_run_options
from kunserve.operator.pool_spec import PullPolicy, SecretKeyRef
from tests.operator.emulator import EmulatorThread
from tests.operator.kubectl import Kubectl, wait_for
from tests.operator.pools import example

REPO = Path(__file__).resolve().parents[2]
SOURCE_ROOTS = [str(REPO / root) for root in ("operator", "agent", "gateway", "proto")]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser("operator").parse_args(["operator", *argv])


def test_subcommand_is_registered() -> None:
    assert SUBCOMMANDS["operator"][0] == "kunserve.operator.operator_cmd"


def test_scope_liveness_and_peering_flags() -> None:
    assert kopf_run_options(parse()) == {"clusterwide": True, "namespaces": [], "liveness_endpoint": None,
                                         "standalone": None, "peering_name": None, "priority": None}
    assert kopf_run_options(parse("-n", "serving", "-n", "team-*", "--liveness", "http://0.0.0.0:8080/healthz",
                                  "--standalone")) == {
        "clusterwide": False, "namespaces": ["serving", "team-*"], "liveness_endpoint": "http://0.0.0.0:8080/healthz",
        "standalone": True, "peering_name": None, "priority": None}
    with pytest.raises(SystemExit):
        parse("-A", "-n", "serving")


def test_settings_come_from_env_and_flags_win() -> None:
    env = {"KUNSERVE_AGENT_IMAGE": "env:1", "KUNSERVE_REDIS_URL": "redis://env:6379/0",
           "KUNSERVE_GATEWAY_API_KEYS": "keys/api"}
    assert build_config(parse(), env={}) == OperatorConfig()
    assert build_config(parse("--agent-image", "flag:2", "--image-pull-policy", "Never"), env=env) == OperatorConfig(
        agent_image="flag:2", image_pull_policy=PullPolicy.NEVER, redis_url="redis://env:6379/0",
        gateway_api_keys=SecretKeyRef("keys", "api"))
    assert OperatorConfig().effective_gateway_image == DEFAULT_IMAGE
    with pytest.raises(ConfigError, match="SECRET/KEY"):
        build_config(parse("--gateway-api-keys", "no-key"), env={})
    assert build_config(parse("--resync-seconds", "5"), env={}).resync_interval_s == 5.0
    with pytest.raises(ConfigError, match="resync interval"):
        OperatorConfig.from_env({"KUNSERVE_RESYNC_SECONDS": "never"})
    with pytest.raises(ConfigError, match="pull policy"):
        OperatorConfig.from_env({"KUNSERVE_IMAGE_PULL_POLICY": "Sometimes"})


def test_planning_settings() -> None:
    config = build_config(parse("--plan-seconds", "0.5"), env={"KUNSERVE_STALE_SECONDS": "7"})
    assert (config.plan_interval_s, config.stale_after_s) == (0.5, 7.0)
    assert build_config(parse(), env={}).plan_interval_s == OperatorConfig().plan_interval_s == 2.0
    with pytest.raises(ConfigError, match="stale threshold"):
        build_config(parse("--stale-seconds", "0"), env={})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_kunserve_operator_process_serves_a_pool_through_a_kubeconfig(tmp_path: Path) -> None:
    """The production path: kopf's own login (kubeconfig), the liveness endpoint, SIGTERM."""
    port = _free_port()
    with EmulatorThread() as emulator:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({  # JSON is YAML
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": emulator.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "test"}}]}))
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUNSERVE_AGENT_IMAGE": "registry.test/agent:7",
               "PYTHONPATH": os.pathsep.join(SOURCE_ROOTS)}
        cmd = [sys.executable, "-m", "kunserve.cli", "operator", "--standalone",
               "--liveness", f"http://127.0.0.1:{port}/healthz"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            k = Kubectl(emulator.url)
            k.create({**example(), "metadata": {"name": "smollm2"}}, namespace="prod")
            sts = wait_for(lambda: k.get_or_none("apps/v1", "statefulsets", "prod", "smollm2-agent"),
                           timeout_s=30, what="StatefulSet from the operator process")
            assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.test/agent:7"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                assert resp.status == 200
            wait_for(lambda: (k.get("kunserve.io/v1alpha1", "servingpools", "prod", "smollm2").get("status") or {})
                     .get("phase") == "Pending", what="pool status")  # so that SIGTERM interrupts no handler
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output[-3000:]
        assert "login_with_kubeconfig' succeeded" in output
        assert "Traceback" not in output, output[-3000:]


def test_operator_modules_never_import_torch_or_the_agent() -> None:
    code = textwrap.dedent("""
        import sys
        import kunserve.cli
        import kunserve.operator.handlers, kunserve.operator.operator_cmd, kunserve.operator.reconcile
        import kunserve.operator.manifests, kunserve.operator.validation, kunserve.operator.planner
        import kunserve.operator.local, kunserve.operator.up_cmd, kunserve.operator.reconfigure_cmd
        import kunserve.operator.executor, kunserve.operator.pressure, kunserve.operator.kube_runtime
        kunserve.cli.build_parser("operator")
        kunserve.cli.build_parser("up")
        kunserve.cli.build_parser("reconfigure")
        bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "kunserve.agent")))
        print(",".join(bad))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(SOURCE_ROOTS)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                            check=True)
    assert result.stdout.strip() == "", f"operator imported: {result.stdout.strip()}"


def test_only_the_client_module_imports_the_generated_stubs() -> None:
    import ast

    importers = []
    for path in sorted((REPO / "operator" / "kunserve" / "operator").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.startswith("kunserve.rpc") for n in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["agent_client.py"]
