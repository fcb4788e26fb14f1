"""`clusterconnect login`, `logout`, `token`, `users`, `keys` and `clusters grant|revoke|access` (user identity)."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import getpass
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Message

from clusterconnect import cliargs, credentials
from clusterconnect.cli import output, profile
from clusterconnect.cli.secret_input import read_secret
from clusterconnect.cli.usage import fail, read_file
from clusterconnect.clientproxy.local_tls import client_credential
from clusterconnect.grpc_options import CHANNEL_OPTIONS, bearer, grpc_target
from clusterconnect.v1 import identity_pb2, identity_pb2_grpc

Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

COMMANDS = ("login", "logout", "token", "users", "keys")
CLUSTER_ACTIONS = ("grant", "revoke", "access")


def add_parsers(commands: Subcommands, cluster_actions: Subcommands,
                admin_flags: Callable[[argparse.ArgumentParser], None], state_dir: Path) -> None:
    login = commands.add_parser("login", help="log in: at the relay (--code), an OIDC issuer, or via a command")
    how = login.add_mutually_exclusive_group(required=True)
    cliargs.add_flag(how, "--code", help="one-time login code from `clusterconnect users add` (needs --relay);"
                                    " - reads it from stdin, so it never shows in `ps`")
    cliargs.add_flag(how, "--code-file", metavar="PATH", help="file holding the login code (- for stdin)")
    cliargs.add_flag(how, "--issuer", help="external OIDC issuer URL (device authorization grant, or client"
                                      " credentials with --client-secret)")
    cliargs.add_flag(how, "--token-command", help="command printing a token (e.g. 'az account get-access-token"
                                             " --resource ... -o json')")
    cliargs.add_flag(login, "--relay", help="relay URL (needed with --code); remembered with --relay-ca and this"
                     " login, so later commands need neither flag")
    cliargs.add_flag(login, "--relay-ca", type=Path, help="CA bundle of the relay's certificate")
    cliargs.add_flag(login, "--client-id", help="OAuth client id at --issuer")
    secret = login.add_mutually_exclusive_group()
    cliargs.add_flag(secret, "--client-secret", help="client secret: use the client credentials grant (CI);"
                                                " - reads it from stdin")
    cliargs.add_flag(secret, "--client-secret-file", metavar="PATH",
                     help="file holding the client secret (- for stdin)")
    cliargs.add_flag(login, "--issuer-ca", type=Path, help="CA bundle of the issuer's certificate")
    cliargs.add_flag(login, "--scope", help="scopes to ask for (default: 'openid offline_access' for people)")
    cliargs.add_flag(login, "--audience", help="audience to ask for (client credentials)")
    cliargs.add_flag(login, "--name", help="name of this login (default: derived from the relay or issuer)")
    cliargs.add_flag(login, "--state-dir", type=Path, default=state_dir, help="where credentials are kept")

    logout = commands.add_parser("logout", help="revoke this device's login at the relay and delete it here")
    cliargs.add_flag(logout, "--login", help="login name (default: the only one)")
    cliargs.add_flag(logout, "--state-dir", type=Path, default=state_dir, help="where credentials are kept")

    token = commands.add_parser("token", help="print an ExecCredential with a fresh token (kubectl exec plugin)")
    cliargs.add_flag(token, "--cluster", help="cluster the token is for (informational)")
    cliargs.add_flag(token, "--login", help="login name (default: the only one)")
    cliargs.add_flag(token, "--state-dir", type=Path, default=state_dir, help="where credentials are kept")

    users = commands.add_parser("users", help="users of the relay's built-in issuer (admin)")
    actions = users.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="create a user and print a one-time login code")
    add.add_argument("name")
    cliargs.add_flag(add, "--group", action="append", default=[], help="group of the user (repeatable)")
    admin_flags(add)
    code = actions.add_parser("code", help="a new one-time login code for an existing user")
    code.add_argument("name")
    admin_flags(code)
    listing = actions.add_parser("list", help="table of users")
    output.add_flag(listing)
    admin_flags(listing)
    remove = actions.add_parser("remove", help="remove a user; their credentials stop working at once")
    remove.add_argument("name")
    admin_flags(remove)
    logins = actions.add_parser("credentials", help="a user's logins (refresh credentials): id, device, expiry")
    logins.add_argument("name")
    output.add_flag(logins)
    admin_flags(logins)
    revoke_login = actions.add_parser("revoke-credential", help="revoke one login of a user at once")
    revoke_login.add_argument("name")
    revoke_login.add_argument("id", help="credential id from `users credentials NAME`")
    admin_flags(revoke_login)

    keys = commands.add_parser("keys", help="the built-in issuer's signing keys (admin)")
    key_actions = keys.add_subparsers(dest="action", required=True)
    admin_flags(key_actions.add_parser("rotate", help="sign with the next key; the old one stays published"
                                                      " until its tokens expired"))

    for action, text in (("grant", "let a user or group reach a cluster"),
                         ("revoke", "take that back")):
        parser = cluster_actions.add_parser(action, help=text)
        parser.add_argument("name", help="cluster")
        who = parser.add_mutually_exclusive_group(required=True)
        cliargs.add_flag(who, "--user", help="a user of the relay's issuer (the token's sub)")
        cliargs.add_flag(who, "--group", help="a group (of the token's groups claim)")
        admin_flags(parser)
    access = cluster_actions.add_parser("access", help="a cluster's access list")
    access.add_argument("name", help="cluster")
    output.add_flag(access)
    admin_flags(access)


def handles(args: argparse.Namespace) -> bool:
    return args.command in COMMANDS or (args.command == "clusters" and args.action in CLUSTER_ACTIONS)


def run(args: argparse.Namespace) -> None:
    if args.command == "login":
        login_command(args)
    elif args.command == "logout":
        logout_command(args)
    elif args.command == "token":
        token_command(args)
    else:
        admin_command(args)


# ---- user side ------------------------------------------------------------------------------------


def _read_text(path: Path | None, what: str) -> str | None:
    return read_file(path, what).decode() if path is not None else None


def login_command(args: argparse.Namespace) -> None:
    """Log in and save the login (a LoginError reaches main() as one line)."""
    device = f"{getpass.getuser()}@{socket.gethostname()}"
    relay_ca = _read_text(args.relay_ca, "relay CA")  # read first: a bad path must not follow a spent code
    if args.code is not None or args.code_file is not None:
        if not args.relay:
            fail("--code needs --relay URL")
        code = read_secret(args.code, args.code_file, "login code", "--code")
        assert code is not None  # one of the two flags was given
        builtin = credentials.login_relay(args.relay, relay_ca, code, device)
        login: credentials.AnyLogin = builtin
        name = args.name or credentials.relay_profile(args.relay)
        who = f"{builtin.username} at relay {args.relay}"
    elif args.issuer:
        if not args.client_id:
            fail("--issuer needs --client-id")
        ca = _read_text(args.issuer_ca, "issuer CA")
        name = args.name or credentials.profile_name(f"oidc-{args.issuer.split('://')[-1]}-{args.client_id}")
        client_secret = read_secret(args.client_secret, args.client_secret_file, "client secret", "--client-secret")
        if client_secret:
            login = credentials.client_credentials_login(args.issuer, ca, args.client_id, client_secret,
                                                         args.scope or "", args.audience)
        else:
            def show(uri: str, code: str) -> None:
                print(f"To log in, open {uri} and enter the code {code}", flush=True)
            login = credentials.device_login(args.issuer, ca, args.client_id, None,
                                             args.scope or "openid offline_access", show)
        who = f"client {args.client_id} at {args.issuer}"
    else:
        login = credentials.CommandLogin(command=args.token_command)
        name = args.name or "command"
        login.access_token, login.expires_unix = credentials.refresh(login)  # proves the command works
        login.issued_unix = int(time.time())
        who = f"command {args.token_command.split()[0]}"
    path = credentials.save(args.state_dir, name, login)
    print(f"logged in as {who}; login {name} saved in {path} (mode 600)")
    if args.relay:
        profile.save(args.state_dir, args.relay, relay_ca.encode() if relay_ca else None, name)
        print(f"relay {args.relay} and this login remembered: use them with: clusterconnect proxy CLUSTER")
    else:
        print(f"use it with: clusterconnect proxy CLUSTER --relay URL --login {name}"
              " (or log in with --relay URL to remember it)")


def _resolve_login(args: argparse.Namespace) -> str:
    if args.login:
        return str(args.login)
    logins = credentials.list_logins(args.state_dir)
    if len(logins) == 1:
        return logins[0]
    if not logins:
        fail("not logged in: run `clusterconnect login` first")
    fail(f"several logins ({', '.join(logins)}): choose one with --login")
    raise AssertionError


def logout_command(args: argparse.Namespace) -> None:
    name = _resolve_login(args)
    revoked = credentials.logout(args.state_dir, name)
    at = {True: "revoked at the relay", False: "the relay no longer accepted it",
          None: "nothing to revoke at an external issuer or command"}[revoked]
    forgotten = "; the relay it remembered is forgotten" if profile.forget(args.state_dir, name) else ""
    print(f"logged out: login {name} deleted ({at}){forgotten}")


def token_command(args: argparse.Namespace) -> None:
    try:
        token, expires = credentials.get_token(args.state_dir, _resolve_login(args))
    except credentials.LoginError as exc:
        where = f" for cluster {args.cluster}" if args.cluster else ""
        raise credentials.LoginError(f"no token{where}: {exc}") from None
    # kubectl uses a credential until expirationTimestamp: end it a little early, so a request never
    # arrives with a token that expired on the way.
    early = min(30.0, max(0.0, (expires - time.time()) / 5))
    stamp = datetime.datetime.fromtimestamp(expires - early, datetime.UTC)
    status = {"token": token, "expirationTimestamp": stamp.strftime("%Y-%m-%dT%H:%M:%SZ")}
    # The client proxy's certificate opens its port; kubectl takes it from here, not from the kubeconfig.
    client = client_credential(args.state_dir)
    if client is not None:
        status |= {"clientCertificateData": client.cert_pem.decode(), "clientKeyData": client.key_pem.decode()}
    print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential", "status": status}))


def token_command_argv(cluster: str, login: str, state_dir: Path) -> list[str]:
    """argv of `clusterconnect token` for the kubeconfig's exec plugin."""
    program = os.path.abspath(sys.argv[0]) if Path(sys.argv[0]).name.startswith("clusterconnect") else "clusterconnect"
    return [program, "token", "--cluster", cluster, "--login", login, "--state-dir", str(state_dir.resolve())]


