"""The chaos suite (`--chaos`, length by `--chaos-seconds`): the invariant
under every fault at once. With the provider's rotation grace on, nothing
may be lost; with it off, a token may be lost only when a leader was killed
inside that refresh's in-flight window, and each such loss is listed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.harness import Chaos
from tests.conftest import PgServer
from tests.faults import own_postgres

pytestmark = [pytest.mark.chaos, pytest.mark.anyio, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def chaos_pg() -> Iterator[PgServer]:
    with own_postgres() as server:
        yield server


@pytest.mark.parametrize("grace_s", [60.0, 0.0], ids=["grace-on", "grace-off"])
async def test_chaos(
    chaos_pg: PgServer,
    tmp_path: Path,
    pytestconfig: pytest.Config,
    grace_s: float,
) -> None:
    seconds = float(pytestconfig.getoption("--chaos-seconds"))
    report = await Chaos(tmp_path, chaos_pg, grace_s=grace_s, seconds=seconds).run()
    text = "\n".join(report.lines())
    print("\n" + text)
    (tmp_path / "chaos-report.txt").write_text(text + "\n")

    assert report.false_reconnects == [], text
    assert report.lapses == [], text
    assert report.duplicates_unexplained == [], text
    assert report.lost_unexplained == [], text
    if grace_s:
        assert report.lost == [], text
    assert report.counts["refreshes_ok"] > report.integrations, text
