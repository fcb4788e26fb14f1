"""Start the whole clusterconnect chain on this machine: relay, auth proxy, agent, client proxy (and the
gateway, for kubeconfig-only access).

Used by `make demo`, by the end-to-end tests and by the benchmarks, so all three run the real
console scripts the same way. Each process logs to STATE_DIR/logs/<name>.log; every wait has a
deadline and reports the tail of the log of the process that did not come up.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from waiting import WaitFailed, wait_until

# A service that did not come up (or a wait that timed out): the name the callers of this module know.
StartFailed = WaitFailed

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]

# STATE_DIR/logs/<name>.log is a process's stderr: for our services, their structured log (JSON lines).
# <name>.out is the client proxy's stdout, which is for its caller (the `ready` line), not a log.
LOG_SUFFIX = ".log"
STDOUT_SUFFIX = ".out"


# Ports handed out by free_port in this process: none twice, even before its service has bound it.
_handed_out: set[int] = set()
LOWEST_PORT = 10000


@functools.cache
def ephemeral_range() -> tuple[int, int]:
    """The ports the kernel gives outgoing connections and bind(0) (Linux's default 32768-60999); read once."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port nobody listens on, for a service to bind soon after. Below the ephemeral range: there, any
    outgoing connection may take it between this check and the service's bind (CI: a relay's
    --agent-listen, 'Address already in use', while its sibling connected to etcd). Random, so that
    two processes of a run seldom pick alike, and never one handed out before by this process."""
    low, _ = ephemeral_range()
    for _ in range(1000 if low - LOWEST_PORT >= 1000 else 0):
        port = random.randrange(LOWEST_PORT, low)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def script(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or name)


METRICS_SCRIPTS = ("clusterconnect-relay", "clusterconnect-agent", "clusterconnect-aadproxy")


def has_metrics_port(argv: list[str]) -> bool:
    """Whether ``argv`` starts one of the services with --metrics-listen (relay, agent, auth proxy, client proxy)."""
    program = Path(argv[0]).name if argv else ""
    return program in METRICS_SCRIPTS or (program == "clusterconnect" and argv[1:2] == ["proxy"])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log: Path
    metrics_port: int = 0  # its --metrics-listen port on 127.0.0.1 (0: none)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics" if self.metrics_port else ""

    def http_get(self, path: str, timeout: float = 5) -> tuple[int, str]:
        """(status, body) of GET ``path`` on the service's metrics port (/metrics, /healthz, /readyz)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}{path}", timeout=timeout) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def metrics(self) -> str:
        """The service's /metrics now (Prometheus text format)."""
        status, body = self.http_get("/metrics")
        if status != 200:
            raise RuntimeError(f"{self.name}: /metrics answered {status}")
        return body

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def returncode(self) -> int | None:
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stats(self) -> dict:
        """The service's gauges (see service_stats)."""
        return service_stats(self.log, self.popen.pid)

    def stop(self, timeout: float = 10) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def log_event(log: Path, event: str) -> dict | None:
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("{") and f'"event": "{event}"' in line:
            try:
                return json.loads(line)
            except ValueError:
                continue
    return None


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message ends with the command's stderr (the one line that says why)."""

    def __str__(self) -> str:
        return f"{super().__str__()}: {(self.stderr or '').strip()[-800:]}"


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        raise CommandFailed(result.returncode, result.args, result.stdout, result.stderr)
    return result


def service_stats(log: Path, pid: int, timeout: float = 10) -> dict:
    """A running service's gauges: SIGUSR1 makes it log one `stats` line (clusterconnect.service);
    the new line, read from its log. Raises StartFailed if none comes within ``timeout``."""
    marker = '"event": "stats"'
    before = log.read_text(errors="replace").count(marker)
    os.kill(pid, signal.SIGUSR1)

    def newest() -> dict | None:
        lines = [line for line in log.read_text(errors="replace").splitlines() if marker in line]
        return json.loads(lines[-1]) if len(lines) > before else None

    return wait_until(newest, timeout, f"stats from pid {pid}")