def default_login(relay: str, state_dir: Path) -> str | None:
    name = credentials.relay_profile(relay)
    return name if name in credentials.list_logins(state_dir) else None


# ---- admin side -----------------------------------------------------------------------------------


async def _call(args: argparse.Namespace, method: str, request: Message) -> Any:
    ca = args.relay_ca.read_bytes() if args.relay_ca else None
    admin = args.admin_credential.read_text().strip()
    credentials = grpc.ssl_channel_credentials(root_certificates=ca)
    async with grpc.aio.secure_channel(grpc_target(args.relay), credentials, options=CHANNEL_OPTIONS) as channel:
        stub = identity_pb2_grpc.AccessAdminStub(channel)
        return await getattr(stub, method)(request, metadata=(bearer(admin),), timeout=10)


def _entry(args: argparse.Namespace) -> identity_pb2.AccessEntry:
    return identity_pb2.AccessEntry(user=args.user) if args.user else identity_pb2.AccessEntry(group=args.group)


def admin_command(args: argparse.Namespace) -> None:
    # (command, action) -> (RPC, its request, how its reply is shown)
    requests: dict[tuple[str, str], tuple[str, Callable[[], Message], Callable[[argparse.Namespace, Any], None]]] = {
        ("users", "add"): ("AddUser", lambda: identity_pb2.AddUserRequest(name=args.name, groups=args.group),
                           _show_login_code),
        ("users", "code"): ("NewLoginCode", lambda: identity_pb2.NewLoginCodeRequest(name=args.name),
                            _show_login_code),
        ("users", "list"): ("ListUsers", identity_pb2.ListUsersRequest, _show_users),
        ("users", "remove"): ("RemoveUser", lambda: identity_pb2.RemoveUserRequest(name=args.name), _show_removed),
        ("users", "credentials"): ("ListCredentials", lambda: identity_pb2.ListCredentialsRequest(user=args.name),
                                   _show_credentials),
        ("users", "revoke-credential"): ("RevokeCredential", lambda: identity_pb2.RevokeCredentialRequest(
            user=args.name, id=args.id), _show_credential_revoked),
        ("keys", "rotate"): ("RotateSigningKey", identity_pb2.RotateSigningKeyRequest, _show_rotated),
        ("clusters", "grant"): ("Grant", lambda: identity_pb2.AccessChange(cluster=args.name, entry=_entry(args)),
                                _show_access),
        ("clusters", "revoke"): ("Revoke", lambda: identity_pb2.AccessChange(cluster=args.name, entry=_entry(args)),
                                 _show_access),
        ("clusters", "access"): ("GetAccess", lambda: identity_pb2.GetAccessRequest(cluster=args.name), _show_access),
    }
    method, build, show = requests[(args.command, args.action)]
    try:
        reply = asyncio.run(_call(args, method, build()))
    except grpc.aio.AioRpcError as exc:
        fail(exc.details() or exc.code().name)
    except OSError as exc:
        fail(str(exc))
    show(args, reply)


