"""The engine-queue autoscaling policy (pipeline.serve.autoscale) on hand-built Ray Serve ``AutoscalingContext``s,
and its wiring: the replica's stats, ``serve.autoscaling`` to Serve's ``autoscaling_config``, and Serve's own
wrapper (delays, bounds) around the policy loaded from its import path. No Ray cluster."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from pipeline.config import ConfigError, validate_tree
from pipeline.serve.autoscale import POLICY_PATH, RUNNING, WAITING, EngineQueuePolicy, engine_queue_replicas
from pipeline.serve.deploy import autoscaling_config

DEPLOYMENT = DeploymentID(name="Generator", app_name="raygpt")


def replicas(count: int) -> list[ReplicaID]:
    return [ReplicaID(unique_id=f"r{i}", deployment_id=DEPLOYMENT) for i in range(count)]


def context(
    running: list[ReplicaID],
    metrics: dict[str, dict[ReplicaID, float]] | None,
    *,
    target: int | None = None,
    queued: float = 0.0,
    lowest: int = 1,
    highest: int = 4,
    config: AutoscalingConfig | None = None,
) -> AutoscalingContext:
    return AutoscalingContext(
        deployment_id=DEPLOYMENT,
        deployment_name=DEPLOYMENT.name,
        app_name=DEPLOYMENT.app_name,
        current_num_replicas=len(running),
        target_num_replicas=len(running) if target is None else target,
        running_replicas=running,
        total_num_requests=0.0,
        total_queued_requests=queued,
        aggregated_metrics=metrics,
        raw_metrics=None,
        capacity_adjusted_min_replicas=lowest,
        capacity_adjusted_max_replicas=highest,
        policy_state={},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=time.time(),
        config=config,
    )


def queue(running: list[ReplicaID], waiting_counts: list[float], running_counts: list[float]) -> dict[str, Any]:
    return {
        WAITING: dict(zip(running, waiting_counts, strict=True)),
        RUNNING: dict(zip(running, running_counts, strict=True)),
    }


def test_desired_replicas_are_the_sequences_over_the_target_rounded_up() -> None:
    r = replicas(2)
    assert engine_queue_replicas(context(r, queue(r, [3, 0], [4, 2])), target_sequences=4) == 3  # 9 / 4
    assert engine_queue_replicas(context(r, queue(r, [0, 0], [4, 4])), target_sequences=4) == 2  # exactly 8 / 4
    assert engine_queue_replicas(context(r, queue(r, [0, 0], [1, 0])), target_sequences=4) == 1


def test_float_noise_of_averages_does_not_add_a_replica() -> None:
    (r,) = replicas(1)
    averaged = queue([r], [0.1], [0.2])  # 0.30000000000000004
    assert engine_queue_replicas(context([r], averaged), target_sequences=0.1) == 3


def test_requests_queued_at_the_ingress_count_as_demand() -> None:
    """A saturated replica holds max_ongoing_requests requests; the rest of the backlog waits in the handles."""
    (r,) = replicas(1)
    saturated = queue([r], [0], [4])
    assert engine_queue_replicas(context([r], saturated), target_sequences=4) == 1
    assert engine_queue_replicas(context([r], saturated, queued=5), target_sequences=4) == 3


def test_bounded_by_min_and_max() -> None:
    r = replicas(2)
    assert engine_queue_replicas(context(r, queue(r, [50, 50], [8, 8]), highest=3), target_sequences=4) == 3
    assert engine_queue_replicas(context(r, queue(r, [0, 0], [0, 0]), lowest=2), target_sequences=4) == 2
    assert engine_queue_replicas(context(r, queue(r, [0, 0], [0, 0]), lowest=0), target_sequences=4) == 0


def test_no_figures_yet_keeps_the_current_target() -> None:
    r = replicas(2)
    for metrics in (None, {}, {WAITING: {}, RUNNING: {}}):
        assert engine_queue_replicas(context(r, metrics, target=3), target_sequences=4) == 3
    assert engine_queue_replicas(context([], None, target=0, lowest=0), target_sequences=4) == 0


def test_a_replica_yet_to_report_does_not_shrink_the_deployment() -> None:
    r = replicas(3)
    partial = {WAITING: {r[0]: 0.0}, RUNNING: {r[0]: 1.0}}  # r1 and r2 just started
    assert engine_queue_replicas(context(r, partial, target=3), target_sequences=4) == 3
    busy = {WAITING: {r[0]: 10.0}, RUNNING: {r[0]: 4.0}}  # growth is not held back
    assert engine_queue_replicas(context(r, busy, target=3), target_sequences=4) == 4


def test_figures_of_replicas_no_longer_running_are_ignored() -> None:
    r = replicas(2)
    metrics = queue(r, [0, 40], [1, 8])
    assert engine_queue_replicas(context(r[:1], metrics), target_sequences=4) == 1


def test_policy_object_returns_a_decision_and_a_fresh_state() -> None:
    r = replicas(2)
    decision, state = EngineQueuePolicy(target_sequences=2)(context(r, queue(r, [1, 1], [2, 2])))
    assert (decision, state) == (3, {})
    with pytest.raises(ValueError):
        EngineQueuePolicy(target_sequences=0)


def test_generator_reports_its_engine_queue() -> None:
    from pipeline.serve.replica import Generator

    generator = object.__new__(Generator.func_or_class)  # only the engine is read
    generator.engine = SimpleNamespace(num_waiting=3, num_running=5)
    assert asyncio.run(generator.record_autoscaling_stats()) == {WAITING: 3.0, RUNNING: 5.0}


def serve_section(**autoscaling: Any) -> Any:
    return validate_tree({"serve": {"max_batch_size": 6, "autoscaling": {"max_replicas": 4, **autoscaling}}}).serve


def test_engine_queue_signal_sets_the_policy_and_defaults_to_the_batch_size() -> None:
    options = autoscaling_config(serve_section(signal="engine_queue"))
    assert options["policy"] == {"policy_function": POLICY_PATH, "policy_kwargs": {"target_sequences": 6.0}}
    options = autoscaling_config(serve_section(signal="engine_queue", target_sequences=2.5))
    assert options["policy"]["policy_kwargs"] == {"target_sequences": 2.5}


def test_ongoing_requests_signal_keeps_serves_default_policy() -> None:
    options = autoscaling_config(serve_section(target_ongoing_requests=3))
    assert "policy" not in options and options["target_ongoing_requests"] == 3
    assert AutoscalingConfig(**options).policy.is_default_policy_function()
    defaults = AutoscalingConfig()
    assert (options["look_back_period_s"], options["upscale_delay_s"], options["downscale_delay_s"]) == (
        defaults.look_back_period_s,
        defaults.upscale_delay_s,
        defaults.downscale_delay_s,
    )


def test_unknown_signal_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="serve.autoscaling.signal"):
        serve_section(signal="gpu_utilization")
    with pytest.raises(ConfigError, match="serve.autoscaling.target_sequences"):
        serve_section(signal="engine_queue", target_sequences=0)


def _serve_policy(options: dict[str, Any]) -> tuple[AutoscalingConfig, Any]:
    """Serve's own path from an autoscaling_config to the callable its controller runs each tick."""
    from ray.serve._private.autoscaling_state import _resolve_policy_callable
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    config = AutoscalingConfig(**options)
    return config, _apply_autoscaling_config(_resolve_policy_callable(config.policy))


def test_serve_loads_the_policy_by_its_import_path_and_applies_its_delays() -> None:
    r = replicas(1)
    busy = queue(r, [6], [4])  # 10 sequences, target 4: 3 replicas wanted
    config, policy = _serve_policy(
        autoscaling_config(serve_section(signal="engine_queue", target_sequences=4, upscale_delay_s=0))
    )
    assert policy(context(r, busy, config=config))[0] == 3
    config, policy = _serve_policy(autoscaling_config(serve_section(signal="engine_queue", target_sequences=4)))
    assert policy(context(r, busy, config=config))[0] == 1  # upscale_delay_s (30 s) has not passed yet
