"""The thread plan of the model actors (issue 24): as many torch threads as the node has
CPUs, one CPU of the node reserved for the decode tasks, and OpenMP threads that wait
passively, so that a decode task takes its core at once and nothing else runnable stalls
the forward pass."""

import pipeline.runtime as runtime
from pipeline import Resources


def test_cpu_actors_take_the_node_s_cpus_and_wait_passively(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [2.0])
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: 2.0)
    plan = runtime.plan_actors()
    assert (plan.actors, plan.threads, plan.cpus, plan.decode_cpus) == (1, 2, 1.0, 1.0)  # reservations: no core asked for twice
    assert plan.env == {"OMP_WAIT_POLICY": "PASSIVE"} == runtime.CPU_ACTOR_ENV
    assert runtime.plan_actors(Resources(num_workers=2)).env == runtime.CPU_ACTOR_ENV
    assert runtime.plan_actors(Resources(threads_per_worker=1)).threads == 1  # asked for: as asked
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [16.0])
    assert (runtime.plan_actors().threads, runtime.plan_actors().decode_cpus) == (16, 1.0)
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [1.0, 1.0])
    assert runtime.plan_actors().threads == 1
    plan.env["X"] = "1"  # each plan holds its own copy
    assert "X" not in runtime.CPU_ACTOR_ENV and "X" not in runtime.plan_actors().env


def test_gpu_actors_keep_torch_defaults(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 2.0)
    plan = runtime.plan_actors()
    assert (plan.actors, plan.gpus, plan.threads, plan.env) == (2, 1.0, None, {})
