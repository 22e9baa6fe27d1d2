"""Fitting the cluster before training (``train/trainer.py``: ``plan_worker_cpus``): the workers' reservation, the CPUs
kept for Ray Data's tasks, and the error that names what is missing and what to change. The real 2-CPU head is in
tests/test_job_submit.py. And the Ray Train settings of a local Ray instance (``start_local_ray``)."""

from __future__ import annotations

import pytest

from volvlp_ray.config import ConfigError, load_config
from volvlp_ray.train.trainer import ClusterTooSmallError, plan_worker_cpus


def _scaling(*overrides: str):
    return load_config(None, list(overrides)).scaling


def test_a_cluster_that_holds_everything_gets_the_asked_reservation():
    assert plan_worker_cpus(_scaling(), [{"CPU": 3.0}]) == (1.0, None)
    assert plan_worker_cpus(_scaling("scaling.data_cpus=0"), [{"CPU": 2.0}]) == (1.0, None)
    gpu = _scaling("scaling.num_workers=2", "scaling.use_gpu=true", "scaling.cpus_per_worker=4")
    assert plan_worker_cpus(gpu, [{"CPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}]) == (4.0, None)


def test_one_node_short_of_the_data_cpus_is_fitted_with_smaller_reservations():
    cpus, line = plan_worker_cpus(_scaling(), [{"CPU": 2.0}])  # `ray start --head --num-cpus=2`, the default run
    assert cpus == 0.5
    assert line.startswith("[train] the cluster has 2 CPUs on 1 node") and "reserves 0.5 CPU instead of 1" in line
    assert "1 stay free for Ray Data" in line
    cpus, _ = plan_worker_cpus(_scaling("scaling.num_workers=3", "scaling.data_cpus=2"), [{"CPU": 4.0}])
    assert cpus == 0.66 and 4 - 3 * cpus >= 2


@pytest.mark.parametrize("overrides,nodes,missing", [
    # the workers themselves do not fit: never fitted
    (["scaling.num_workers=3"], [{"CPU": 2.0}], "Missing: 1 CPU(s) for the training workers"),
    # enough CPUs in all, but no node holds a worker's bundle
    (["scaling.cpus_per_worker=2"], [{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 2.0}], "nodes that hold 2 bundles of 2 CPU"),
    # several nodes: smaller reservations could leave a fraction of a CPU on each node, where no task fits
    (["scaling.num_workers=4"], [{"CPU": 2.0}, {"CPU": 2.0}], "1 CPU(s) for Ray Data's tasks beside the training "
                                                               "workers (fitting by smaller reservations is done on "
                                                               "one node only)"),
    (["scaling.use_gpu=true"], [{"CPU": 8.0, "GPU": 1.0}], "Missing: 1 GPU(s)"),
])
def test_a_cluster_too_small_fails_naming_the_missing_resources_and_the_settings(overrides, nodes, missing):
    with pytest.raises(ClusterTooSmallError) as e:
        plan_worker_cpus(_scaling(*overrides), nodes)
    msg = str(e.value)
    assert missing in msg, msg
    for setting in ("scaling.num_workers", "scaling.cpus_per_worker", "scaling.data_cpus", "scaling.cluster"):
        assert setting in msg, (setting, msg)


def test_nodes_that_may_join_turn_the_error_into_a_line():
    cpus, line = plan_worker_cpus(_scaling("scaling.use_gpu=true", "scaling.num_workers=8"), [{"CPU": 4.0}],
                                  nodes_may_join="KubeRay manages the cluster")
    assert cpus == 1.0  # no fitting where nodes may come
    assert "missing 8 GPU(s)" in line and "KubeRay" in line and "scaling.cluster=fixed" in line


def test_bad_settings_are_config_errors():
    for override, match in [("scaling.data_cpus=-1", "data_cpus"), ("scaling.cpus_per_worker=0", "cpus_per_worker"),
                            ("train.timeout_s=0", "train.timeout_s"), ("scaling.cluster=elastic", "scaling.cluster")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [override])


def test_a_local_ray_polls_its_workers_often_and_watches_no_preemption(ray_session):
    """A local Ray started by the job (``start_local_ray``; the session's is one): Ray Train's controller polls its
    workers every 0.5 s instead of 2 s and starts no preemption watcher (one node that no autoscaler drains) --
    values ``fit()`` hands to the controller, which reads them; a value the user set stays."""
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from volvlp_ray.train.trainer import LOCAL_RAY_TRAIN_ENV, local_ray_train_env

    assert LOCAL_RAY_TRAIN_ENV == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
                                   "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    handed = get_env_vars_to_propagate()
    assert {k: handed.get(k) for k in LOCAL_RAY_TRAIN_ENV} == LOCAL_RAY_TRAIN_ENV
    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3"}
    local_ray_train_env(env)
    assert env == {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "3", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
