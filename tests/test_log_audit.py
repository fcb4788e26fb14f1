"""The end-of-session check of service logs (log_audit.py): its rules on crafted logs, and that a finding fails
a whole pytest run, whatever the selection."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import log_audit
import pytest

ROOT = Path(__file__).resolve().parent.parent
JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz"
TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nValueError: boom'


@pytest.fixture
def scratch():
    """A directory outside this session's temporary directory: the session's own audit must not find the
    problems these tests plant."""
    with tempfile.TemporaryDirectory(prefix="log-audit-") as path:
        yield Path(path)


def _log(base: Path, name: str, *lines: str) -> Path:
    path = base / "chain" / "logs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _problems(base: Path) -> list[str]:
    return [finding.describe(base) for finding in log_audit.audit(base)]


def test_json_lines_and_the_commands_plain_messages_pass(scratch):
    _log(scratch, "relay.log", json.dumps({"event": "serving", "level": "info"}),
         json.dumps({"event": "stats", "agents": 1}), "error: cannot listen on 127.0.0.1:1: in use")
    _log(scratch, "proxy-nope.log", "waiting: cluster nope is not registered", "warning: not on the list")
    _log(scratch, "proxy.out", "ready https://127.0.0.1:47011 context=dev")  # stdout, not a log
    _log(scratch, "sim-0.log", '[["UNAVAILABLE: x", 2]]', "E1202 grpc says something")  # not a service
    assert (scratch / "chain" / "logs").is_dir() and len(log_audit.service_logs(scratch)) == 4
    assert _problems(scratch) == []


def test_a_line_that_is_not_a_json_object_is_found(scratch):
    _log(scratch, "agent-beta.log", json.dumps({"event": "connected to relay"}), "plain text", "[1, 2]")
    assert _problems(scratch) == [
        "chain/logs/agent-beta.log:2: not a JSON line: plain text",
        "chain/logs/agent-beta.log:3: not a JSON line: [1, 2]",
    ]


def test_a_traceback_is_found_raw_or_inside_a_json_field(scratch):
    _log(scratch, "aadproxy.log", json.dumps({"event": "request failed", "exception": TRACEBACK}))
    _log(scratch, "relay.log", json.dumps({"event": "serving"}), *TRACEBACK.splitlines(),
         json.dumps({"event": "stats"}), "after it")
    _log(scratch, "proxy.out", TRACEBACK.splitlines()[0])
    assert _problems(scratch) == [
        "chain/logs/aadproxy.log:1: a traceback: event 'request failed', ValueError: boom",
        "chain/logs/proxy.out:1: a traceback (1 line), ending: Traceback (most recent call last):",
        "chain/logs/relay.log:2: a traceback (3 lines), ending: ValueError: boom",
        "chain/logs/relay.log:6: not a JSON line: after it",
    ]


def test_a_secret_is_found_in_every_kind_of_output_and_not_repeated(scratch):
    _log(scratch, "relay.log", json.dumps({"event": "dial", "token": JWT}),
         json.dumps({"event": "dial", "header": "Bearer [redacted]"}))
    _log(scratch, "proxy.out", "sent Authorization: Bearer abcdefgh12345678")
    _log(scratch, "sim-3.log", "Cookie: session=1")
    problems = _problems(scratch)
    assert problems == [
        "chain/logs/proxy.out:1: a secret (bearer) at column 21",
        "chain/logs/relay.log:1: a secret (jwt) at column 29",
        "chain/logs/sim-3.log:1: a secret (cookie) at column 1",
    ]
    assert not any(JWT[:20] in problem or "abcdefgh" in problem for problem in problems)


def test_logs_of_other_programs_are_not_read(scratch):
    _log(scratch, "kube-apiserver.log", "I1202 plain klog line", f"Bearer {JWT}")
    _log(scratch, "hydra.log", "time=now level=info")
    _log(scratch, "relayish.txt", "plain")
    assert log_audit.service_logs(scratch) == [] and _problems(scratch) == []


@pytest.fixture
def suite(pytester, monkeypatch):
    """A pytest run with only the audit plugin, in a subprocess (as the real suite loads it). Its temporary
    directory is outside ours, or this session's own audit would find the leak it plants."""
    pytester.makepyfile(test_some="""
        def _write(tmp_path, line):
            logs = tmp_path / "logs"
            logs.mkdir()
            (logs / "relay.log").write_text(line + "\\n")

        def test_clean(tmp_path):
            _write(tmp_path, '{"event": "serving"}')

        def test_leaky(tmp_path):
            _write(tmp_path, '{"event": "dial", "authorization": "Bearer abcdefgh12345678"}')

        def test_untouched():
            pass
    """)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), str(ROOT / "deploy" / "local")]))
    with tempfile.TemporaryDirectory(prefix="log-audit-") as outside:
        runs = iter(range(100))

        def run(*args: str):
            basetemp = Path(outside) / str(next(runs))
            return pytester.runpytest_subprocess("-p", "log_audit", "-p", "no:cacheprovider",
                                                 f"--basetemp={basetemp}", *args)

        yield run


def test_a_finding_fails_the_run_whatever_the_selection(suite):
    clean = suite("-k", "clean or untouched")
    assert clean.ret == pytest.ExitCode.OK, clean.stdout.str()
    assert "service logs" not in clean.stdout.str()

    leaky = suite("-k", "leaky")
    assert leaky.ret == pytest.ExitCode.TESTS_FAILED, leaky.stdout.str()
    leaky.stdout.fnmatch_lines(["*service logs: 1 problem(s)*", "*logs/relay.log:1: a secret (bearer) at column *"])
    assert "abcdefgh" not in leaky.stdout.str()

    # The leaky test first or last among others: the run fails the same way.
    for order in (("test_leaky", "test_untouched"), ("test_untouched", "test_clean", "test_leaky")):
        run = suite(*(f"test_some.py::{name}" for name in order))
        assert run.ret == pytest.ExitCode.TESTS_FAILED, run.stdout.str()
        run.stdout.fnmatch_lines(["*service logs: 1 problem(s)*"])
