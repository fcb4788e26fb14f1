"""Lightweight simulated agents for the scale scenario: each holds a real Connect stream to the relay.

    sim_agents.py --relay HOST:AGENT_PORT --relay-ca CA --credentials FILE --first I --count N

FILE is JSON [[cluster, key PEM, certificate PEM], ...] (scale.py enrolls them); each agent connects
with mutual TLS to the relay's agent port. Prints `connected N` once all N sessions are welcomed,
then heartbeats until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time

import grpc

from clusterconnect import metadata as md
from clusterconnect.agent.backoff import Backoff
from clusterconnect.grpc_options import CHANNEL_OPTIONS
from clusterconnect.service import raise_fd_limit
from clusterconnect.v1 import tunnel_pb2, tunnel_pb2_grpc


async def agent(target: str, credentials: grpc.ChannelCredentials, cluster: str,
                welcomed: asyncio.Event, counter: list[int], total: int) -> None:
    """Like a real agent: connect, and on failure retry after the agent's own jittered backoff."""
    counted = False
    backoff = Backoff()
    while True:
        try:
            async with grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS) as channel:
                stub = tunnel_pb2_grpc.AgentTunnelStub(channel)
                call = stub.Connect(metadata=((md.CLUSTER, cluster),))
                hello = tunnel_pb2.AgentHello(cluster=cluster, agent_version="sim")
                await call.write(tunnel_pb2.AgentMessage(hello=hello))
                await call.read()
                if not counted:
                    counted = True
                    counter[0] += 1
                    if counter[0] == total:
                        welcomed.set()
                backoff.reset()
                while True:
                    await asyncio.sleep(10)
                    await call.write(tunnel_pb2.AgentMessage(
                        heartbeat=tunnel_pb2.Heartbeat(unix_millis=int(time.time() * 1000))))
        except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            failures[_reason(exc)] += 1
            await asyncio.sleep(backoff.next_delay())


# Failed attempts by status: each one is a TLS handshake both sides did for nothing, so a run says
# how many there were and why (printed on stderr, in the sim's log).
failures: collections.Counter = collections.Counter()


def _reason(exc: Exception) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {(exc.details() or '')[:100]}"
    return type(exc).__name__


async def main(args: argparse.Namespace, entries: list[list[str]], root: bytes) -> None:
    welcomed = asyncio.Event()
    counter = [0]
    async with asyncio.TaskGroup() as group:
        for i, (cluster, key, cert) in enumerate(entries):
            credentials = grpc.ssl_channel_credentials(root, key.encode(), cert.encode())
            group.create_task(agent(args.relay, credentials, cluster, welcomed, counter, len(entries)))
            if i % 100 == 99:
                await asyncio.sleep(0)
        await welcomed.wait()
        print(f"connected {len(entries)} after {sum(failures.values())} failed attempts", flush=True)
        print(json.dumps(failures.most_common(8)), file=sys.stderr, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--relay", required=True)
    parser.add_argument("--relay-ca", required=True)
    parser.add_argument("--credentials", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, required=True)
    raise_fd_limit()
    arguments = parser.parse_args()
    with open(arguments.credentials) as credentials_file:
        selected = json.load(credentials_file)[arguments.first:arguments.first + arguments.count]
    with open(arguments.relay_ca, "rb") as ca_file:
        relay_ca = ca_file.read()
    try:
        import uvloop
        uvloop.run(main(arguments, selected, relay_ca))
    except KeyboardInterrupt:
        pass
