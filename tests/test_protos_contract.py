"""protos/ as a public contract: `buf lint` (buf.yaml: STANDARD + COMMENTS, with the wire-name
exceptions) and `buf breaking` against the committed baseline image protos/baseline.binpb. buf is
built from source at the version pinned in tools/buf/go.mod (`make proto-tools`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = ROOT / "tools" / "bin" / "buf"
BASELINE = ROOT / "protos" / "baseline.binpb"
TUNNEL = Path("protos/clusterconnect/v1/tunnel.proto")


@pytest.fixture(scope="module", autouse=True)
def buf_built() -> None:
    """`make proto-tools` (a no-op when `make test` built it already)."""
    result = subprocess.run(["make", "-s", "proto-tools"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout + result.stderr


def buf(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def copy_of_the_protos(into: Path) -> Path:
    """buf.yaml and the .proto files (only) in a fresh directory."""
    shutil.copy(ROOT / "buf.yaml", into / "buf.yaml")
    for proto in (ROOT / "protos").rglob("*.proto"):
        target = into / proto.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(proto, target)
    return into


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not once in {path}"
    path.write_text(text.replace(old, new))


def test_protos_pass_lint() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_protos_keep_the_baseline_contract() -> None:
    result = buf("breaking", "--against", str(BASELINE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_changed_field_number_breaks_the_contract(tmp_path: Path) -> None:
    copy = copy_of_the_protos(tmp_path)
    unchanged = buf("breaking", "--against", str(BASELINE), cwd=copy)
    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr  # the copy itself is fine
    edit(copy / TUNNEL, "bytes data = 1;", "bytes data = 4;")
    result = buf("breaking", "--against", str(BASELINE), cwd=copy)
    assert result.returncode != 0
    assert 'field "1" with name "data" on message "Chunk" was deleted' in result.stdout, result.stdout + result.stderr


def test_lint_wants_a_comment_on_every_field(tmp_path: Path) -> None:
    copy = copy_of_the_protos(tmp_path)
    edit(copy / TUNNEL, "  // Why, for the agent's log.\n", "")
    result = buf("lint", cwd=copy)
    assert result.returncode != 0
    assert 'Field "reason" should have a non-empty comment' in result.stdout, result.stdout + result.stderr
