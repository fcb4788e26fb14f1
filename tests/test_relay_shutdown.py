"""A relay stopped while its agents hang up ends their Connect handlers itself before its server stops:
grpc then has no handler left to cancel, and logs no "Exception not handled by _handle_exceptions"
CancelledError traceback (the leftover make demo-down used to work around)."""

from __future__ import annotations

import signal
from pathlib import Path

from chain import Chain


def test_a_relay_stopped_as_its_agents_hang_up_logs_no_traceback(tmp_path):
    chain = Chain(tmp_path, Path("/nonexistent"))
    try:
        chain.start_relay()
        for name in [f"c{i}" for i in range(8)]:
            chain.add_cluster(name)
            chain.start_agent(name=f"agent-{name}", cluster=name)
        relay = chain.processes["relay"]
        # All at once: the agents hang up while the relay shuts down.
        for process in reversed(list(chain.processes.values())):
            process.popen.send_signal(signal.SIGTERM)
        assert relay.popen.wait(15) == 0, relay.tail()
        for process in chain.processes.values():
            process.popen.wait(15)
    finally:
        chain.stop_all()
    log = relay.log.read_text()
    assert "Traceback" not in log and "_handle_exceptions" not in log, log[-3000:]
    assert '"event": "agent disconnected"' in log
