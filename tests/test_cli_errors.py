"""The command line reports every ClusterConnectError as one line on stderr and exits with its exit code."""

from __future__ import annotations

import subprocess

import pytest
from chain import script

from clusterconnect.cli import main as cli_main
from clusterconnect.errors import ClusterConnectError, InvalidInput


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([script("clusterconnect"), *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("args", "line"), [
    (("token",), "error: not logged in: run `clusterconnect login` first"),
    (("token", "--login", "nope", "--cluster", "dev"), "error: no token for cluster dev: not logged in ("),
    (("login", "--code", "CODE"), "error: --code needs --relay URL"),
    (("login", "--issuer", "https://login.example.com"), "error: --issuer needs --client-id"),
    (("clusters", "list", "--relay", "https://127.0.0.1:1", "--admin-credential", "/nonexistent"),
     "error: cannot read admin credential /nonexistent: No such file or directory"),
], ids=["no-login", "unknown-login", "code-without-relay", "issuer-without-client", "unreadable-file"])
def test_failures_are_one_line_and_exit_code_1(tmp_path, args, line):
    result = _run(*args, "--state-dir", str(tmp_path)) if args[0] in ("token", "login") else _run(*args)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(line), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_main_uses_the_exit_code_of_the_error(monkeypatch, capsys):
    class Refused(InvalidInput):
        pass

    def refuse(args) -> None:
        raise Refused("refused, and why")

    monkeypatch.setattr(cli_main, "clusters_command", refuse)
    with pytest.raises(SystemExit) as exited:
        cli_main.main(["clusters", "list", "--relay", "r:1", "--admin-credential", "x"])
    assert exited.value.code == 2 == Refused.exit_code
    assert capsys.readouterr().err == "error: refused, and why\n"
    assert issubclass(Refused, ClusterConnectError)


def test_a_login_whose_command_fails_is_one_line_and_saves_nothing(tmp_path):
    command = tmp_path / "no-token"
    command.write_text("#!/bin/sh\necho 'not logged in to the cloud' >&2\nexit 3\n")
    command.chmod(0o755)
    result = _run("login", "--token-command", str(command), "--name", "cloud", "--state-dir", str(tmp_path))
    assert result.returncode == 1
    assert result.stderr == "error: token command exited with 3: not logged in to the cloud\n"
    assert not list(tmp_path.glob("credentials/*.json"))  # no login that cannot give a token
