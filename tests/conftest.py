"""Fixtures every test uses: one Ray session, a real S3 server on loopback."""

from __future__ import annotations

import os
import uuid

import pytest
from services import S3Server

# Ray workers inherit this; keeps every process in the suite off the network and quiet.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default; a finished run waits for
# the next poll. Tests run dozens of short runs, so poll faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole run (starting Ray costs seconds)."""
    import ray
    from ray.data import DataContext

    ray.init(
        address="local",  # a Ray of its own, even where another cluster on this machine wrote /tmp/ray/ray_current_cluster
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=1 << 30,
        # as the CLI starts Ray (quiet by default): the workers' output goes to the session's log
        # files only. Forwarded, a worker's line could land in whichever test's capsys was open
        # (the demo's printed-line count failed so in a full run)
        log_to_driver=False,
        ignore_reinit_error=True,
    )
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 endpoint on loopback for the whole run, torn down at the end."""
    server = S3Server.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket (names need 3-63 characters)."""
    return s3_server.make_bucket(f"t-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def storage_options(s3_server) -> dict:
    """The `storage_options` a user would pass for this bucket's endpoint and credentials."""
    return s3_server.storage_options


@pytest.fixture(scope="session")
def tiny_name() -> str:
    """Name of a small CNN registered in the zoo for tests."""
    import models  # noqa: F401  (registers tiny_cnn_test once per process)

    return "tiny_cnn_test"


@pytest.fixture(scope="session")
def vgg16_random():
    """VGG16 with random weights, loaded once (builders never modify their input)."""
    import surgery

    return surgery.zoo.load("vgg16")


@pytest.fixture(scope="session")
def lite0_imagenet():
    """efficientnet_lite0 with its bundled ImageNet weights."""
    import surgery

    return surgery.zoo.load("efficientnet_lite0", weights="imagenet")


_LEDGER: list[dict] = []  # the passing reliability cases of this run, as their reports arrived


def pytest_runtest_logreport(report):
    """A passing reliability case's ledger entry (see ``tests/reliability/conftest.py``): it
    travels in the report, so under ``pytest -n`` the controller gets the workers' cases."""
    if report.when == "call" and report.passed:
        _LEDGER.extend(value for key, value in report.user_properties if key == "reliability_case")


def pytest_terminal_summary(terminalreporter):
    if not _LEDGER:
        return
    cases, tr = _LEDGER, terminalreporter
    tr.write_sep("=", "reliability ledger")
    for c in cases:
        tr.write_line(f"{c['name']}: tried {c['tried']}; checked {c['checked']}; inputs {c['inputs']}; "
                      f"faults {c['faults']}; rows {c['rows_checked']}, lost {c['rows_lost']}")
    total = {k: sum(c[k] for c in cases) for k in ("inputs", "faults", "rows_checked", "rows_lost")}
    tr.write_line(f"cases {len(cases)}, bad or hostile inputs {total['inputs']}, faults injected {total['faults']}, "
                  f"rows checked {total['rows_checked']}, rows lost {total['rows_lost']}")
