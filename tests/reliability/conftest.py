"""Fixtures of the reliability suite: the ledger every case writes to, printed at the end."""

from __future__ import annotations

import pytest
from ledger import LEDGER, Case


@pytest.fixture
def ledger(request):
    """``ledger(tried=..., checked=..., inputs=0, faults=0, rows_checked=0, rows_lost=0)``:
    call it at the end of a case, after its assertions, so only passing cases are counted."""

    def record(tried: str, checked: str, inputs: int = 0, faults: int = 0, rows_checked: int = 0,
               rows_lost: int = 0) -> None:
        LEDGER.append(Case(request.node.name, tried, checked, inputs, faults, rows_checked, rows_lost))

    return record


def pytest_terminal_summary(terminalreporter):
    if not LEDGER:
        return
    tr = terminalreporter
    tr.write_sep("=", "reliability ledger")
    for c in LEDGER:
        tr.write_line(f"{c.name}: tried {c.tried}; checked {c.checked}; inputs {c.inputs}; faults {c.faults}; "
                      f"rows {c.rows_checked}, lost {c.rows_lost}")
    tr.write_line(f"cases {len(LEDGER)}, bad or hostile inputs {sum(c.inputs for c in LEDGER)}, "
                  f"faults injected {sum(c.faults for c in LEDGER)}, "
                  f"rows checked {sum(c.rows_checked for c in LEDGER)}, rows lost {sum(c.rows_lost for c in LEDGER)}")
