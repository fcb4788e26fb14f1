"""clusterconnect-agent: runs in the cluster and opens only outbound connections, to the relay."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import grpc

from clusterconnect import cliargs, health, service
from clusterconnect.addresses import is_loopback
from clusterconnect.agent import metrics as agent_metrics
from clusterconnect.agent.backoff import Backoff
from clusterconnect.agent.enrollment import AgentState, EnrollmentError, enroll
from clusterconnect.agent.raw_calls import AuthProxyCalls
from clusterconnect.agent.session import Agent, AgentConfig
from clusterconnect.errors import StartupError
from clusterconnect.grpc_options import CHANNEL_OPTIONS, grpc_target
from clusterconnect.logs import get_logger

log = get_logger(__name__)

# The relay keeps at most this many warm streams per agent (relay/datapath/sessions.py MAX_WARM).
MAX_WARM_STREAMS = 8
# Loopback: the agent opens no other port; the chart opens this one on the pod network for its probes.
DEFAULT_METRICS_LISTEN = "127.0.0.1:9444"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="clusterconnect-agent", description=__doc__)
    cliargs.add_version(parser)
    cliargs.add_flag(parser, "--relay", required=True,
                     help="relay URL, e.g. https://relay.example.com:8443; or several, comma-separated (replicas"
                          " without a balancer): each new session tries the next")
    cliargs.add_flag(parser, "--cluster", required=True, help="this cluster's name at the relay")
    cliargs.add_flag(parser, "--state-dir", type=Path,
                     help="where the agent keeps its key, certificate and the relay CA (mode 700; a volume in a pod;"
                     " default ~/.local/state/clusterconnect/agent-CLUSTER)")
    cliargs.add_flag(parser, "--join-token-file", type=Path,
                     help="file holding the one-time join token from `clusterconnect clusters add` (or give the"
                          " token in the environment); needed only until the agent has joined")
    cliargs.add_flag(parser, "--join-token",
                     help="deprecated on the command line, where `ps` shows it to every local user: give the"
                          " token in the environment or --join-token-file")
    cliargs.add_flag(parser, "--relay-ca-hash",
                     help="sha256:<hex> of the relay CA's public key (from `clusters add`):"
                          " pins the relay on the first start")
    cliargs.add_flag(parser, "--relay-ca", type=Path,
                     help="CA bundle of the relay, instead of discovering it by --relay-ca-hash")
    cliargs.add_flag(parser, "--authproxy", default="127.0.0.1:8080", help="HOST:PORT of the auth proxy")
    cliargs.add_flag(parser, "--authproxy-ca", type=Path,
                     help="CA bundle to verify the auth proxy's TLS; without it only a loopback auth proxy is allowed")
    cliargs.add_flag(parser, "--health-file", type=Path,
                     help="file touched on every heartbeat while connected (for a readiness probe)")
    cliargs.add_flag(parser, "--warm-streams", type=int, default=2,
                     help="connections kept open at the relay ahead of need, so a new connection starts at once "
                          "(0: none)")
    cliargs.add_flag(parser, "--log-level", default="info", help="debug, info, warning or error")
    cliargs.add_flag(parser, "--metrics-listen", default=DEFAULT_METRICS_LISTEN,
                     help="HOST:PORT for /metrics, /healthz and /readyz (plain HTTP; \"\" for none; in a pod,"
                          " 0.0.0.0:9444 for the kubelet's probes)")
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    # Warned about once logging runs (run()); the environment variable of the same flag is fine.
    args.join_token_on_argv = any(a == "--join-token" or a.startswith("--join-token=") for a in given)
    if not 0 <= args.warm_streams <= MAX_WARM_STREAMS:
        parser.error(f"--warm-streams must be between 0 and {MAX_WARM_STREAMS}")
    return args


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {path}: {exc.strerror}") from None


def authproxy_channel(address: str, ca: Path | None) -> grpc.aio.Channel:
    if ca is not None:
        credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca, "auth proxy CA"))
        return grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    if not is_loopback(address.rsplit(":", 1)[0]):
        raise StartupError(
            f"auth proxy {address} is not on loopback: give --authproxy-ca to reach it over TLS"
        )
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)


def join_token(args: argparse.Namespace) -> str | None:
    """The join token: --join-token-file's content, else --join-token (normally from the environment)."""
    if args.join_token_on_argv:
        log.warning("--join-token on the command line is visible to every local user (ps);"
                    " give CLUSTERCONNECT_JOIN_TOKEN or --join-token-file instead")
    if args.join_token_file is not None:
        if not args.join_token_file.exists():
            # An agent that has joined needs no token: its Secret may be gone (an optional volume).
            log.info("join token file not found; an agent that has joined needs none", path=str(args.join_token_file))
            return None
        return _read(args.join_token_file, "join token file").decode().strip() or None
    return args.join_token or None


async def run(args: argparse.Namespace) -> None:
    relay_ca = _read(args.relay_ca, "relay CA") if args.relay_ca else None
    token = join_token(args)
    # InvalidInput: one line and exit code 2 (clusterconnect.service)
    targets = [grpc_target(url.strip()) for url in args.relay.split(",") if url.strip()]
    if not targets:
        raise StartupError("--relay names no relay")
    state_dir = args.state_dir or Path.home() / ".local/state/clusterconnect" / f"agent-{args.cluster}"
    backoff = Backoff()
    attempt = 0
    while True:
        first = attempt % len(targets)
        try:
            enrolled = await enroll(AgentState(state_dir), targets[first], args.cluster, token,
                                    args.relay_ca_hash, relay_ca)
            enrolled.relay_targets = targets[first:] + targets[:first]
            break
        except EnrollmentError as exc:
            if not exc.transient:
                raise
            attempt += 1
            delay = backoff.next_delay()
            log.warning("relay not reachable for enrollment; retrying", reason=str(exc), retry_in=round(delay, 2))
            await asyncio.sleep(delay)
        except OSError as exc:
            raise StartupError(f"agent state in {state_dir}: {exc}") from None
    async with authproxy_channel(args.authproxy, args.authproxy_ca) as channel:
        agent = Agent(
            AgentConfig(
                args.cluster, enrolled, AuthProxyCalls(channel),
                health_file=args.health_file,
                warm_streams=args.warm_streams,
            )
        )
        agent_metrics.register(agent)
        health.check("relay session", agent_metrics.control_stream_up(agent))
        health.serving()
        await agent.run_forever()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    service.run_service("agent", args.log_level, lambda: run(args), args.metrics_listen)


if __name__ == "__main__":
    main(sys.argv[1:])
