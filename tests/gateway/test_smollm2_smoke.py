"""One real model through the whole path: SmolLM2-135M-Instruct's chat template in the gateway, one agent."""

from __future__ import annotations

from pathlib import Path

import pytest
from openai import OpenAI

from tests.gateway.processes import start_agents, start_gateway


@pytest.mark.slow
def test_smollm2_answers_through_the_gateway(smollm2_dir: Path, tmp_path: Path) -> None:
    (agent,) = start_agents(smollm2_dir, tmp_path, [("smol-0", ("--threads", "2"))])
    try:
        gw = start_gateway(smollm2_dir, tmp_path / "gw", "--static-topology", f"smol-0={agent.target}")
        try:
            client = OpenAI(base_url=f"{gw.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
            chunks = list(client.chat.completions.create(
                model=smollm2_dir.name, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
            answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert "Paris" in answer, answer
            usage = chunks[-1].usage
            assert usage is not None and 0 < usage.completion_tokens <= 24 and usage.prompt_tokens > 10
        finally:
            gw.stop()
    finally:
        agent.stop()
