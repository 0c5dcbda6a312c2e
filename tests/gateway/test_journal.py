"""The request journal: an accepted request is in Redis while it runs and gone when it ends."""

from __future__ import annotations

import asyncio
import http.client
import json
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from redis.asyncio import Redis as AsyncRedis

from kunserve.gateway import journal as journal_module
from kunserve.gateway.journal import Journal, JournalRecord, journal_key, read_entries
from tests.gateway.conftest import API_KEY, MAIN_POOL
from tests.gateway.processes import GatewayProcess, RedisProcess, request, start_redis, wait_until

KEY = f"kunserve:journal:{MAIN_POOL}:" + "{}"


def _entry(redis: Any, request_id: str) -> dict[str, str]:
    return dict(redis.hgetall(KEY.format(request_id)))


def test_a_streaming_request_is_journaled_until_it_finishes(gateway: GatewayProcess,
                                                             redis_server: RedisProcess) -> None:
    redis = redis_server.client()
    client = OpenAI(base_url=f"{gateway.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    stream = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=300, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    chunks = iter(stream)
    first = next(chunks)
    entry = _entry(redis, first.id)  # recorded before the first byte went out
    assert asyncio.run(_entries(redis_server))[first.id]["request_id"] == first.id
    assert entry["request_id"] == first.id and entry["endpoint"] == "completions" and entry["model"] == "tiny"
    assert json.loads(entry["prompt_token_ids"]) and json.loads(entry["params"])["max_tokens"] == 300
    assert json.loads(entry["params"])["ignore_eos"] is True
    assert entry["replica"] in {"agent-0", "agent-1"} and entry["attempt"] == "0"
    assert 0 < redis.ttl(KEY.format(first.id)) <= 660
    seen = list((first.choices[0].model_extra or {}).get("token_ids", []))
    for chunk in chunks:  # the output is journaled in batches: never more than 16 tokens behind
        seen += (chunk.choices[0].model_extra or {}).get("token_ids", [])
        if len(seen) >= 100:
            break
    journaled = json.loads(_entry(redis, first.id)["output_token_ids"])
    for chunk in chunks:
        seen += (chunk.choices[0].model_extra or {}).get("token_ids", [])
    assert len(seen) == 300
    assert len(journaled) >= 100 - 16 and journaled == seen[: len(journaled)]
    assert wait_until(lambda: not redis.exists(KEY.format(first.id)), 5, what="entry deleted")


def test_non_streaming_and_refused_requests_leave_nothing(gateway: GatewayProcess, redis_server: RedisProcess) -> None:
    redis = redis_server.client()
    auth = {"authorization": f"Bearer {API_KEY}"}
    status, headers, _ = request(gateway.base_url, "POST", "/v1/completions",
                                 {"model": "tiny", "prompt": "hi", "max_tokens": 3}, auth)
    assert status == 200 and not redis.exists(KEY.format(headers["x-request-id"]))
    status, _, _ = request(gateway.base_url, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "n": 3}, auth)
    assert status == 400
    assert asyncio.run(_entries(redis_server)) == {}


async def _entries(server: RedisProcess) -> dict[str, dict[str, str]]:
    client = AsyncRedis(host="127.0.0.1", port=server.port)
    try:
        return await read_entries(client, MAIN_POOL)
    finally:
        await client.aclose()


def test_a_client_that_goes_away_releases_its_request(gateway: GatewayProcess, redis_server: RedisProcess) -> None:
    redis = redis_server.client()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    body = {"model": "tiny", "prompt": "Once", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body),
                 headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    resp = conn.getresponse()
    rid = resp.getheader("x-request-id")
    assert resp.status == 200 and rid
    resp.read(2000)
    assert redis.exists(KEY.format(rid))
    conn.close()  # mid-stream

    def released() -> bool:
        _, _, raw = request(gateway.base_url, "GET", "/health")
        return not redis.exists(KEY.format(rid)) and all(r["inflight"] == 0 for r in json.loads(raw)["replicas"])

    assert wait_until(released, 10, what="journal entry deleted and no stream in flight")


def test_a_delete_lost_while_redis_was_down_is_retried_once_it_is_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        server = start_redis(tmp_path / "r1")
        client = AsyncRedis(host="127.0.0.1", port=server.port, socket_timeout=2)
        journal = Journal(client, "p", ttl_s=600)
        try:
            first = await journal.record(JournalRecord("cmpl-a", "completions", "tiny", "gw", [1, 2], {}))
            server.stop()
            await first.close()  # Redis is down: the delete fails and is remembered
            assert list(journal.pending_deletes) == ["cmpl-a"] and journal.write_errors == 1
            server = start_redis(tmp_path / "r2", port=server.port)
            await client.hset(journal_key("p", "cmpl-a"), mapping={"request_id": "cmpl-a"})  # as an AOF kept it
            second = await journal.record(JournalRecord("cmpl-b", "completions", "tiny", "gw", [3], {}))
            assert set(await read_entries(client, "p")) == {"cmpl-b"} and not journal.pending_deletes
            await second.close()
            assert await read_entries(client, "p") == {}
        finally:
            await client.aclose()
            server.stop()

    asyncio.run(scenario())


def test_pending_deletes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    class Down:
        async def delete(self, *keys: str) -> int:
            raise ConnectionError("redis is down")

    monkeypatch.setattr(journal_module, "MAX_PENDING_DELETES", 3)
    journal = Journal(Down(), "p", ttl_s=600)  # type: ignore[arg-type]
    for i in range(5):
        asyncio.run(journal._delete(f"r{i}"))
    assert list(journal.pending_deletes) == ["r2", "r3", "r4"] and journal.write_errors == 5
