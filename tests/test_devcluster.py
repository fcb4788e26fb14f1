"""Acceptance tests for tests/devcluster: a real kube-apiserver + process node,
driven with the real /usr/bin/kubectl."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import queue
import re
import select
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import uuid
from pathlib import Path

import pytest
from devcluster.fixture import KUBECTL, KubectlError
from waiting import wait_until

NS = "devcluster-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LineReader:
    """Reads a Popen's stdout lines in a thread; ``expect`` waits with a deadline."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self.lines.put(raw.decode(errors="replace") if isinstance(raw, bytes) else raw)
        self.lines.put(None)

    def next_line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output within {timeout}s; seen so far: {self.seen[-10:]}") from None
        if line is None:
            raise EOFError(f"process exited ({self.popen.poll()}); seen: {self.seen[-10:]}")
        self.seen.append(line)
        return line

    def expect(self, predicate, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out waiting for {what}; seen: {self.seen[-10:]}")
            line = self.next_line(remaining)
            if predicate(line):
                return line


def _stop(popen: subprocess.Popen) -> None:
    if popen.poll() is None:
        popen.terminate()
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _popen_kubectl(devcluster, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = dict(os.environ)
    full_env.pop("KUBECONFIG", None)
    full_env.update(env or {})
    return subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(devcluster.kubeconfig), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
    )


def _pod(name: str, command: list[str], env: dict | None = None, restart: str = "Always", labels=None) -> dict:
    container = {"name": "main", "image": "devcluster/local", "command": command}
    if env:
        container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels or {"test": name}},
        "spec": {"containers": [container], "restartPolicy": restart, "terminationGracePeriodSeconds": 5},
    }


@pytest.fixture(scope="module")
def ns(devcluster):
    devcluster.create_namespace(NS)
    yield NS
    devcluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


@pytest.fixture(scope="module")
def shell_pod(devcluster, ns):
    devcluster.apply(_pod("shell", ["sh", "-c", "echo started; exec sleep 3600"], env={"GREETING": "hello-from-env"}))
    devcluster.wait_pod_ready("shell", ns)
    return "shell"


# ---------------------------------------------------------------- basics

def test_readyz(devcluster):
    assert devcluster.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_node_ready(devcluster):
    node = devcluster.get_json("node", "devnode")
    conds = {c["type"]: c["status"] for c in node["status"]["conditions"]}
    assert conds["Ready"] == "True"
    assert {"type": "InternalIP", "address": "127.0.0.1"} in node["status"]["addresses"]
    assert node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] > 0
    assert node["status"]["allocatable"]["cpu"] == "8"
    assert "devnode" in devcluster.kubectl("get", "nodes").stdout


def test_configmap_crud(devcluster, ns):
    devcluster.kubectl("create", "configmap", "cm1", "-n", ns, "--from-literal=k=v1")
    data = devcluster.get_json("configmap", "cm1", "-n", ns)
    assert data["data"] == {"k": "v1"}
    devcluster.kubectl("delete", "configmap", "cm1", "-n", ns)
    r = devcluster.kubectl("get", "configmap", "cm1", "-n", ns, check=False)
    assert r.returncode != 0 and "NotFound" in r.stderr


def test_watch_sees_new_pod(devcluster, ns):
    name = "watched-" + uuid.uuid4().hex[:6]
    watcher = _popen_kubectl(devcluster, "get", "pods", "-n", ns, "-w", "--output-watch-events", "-o", "name")
    try:
        reader = LineReader(watcher)
        # Whether the pod lands in the initial list or arrives as a watch
        # event, kubectl prints it; wait for it with a deadline.
        devcluster.apply(_pod(name, ["sleep", "600"]))
        reader.expect(lambda line: f"pod/{name}" in line, timeout=30, what=f"watch event for {name}")
    finally:
        _stop(watcher)
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


# ---------------------------------------------------------------- exec

def test_exec_simple(devcluster, shell_pod):
    r = devcluster.kubectl("exec", "-n", NS, shell_pod, "--", "sh", "-c", "echo $GREETING; pwd")
    out = r.stdout.splitlines()
    assert out[0] == "hello-from-env"
    assert "/pods/" in out[1]