def _show_login_code(args: argparse.Namespace, reply: Any) -> None:
    ca = f" --relay-ca {args.relay_ca}" if args.relay_ca else ""
    groups = ", ".join(reply.user.groups) or "none"
    print(f"user {reply.user.name} (groups: {groups}); one-time login code (valid until "
          f"{datetime.datetime.fromtimestamp(reply.login_code_expires_unix, datetime.UTC):%Y-%m-%d %H:%M} UTC):")
    print(reply.login_code)
    # `--code -` reads the code from stdin: on argv another local user could see it and redeem it first.
    print(f"the user logs in with: clusterconnect login --relay {args.relay}{ca} --code -   (then pastes the code)")


def _show_users(args: argparse.Namespace, reply: identity_pb2.ListUsersResponse) -> None:
    records = [{"name": user.name, "groups": list(user.groups), "created_unix": user.created_unix or None,
                "logins": user.credentials} for user in reply.users]
    output.emit(args, records, (("NAME", lambda r: r["name"]), ("GROUPS", lambda r: ",".join(r["groups"]) or "-"),
                                ("LOGINS", lambda r: str(r["logins"]))))


def _show_removed(args: argparse.Namespace, reply: Any) -> None:
    print(f"user {args.name} removed; their logins no longer work")


def _utc(unix: int | None) -> str:
    return f"{datetime.datetime.fromtimestamp(unix, datetime.UTC):%Y-%m-%d %H:%M}" if unix else "-"


