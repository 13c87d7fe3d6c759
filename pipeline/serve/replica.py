"""The ``Generator`` deployment: one export, one continuous-batching :class:`~pipeline.inference.engine.Engine`.

A loop on a thread of its own steps the engine while it has work, handing each step's output to the replica's
event loop without waiting for it (of a request that does not stream, only its first token and, merged on that
thread, the rest once its sequence finishes); new sequences join the running batch at the next step and finished
ones leave it at once. The ingress sends :class:`SequenceRequest` objects and receives, as a stream, first a
:class:`ReplicaInfo`, then lists of ``(sequence index, Delta)`` (with ``stream=False`` an empty list when the
request's first token is generated, so the ingress can time it, then one list at the end with each sequence's
merged output). An engine failure fails the sequences in flight and the loop goes on; should the loop itself
die, every attached request fails at once, later ones fail fast, and the health check reports it so Serve
replaces the replica. Every GAUGE_INTERVAL_S while it steps, and when it goes idle, the engine's figures go to
Ray's metrics (:class:`~pipeline.serve.metrics.EngineGauges`); :meth:`Generator.engine_stats` gives them to the
ingress's ``/metrics``; :meth:`Generator.record_autoscaling_stats` gives the queue to Serve's autoscaler.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from pipeline.inference.outputs import Delta
from pipeline.inference.sampling import SamplingParams
from pipeline.serve.autoscale import RUNNING, WAITING
from pipeline.serve.metrics import EngineGauges, EngineStats


@dataclass(frozen=True)
class SequenceRequest:
    """One sequence to generate: the prompt's ids, its text when it was given as text (echo returns it verbatim),
    and how to sample."""

    prompt_ids: list[int]
    prompt_text: str | None
    params: SamplingParams


@dataclass(frozen=True)
class ReplicaInfo:
    """Which replica and which weights answer a request (sent before any output)."""

    replica: str
    export_sha256: str


@dataclass
class _Attached:
    """A sequence's request: the queue its outputs go to on the event loop and, unless the request streams, the
    output merged on the engine thread since the last delivery (only that thread touches ``pending``)."""

    queue: asyncio.Queue[Delta | EngineFailure]
    stream: bool
    pending: Delta | None = None
    started: bool = False  # the sequence's first token was delivered


GAUGE_INTERVAL_S = 0.5  # the engine's gauges go to Ray's metrics this often while it steps (and when it idles)


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the sequences it was running are lost, the replica keeps serving."""


