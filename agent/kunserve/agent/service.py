"""gRPC servicers of an agent: Inference (Generate stream, Abort) and Agent (Status, WatchPressure).

Handlers are thin: they translate between protobuf messages and the engine loop, which owns the engine.
Errors map to gRPC status codes: InvalidRequestError -> INVALID_ARGUMENT, EngineStoppedError ->
UNAVAILABLE (retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from kunserve.agent.engine.output import Pressure, RequestOutput
from kunserve.agent.engine.sequence import FinishReason, SamplingParams
from kunserve.agent.engine_loop import EngineLoop, EngineStoppedError, HandedBack
from kunserve.agent.errors import InvalidRequestError
from kunserve.rpc.v1 import agent_pb2, agent_pb2_grpc, inference_pb2, inference_pb2_grpc

if TYPE_CHECKING:
    from kunserve.agent.member import Member

_FINISH = {
    None: inference_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: inference_pb2.FINISH_REASON_ABORT,
}
DEFAULT_PRESSURE_INTERVAL_MS = 500


def sampling_from_proto(msg: inference_pb2.SamplingParams) -> SamplingParams:
    """Proto3 defaults: top_p 0 means off (1.0); temperature 0 means greedy; an unset seed is None."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p if msg.top_p != 0 else 1.0,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        sample_index_offset=msg.sample_index_offset,
    )


def output_to_proto(out: RequestOutput, first: bool) -> inference_pb2.GenerateResponse:
    msg = inference_pb2.GenerateResponse(
        request_id=out.request_id, token_ids=out.new_token_ids, text=out.new_text,
        finish_reason=_FINISH[out.finish_reason],
    )
    if first and out.ttft_s is not None:
        msg.ttft_s = out.ttft_s
    if out.finished:
        msg.usage.prompt_tokens = len(out.prompt_token_ids)
        msg.usage.completion_tokens = len(out.token_ids)
    return msg