@pytest.mark.parametrize("websockets", ["true", "false"], ids=["websocket", "spdy"])
def test_exec_stdin_and_exit_code(devcluster, shell_pod, websockets):
    payload = "line one\nline two\n" + "x" * 100000 + "\n"
    r = devcluster.kubectl(
        "exec", "-i", "-n", NS, shell_pod, "--", "sh", "-c", "cat; exit 7",
        input=payload, check=False, env={"KUBECTL_REMOTE_COMMAND_WEBSOCKETS": websockets},
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout == payload


def test_exec_tty(devcluster, shell_pod):
    master, slave = os.openpty()
    # A fixed window size that must arrive in the pod's pty.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    proc = subprocess.Popen(
        [KUBECTL, "--kubeconfig", str(devcluster.kubeconfig), "exec", "-it", "-n", NS, shell_pod, "--",
         "sh", "-c", "tty; stty size; exit 3"],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
    )
    os.close(slave)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: all slave fds closed
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=10)
    finally:
        os.close(master)
        _stop(proc)
    text = out.decode(errors="replace")
    assert re.search(r"/dev/pts/\d+", text), text
    assert "33 101" in text, text
    assert rc == 3, text


# ---------------------------------------------------------------- logs

def test_logs_follow(devcluster, ns):
    name = "ticker"
    devcluster.apply(_pod(name, ["sh", "-c", "i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done"]))
    devcluster.wait_pod_ready(name, ns)
    follower = _popen_kubectl(devcluster, "logs", "-f", "-n", ns, name)
    try:
        reader = LineReader(follower)
        first = reader.expect(lambda line: line.startswith("tick "), timeout=20, what="first log line")
        n0 = int(first.split()[1])
        # New lines must keep arriving while we follow (~5 lines per second).
        t0 = time.monotonic()
        reader.expect(lambda line: line.startswith("tick ") and int(line.split()[1]) >= n0 + 10, timeout=15,
                      what="10 more followed lines")
        assert time.monotonic() - t0 >= 1.0  # they really arrived over time
        # tailLines / plain logs work too
        tail = devcluster.kubectl("logs", "-n", ns, name, "--tail=2").stdout.splitlines()
        assert len(tail) == 2 and all(line.startswith("tick ") for line in tail)
    finally:
        _stop(follower)
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


# ---------------------------------------------------------------- environment

# What the node gives every container before its own env (an image's environment, in a real kubelet).
NODE_BASE_ENV = {"PATH", "HOME", "HOSTNAME", "LANG", "LC_ALL", "TMPDIR", "USER"}


def _is_base_env(name: str) -> bool:
    """The node's own variables, and the in-cluster ones of the kubernetes Service."""
    return name in NODE_BASE_ENV or name.startswith("KUBERNETES_")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _env_pod(name: str, env_from: list[dict], env: list[dict] | None = None) -> dict:
    """A pod whose only container prints its environment and exits. `env` itself, not `sh -c env`:
    dash drops names that are not shell identifiers (such as CM_log.level) from its children."""
    pod = _pod(name, ["env"], restart="Never")
    pod["spec"]["containers"][0]["envFrom"] = env_from
    if env:
        pod["spec"]["containers"][0]["env"] = env
    return pod


def _printed_env(devcluster, name: str, ns: str) -> dict[str, str]:
    """The environment pod `name` printed, without the node's base variables."""
    def finished():
        status = devcluster.get_json("pod", name, "-n", ns)["status"]
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_until(finished, 60, f"pod {name} finished")
    assert status["phase"] == "Succeeded", status
    lines = devcluster.kubectl("logs", "-n", ns, name).stdout.splitlines()
    printed = dict(line.split("=", 1) for line in lines)
    assert printed["HOSTNAME"] == name
    return {k: v for k, v in printed.items() if not _is_base_env(k)}


