"""Fixtures of the reliability suite: the ledger every case writes to, printed at the end
(by ``tests/conftest.py``, which sees every case's report, also under ``pytest -n``)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from ledger import LEDGER_PROPERTY, Case


@pytest.fixture
def ledger(request):
    """``ledger(tried=..., checked=..., inputs=0, faults=0, rows_checked=0, rows_lost=0)``:
    call it at the end of a case, after its assertions, so only passing cases are counted.
    The case travels in the test's report (``user_properties``), so the ledger is the
    same when xdist workers run the cases."""

    def record(tried: str, checked: str, inputs: int = 0, faults: int = 0, rows_checked: int = 0,
               rows_lost: int = 0) -> None:
        case = Case(request.node.name, tried, checked, inputs, faults, rows_checked, rows_lost)
        request.node.user_properties.append((LEDGER_PROPERTY, asdict(case)))

    return record