def pressure_to_proto(agent_id: str, p: Pressure, epoch: int, preemptions: int, role: int = agent_pb2.ROLE_REPLICA,
                      home_blocks_needed: int | None = None) -> agent_pb2.Pressure:
    return agent_pb2.Pressure(
        agent_id=agent_id, blocks_needed=p.blocks_needed, blocks_total=p.blocks_total, blocks_free=p.blocks_free,
        num_waiting=p.num_waiting, num_running=p.num_running, demand=p.demand, timestamp=p.timestamp,
        epoch=epoch, num_preemptions=preemptions, role=role,  # type: ignore[arg-type]
        home_blocks_needed=p.blocks_needed if home_blocks_needed is None else home_blocks_needed,
    )


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(self, loop: EngineLoop, member: Member | None = None) -> None:
        self.loop = loop
        self.member = member

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        which = request.WhichOneof("prompt")
        prompt: str | list[int] = request.text if which == "text" else list(request.token_ids.ids)
        if which is None or not prompt:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "a non-empty prompt (text or token_ids) is required")
        outputs: asyncio.Queue[object] = asyncio.Queue()
        aio_loop = asyncio.get_running_loop()

        def sink(item: object) -> None:
            aio_loop.call_soon_threadsafe(outputs.put_nowait, item)

        relayed = False
        try:
            params = sampling_from_proto(request.sampling)
            params.validate()
            member = self.member
            if member is not None and member.role.name == "STAGE":
                relayed = True  # the group's leader computes it; this agent keeps the stream
                await member.relay_new(request, sink)
            else:
                await asyncio.wrap_future(self.loop.submit(prompt, params, request.request_id, sink, request.owner))
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finished, first = False, True
        try:
            while not finished:
                out = await outputs.get()
                if isinstance(out, EngineStoppedError):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, str(out))
                    return
                if isinstance(out, HandedBack):  # the group split: the request goes on at its owner
                    if request.owner:
                        finished = True
                        yield inference_pb2.GenerateResponse(request_id=request.request_id, handed_back=True)
                    continue
                if isinstance(out, inference_pb2.GenerateResponse):  # relayed from the group's leader
                    if out.handed_back:
                        continue
                    finished = out.finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
                    if not first:
                        out.ttft_s = 0.0  # the client had its first token already
                    first = first and not out.token_ids
                    yield out
                    continue
                assert isinstance(out, RequestOutput)
                finished = out.finished
                if out.new_token_ids or finished:
                    yield output_to_proto(out, first and bool(out.new_token_ids))
                    first = first and not out.new_token_ids
        finally:
            if not finished:  # the client went away: free the request's blocks
                self.loop.abort(request.request_id)
                if self.member is not None and (relayed or self.member.role.name == "STAGE"):
                    await self.member.abort_relayed(request.request_id)

    async def Abort(
        self, request: inference_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.AbortResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id is required")
        try:
            found = await asyncio.wrap_future(self.loop.abort(request.request_id))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        return inference_pb2.AbortResponse(found=found)


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, loop: EngineLoop, agent_id: str, model_name: str, member: Member | None = None) -> None:
        self.loop = loop
        self.agent_id = agent_id
        self.model_name = model_name
        self.member = member
        self._closing = asyncio.Event()

    @property
    def epoch(self) -> int:
        return self.member.epoch if self.member is not None else 0

    def _role(self) -> int:
        return self.member.role.value if self.member is not None else agent_pb2.ROLE_REPLICA

    def close(self) -> None:
        """End every pressure stream (the agent is stopping)."""
        self._closing.set()

    def _status(self) -> agent_pb2.StatusResponse:
        e = self.loop.engine  # runs on the engine thread
        msg = agent_pb2.StatusResponse(
            agent_id=self.agent_id, model=self.model_name, num_layers=e.model_config.num_hidden_layers,
            layer_start=e.model.start, layer_end=e.model.end, block_size=e.config.block_size,
            kv_blocks_total=e.block_manager.num_blocks, kv_blocks_free=e.block_manager.num_free_blocks,
            kv_block_bytes=e.kv_cache.block_bytes, weight_bytes=e.weight_bytes,
            memory_budget_bytes=e.budget_bytes, epoch=self.epoch, role=self._role(),  # type: ignore[arg-type]
            device=str(e.device),
        )
        m = self.member
        if m is not None:
            from kunserve.agent.member import stages_to_proto

            if m.stages:
                msg.group.CopyFrom(stages_to_proto(m.stages))
            msg.prepared_epoch = m.prepared.epoch if m.prepared is not None else 0
        return msg

    async def Status(
        self, request: agent_pb2.StatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.StatusResponse:
        try:
            return await asyncio.wrap_future(self.loop.call(self._status))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises

    async def WatchPressure(
        self, request: agent_pb2.WatchPressureRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.Pressure]:
        interval = max(10, request.interval_ms or DEFAULT_PRESSURE_INTERVAL_MS) / 1000
        last: tuple[Pressure, int, int | None] | None = None
        while not self._closing.is_set():
            try:
                # The engine thread answers between steps. A step or a reconfiguration can hold it longer
                # than a follower waits for a message: then the last measurement is sent again (with its
                # own timestamp), so the stream never goes quiet and a busy agent is not taken for a dead one.
                measure = asyncio.wrap_future(self.loop.call(self._measure))
                last = await (measure if last is None else asyncio.wait_for(measure, max(interval, 0.25)))
            except TimeoutError:
                pass
            except EngineStoppedError as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
                return
            assert last is not None
            p, preemptions, home = last
            yield pressure_to_proto(self.agent_id, p, self.epoch, preemptions, self._role(), home)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), interval)

    def _measure(self) -> tuple[Pressure, int, int | None]:
        """On the engine thread: pressure, preemptions so far, and the blocks of the requests owned here."""
        e = self.loop.engine
        home = self.member.home_blocks_needed() if self.member is not None else None
        return e.pressure(), e.scheduler.num_preemptions, home

    async def Prepare(self, request: agent_pb2.PrepareRequest, context: grpc.aio.ServicerContext
                      ) -> agent_pb2.PrepareResponse:
        return await self._reconfigure(context, lambda m: m.prepare(request))

    async def Commit(self, request: agent_pb2.CommitRequest, context: grpc.aio.ServicerContext
                     ) -> agent_pb2.CommitResponse:
        return await self._reconfigure(context, lambda m: m.commit(request.epoch))

    async def Abort(self, request: agent_pb2.AbortReconfigurationRequest, context: grpc.aio.ServicerContext
                    ) -> agent_pb2.AbortReconfigurationResponse:
        was = self.member.abort(request.epoch) if self.member is not None else False
        return agent_pb2.AbortReconfigurationResponse(was_prepared=was)

    async def _reconfigure(self, context: grpc.aio.ServicerContext, fn):  # type: ignore[no-untyped-def]
        from kunserve.agent.member import ReconfigurationError

        if self.member is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this agent runs without reconfiguration")
        try:
            return await fn(self.member)
        except ReconfigurationError as exc:
            await context.abort(exc.code, str(exc))
        except EngineStoppedError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
