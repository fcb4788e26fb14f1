"""Secrets stay off command lines, where every local user reads them (ps, /proc/PID/cmdline): the agent
command `clusters add` prints, the agent's join token from a file, and `login`'s code and client secret
from stdin or a file (real relay, agent and CLI processes)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from chain import BIN, Chain, script, wait_until


@pytest.fixture
def relay(lone_relay):
    return lone_relay


def _agent_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if "clusterconnect-agent " in line]
    assert len(lines) == 1, output
    return lines[0]


def test_printed_agent_command_works_as_printed_and_shows_no_token_in_ps(relay, tmp_path):
    added = relay.admin("add", "printed")
    command = _agent_line(added.stdout)
    token = next(word.split("=", 1)[1] for word in shlex.split(command)
                 if word.startswith("CLUSTERCONNECT_JOIN_TOKEN="))
    assert "--join-token" not in command
    # Exactly as printed, in a shell (its default --state-dir under a HOME of the test's own); bash runs
    # a single command in place of itself, so the agent has the shell's pid.
    log = relay.state_dir / "logs" / "agent-printed.log"
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "CLUSTERCONNECT_LOG_LEVEL": "info"}
    with open(log, "wb") as handle:
        agent = subprocess.Popen(["bash", "-c", command], env=env, stdout=handle, stderr=handle,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: '"event": "joined relay"' in log.read_text(), 30, "the printed command to join")
        shown = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(agent.pid)], capture_output=True, text=True,
                               check=True).stdout
        assert "clusterconnect-agent" in shown and "--cluster printed" in shown, shown
        assert token not in shown
        assert token.encode() not in Path(f"/proc/{agent.pid}/cmdline").read_bytes()
    finally:
        agent.terminate()
        agent.wait(10)
    assert (tmp_path / "home" / ".local/state/clusterconnect/agent-printed/agent.pem").exists()


def test_agent_reads_its_join_token_from_a_file(relay, tmp_path):
    join = relay.add_cluster("filed")
    token_file = tmp_path / "join-token"
    token_file.write_text(join["join_token"] + "\n")
    token_file.chmod(0o600)
    relay.joins["filed"] = {**join, "join_token": ""}  # nothing in the environment: only the file has it
    flags = ("--join-token-file", str(token_file))
    relay.start_agent(name="agent-filed", cluster="filed", extra_args=flags).stop()
    log = (relay.state_dir / "logs" / "agent-filed.log").read_text()
    assert '"event": "joined relay"' in log and "visible to every local user" not in log
    # Once joined, the token is not needed: the file (a Secret's, say) may be gone.
    token_file.unlink()
    relay.start_agent(name="agent-filed", cluster="filed", extra_args=flags).stop()


def test_join_token_on_the_command_line_still_works_with_a_warning(relay):
    join = relay.add_cluster("legacy")
    relay.joins["legacy"] = {**join, "join_token": ""}
    relay.start_agent(name="agent-legacy", cluster="legacy", extra_args=("--join-token", join["join_token"])).stop()
    log = (relay.state_dir / "logs" / "agent-legacy.log").read_text()
    assert '"event": "joined relay"' in log
    assert "--join-token on the command line is visible to every local user" in log


def _login(relay: Chain, state: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), "login", "--relay", relay.relay_url, "--relay-ca",
                           str(relay.relay_ca), "--state-dir", str(state), *args],
                          input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


def _code(relay: Chain, user: str) -> str:
    added = relay.cli("users", "add", user)
    assert "--code -" in added.stdout  # the hint it prints keeps the code off the command line too
    return added.stdout.splitlines()[1].strip()


def test_login_code_from_stdin_or_a_file(relay, tmp_path):
    piped = _login(relay, tmp_path / "dave", "--code", "-", stdin=_code(relay, "dave") + "\n")
    assert piped.returncode == 0 and "logged in as dave" in piped.stdout and not piped.stderr, piped
    code_file = tmp_path / "erin.code"
    code_file.write_text(_code(relay, "erin"))
    filed = _login(relay, tmp_path / "erin", "--code-file", str(code_file))
    assert filed.returncode == 0 and "logged in as erin" in filed.stdout and not filed.stderr, filed
    literal = _login(relay, tmp_path / "frank", "--code", _code(relay, "frank"))
    assert literal.returncode == 0 and "logged in as frank" in literal.stdout, literal
    assert literal.stderr.startswith("warning: a login code on the command line is visible to other local users")
    empty = _login(relay, tmp_path / "nobody", "--code", "-", stdin="\n")
    assert empty.returncode == 1 and empty.stderr == "error: no login code in stdin\n", empty


def test_client_secret_from_stdin_or_a_file(oidc_provider_jwt_access_tokens, tmp_path):
    from oidc_provider import create_machine_client

    hydra = oidc_provider_jwt_access_tokens
    client_id, secret = create_machine_client(hydra, "clusterconnect-secret-input")
    base = [script("clusterconnect"), "login", "--issuer", hydra.issuer, "--client-id", client_id,
            "--issuer-ca", str(hydra.ca_file), "--audience", "clusterconnect-secret-input", "--name", "ci"]
    piped = subprocess.run([*base, "--client-secret", "-", "--state-dir", str(tmp_path / "a")],
                           input=secret + "\n", capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and not piped.stderr, piped
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    filed = subprocess.run([*base, "--client-secret-file", str(secret_file), "--state-dir", str(tmp_path / "b")],
                           capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert filed.returncode == 0 and not filed.stderr, filed
    wrong = subprocess.run([*base, "--client-secret", "-", "--state-dir", str(tmp_path / "c")],
                           input="not-the-secret\n", capture_output=True, text=True, timeout=60)
    assert wrong.returncode != 0 and len(wrong.stderr.strip().splitlines()) == 1, wrong


