"""Agents serve and call each other over mutual TLS (--tls-cert/--tls-key/--tls-ca): a drop, a request sent
to the later stage (relayed to the leader), a completion through a gateway holding its own client
certificate, and a restore all go over TLS; a plaintext client is refused."""

from __future__ import annotations

from pathlib import Path

import grpc
import openai
import pytest

from kunserve.rpc.tls import TlsFiles
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2
from tests.deploy.test_tls import Ca
from tests.gateway.processes import start_gateway
from tests.integration.agent_process import start_agent
from tests.integration.group_driver import Stream, even_ranges, reconfigure, status

GREEDY = inference_pb2.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def test_a_group_over_mutual_tls(tiny_dir: Path, tmp_path: Path) -> None:
    ca = Ca(tmp_path, "pool")
    issued = ca.issue("agent", dns=("localhost",), ips=("127.0.0.1",))
    tls = TlsFiles(cert=issued.cert, key=issued.key, ca=ca.path)
    agents = [start_agent(tiny_dir, tmp_path / f"a{i}", "--agent-id", f"a{i}", "--num-kv-blocks", "64", tls=tls)
              for i in range(2)]
    try:
        want = Stream(agents[1], "before", [5, 6, 7], GREEDY).start().wait(60)
        assert want.error is None
        with grpc.insecure_channel(agents[0].target) as plain, pytest.raises(grpc.RpcError) as err:
            agent_pb2_grpc.AgentStub(plain).Status(agent_pb2.StatusRequest(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reconfigure(agents, agent_pb2.ACTION_DROP, even_ranges(8, 2), epoch=1)
        during = Stream(agents[1], "during", [5, 6, 7], GREEDY).start().wait(60)  # relayed to the leader
        assert during.error is None and during.tokens == want.tokens
        # The gateway reaches the agents over mutual TLS too (its own client certificate from the pool CA).
        gw_cert = ca.issue("gateway")
        topology = ",".join(f"{a.agent_id}={a.target}" for a in agents)
        gateway = start_gateway(tiny_dir, tmp_path / "gw", "--static-topology", topology, "--tls-cert",
                                str(gw_cert.cert), "--tls-key", str(gw_cert.key), "--tls-ca", str(ca.path))
        try:
            client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
            out = client.completions.create(model="tiny", prompt="hello", max_tokens=8, temperature=0)
            assert out.choices[0].text and out.usage is not None and out.usage.completion_tokens == 8
        finally:
            gateway.stop()
        reconfigure(agents, agent_pb2.ACTION_RESTORE, even_ranges(8, 2), epoch=2)
        assert [status(a).role for a in agents] == [agent_pb2.ROLE_REPLICA] * 2
        assert "(mutual TLS)" in agents[0].log_path.read_text()
    finally:
        for a in agents:
            a.stop()