@serve.deployment(name="Generator")
class Generator:
    def __init__(
        self,
        export: str,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        num_threads: int = 1,
        device: str = "cpu",
        tokenizer_file: str | None = None,
    ) -> None:
        import torch

        from pipeline.inference.engine import Engine

        torch.set_num_threads(max(1, num_threads))
        self.engine, self.info = Engine.from_export(
            export,
            max_batch_size=max_batch_size,
            device=device,
            dtype=torch.bfloat16 if device.startswith("cuda") else None,  # fp32 on CPUs (bf16 matmuls are slow)
            tokenizer_file=tokenizer_file,
        )
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._attached: dict[int, _Attached] = {}
        self._work = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_error: BaseException | None = None
        self._gauges = EngineGauges()
        self._gauges.record(self.engine_stats())

    def _ensure_loop(self) -> None:
        """Start the generation loop (a daemon thread: it never holds the process's exit) unless it runs; wake it."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._run, args=(asyncio.get_running_loop(),), name="raygpt-engine", daemon=True
            )
            self._thread.start()
        self._work.set()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            self._step_while_there_is_work(loop)
        except BaseException as exc:  # check_health reports it, and Serve replaces the replica
            self._loop_error = exc
            failure = EngineFailure(f"the generation loop died: {type(exc).__name__}: {exc}")
            with contextlib.suppress(RuntimeError):  # a closed event loop has no request left to tell
                loop.call_soon_threadsafe(self._fail_attached, failure)
            raise

    def _step_while_there_is_work(self, loop: asyncio.AbstractEventLoop) -> None:
        """Step the engine while it has work, on this thread, handing each step's deltas to the event loop without
        waiting for it: the next step starts at once, however busy the loop is with requests and responses."""
        recorded = 0.0
        while True:
            self._work.clear()
            if not self.engine.has_work():
                self._gauges.record(self.engine_stats())
                self._work.wait()
                if self.batch_wait_timeout_s > 0:
                    time.sleep(self.batch_wait_timeout_s)  # let concurrent arrivals share the prefill
                continue
            try:
                deltas = self.engine.step()
            except Exception as exc:  # fail the requests in flight, keep serving
                failure = EngineFailure(f"{type(exc).__name__}: {exc}")
                loop.call_soon_threadsafe(self._deliver, [(seq_id, failure) for seq_id in self.engine.reset()])
                continue
            ready = self._ready(deltas)
            if ready:
                loop.call_soon_threadsafe(self._deliver, ready)
            now = time.monotonic()
            if now - recorded >= GAUGE_INTERVAL_S:
                self._gauges.record(self.engine_stats())
                recorded = now

    def _ready(self, deltas: list[Delta]) -> list[tuple[int, Delta | EngineFailure]]:
        """On the engine thread: what the event loop must see of a step's deltas. A streamed sequence's every delta;
        of the others, the delta with the first token (the request's first-token notice) and, merged, all the rest
        once the sequence finishes, so that a request that does not stream wakes the event loop twice per
        sequence rather than at every step."""
        ready: list[tuple[int, Delta | EngineFailure]] = []
        for delta in deltas:
            attached = self._attached.get(delta.seq_id)
            if attached is None or attached.stream:  # None: not attached yet (or gone), the event loop decides
                ready.append((delta.seq_id, delta))
                continue
            if attached.pending is None:
                attached.pending = delta
            else:
                attached.pending.merge(delta)
            if delta.finish_reason is not None or (not attached.started and delta.completion_tokens > 0):
                attached.started = True
                ready.append((delta.seq_id, attached.pending))
                attached.pending = None
        return ready

    def _deliver(self, items: list[tuple[int, Delta | EngineFailure]]) -> None:
        """On the event loop: each delta (or failure) to the queue of the request its sequence belongs to."""
        for seq_id, item in items:
            attached = self._attached.get(seq_id)
            if attached is not None:
                attached.queue.put_nowait(item)

    def _fail_attached(self, failure: EngineFailure) -> None:
        """On the event loop: end every attached request with ``failure`` (nothing steps their sequences now)."""
        for queue in {id(a.queue): a.queue for a in self._attached.values()}.values():
            queue.put_nowait(failure)

    def stats(self) -> dict[str, Any]:
        """Sequences running and waiting in this replica's engine, and requests attached to it."""
        return {"running": self.engine.num_running, "waiting": self.engine.num_waiting, "attached": len(self._attached)}

    def engine_stats(self) -> EngineStats:
        """This replica's engine figures, for the ingress's ``/metrics`` (and Ray's, after every step)."""
        engine = self.engine
        return EngineStats(
            self.replica, engine.num_running, engine.num_waiting, engine.num_cached_tokens, engine.cache_capacity
        )

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """This replica's engine queue, which Ray Serve records on a timer when the deployment autoscales and
        :class:`~pipeline.serve.autoscale.EngineQueuePolicy` reads (signal ``engine_queue``)."""
        return {WAITING: float(self.engine.num_waiting), RUNNING: float(self.engine.num_running)}

    def check_health(self) -> None:
        if self._loop_error is not None:
            raise RuntimeError(f"the generation loop died: {self._loop_error!r}")

    async def generate(
        self, sequences: list[SequenceRequest], stream: bool = True
    ) -> AsyncIterator[ReplicaInfo | list[tuple[int, Delta]]]:
        """Yields a :class:`ReplicaInfo`, then ``(sequence index, delta)`` lists until every sequence finished;
        without ``stream`` an empty list at the request's first generated token and one list of merged deltas at
        the end (far less per-token overhead)."""
        if self._loop_error is not None:  # until Serve replaces this replica, fail fast rather than hang
            raise EngineFailure(f"the generation loop died: {self._loop_error!r}")
        yield ReplicaInfo(self.replica, self.info.weights_sha256)
        queue: asyncio.Queue[Delta | EngineFailure] = asyncio.Queue()
        index: dict[int, int] = {}
        try:
            for i, seq in enumerate(sequences):
                seq_id = self.engine.add(seq.prompt_ids, seq.params, seq.prompt_text)
                index[seq_id] = i
                self._attached[seq_id] = _Attached(queue, stream)
            self._ensure_loop()
            remaining = len(index)
            merged = [Delta(seq_id) for seq_id in index]
            first_token_sent = stream
            while remaining:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                out = []
                for item in items:
                    if isinstance(item, EngineFailure):
                        raise item
                    if item.finish_reason is not None:
                        remaining -= 1
                    if stream:
                        out.append((index[item.seq_id], item))
                    else:
                        merged[index[item.seq_id]].merge(item)
                if out:
                    yield out
                elif not first_token_sent and any(m.completion_tokens > 0 for m in merged):
                    first_token_sent = True
                    yield []
            if not stream:
                yield list(enumerate(merged))
        finally:
            for seq_id in index:
                if self._attached.pop(seq_id, None) is not None:
                    self.engine.abort(seq_id)  # a no-op for finished sequences