@dataclass
class Chain:
    state_dir: Path
    cluster_kubeconfig: Path  # where the auth proxy finds the apiserver (server + CA)
    cluster: str = "dev"
    log_level: str = "info"
    processes: dict[str, Process] = field(default_factory=dict)
    relay_port: int = 0
    authproxy_port: int = 0
    authproxy_args: list[str] = field(default_factory=list)  # e.g. OIDC mode: --authentication-config FILE
    relay_args: list[str] = field(default_factory=list)  # e.g. --access-token-lifetime 5
    issuer_port: int = 0  # the relay's built-in issuer (HTTPS discovery + JWKS)
    agent_port: int = 0  # the relay's agent endpoint (mutual TLS)
    joins: dict[str, dict] = field(default_factory=dict)  # cluster -> `clusters add --json` output
    gateway_port: int = 0
    cluster_domain: str = "clusters.test"  # the gateway serves CLUSTER.clusters.test (SNI)
    env: dict[str, str] = field(default_factory=dict)  # for every process, e.g. OTEL_* (otlp_receiver.py)

    def __post_init__(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "logs").mkdir(exist_ok=True)

    @property
    def relay_data(self) -> Path:
        return self.state_dir / "relay"

    @property
    def relay_url(self) -> str:
        return f"https://127.0.0.1:{self.relay_port}"

    @property
    def issuer_url(self) -> str:
        return f"https://127.0.0.1:{self.issuer_port}"

    @property
    def relay_ca(self) -> Path:
        return self.relay_data / "pki" / "ca.crt"

    @property
    def admin_credential(self) -> Path:
        return self.relay_data / "admin.credential"

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
              stdout: int | None = None, metrics: bool | None = None, metrics_port: int = 0) -> Process:
        """Start a process; with ``metrics`` (default: when it is one of the four services that have
        --metrics-listen), its metrics port on ``metrics_port`` or a free port (no two services of the
        chain, or two chains, meet on the built-in defaults)."""
        log = self.state_dir / "logs" / f"{name}{LOG_SUFFIX}"
        if metrics is None:
            metrics = has_metrics_port(argv)
        metrics_port = (metrics_port or free_port()) if metrics else 0
        if metrics_port:
            argv = [*argv, "--metrics-listen", f"127.0.0.1:{metrics_port}"]
        with open(log, "ab") as handle:  # the child keeps its own copy of the descriptor
            popen = subprocess.Popen(
                argv, stdout=stdout if stdout is not None else handle, stderr=handle, stdin=subprocess.DEVNULL,
                env={**os.environ, **self.env, **(env or {})}, start_new_session=True,
            )
        process = Process(name, popen, log, metrics_port)
        self.processes[name] = process
        return process

    def start_relay(self) -> Process:
        if not self.relay_port:
            self.relay_port = free_port()
        if not self.issuer_port:
            self.issuer_port = free_port()
        if not self.agent_port:
            self.agent_port = free_port()
        log = self.state_dir / "logs" / "relay.log"
        offset = log.stat().st_size if log.exists() else 0
        process = self.spawn("relay", [
            script("clusterconnect-relay"), "serve", "--data-dir", str(self.relay_data),
            "--listen", f"127.0.0.1:{self.relay_port}", "--log-level", self.log_level,
            "--issuer-listen", f"127.0.0.1:{self.issuer_port}", "--agent-listen", f"127.0.0.1:{self.agent_port}",
            *self.relay_args,
        ])
        wait_until(lambda: _logged_since(log, offset, "serving"), 20, "relay to serve", process)
        return process

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _checked(subprocess.run(
            [script("clusterconnect"), "clusters", *args, "--relay", self.relay_url,
             "--relay-ca", str(self.relay_ca), "--admin-credential", str(self.admin_credential)],
            capture_output=True, text=True, timeout=30,
        ), check)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """`clusterconnect GROUP ACTION ...` with the admin flags (users, keys, clusters grant ...)."""
        return _checked(subprocess.run(
            [script("clusterconnect"), *args, "--relay", self.relay_url,
             "--relay-ca", str(self.relay_ca), "--admin-credential", str(self.admin_credential)],
            capture_output=True, text=True, timeout=30,
        ), check)

    def add_cluster(self, name: str | None = None) -> dict:
        """Register a cluster; returns its one-time join token, the relay CA hash and the agent command."""
        name = name or self.cluster
        self.joins[name] = json.loads(self.admin("add", name, "--json").stdout)
        return self.joins[name]

    def agent_state(self, cluster: str | None = None) -> Path:
        return self.state_dir / f"agent-{cluster or self.cluster}"

    def start_authproxy(self) -> Process:
        if not self.authproxy_port:
            self.authproxy_port = free_port()
        process = self.spawn("aadproxy", [
            script("clusterconnect-aadproxy"), "--listen", f"127.0.0.1:{self.authproxy_port}",
            "--kubeconfig", str(self.cluster_kubeconfig), "--log-level", self.log_level, *self.authproxy_args,
        ])
        wait_until(lambda: port_open(self.authproxy_port), 30, "auth proxy to listen", process)
        return process

    def start_agent(self, name: str = "agent", cluster: str | None = None, state_dir: Path | None = None,
                    wait: bool = True, extra_args: tuple[str, ...] = ()) -> Process:
        """Start an agent the way `clusters add` prints it: join token + pinned CA hash, state in
        STATE_DIR/agent-CLUSTER (it joins on the first start and uses its certificate afterwards)."""
        cluster = cluster or self.cluster
        join = self.joins.get(cluster) or self.joins.get(self.cluster) or {}
        log = self.state_dir / "logs" / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        process = self.spawn(name, [
            script("clusterconnect-agent"), "--relay", self.relay_url, "--cluster", cluster,
            "--state-dir", str(state_dir or self.agent_state(cluster)),
            "--authproxy", f"127.0.0.1:{self.authproxy_port}", "--log-level", self.log_level, *extra_args,
        ], env={"CLUSTERCONNECT_JOIN_TOKEN": join.get("join_token", ""),
                "CLUSTERCONNECT_RELAY_CA_HASH": join.get("relay_ca_hash", "")})
        if wait:
            wait_until(lambda: _logged_since(log, offset, "connected to relay"), 20, "agent to connect", process)
        return process

    def start_proxy(self, token_file: Path | None, kubeconfig: Path, port: int = 0, name: str = "proxy",
                    cluster: str | None = None, login: str | None = None,
                    state_dir: Path | None = None) -> tuple[Process, str]:
        """Start `clusterconnect proxy`; returns the process and its `ready` line.

        ``token_file`` None: the proxy uses a login (``login``, else the one of this relay) from
        ``state_dir`` (default STATE_DIR/proxy-state), and the kubeconfig runs `clusterconnect token`.
        """
        out = self.state_dir / "logs" / f"{name}{STDOUT_SUFFIX}"
        credential = ["--token-file", str(token_file)] if token_file is not None else \
            (["--login", login] if login else [])
        with open(out, "wb") as handle:
            process = self.spawn(name, [
                script("clusterconnect"), "proxy", cluster or self.cluster, "--relay", self.relay_url,
                "--relay-ca", str(self.relay_ca), *credential,
                "--port", str(port), "--kubeconfig-out", str(kubeconfig),
                "--state-dir", str(state_dir or self.state_dir / "proxy-state"), "--log-level", self.log_level,
            ], stdout=handle.fileno())
        ready = wait_until(lambda: _line_starting(out, "ready "), 30, "client proxy to be ready", process)
        return process, ready

    @property
    def gateway_url(self) -> str:
        return f"https://127.0.0.1:{self.gateway_port}"

    @property
    def gateway_ca(self) -> Path:
        return self.state_dir / "gateway" / "ca.crt"

    def start_gateway(self, name: str = "gateway", port: int | None = None) -> Process:
        """`clusterconnect-gateway` in front of this relay, with a certificate for *.CLUSTER_DOMAIN from a
        CA of its own (STATE_DIR/gateway/ca.crt; every gateway of the chain shares it). ``port``: one of
        several gateways (behind a balancer); by default the chain's ``gateway_port``."""
        from clusterconnect.pki import ensure_ca_and_server_cert

        _, cert, key = ensure_ca_and_server_cert(self.state_dir / "gateway", "clusterconnect test gateway CA",
                                                 [f"*.{self.cluster_domain}"])
        if port is None:
            self.gateway_port = port = self.gateway_port or free_port()
        log = self.state_dir / "logs" / f"{name}.log"
        offset = log.stat().st_size if log.exists() else 0
        process = self.spawn(name, [
            script("clusterconnect-gateway"), "--listen", f"127.0.0.1:{port}",
            "--relay", self.relay_url, "--relay-ca", str(self.relay_ca), "--cluster-domain", self.cluster_domain,
            "--tls-cert", str(cert), "--tls-key", str(key), "--log-level", self.log_level,
        ])
        wait_until(lambda: _logged_since(log, offset, "serving"), 20, "gateway to serve", process)
        return process

    def gateway_kubeconfig(self, path: Path, token_file: Path | None = None, login: str | None = None,
                           state_dir: Path | None = None, cluster: str | None = None) -> Path:
        """`clusterconnect kubeconfig CLUSTER --gateway ...` into ``path``: a token file, else the login
        (``login``, else the only one in ``state_dir``) through the exec plugin."""
        credential = ["--token-file", str(token_file)] if token_file is not None else \
            (["--login", login] if login else [])
        written = subprocess.run([
            script("clusterconnect"), "kubeconfig", cluster or self.cluster, "--gateway", self.gateway_url,
            "--cluster-domain", self.cluster_domain, "--gateway-ca", str(self.gateway_ca), *credential,
            "--state-dir", str(state_dir or self.state_dir / "proxy-state"), "--kubeconfig-out", str(path),
        ], capture_output=True, text=True, timeout=30)
        if written.returncode != 0:
            raise StartFailed(f"clusterconnect kubeconfig failed: {written.stderr.strip()}")
        return path

    def start_all(self, token_file: Path, kubeconfig: Path) -> str:
        self.start_relay()
        self.add_cluster()
        self.start_authproxy()
        self.start_agent()
        _, ready = self.start_proxy(token_file, kubeconfig)
        return ready

    @contextmanager
    def running(self, token_file: Path | None, kubeconfig: Path) -> Iterator[Chain]:
        """``start_all``, then ``stop_all`` however the block ends (also when starting failed)."""
        try:
            self.start_all(token_file, kubeconfig)
            yield self
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()

    def endpoints(self) -> list[dict]:
        """Each running service's name, pid and metrics URL."""
        return [{"name": p.name, "pid": p.popen.pid, "metrics_url": p.metrics_url}
                for p in self.processes.values() if p.alive()]

    def write_pids(self) -> None:
        (self.state_dir / "pids").write_text(
            "\n".join(str(p.popen.pid) for p in self.processes.values()) + "\n"
        )