def test_env_from_configmap_and_secrets(devcluster, ns):
    """envFrom entries apply in order (a later one overrides an earlier one), with their prefix; a
    missing optional Secret is skipped; Secret values are the decoded bytes; env overrides envFrom
    and can refer to its variables; keys that are not C identifiers are kept, as by the kubelet."""
    devcluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "env-cm", "namespace": ns},
                      "data": {"color": "blue", "size": "L", "log.level": "debug=verbose"}})
    devcluster.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "env-secret", "namespace": ns},
                      "data": {"password": _b64("pa ss wörd"), "CM_size": _b64("XL")}})
    name = "env-from"
    devcluster.apply(_env_pod(
        name,
        env_from=[
            {"prefix": "CM_", "configMapRef": {"name": "env-cm"}},
            {"secretRef": {"name": "no-such-secret", "optional": True}},
            {"secretRef": {"name": "env-secret"}},
        ],
        env=[{"name": "CM_color", "value": "red"}, {"name": "GREETING", "value": "hi $(password)"}],
    ))
    try:
        assert _printed_env(devcluster, name, ns) == {
            "CM_color": "red",
            "CM_size": "XL",
            "CM_log.level": "debug=verbose",
            "password": "pa ss wörd",
            "GREETING": "hi pa ss wörd",
        }
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_env_from_missing_configmap_waits_until_created(devcluster, ns):
    """A missing non-optional ConfigMap keeps the container from starting (CreateContainerConfigError,
    pod Pending); once the ConfigMap exists the container starts, with its variables."""
    name = "env-waits"
    configmap = "late-" + uuid.uuid4().hex[:6]
    devcluster.apply(_env_pod(name, env_from=[{"configMapRef": {"name": configmap}}]))
    try:
        def config_error():
            status = devcluster.get_json("pod", name, "-n", ns)["status"]
            waiting = (status.get("containerStatuses") or [{}])[0].get("state", {}).get("waiting", {})
            return status if waiting.get("reason") == "CreateContainerConfigError" else None

        status = wait_until(config_error, 30, "CreateContainerConfigError")
        assert status["phase"] == "Pending"
        assert configmap in status["containerStatuses"][0]["state"]["waiting"]["message"]
        assert status["containerStatuses"][0]["restartCount"] == 0

        devcluster.kubectl("create", "configmap", configmap, "-n", ns, "--from-literal=arrived=yes")
        # Its only run printed the ConfigMap's variable, so it did not start before the ConfigMap existed.
        assert _printed_env(devcluster, name, ns) == {"arrived": "yes"}
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_env_from_is_read_again_at_restart(devcluster, ns):
    """The environment is built before every start, as by the kubelet: a container restarted after
    its ConfigMap changed sees the new value."""
    devcluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "restart-cm", "namespace": ns},
                      "data": {"MODE": "wait"}})
    name = "env-restart"
    pod = _pod(name, ["sh", "-c", 'echo "mode=$MODE"; [ "$MODE" = go ]'], restart="OnFailure")
    pod["spec"]["containers"][0]["envFrom"] = [{"configMapRef": {"name": "restart-cm"}}]
    devcluster.apply(pod)
    try:
        def previous_log():
            return devcluster.kubectl("logs", "-n", ns, name, "--previous", check=False).stdout

        wait_until(lambda: "mode=wait" in previous_log(), 30, "a finished run with MODE=wait")
        devcluster.kubectl("patch", "configmap", "restart-cm", "-n", ns, "-p", '{"data": {"MODE": "go"}}')
        wait_until(lambda: devcluster.get_json("pod", name, "-n", ns)["status"].get("phase") == "Succeeded", 40,
                 "pod Succeeded after the ConfigMap changed")
        assert devcluster.kubectl("logs", "-n", ns, name).stdout == "mode=go\n"
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


# ---------------------------------------------------------------- port-forward

ECHO_SERVER = r"""
import os, socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"])))
s.listen(16)
print("listening", flush=True)
def handle(c):
    with c:
        while True:
            d = c.recv(1 << 16)
            if not d:
                break
            c.sendall(d)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


@pytest.fixture(scope="module")
def echo_pod(devcluster, ns):
    port = _free_port()
    devcluster.apply(_pod("echo", ["python3", "-u", "-c", ECHO_SERVER], env={"PORT": str(port)}))
    devcluster.wait_pod_ready("echo", ns)
    wait_until(lambda: "listening" in devcluster.kubectl("logs", "-n", ns, "echo").stdout, 30, "echo server listening",
               ignoring=(KubectlError,))
    return "echo", port


def _transfer(port: int, size: int) -> tuple[str, str, int]:
    """Send ``size`` random bytes and read the echo concurrently; return (sha sent, sha received, n received)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent_hash, recv_hash = hashlib.sha256(), hashlib.sha256()
    errors: list[BaseException] = []

    def sender():
        try:
            block = os.urandom(1 << 20)
            remaining = size
            while remaining > 0:
                chunk = block[: min(len(block), remaining)]
                sent_hash.update(chunk)
                sock.sendall(chunk)
                remaining -= len(chunk)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    received = 0
    try:
        while received < size:
            data = sock.recv(1 << 20)
            if not data:
                break
            recv_hash.update(data)
            received += len(data)
    finally:
        t.join(timeout=60)
        sock.close()
    assert not errors, errors
    return sent_hash.hexdigest(), recv_hash.hexdigest(), received