def _show_credentials(args: argparse.Namespace, reply: identity_pb2.ListCredentialsResponse) -> None:
    now = time.time()
    records = [{"id": item.id, "device": item.device or None, "created_unix": item.created_unix or None,
                "last_used_unix": item.last_used_unix or None, "expires_unix": item.expires_unix or None,
                "expired": bool(item.expires_unix) and item.expires_unix < now} for item in reply.credentials]
    output.emit(args, records, (
        ("ID", lambda r: r["id"]), ("DEVICE", lambda r: output.or_dash(r["device"])),
        ("CREATED (UTC)", lambda r: _utc(r["created_unix"])), ("LAST USED", lambda r: _utc(r["last_used_unix"])),
        ("EXPIRES", lambda r: _utc(r["expires_unix"]) + (" (expired)" if r["expired"] else ""))), width=140)


def _show_credential_revoked(args: argparse.Namespace, reply: Any) -> None:
    print(f"credential {args.id} of user {args.name} revoked; that login no longer works")


def _show_rotated(args: argparse.Namespace, reply: identity_pb2.RotateSigningKeyResponse) -> None:
    print(f"signing with key {reply.kid}; published keys: {', '.join(reply.published_kids)}")


def _show_access(args: argparse.Namespace, reply: Any) -> None:
    if output.machine_readable(args):
        output.dump(args, {"cluster": reply.cluster, "entries": [
            {"user": e.user} if e.WhichOneof("subject") == "user" else {"group": e.group} for e in reply.entries]})
        return
    entries = [f"user:{e.user}" if e.WhichOneof("subject") == "user" else f"group:{e.group}"
               for e in reply.entries]
    if entries:
        print(f"cluster {reply.cluster} access list: {' '.join(entries)}")
    else:
        print(f"cluster {reply.cluster} access list is empty: any bearer token may dial it (passthrough;"
              " the cluster authenticates)")
