"""The profile: the relay (and its CA) of the last `clusterconnect login --relay URL`, so that later commands
(`proxy`, `clusters list`, `users add` ...) need neither ``--relay`` nor ``--relay-ca``.

``STATE_DIR/profile.json`` holds the relay URL and the login's name, ``STATE_DIR/profile-relay-ca.pem`` a
copy of the relay's CA bundle when one was given (so moving or deleting the original breaks nothing); both
mode 600. No token: tokens stay in the login (``STATE_DIR/credentials/``). A flag or its environment
variable wins over the profile, and the profile's CA is used only for the profile's relay (a CA pinned for
one relay must not vouch for another).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from clusterconnect.cli.usage import fail
from clusterconnect.pki import write_private

FILE = "profile.json"
CA_FILE = "profile-relay-ca.pem"


@dataclass(frozen=True)
class Profile:
    relay: str
    login: str
    relay_ca: Path | None


def save(state_dir: Path, relay: str, relay_ca_pem: bytes | None, login: str) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = state_dir / CA_FILE
    if relay_ca_pem is not None:
        write_private(ca, relay_ca_pem)
    else:
        ca.unlink(missing_ok=True)  # the system's CAs, as at the login
    path = state_dir / FILE
    document = {"relay": relay, "login": login, "relay_ca": str(ca) if relay_ca_pem is not None else None}
    write_private(path, (json.dumps(document, indent=1) + "\n").encode())
    return path


def load(state_dir: Path) -> Profile | None:
    """The profile in ``state_dir``; None if there is none. A damaged one is an error, not silence."""
    path = state_dir / FILE
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        fail(f"cannot read the profile {path}: {exc} (log in again with `clusterconnect login --relay URL ...`)")
    if not (isinstance(document, dict) and isinstance(document.get("relay"), str)
            and isinstance(document.get("login"), str) and isinstance(document.get("relay_ca"), str | None)):
        fail(f"the profile {path} is not one clusterconnect wrote (log in again with `clusterconnect login"
             " --relay URL ...`)")
    ca = document["relay_ca"]
    return Profile(relay=document["relay"], login=document["login"], relay_ca=Path(ca) if ca else None)


def apply(args: argparse.Namespace, state_dir: Path) -> Profile | None:
    """Fill ``args.relay`` and ``args.relay_ca`` from the profile where neither a flag nor the environment gave
    them. Returns the profile when its relay is the one this command uses."""
    if not hasattr(args, "relay"):
        return None  # a command without a relay
    profile = load(state_dir)
    if args.relay is None:
        if profile is None:
            fail("--relay URL is needed (or log in once with `clusterconnect login --relay URL ...`, which"
                 " remembers it)")
        args.relay = profile.relay
    if profile is None or profile.relay != args.relay:
        return None
    if getattr(args, "relay_ca", None) is None:
        args.relay_ca = profile.relay_ca
    return profile


def forget(state_dir: Path, login: str) -> bool:
    """Drop the profile if it names ``login`` (at its logout); True if it did."""
    profile = load(state_dir)
    if profile is None or profile.login != login:
        return False
    (state_dir / FILE).unlink(missing_ok=True)
    (state_dir / CA_FILE).unlink(missing_ok=True)
    return True
