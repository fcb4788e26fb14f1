"""The committed Go stubs of clients/go are what buf.gen.yaml makes from protos/ now (`make go-protos`),
with the generators pinned in tools/protoc-gen-go/go.mod."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = Path("clients/go/clusterconnectv1")


def test_committed_go_stubs_match_the_protos(tmp_path: Path) -> None:
    built = subprocess.run(["make", "-s", "proto-tools"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert built.returncode == 0, built.stdout + built.stderr
    result = subprocess.run([str(ROOT / "tools/bin/buf"), "generate", "-o", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    generated = {path.name: path.read_text() for path in (tmp_path / STUBS).glob("*.go")}
    committed = {path.name: path.read_text() for path in (ROOT / STUBS).glob("*.go")}
    protos = sorted((ROOT / "protos/clusterconnect/v1").glob("*.proto"))
    assert protos and len(generated) == 2 * len(protos)  # a .pb.go and a _grpc.pb.go for each proto
    assert generated.keys() == committed.keys(), "run `make go-protos`"
    stale = [name for name in generated if generated[name] != committed[name]]
    assert not stale, f"{stale} stale: run `make go-protos`"