@pytest.mark.parametrize("websockets", ["true", "false"], ids=["websocket", "spdy"])
def test_port_forward_100mib(devcluster, echo_pod, websockets):
    name, pod_port = echo_pod
    pf = _popen_kubectl(devcluster, "port-forward", "-n", NS, "--address", "127.0.0.1", f"pod/{name}", f":{pod_port}",
                        env={"KUBECTL_PORT_FORWARD_WEBSOCKETS": websockets})
    try:
        reader = LineReader(pf)
        line = reader.expect(lambda text: "Forwarding from 127.0.0.1:" in text, timeout=30, what="Forwarding line")
        local_port = int(re.search(r"127\.0\.0\.1:(\d+)", line).group(1))
        size = 100 * 1024 * 1024
        sent, got, n = _transfer(local_port, size)
        assert n == size
        assert sent == got
        # A second connection over the same port-forward works as well.
        sent, got, n = _transfer(local_port, 1024 * 1024)
        assert (n, sent) == (1024 * 1024, got)
    finally:
        _stop(pf)


# ---------------------------------------------------------------- RBAC

def test_serviceaccount_rbac(devcluster, ns, tmp_path):
    devcluster.create_service_account(ns, "nobody")
    devcluster.create_service_account(ns, "reader", role_rules=[
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}])
    nobody = devcluster.write_kubeconfig(tmp_path / "nobody", devcluster.token(ns, "nobody"))
    reader = devcluster.write_kubeconfig(tmp_path / "reader", devcluster.token(ns, "reader"))

    r = devcluster.kubectl("get", "pods", "-n", ns, user_kubeconfig=nobody, check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr, r.stderr
    # RBAC objects may take a moment to reach the authorizer's cache.
    wait_until(lambda: devcluster.kubectl("get", "pods", "-n", ns, user_kubeconfig=reader, check=False).returncode == 0,
             20, "reader SA may list pods")
    r = devcluster.kubectl("get", "pods", "-n", "default", user_kubeconfig=reader, check=False)
    assert r.returncode != 0 and "Forbidden" in r.stderr
    r = devcluster.kubectl("auth", "whoami", "-o", "json", user_kubeconfig=reader)
    assert json.loads(r.stdout)["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:reader"


def test_impersonation_rbac(devcluster, ns):
    devcluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "dev-configmaps", "namespace": ns},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
    })
    devcluster.apply({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "dev-configmaps", "namespace": ns},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "dev-configmaps"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "dev"}],
    })

    # A user name of this test alone: other tests impersonate "alice" through the auth proxy, and the
    # audit log is the whole cluster's.
    alice = f"alice-{ns}"

    def can(*args: str) -> bool:
        r = devcluster.kubectl(*args, check=False)
        if r.returncode != 0:
            assert "Forbidden" in r.stderr or "forbidden" in r.stderr, r.stderr
        return r.returncode == 0

    wait_until(lambda: can(f"--as={alice}", "--as-group=dev", "get", "configmaps", "-n", ns), 20,
               f"{alice}@dev can list")
    assert not can(f"--as={alice}", "get", "configmaps", "-n", ns)  # not in group dev
    assert not can(f"--as={alice}", "--as-group=dev", "get", "configmaps", "-n", "default")  # other namespace
    assert not can(f"--as={alice}", "--as-group=dev", "create", "configmap", "x", "-n", ns)  # verb not granted
    assert not can(f"--as={alice}", "--as-group=dev", "get", "secrets", "-n", ns)  # resource not granted
    # The audit log records both the real and the impersonated user.
    events = [e for e in devcluster.audit_events() if (e.get("impersonatedUser") or {}).get("username") == alice]
    assert events
    assert all(e["user"]["username"] == "kubernetes-admin" for e in events), events[-1]
    # both calls: alice in group dev, and alice alone
    groups = [set(e["impersonatedUser"].get("groups", [])) for e in events]
    assert any("dev" in g for g in groups) and any("dev" not in g for g in groups), groups


