"""Runs last (file order): no token, Authorization value or cookie in any log this test session produced."""

from __future__ import annotations

import re
from pathlib import Path

# A JWT (header.payload.signature, base64url, header starting with '{"'), a bearer value that is not
# redacted, or a cookie header.
SECRET = re.compile(
    rb"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"
    rb"|[Bb]earer (?!\[redacted\])[A-Za-z0-9._~+/=-]{8,}"
    rb"|[Cc]ookie: \S"
)


def _service_logs(base: Path) -> list[Path]:
    """Logs written by clusterconnect processes (relay, agent, aadproxy, proxy) anywhere in this session."""
    names = re.compile(r"^(relay|agent.*|aadproxy|proxy.*|sim-\d+)\.(log|out)$")
    return [p for p in base.rglob("*") if p.is_file() and names.match(p.name)]


def test_no_secret_in_any_service_log(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    logs = _service_logs(base)
    assert logs, f"no service logs found under {base}"
    leaks = []
    for log in logs:
        for number, line in enumerate(log.read_bytes().splitlines(), 1):
            match = SECRET.search(line)
            if match:
                leaks.append(f"{log.relative_to(base)}:{number}: …{match.group()[:12].decode(errors='replace')}…")
    assert not leaks, "secrets in logs:\n" + "\n".join(leaks[:20])
