"""pytest plugin: a real Kubernetes control plane plus a process-based node.

Load it with ``pytest_plugins = ["devcluster.fixture"]`` (tests/ on sys.path).
Pure stdlib + pytest. The cluster is started once per session by the
``devcluster`` fixture; ``start_devcluster``/``stop_devcluster`` can be used
directly too.
"""

from __future__ import annotations

import base64
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

HERE = Path(__file__).resolve().parent
RUN = HERE / "run"
KUBECTL = os.environ.get("DEVCLUSTER_KUBECTL", "/usr/bin/kubectl")
# Cold builds of the binary take minutes; "ready" itself ~10 s.
START_TIMEOUT = float(os.environ.get("DEVCLUSTER_START_TIMEOUT", "900"))

T = TypeVar("T")


class DevClusterError(RuntimeError):
    pass


class KubectlError(subprocess.CalledProcessError):
    """CalledProcessError whose message includes kubectl's stderr."""

    def __str__(self) -> str:
        err = self.stderr.decode(errors="replace") if isinstance(self.stderr, bytes) else (self.stderr or "")
        return f"{super().__str__()}\nstderr: {err.strip()}"


def wait_for(predicate: Callable[[], T], timeout: float = 30, what: str = "condition", interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns a truthy value (which is returned).

    Exceptions raised by the predicate count as "not yet"; the last one is
    reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            msg = f"timed out after {timeout:.0f}s waiting for {what}"
            if last_exc is not None:
                msg += f" (last error: {last_exc!r})"
            raise TimeoutError(msg)
        time.sleep(interval)


class DevCluster:
    """A running devcluster; all paths are inside ``state_dir``."""

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        info = json.loads((self.state_dir / "cluster.json").read_text())
        self.info = info
        self.kubeconfig = Path(info["kubeconfig"])
        self.server: str = info["server"]
        self.ca_file = Path(info["ca_file"])
        self.node: str = info.get("node", "devnode")
        self.audit_log = Path(info.get("audit_log", self.state_dir / "logs" / "audit.log"))
        self.logs_dir = Path(info.get("logs_dir", self.state_dir / "logs"))

    def __repr__(self) -> str:
        return f"DevCluster(server={self.server!r}, state_dir={str(self.state_dir)!r})"

    # -- kubectl ---------------------------------------------------------
    def kubectl(
        self,
        *args: str,
        input: str | bytes | None = None,
        env: dict | None = None,
        check: bool = True,
        timeout: float = 60,
        user_kubeconfig: os.PathLike | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run kubectl against the cluster (admin unless ``user_kubeconfig``).

        Text mode unless ``input`` is bytes. ``env`` entries are added to the
        current environment. Raises CalledProcessError (with stderr in the
        message) when ``check`` and the exit code is non-zero.
        """
        kubeconfig = str(user_kubeconfig) if user_kubeconfig else str(self.kubeconfig)
        cmd = [KUBECTL, "--kubeconfig", kubeconfig, *args]
        full_env = dict(os.environ)
        full_env.pop("KUBECONFIG", None)
        if env:
            full_env.update(env)
        text = not isinstance(input, bytes)
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=text, env=full_env, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise KubectlError(proc.returncode, cmd, output=proc.stdout, stderr=proc.stderr)
        return proc

    def apply(self, manifest: str | dict, namespace: str | None = None) -> subprocess.CompletedProcess:
        """``kubectl apply -f -`` with a YAML/JSON string or a dict."""
        if isinstance(manifest, dict):
            manifest = json.dumps(manifest)
        args = ["apply", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        return self.kubectl(*args, input=manifest)

    def get_json(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- helpers ----------------------------------------------------------
    def create_namespace(self, name: str) -> None:
        """Create a namespace (idempotent) and wait for its default ServiceAccount
        (pods are rejected until it exists)."""
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        wait_for(
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
            timeout=30,
            what=f"default ServiceAccount in namespace {name}",
        )

    def create_service_account(
        self,
        namespace: str,
        name: str,
        cluster_role: str | None = None,
        role_rules: Sequence[dict] | None = None,
    ) -> None:
        """Create a ServiceAccount (idempotent).

        ``cluster_role``: bind that ClusterRole cluster-wide (ClusterRoleBinding
        ``<namespace>-<name>-<cluster_role>``). ``role_rules``: create Role
        ``<name>`` in ``namespace`` with these RBAC rules (dicts like
        ``{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}``)
        and bind it to the ServiceAccount.
        """
        self.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
        subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
        if cluster_role:
            self.apply({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": f"{namespace}-{name}-{cluster_role}".replace(":", "-")},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": cluster_role},
                "subjects": [subject],
            })
        if role_rules:
            self.apply({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": name, "namespace": namespace},
                "rules": list(role_rules),
            })
            self.apply({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": name, "namespace": namespace},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [subject],
            })

    def token(self, namespace: str, name: str, duration: str = "1h") -> str:
        """A bound ServiceAccount token via ``kubectl create token``."""
        out = self.kubectl("create", "token", name, "-n", namespace, f"--duration={duration}").stdout
        return out.strip()

    def write_kubeconfig(self, path: os.PathLike | str, token: str) -> Path:
        """Write a kubeconfig for this cluster that authenticates with ``token``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "devcluster", "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "token-user", "user": {"token": token}}],
            "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": "token-user"}}],
            "current-context": "devcluster",
        }
        # JSON is valid YAML.
        path.write_text(json.dumps(cfg, indent=2))
        path.chmod(0o600)
        return path

    def wait_for(self, predicate: Callable[[], T], timeout: float = 30, what: str = "condition") -> T:
        return wait_for(predicate, timeout=timeout, what=what)

    def wait_pod_ready(self, name: str, namespace: str = "default", timeout: float = 60) -> None:
        """Wait for the pod's Ready condition; on timeout the error includes
        the pod status and the node log tail."""
        r = self.kubectl("wait", "--for=condition=Ready", f"pod/{name}", "-n", namespace,
                         f"--timeout={int(timeout)}s", timeout=timeout + 10, check=False)
        if r.returncode != 0:
            status = self.kubectl("get", "pod", name, "-n", namespace, "-o", "json", check=False)
            raise AssertionError(
                f"pod {namespace}/{name} not Ready within {timeout}s: {r.stderr.strip()}\n"
                f"pod: {status.stdout or status.stderr}\n--- node log ---\n{self.log_tail('node', 60)}"
            )

    def audit_events(self) -> list[dict]:
        """All audit events so far (Metadata level: user, impersonatedUser, verb, objectRef...)."""
        events = []
        try:
            text = self.audit_log.read_text()
        except FileNotFoundError:
            return events
        for line in text.splitlines():
            line = line.strip()
            if line:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass  # partially written last line
        return events

    def log_tail(self, component: str, lines: int = 40) -> str:
        try:
            return "\n".join((self.logs_dir / f"{component}.log").read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


# -- process management -----------------------------------------------------

def _kill_procs_under(directory: Path) -> None:
    """SIGKILL every process whose cwd is inside ``directory`` (pod processes)."""
    prefix = str(directory.resolve())
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd == prefix or cwd.startswith(prefix + "/"):
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def node_environment() -> dict[str, str]:
    """The launcher's environment, whose PATH the node's containers inherit: this venv's bin first, so a
    chart's `command: [clusterconnect-agent]` runs this checkout's console script (images are ignored)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    # What stands for the image: the node binds them again over a volume that would hide them (a
    # checkout under /tmp and a pod's emptyDir at /tmp; node_volumes.go hiddenImageDirs).
    checkout = Path(__file__).resolve().parents[2]
    env["DEVCLUSTER_IMAGE_DIRS"] = os.pathsep.join([str(checkout), sys.base_prefix])
    return env


def _killpg(popen: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def start_devcluster(
    state_dir: os.PathLike | str, timeout: float = START_TIMEOUT, extra_args: Iterable[str] = ()
) -> tuple[DevCluster, subprocess.Popen]:
    """Start ``tests/devcluster/run --state-dir state_dir`` in its own session
    and wait for its ``ready`` line. Launcher stderr (build output, errors) goes
    to ``state_dir/launcher.log``."""
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    # The launcher keeps its own copy of the fd; ours is closed once it has started.
    with open(state_dir / "launcher.log", "ab") as launcher_log:
        popen = subprocess.Popen(
            [str(RUN), "--state-dir", str(state_dir), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=launcher_log,
            start_new_session=True,
            env=node_environment(),
        )
    ok = False
    try:
        line = _wait_ready_line(popen, timeout)
        kubeconfig = Path(line.split(" ", 1)[1])
        if not kubeconfig.exists():
            raise DevClusterError(f"launcher reported {kubeconfig} but it does not exist")
        cluster = DevCluster(state_dir)
        ok = True
        return cluster, popen
    finally:
        if not ok:
            stop_devcluster(popen, state_dir=state_dir)


def _wait_ready_line(popen: subprocess.Popen, timeout: float) -> str:
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(popen.stdout, selectors.EVENT_READ)
    buf = b""
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevClusterError(f"devcluster not ready within {timeout:.0f}s")
            for _key, _ in sel.select(remaining):
                chunk = os.read(popen.stdout.fileno(), 4096)
                if not chunk:
                    code = popen.wait(timeout=10)
                    raise DevClusterError(f"devcluster launcher exited ({code}) before it was ready")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").strip()
                    if text.startswith("ready "):
                        return text
    finally:
        sel.close()


def stop_devcluster(popen: subprocess.Popen, timeout: float = 30, state_dir: os.PathLike | str | None = None) -> int:
    """SIGTERM the launcher, wait, then SIGKILL its whole process group.
    Also kills stray pod processes under ``state_dir/pods``. Returns the exit code."""
    if popen.poll() is None:
        try:
            popen.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # Whatever is left in the group (the launcher's children) goes now.
    _killpg(popen, signal.SIGKILL)
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    if popen.stdout is not None:
        popen.stdout.close()
    if state_dir is not None and (Path(state_dir) / "pods").exists():
        _kill_procs_under(Path(state_dir) / "pods")
    return popen.returncode


def _describe_failure(state_dir: Path) -> str:
    parts = []
    for name in ("launcher.log",):
        p = state_dir / name
        if p.exists():
            parts.append(f"--- {p} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-60:]))
    return "\n".join(parts)


@pytest.fixture(scope="session")
def devcluster(tmp_path_factory):
    """A running devcluster for the whole session (yields a DevCluster).

    Set DEVCLUSTER_STATE_DIR to use a fixed state directory (handy for
    inspecting logs after a run)."""
    fixed = os.environ.get("DEVCLUSTER_STATE_DIR")
    state_dir = Path(fixed) if fixed else tmp_path_factory.mktemp("devcluster")
    try:
        cluster, popen = start_devcluster(state_dir)
    except DevClusterError as exc:
        pytest.fail(f"{exc}\n{_describe_failure(Path(state_dir))}", pytrace=False)
    try:
        yield cluster
    finally:
        stop_devcluster(popen, state_dir=cluster.state_dir)