# ---------------------------------------------------------------- workloads

def test_deployment_two_replicas(devcluster, ns):
    devcluster.apply({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"terminationGracePeriodSeconds": 2,
                         "containers": [{"name": "web", "image": "devcluster/local", "command": ["sleep", "3600"]}]},
            },
        },
    })
    devcluster.kubectl("rollout", "status", "deployment/web", "-n", ns, "--timeout=60s", timeout=70)

    def two_running():
        pods = devcluster.get_json("pods", "-n", ns, "-l", "app=web")["items"]
        running = [p for p in pods
                   if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
        return len(running) == 2 and running

    pods = wait_until(two_running, 30, "2 running web pods", ignoring=(KubectlError,))
    assert all(p["spec"]["nodeName"] == "devnode" for p in pods)


def _pids_with_marker(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_pod_lifecycle_processes(devcluster, ns):
    """Deleting a pod kills its processes and removes the object; a
    restartPolicy=Never pod that exits 3 ends up Failed with exit code 3."""
    marker = "marker" + uuid.uuid4().hex[:8]
    devcluster.apply(_pod("lifecycle", ["sh", "-c", f"sleep 3600; echo {marker}"]))
    devcluster.wait_pod_ready("lifecycle", ns)
    assert wait_until(lambda: _pids_with_marker(marker), 10, "pod process")
    devcluster.kubectl("delete", "pod", "lifecycle", "-n", ns, "--timeout=30s", timeout=40)
    wait_until(lambda: not _pids_with_marker(marker), 10, "pod processes gone")

    devcluster.apply(_pod("fails", ["sh", "-c", "echo bye; exit 3"], restart="Never"))
    wait_until(lambda: devcluster.get_json("pod", "fails", "-n", ns)["status"].get("phase") == "Failed", 30,
               "pod Failed", ignoring=(KubectlError,))
    st = devcluster.get_json("pod", "fails", "-n", ns)["status"]["containerStatuses"][0]
    assert st["state"]["terminated"]["exitCode"] == 3
    assert devcluster.kubectl("logs", "-n", ns, "fails").stdout == "bye\n"
    # Following the log of an exited container ends by itself.
    assert devcluster.kubectl("logs", "-f", "-n", ns, "fails", timeout=20).stdout == "bye\n"
    devcluster.kubectl("delete", "pod", "fails", "-n", ns, "--timeout=30s", timeout=40)


# ---------------------------------------------------------------- volumes and in-cluster config

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def _finished_log(devcluster, name: str, ns: str, container: str | None = None) -> str:
    """The log of a restartPolicy=Never pod once it has Succeeded."""
    def finished():
        status = devcluster.get_json("pod", name, "-n", ns)["status"]
        return status if status.get("phase") in ("Succeeded", "Failed") else None

    status = wait_until(finished, 60, f"pod {name} finished", ignoring=(KubectlError,))
    args = ["logs", "-n", ns, name] + (["-c", container] if container else [])
    log = devcluster.kubectl(*args).stdout
    assert status["phase"] == "Succeeded", (status, log, devcluster.log_tail("node", 30))
    return log


@pytest.fixture
def mount_root():
    """A fresh directory for mount points; the node creates them (empty) on the host, as a
    runtime creates them in an image. Removed afterwards."""
    root = f"/tmp/devcluster-mounts-{uuid.uuid4().hex[:8]}"
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", root], check=False)


def test_projected_token_gives_in_cluster_config(devcluster, ns):
    """The default kube-api-access-* volume holds a token from the TokenRequest API (bound to the
    pod), the cluster CA and the namespace; with KUBERNETES_SERVICE_HOST/_PORT set, kubectl in the
    pod uses in-cluster config, and the audit log records the pod's ServiceAccount, bound to the pod."""
    name = "in-cluster-" + uuid.uuid4().hex[:6]
    script = (
        f"echo namespace=$(cat {SA_DIR}/namespace); "
        f"grep -c 'BEGIN CERTIFICATE' {SA_DIR}/ca.crt; "
        # No kubeconfig: HOME has none and KUBECONFIG is unset, so kubectl falls back to in-cluster config.
        "echo user=$(kubectl auth whoami -o jsonpath='{.status.userInfo.username}')"
    )
    pod = _pod(name, ["sh", "-c", script], env={"HOME": "/nonexistent-home"}, restart="Never")
    devcluster.apply(pod)
    try:
        volumes = devcluster.get_json("pod", name, "-n", ns)["spec"]["volumes"]
        assert [v["name"] for v in volumes if v["name"].startswith("kube-api-access-")], volumes
        lines = _finished_log(devcluster, name, ns).splitlines()
        assert f"namespace={ns}" in lines
        assert int(lines[1]) >= 1, lines
        assert f"user=system:serviceaccount:{ns}:default" in lines, lines
        uid = devcluster.get_json("pod", name, "-n", ns)["metadata"]["uid"]
        events = [e for e in devcluster.audit_events()
                  if e.get("objectRef", {}).get("resource") == "selfsubjectreviews"
                  and e["user"].get("extra", {}).get("authentication.kubernetes.io/pod-uid") == [uid]]
        assert events, "no SelfSubjectReview by the pod's bound token in the audit log"
        assert events[0]["user"]["username"] == f"system:serviceaccount:{ns}:default"
        assert events[0]["user"]["extra"]["authentication.kubernetes.io/pod-name"] == [name]
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_secret_and_configmap_volumes(devcluster, ns, mount_root):
    """Secret (with items, mode) and ConfigMap volumes appear at their mountPath, read-only, in the
    container's own mount namespace: the node's directory stays empty."""
    suffix = uuid.uuid4().hex[:6]
    devcluster.apply({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": f"vol-secret-{suffix}", "namespace": ns},
                      "data": {"password": _b64("s3cret"), "unused": _b64("x")}})
    devcluster.apply({"apiVersion": "v1", "kind": "ConfigMap",
                      "metadata": {"name": f"vol-cm-{suffix}", "namespace": ns},
                      "data": {"app.conf": "color=blue\n", "other": "two"}})
    secret_dir, cm_dir = f"{mount_root}/secret", f"{mount_root}/config"
    script = (
        f"cat {secret_dir}/creds/pw; echo; ls {secret_dir}/creds; stat -c %a {secret_dir}/creds/pw; "
        f"cat {cm_dir}/app.conf; cat {cm_dir}/other; echo; "
        f"if touch {cm_dir}/new 2>/dev/null; then echo cm-writable; else echo cm-refused; fi"
    )
    name = "volumes-" + suffix
    pod = _pod(name, ["sh", "-c", script], restart="Never")
    pod["spec"]["volumes"] = [
        {"name": "creds", "secret": {"secretName": f"vol-secret-{suffix}",
                                     "items": [{"key": "password", "path": "creds/pw", "mode": 0o400}]}},
        {"name": "conf", "configMap": {"name": f"vol-cm-{suffix}"}},
    ]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "creds", "mountPath": secret_dir},
        {"name": "conf", "mountPath": cm_dir},
    ]
    devcluster.apply(pod)
    try:
        assert _finished_log(devcluster, name, ns).splitlines() == [
            "s3cret", "pw", "400", "color=blue", "two", "cm-refused"]
        assert os.listdir(secret_dir) == [] and os.listdir(cm_dir) == []
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_empty_dir_shared_and_read_only_mount(devcluster, ns, mount_root):
    """An emptyDir is shared by the pod's containers; a readOnly mount of it refuses writes; exec
    into the container sees the same mounts."""
    name = "shared-" + uuid.uuid4().hex[:6]
    writer_dir, reader_dir = f"{mount_root}/rw", f"{mount_root}/ro"
    pod = _pod(name, ["sh", "-c", f"echo hello > {writer_dir}/msg && exec sleep 3600"])
    pod["spec"]["containers"][0]["name"] = "writer"
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "shared", "mountPath": writer_dir}]
    pod["spec"]["containers"].append({
        "name": "reader", "image": "devcluster/local",
        "command": ["sh", "-c", f"until [ -f {reader_dir}/msg ]; do sleep 0.1; done; cat {reader_dir}/msg; "
                                f"if touch {reader_dir}/w 2>/dev/null; then echo writable; else echo refused; fi; "
                                "exec sleep 3600"],
        "volumeMounts": [{"name": "shared", "mountPath": reader_dir, "readOnly": True}],
    })
    pod["spec"]["volumes"] = [{"name": "shared", "emptyDir": {}}]
    devcluster.apply(pod)
    try:
        devcluster.wait_pod_ready(name, ns)
        log = wait_until(lambda: (lambda out: out if out.count("\n") >= 2 else None)(
            devcluster.kubectl("logs", "-n", ns, name, "-c", "reader").stdout), 30, "the reader's two lines")
        assert log == "hello\nrefused\n"
        r = devcluster.kubectl("exec", "-n", ns, name, "-c", "writer", "--", "cat", f"{writer_dir}/msg")
        assert r.stdout == "hello\n"
        assert not os.path.exists(f"{writer_dir}/msg")
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


