"""`clusterconnect proxy CLUSTER --background` and `clusterconnect proxy stop [NAME]`.

The proxy forks once the command line is checked: the child leaves the terminal's session and runs the
proxy as it would in the foreground, its output in ``STATE_DIR/proxies/CONTEXT.log``; the parent waits
until the child printed its ``ready`` line (passing on what it waits for) or exited (passing on its error
and exit code), so a script can rely on the endpoint once the command returned. The child keeps
``STATE_DIR/proxies/CONTEXT.json`` (mode 600: pid, its start time, cluster, context, log) while it runs.
`proxy stop` sends SIGTERM only to a pid whose start time is still the recorded one, so a reused pid is
never signalled.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from clusterconnect.cli.usage import fail
from clusterconnect.pki import write_private

# How long `proxy stop` waits for a proxy to finish its connections and exit after SIGTERM (the proxy
# closes its listener at once and cancels its connections: well under a second when measured).
STOP_TIMEOUT = 10.0
# How often the waiting parent reads the child's log: the ready line shows up within this of being printed.
POLL_INTERVAL = 0.05


@dataclass(frozen=True)
class Running:
    """A background proxy, as its pidfile records it."""

    pid: int
    started: str  # /proc/PID/stat's start time: the pid is this process only while it matches
    cluster: str
    context: str
    log: str


def _directory(state_dir: Path) -> Path:
    return state_dir / "proxies"


def _file_name(context: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", context)


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (after the command name, which may hold spaces and parentheses); None if
    the process is gone or a zombie (it has exited; only its parent has not collected it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else fields[19]


def _alive(running: Running) -> bool:
    return _start_time(running.pid) == running.started


def _recorded(state_dir: Path) -> Iterator[tuple[Path, Running]]:
    for path in sorted(_directory(state_dir).glob("*.json")):
        try:
            yield path, Running(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # not one of ours, or half written: ignored, never signalled


def start(state_dir: Path, cluster: str, context: str, run: Callable[[], None]) -> None:
    """Run ``run`` (the proxy) in a child process of its own session; return once it is ready. Exits with
    the child's error and exit code if it ends first."""
    directory = _directory(state_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pidfile = directory / f"{_file_name(context)}.json"
    for _, running in _recorded(state_dir):
        if running.context == context and _alive(running):
            fail(f"a proxy for context {context} runs in the background already (pid {running.pid}):"
                 f" stop it with `clusterconnect proxy stop {context}`")
    log = directory / f"{_file_name(context)}.log"
    write_private(log, b"")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(pidfile, log, cluster, context, run)
    _wait_until_ready(pid, log, context)


def _child(pidfile: Path, log: Path, cluster: str, context: str, run: Callable[[], None]) -> None:
    code = 1
    try:
        os.setsid()  # no SIGHUP when the terminal closes, no SIGINT from its Ctrl-C
        with open(os.devnull, "rb") as null:
            os.dup2(null.fileno(), 0)
        with open(log, "ab") as out:
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
        me = os.getpid()
        write_private(pidfile, json.dumps(asdict(Running(me, _start_time(me) or "", cluster, context,
                                                         str(log)))).encode())
        try:
            run()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()  # os._exit below would swallow it
        finally:
            with suppress(OSError):
                if json.loads(pidfile.read_text()).get("pid") == me:
                    pidfile.unlink()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never back into the parent's code


def _wait_until_ready(pid: int, log: Path, context: str) -> None:
    seen = 0
    try:
        while True:
            exited, status = os.waitpid(pid, os.WNOHANG)
            lines = log.read_text(errors="replace").splitlines(keepends=True)
            complete = [line for line in lines if line.endswith("\n")]
            for line in complete[seen:]:
                if line.startswith(("waiting: ", "warning: ")):
                    print(line, end="", file=sys.stderr, flush=True)
                elif line.startswith("ready "):
                    print(line, end="", flush=True)
                    print(f"running in the background: pid {pid}, log {log}; stop it with:"
                          f" clusterconnect proxy stop {context}", flush=True)
                    return
            seen = len(complete)
            if exited:
                errors = [line for line in lines if line.startswith("error: ")]
                print(errors[-1] if errors else f"error: the proxy exited before it was ready (log {log})",
                      end="\n" if not errors else "", file=sys.stderr, flush=True)
                sys.exit(os.waitstatus_to_exitcode(status) or 1)
            time.sleep(POLL_INTERVAL)
    except KeyboardInterrupt:
        os.kill(pid, signal.SIGTERM)  # asked to give up before it was ready: no proxy left behind
        os.waitpid(pid, 0)
        sys.exit(130)


def stop(state_dir: Path, name: str | None) -> None:
    """Stop the background proxies of context or cluster ``name`` (all of them if None)."""
    matching = [(path, running) for path, running in _recorded(state_dir)
                if name is None or name in (running.context, running.cluster)]
    if not matching:
        if name is not None:
            fail(f"no proxy for {name} runs in the background (of {state_dir})")
        print("no proxy runs in the background")
        return
    for path, running in matching:
        if not _alive(running):
            path.unlink(missing_ok=True)
            print(f"the proxy for context {running.context} was not running any more (pid {running.pid})")
            continue
        os.kill(running.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while _alive(running) and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
        if _alive(running):
            fail(f"the proxy for context {running.context} (pid {running.pid}) did not exit within"
                 f" {STOP_TIMEOUT:.0f} s of SIGTERM; its log: {running.log}")
        path.unlink(missing_ok=True)
        print(f"stopped the proxy for context {running.context} (pid {running.pid})")
