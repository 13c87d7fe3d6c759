"""Replica autoscaling on the engines' queues (``serve.autoscaling.signal: engine_queue``).

Each Generator replica reports its engine's waiting and running sequence counts
(:meth:`~pipeline.serve.replica.Generator.record_autoscaling_stats`); Ray Serve averages each replica's figures over
``look_back_period_s`` and calls :class:`EngineQueuePolicy` with them in an ``AutoscalingContext``. The policy asks
for enough replicas that each holds ``target_sequences``; Serve applies the up/down scaling delays to that decision
and bounds it by min/max replicas.

Serve ships the policy to its controller by value (cloudpickle), so this module needs nothing beyond the standard
library at call time: the controller need not import raygpt.
"""

from __future__ import annotations

import math
from typing import Any

# The names of the figures a replica reports (keys of AutoscalingContext.aggregated_metrics).
WAITING = "raygpt_engine_waiting_sequences"
RUNNING = "raygpt_engine_running_sequences"
# Ray Serve's import path of the policy (AutoscalingPolicy.policy_function).
POLICY_PATH = "pipeline.serve.autoscale:EngineQueuePolicy"
# Time-weighted averages carry float noise: 6 sequences may add up to 6.000000000000001, which must not ask for
# one replica more than 6 / target.
_EPSILON = 1e-9


def engine_queue_replicas(ctx: Any, target_sequences: float) -> int:
    """The replicas for the demand in ``ctx`` (a Ray Serve ``AutoscalingContext``), between its min and max.

    Demand is the waiting and running sequences of every running replica's engine plus the requests queued at
    the ingress's handles (each at least one sequence): a replica takes at most ``max_ongoing_requests``
    requests, so a saturated deployment's backlog waits in those queues, where no engine sees it. While a
    running replica has yet to report (one that just started pushes its first figures within a push interval),
    the decision stays at or above the current target: counting that replica as idle would shrink the
    deployment that just grew. With no figures at all, the current target holds.
    """
    metrics = ctx.aggregated_metrics or {}
    waiting = metrics.get(WAITING) or {}
    running = metrics.get(RUNNING) or {}
    replicas = list(ctx.running_replicas)
    reported = [r for r in replicas if r in waiting or r in running]
    lowest, highest = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
    if not reported:
        return min(max(ctx.target_num_replicas, lowest), highest)
    sequences = sum(waiting.get(r, 0.0) + running.get(r, 0.0) for r in reported)
    demand = sequences + (ctx.total_queued_requests or 0.0)
    desired = math.ceil(demand / target_sequences - _EPSILON)
    if len(reported) < len(replicas):
        desired = max(desired, ctx.target_num_replicas)
    return min(max(desired, lowest), highest)


class EngineQueuePolicy:
    """Ray Serve's custom policy: ``AutoscalingPolicy(policy_function=POLICY_PATH,
    policy_kwargs={"target_sequences": ...})``. A class, since Serve passes ``policy_kwargs`` only to a class's
    constructor (a plain function gets the context alone)."""

    def __init__(self, target_sequences: float) -> None:
        if not target_sequences > 0:
            raise ValueError(f"target_sequences must be > 0, got {target_sequences!r}")
        self.target_sequences = float(target_sequences)

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        return engine_queue_replicas(ctx, self.target_sequences), {}
