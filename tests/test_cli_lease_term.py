"""``lockd run`` gives its child the grace, inside the lease, when renewals fail at once.

Needs the SDK to mark a hold ``at_risk`` at the first failed renewal attempt (issue 12,
item 8): before that, the http backend retries a refused connection until the deadline.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from lockd.cli import EXIT_LOCK_LOST
from tests.serverproc import start_server
from tests.test_cli_lease import (
    GRACE,
    TTL,
    dead,
    lease_end_after_a_renewal,
    stamps,
    start_run,
    wait_for,
)


def test_store_down_child_gets_sigterm_with_grace_and_sigkill_before_the_lease(
    tmp_path: Path,
) -> None:
    store, log = f"file://{tmp_path / 'store'}", tmp_path / "log"
    server = start_server(store)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        first = start_run(server.url, log, "A", "--ttl", str(TTL), "--grace", str(GRACE))
        processes.append(first)
        wait_for(lambda: stamps(log, "A"))
        pid = stamps(log, "A")[0][2]
        lease_end = lease_end_after_a_renewal(server.url)
        server.stop(signal.SIGKILL)  # renewals now fail at once: at_risk
        if server.process.stdout:
            server.process.stdout.close()
        wait_for(lambda: dead(pid))
        died_by = time.monotonic()
        assert died_by < lease_end, f"child lived {died_by - lease_end:.3f} s past the lease"
        terms = [t for event, t, _ in stamps(log, "A") if event == "term"]
        assert len(terms) == 1 and lease_end - GRACE - 0.3 < terms[0] < lease_end - GRACE / 2
        assert first.wait(timeout=20) == EXIT_LOCK_LOST
        server = start_server(store)  # the same store again: the next run waits its turn
        second = start_run(server.url, log, "B", "--wait", "20", once=True)
        processes.append(second)
        assert second.wait(timeout=30) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        server.stop()
        if server.process.stdout:
            server.process.stdout.close()
    (b_start,) = [t for event, t, _ in stamps(log, "B") if event == "start"]
    assert max(t for _, t, _ in stamps(log, "A")) < b_start
