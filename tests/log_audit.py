"""A pytest plugin (conftest.py loads it): when the session ends, every clusterconnect service log it
produced is checked, whichever tests ran and in whatever order, and any finding fails the run.

deploy/local/chain.py writes each process's stderr to STATE_DIR/logs/<name>.log (for our services, their
structured log: JSON lines, clusterconnect.logs) and the client proxy's stdout to <name>.out. The rules:

- No token, Authorization value or cookie in any of them, nor in the logs of the bench's simulated agents.
- In a service's .log every line is a JSON object, except the one-line messages our commands print for a
  person (``error: ...`` when a start fails, the client proxy's ``waiting: ...`` and ``warning: ...``).
- No traceback anywhere, raw or inside a JSON field.

Not checked for JSON, by design: the .out files (the client proxy's answer to its caller, not a log) and
the simulated agents' logs (bench/sim_agents.py is a load generator, not a service). Other processes'
logs (the devcluster's, Hydra's) are not ours and not read at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from chain import LOG_SUFFIX, STDOUT_SUFFIX

# Process names as Chain.spawn and the tests give them: relay, aadproxy, agent[-X], proxy[-X], gateway[-X].
SERVICE = re.compile(r"^(relay|aadproxy|agent|proxy|gateway)(-[\w.-]+)?$")
SIMULATED_AGENTS = re.compile(r"^sim-\d+$")

# A JWT (header.payload.signature, base64url, header starting with '{"'), a bearer value that is not
# redacted, or a cookie header.
SECRET = re.compile(
    rb"(?P<jwt>eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,})"
    rb"|(?P<bearer>[Bb]earer (?!\[redacted\])[A-Za-z0-9._~+/=-]{8,})"
    rb"|(?P<cookie>[Cc]ookie: \S)"
)
PLAIN_MESSAGE = re.compile(rb"^(error|warning|waiting): \S")
TRACEBACK = b"Traceback (most recent call last)"
EXCERPT = 160


@dataclass(frozen=True)
class Finding:
    path: Path
    line: int
    problem: str

    def describe(self, base: Path) -> str:
        where = self.path.relative_to(base) if self.path.is_relative_to(base) else self.path
        return f"{where}:{self.line}: {self.problem}"


def service_logs(base: Path) -> list[Path]:
    """Every log and stdout file of our processes under ``base`` (in any Chain's STATE_DIR/logs)."""
    found = []
    for path in base.rglob("logs/*"):
        if not path.is_file():
            continue
        ours = SERVICE.match(path.stem) and path.suffix in (LOG_SUFFIX, STDOUT_SUFFIX)
        if ours or (SIMULATED_AGENTS.match(path.stem) and path.suffix == LOG_SUFFIX):
            found.append(path)
    return sorted(found)


def is_structured(path: Path) -> bool:
    """A service's own log, whose every line must be JSON."""
    return bool(SERVICE.match(path.stem)) and path.suffix == LOG_SUFFIX


def check(path: Path) -> list[Finding]:
    structured = is_structured(path)
    findings = []
    raw_traceback: list[bytes] = []  # a plain-text traceback in progress: one finding for all its lines
    start = 0

    def end_traceback() -> None:
        if raw_traceback:
            last = _excerpt(raw_traceback[-1])
            lines = f"{len(raw_traceback)} line{'s' if len(raw_traceback) > 1 else ''}"
            findings.append(Finding(path, start, f"a traceback ({lines}), ending: {last}"))
            raw_traceback.clear()

    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        secret = SECRET.search(line)
        if secret:
            end_traceback()
            # Name the kind only: the finding is printed, and must not print the secret.
            findings.append(Finding(path, number, f"a secret ({secret.lastgroup}) at column {secret.start() + 1}"))
            continue
        structured_line = _is_json_object(line)
        if raw_traceback and not structured_line and not line.startswith(TRACEBACK):
            raw_traceback.append(line)
            continue
        end_traceback()
        if line.startswith(TRACEBACK):
            raw_traceback.append(line)
            start = number
        elif TRACEBACK in line:
            findings.append(Finding(path, number, f"a traceback: {_traceback_summary(line)}"))
        elif structured and not structured_line and not PLAIN_MESSAGE.match(line):
            findings.append(Finding(path, number, f"not a JSON line: {_excerpt(line)}"))
    end_traceback()
    return findings


def _is_json_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _traceback_summary(line: bytes) -> str:
    """For a JSON line (structlog's ``exception`` field), its event and the exception's last line."""
    try:
        event = json.loads(line)
    except ValueError:
        return _excerpt(line)
    if not isinstance(event, dict):
        return _excerpt(line)
    field = next((v for v in event.values() if isinstance(v, str) and TRACEBACK.decode() in v), None)
    if field is None:  # nested deeper than a top-level field
        return _excerpt(line)
    return f"event {event.get('event')!r}, {field.strip().splitlines()[-1][:EXCERPT]}"


def _excerpt(line: bytes) -> str:
    text = line.decode(errors="replace").strip()
    return text if len(text) <= EXCERPT else text[:EXCERPT] + "…"


def audit(base: Path) -> list[Finding]:
    """Every finding in every service log under ``base``."""
    return [finding for path in service_logs(base) for finding in check(path)]


# ---- the plugin ----------------------------------------------------------------------------------

# This session's temporary directory (and so every Chain's logs), once a test asked for one.
BASETEMP = pytest.StashKey[Path]()
SHOWN_FINDINGS = 40


@pytest.fixture(scope="session", autouse=True)
def _service_logs_are_audited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    request.config.stash[BASETEMP] = tmp_path_factory.getbasetemp()


@pytest.hookimpl(tryfirst=True)  # before the tmp_path plugin may remove passed tests' directories
def pytest_sessionfinish(session: pytest.Session) -> None:
    # Every fixture is torn down by now, so every process has stopped and its log is complete.
    base = session.config.stash.get(BASETEMP, None)
    if base is None:
        return
    findings = audit(base)
    if not findings:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_sep("=", f"service logs: {len(findings)} problem(s) (tests/log_audit.py)", red=True)
        for finding in findings[:SHOWN_FINDINGS]:
            reporter.write_line(finding.describe(base))
        if len(findings) > SHOWN_FINDINGS:
            reporter.write_line(f"... and {len(findings) - SHOWN_FINDINGS} more, under {base}")
    if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
