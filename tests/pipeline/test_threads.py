"""The thread plan of the model actors (issue 24): as many torch threads as the CPUs the
actor reserves, the rest of the node for the decode tasks, and OpenMP threads that wait
passively, so that neither the decode tasks nor anything else runnable stalls the
forward pass."""

import pipeline.runtime as runtime
from pipeline import Resources


def test_cpu_actors_take_the_cpus_they_reserve_and_wait_passively(monkeypatch):
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [2.0])
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 0.0)
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: 2.0)
    plan = runtime.plan_actors()
    assert (plan.actors, plan.threads, plan.cpus, plan.decode_cpus) == (1, 1, 1.0, 1.0)  # no core asked for twice
    assert plan.env == {"OMP_WAIT_POLICY": "PASSIVE"} == runtime.CPU_ACTOR_ENV
    assert runtime.plan_actors(Resources(num_workers=2)).env == runtime.CPU_ACTOR_ENV
    assert runtime.plan_actors(Resources(threads_per_worker=2)).threads == 2  # asked for: as asked
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [16.0])
    assert (runtime.plan_actors().threads, runtime.plan_actors().decode_cpus) == (15, 1.0)
    monkeypatch.setattr(runtime, "cpu_nodes", lambda: [1.0, 1.0])
    assert runtime.plan_actors().threads == 1
    plan.env["X"] = "1"  # each plan holds its own copy
    assert "X" not in runtime.CPU_ACTOR_ENV and "X" not in runtime.plan_actors().env


def test_gpu_actors_keep_torch_defaults(monkeypatch):
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: 2.0)
    plan = runtime.plan_actors()
    assert (plan.actors, plan.gpus, plan.threads, plan.env) == (2, 1.0, None, {})