def _logged_since(log: Path, offset: int, event: str) -> bool:
    try:
        with open(log, "rb") as handle:
            handle.seek(offset)
            data = handle.read().decode(errors="replace")
    except OSError:
        return False
    return f'"event": "{event}"' in data


def _line_starting(path: Path, prefix: str) -> str | None:
    try:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith(prefix):
                return line
    except OSError:
        return None
    return None


def start_devcluster(state_dir: Path, out: Path, timeout: float = 600) -> tuple[subprocess.Popen, Path]:
    """Start tests/devcluster/run in its own process group; returns it and the admin kubeconfig once ready."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as handle:
        # The node's containers inherit its PATH: this venv's console scripts first (chart pods run them);
        # the checkout and Python stand for the image, bound again over a volume that would hide them.
        env = {**os.environ, "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", os.defpath)]),
               "DEVCLUSTER_IMAGE_DIRS": os.pathsep.join([str(ROOT), sys.base_prefix])}
        process = subprocess.Popen([str(ROOT / "tests/devcluster/run"), "--state-dir", str(state_dir)],
                                   stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, env=env)

    def ready() -> Path | None:
        line = _line_starting(out, "ready ")
        if line:
            return Path(line.split(" ", 1)[1].strip())
        if process.poll() is not None:
            raise StartFailed(f"devcluster exited:\n{out.read_text(errors='replace')[-3000:]}")
        return None

    return process, wait_until(ready, timeout, "the devcluster to be ready", interval=0.2)


def endpoint_only(admin_kubeconfig: Path, path: Path) -> Path:
    """Server and CA of a kubeconfig, no credentials: all the auth proxy needs to pass callers' tokens through."""
    import yaml

    config = yaml.safe_load(admin_kubeconfig.read_text())
    cluster = config["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "none", "user": {}}],
        "contexts": [{"name": "cluster", "context": {"cluster": cluster["name"], "user": "none"}}],
        "current-context": "cluster",
    }))
    return path


