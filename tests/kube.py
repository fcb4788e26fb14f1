"""Driving the real kubectl (/usr/bin/kubectl) from tests: commands, pods, exec under a pty, port-forward."""

from __future__ import annotations

import hashlib
import os
import pty
import re
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from waiting import wait_until

KUBECTL = "/usr/bin/kubectl"

# A TCP echo server for port-forward tests; runs as a pod's container process on the devcluster node.
ECHO_SERVER = r"""
import socket, sys, threading
def serve(conn):
    with conn:
        while True:
            data = conn.recv(1 << 18)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(16)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def kubectl(kubeconfig: Path, *args: str, input: str | bytes | None = None, env: dict[str, str] | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    text = not isinstance(input, bytes)
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(kubeconfig), *args], input=input, capture_output=True, text=text,
        env={**os.environ, **(env or {})}, timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def kubectl_popen(kubeconfig: Path, *args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(kubeconfig), *args], env={**os.environ, **(env or {})},
        start_new_session=True, **kwargs,
    )


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class LineReader:
    """Collects a process's stdout lines in a thread, so tests can wait on them with a deadline."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for raw in stream:
            line = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_line(self, pattern: str, timeout: float) -> str:
        regex = re.compile(pattern)
        return wait_until(lambda: next((line for line in self.snapshot() if regex.search(line)), None), timeout,
                        f"a line matching {pattern!r}")


def pod_manifest(name: str, namespace: str, command: list[str]) -> str:
    import json
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": "main", "image": "local", "command": command}],
                 "terminationGracePeriodSeconds": 1},
    })


def run_pod(kubeconfig: Path, name: str, namespace: str, command: list[str], timeout: float = 60) -> None:
    kubectl(kubeconfig, "apply", "-f", "-", input=pod_manifest(name, namespace, command))
    kubectl(kubeconfig, "wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
            f"--timeout={int(timeout)}s", timeout=timeout + 10)


def shell_pod(kubeconfig: Path, name: str, namespace: str) -> None:
    run_pod(kubeconfig, name, namespace, ["sh", "-c", "sleep 3600"])


def echo_pod(kubeconfig: Path, name: str, namespace: str, port: int) -> None:
    run_pod(kubeconfig, name, namespace, [sys.executable, "-c", ECHO_SERVER, str(port)])
    # The pod is Ready when its process started; wait until it listens.
    wait_until(lambda: _listening(port), 20, f"echo server on port {port}")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def exec_in_pty(kubeconfig: Path, namespace: str, pod: str, script: str, timeout: float = 30) -> str:
    """`kubectl exec -it` with a real pseudo-terminal as stdin/stdout; returns what the terminal showed."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(kubeconfig), "exec", "-it", "-n", namespace, pod, "--", "sh"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
    )
    os.close(slave)
    output = b""
    try:
        os.write(master, script.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while process.poll() is None or select.select([master], [], [], 0)[0]:
            if time.monotonic() > deadline:
                raise AssertionError(f"exec -it did not finish; terminal so far: {output!r}")
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        stop(process)
        os.close(master)
    return output.decode(errors="replace")


def port_forward(kubeconfig: Path, namespace: str, pod: str, port: int, websockets: bool,
                 ) -> tuple[subprocess.Popen, int]:
    process = kubectl_popen(
        kubeconfig, "port-forward", "-n", namespace, f"pod/{pod}", f":{port}",
        env={"KUBECTL_PORT_FORWARD_WEBSOCKETS": "true" if websockets else "false"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    lines = LineReader(process.stdout)
    line = lines.wait_line(r"Forwarding from 127\.0\.0\.1:\d+", 30)
    local = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
    return process, local


def echo_roundtrip(local_port: int, size: int, timeout: float = 300) -> tuple[str, str, float]:
    """Send ``size`` pseudo-random bytes and read the echo at once; returns (sent sha, received sha, seconds)."""
    block = hashlib.sha256(b"clusterconnect").digest() * 8192  # 256 KiB
    sent_hash, received_hash = hashlib.sha256(), hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", local_port), timeout=timeout) as sock:
        start = time.monotonic()

        def send() -> None:
            remaining = size
            counter = 0
            while remaining:
                piece = (counter.to_bytes(8, "big") + block)[: min(len(block), remaining)]
                sent_hash.update(piece)
                sock.sendall(piece)
                remaining -= len(piece)
                counter += 1
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        while received < size:
            data = sock.recv(1 << 20)
            if not data:
                break
            received_hash.update(data)
            received += len(data)
        sender.join(timeout)
        elapsed = time.monotonic() - start
    assert received == size, f"echo returned {received} of {size} bytes"
    return sent_hash.hexdigest(), received_hash.hexdigest(), elapsed