# ---------------------------------------------------------------- probes

def _pod_dir(devcluster, name: str, ns: str) -> str:
    uid = devcluster.get_json("pod", name, "-n", ns)["metadata"]["uid"]
    return str(devcluster.state_dir / "pods" / f"{ns}_{name}_{uid}")


def _ready(devcluster, name: str, ns: str) -> tuple[str, bool]:
    status = devcluster.get_json("pod", name, "-n", ns)["status"]
    cond = next((c["status"] for c in status.get("conditions", []) if c["type"] == "Ready"), "")
    return cond, status.get("containerStatuses", [{}])[0].get("ready", False)


def test_failing_exec_readiness_probe_keeps_pod_unready(devcluster, ns):
    """An exec readiness probe that fails keeps the running pod unready (every probe run is counted
    in the pod dir, so the wait is on probes that happened, not on time); once it passes the pod is
    Ready, and failing again makes it unready."""
    name = "probe-ready-" + uuid.uuid4().hex[:6]
    pod = _pod(name, ["sleep", "3600"])
    # The probe runs in the pod dir, like the container: it passes while the file "ok" exists.
    pod["spec"]["containers"][0]["readinessProbe"] = {
        "exec": {"command": ["sh", "-c", "echo probed >> probes.log; test -f ok"]},
        "periodSeconds": 1, "failureThreshold": 1, "successThreshold": 1,
    }
    devcluster.apply(pod)
    try:
        wait_until(lambda: devcluster.get_json("pod", name, "-n", ns)["status"].get("phase") == "Running", 30,
                   "pod Running", ignoring=(KubectlError,))
        pod_dir = _pod_dir(devcluster, name, ns)
        probes = Path(pod_dir) / "probes.log"
        wait_until(lambda: probes.exists() and len(probes.read_text().splitlines()) >= 3, 30, "three probes")
        assert _ready(devcluster, name, ns) == ("False", False)

        open(f"{pod_dir}/ok", "w").close()
        wait_until(lambda: _ready(devcluster, name, ns) == ("True", True), 30, "Ready once the probe passes")
        os.unlink(f"{pod_dir}/ok")
        wait_until(lambda: _ready(devcluster, name, ns) == ("False", False), 30, "unready once it fails again")
    finally:
        devcluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def test_http_readiness_and_failing_liveness_probe(devcluster, ns):
    """An HTTP readiness probe against the container's port makes it Ready; an exec liveness probe
    that fails kills the container, which restarts (restartCount grows)."""
    name = "probe-live-" + uuid.uuid4().hex[:6]
    port = _free_port()
    pod = _pod(name, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)])
    container = pod["spec"]["containers"][0]
    container["ports"] = [{"name": "http", "containerPort": port}]
    container["readinessProbe"] = {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1}
    devcluster.apply(pod)
    live = "probe-dead-" + uuid.uuid4().hex[:6]
    dead = _pod(live, ["sleep", "3600"])
    dead["spec"]["containers"][0]["livenessProbe"] = {"exec": {"command": ["false"]}, "periodSeconds": 1,
                                                      "failureThreshold": 2}
    devcluster.apply(dead)
    try:
        devcluster.wait_pod_ready(name, ns)
        wait_until(lambda: devcluster.get_json("pod", live, "-n", ns)["status"]
                   .get("containerStatuses", [{}])[0].get("restartCount", 0) >= 1, 60, "restart after liveness failure",
                   ignoring=(KubectlError,))
        last = devcluster.get_json("pod", live, "-n", ns)["status"]["containerStatuses"][0]["lastState"]
        assert last["terminated"]["exitCode"] == 137, last
    finally:
        devcluster.kubectl("delete", "pod", name, live, "-n", ns, "--wait=false", check=False)