def cpu_times(pids: list[int]) -> tuple[float, float]:
    """CPU time the processes used so far: (user, system) seconds; system is the kernel's work for them
    (on loopback, every TCP hop's copies and wake-ups are paid here, by sender and receiver)."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        user += int(fields[11])  # utime, in clock ticks
        system += int(fields[12])  # stime
    ticks = os.sysconf("SC_CLK_TCK")
    return user / ticks, system / ticks


def machine_idle_total() -> tuple[int, int]:
    """The machine's (idle, total) CPU time so far, in clock ticks summed over every core."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    return values[3] + values[4], sum(values)  # idle + iowait


def cpu_seconds(pids: list[int]) -> float:
    """CPU time (user + system) the processes used so far."""
    return sum(cpu_times(pids))


def process_in_group(group: int, name: str) -> int | None:
    """The pid of a process of process group ``group`` that is ``name`` (its program or, for a multi-call
    binary like the devcluster's, its first argument)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != group:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                program = [os.path.basename(arg) for arg in cmdline.read().split(b"\0")[:2]]
            if name.encode() in program:
                return int(entry)
        except OSError:
            continue
    return None


def quiescent(pids: list[int], window: float = 1.0, share: float = 0.05) -> bool:
    """True once the processes used under ``share`` of a core over ``window`` seconds."""
    before = cpu_seconds(pids)
    time.sleep(window)  # a measuring interval, not synchronisation
    return cpu_seconds(pids) - before < share * window
