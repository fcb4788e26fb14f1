"""Turn raw benchmark data into JSON, a Markdown table (with targets) and a PNG of latency distributions."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from stats import percentile

MS = 1000.0


def _pool(rounds: list[dict], key: str) -> list[float]:
    return [x for r in rounds for x in r[key]]


def _throughput(rounds: list[dict]) -> float:
    return statistics.median(r["bytes"] / r["seconds"] for r in rounds) / 1e6


PEER = "konnectivity"
GATEWAY = "gateway"
OBSERVED_TARGET = 0.05  # issue #14: metrics and tracing cost at most 5 % of small-GET latency


def _mark(ok: bool) -> str:
    return "✅" if ok else "❌"


def rows(results: dict) -> list[tuple[str, ...]]:
    """(scenario, metric, direct, tunnel, gateway, konnectivity, tunnel vs direct, target) rows. The targets
    are ratios against Konnectivity measured in the same run (issue #15); without it (--no-peer) none. The
    gateway column is the same tunnel entered through clusterconnect-gateway instead of the client proxy."""
    out = []
    s = results["scenarios"]

    def peer(name: str) -> list[dict] | None:
        return s[name].get(PEER) or None

    def gateway(name: str) -> list[dict] | None:
        return s[name].get(GATEWAY) or None

    if "small_get" in s:
        d, t = _pool(s["small_get"]["direct"], "latencies"), _pool(s["small_get"]["tunnel"], "latencies")
        k = _pool(peer("small_get"), "latencies") if peer("small_get") else None
        g = _pool(gateway("small_get"), "latencies") if gateway("small_get") else None
        for q in (50, 99):
            added = (percentile(t, q) - percentile(d, q)) * MS
            cell, target = "", ""
            gcell = f"{percentile(g, q) * MS:.2f} (+{(percentile(g, q) - percentile(d, q)) * MS:.2f})" if g else ""
            if k:
                peer_added = (percentile(k, q) - percentile(d, q)) * MS
                cell = f"{percentile(k, q) * MS:.2f} (+{peer_added:.2f})"
                target = f"added ≤ 2× Konnectivity's {_mark(added <= 2 * max(peer_added, 0.0))}"
            out.append(("small GET", f"p{q} latency (ms)", f"{percentile(d, q) * MS:.2f}",
                        f"{percentile(t, q) * MS:.2f}", gcell, cell, f"+{added:.2f} ms", target))
    if results.get("observed_small_get"):
        # The plain tunnel's and the observed chain's requests interleaved (bench/observed.py).
        plain = _pool(results["observed_small_get"], "plain")
        o = _pool(results["observed_small_get"], "observed")
        for q in (50, 99):
            cost = percentile(o, q) / percentile(plain, q) - 1
            target = f"≤ +{OBSERVED_TARGET:.0%} {_mark(cost <= OBSERVED_TARGET)}" if q == 50 else ""
            out.append(("small GET, traced + scraped", f"p{q} latency (ms)", "", f"{percentile(o, q) * MS:.2f}",
                        "", "", f"{cost:+.1%} over the plain tunnel's {percentile(plain, q) * MS:.2f}"
                        " (interleaved)", target))
    for name, label in (("big_list", "LIST"), ("port_forward", "port-forward")):
        if name in s:
            d, t = _throughput(s[name]["direct"]), _throughput(s[name]["tunnel"])
            cell, target = "n/a", ""
            gcell = f"{_throughput(gateway(name)):.0f}" if gateway(name) else ""
            if peer(name):
                k = _throughput(peer(name))
                cell, target = f"{k:.0f} ({k / d:.0%})", f"≥ Konnectivity's {_mark(t >= k)}"
            out.append((label, "throughput (MB/s)", f"{d:.0f}", f"{t:.0f}", gcell, cell, f"{t / d:.0%}", target))
    if "dial" in s:
        d, t = _pool(s["dial"]["direct"], "latencies"), _pool(s["dial"]["tunnel"], "latencies")
        added = (percentile(t, 50) - percentile(d, 50)) * MS
        cell, target, gcell = "", "", ""
        if gateway("dial"):
            g = _pool(gateway("dial"), "latencies")
            gcell = f"{percentile(g, 50) * MS:.2f} (+{(percentile(g, 50) - percentile(d, 50)) * MS:.2f})"
        if peer("dial"):
            k = _pool(peer("dial"), "latencies")
            peer_added = (percentile(k, 50) - percentile(d, 50)) * MS
            cell = f"{percentile(k, 50) * MS:.2f} (+{peer_added:.2f})"
            target = f"added ≤ 1.5× Konnectivity's {_mark(added <= 1.5 * max(peer_added, 0.0))}"
        out.append(("dial", "connect → first byte p50 (ms)", f"{percentile(d, 50) * MS:.2f}",
                    f"{percentile(t, 50) * MS:.2f}", gcell, cell, f"+{added:.2f} ms", target))
    if "watches" in s:
        d, t = _pool(s["watches"]["direct"], "latencies"), _pool(s["watches"]["tunnel"], "latencies")
        expected = s["watches"]["tunnel"][0]["expected"]
        cell = f"{percentile(_pool(peer('watches'), 'latencies'), 99) * MS:.1f}" if peer("watches") else ""
        gcell = ""
        if gateway("watches"):
            g = _pool(gateway("watches"), "latencies")
            delivered = f"{len(g) // len(gateway('watches'))}/{expected}"
            gcell = f"{percentile(g, 99) * MS:.1f} ({delivered})" if g else f"({delivered})"
        out.append(("watches", "event delivery p99 (ms)", f"{percentile(d, 99) * MS:.1f}",
                    f"{percentile(t, 99) * MS:.1f}", gcell, cell,
                    f"{len(t) // len(s['watches']['tunnel'])}/{expected} delivered", ""))
        rss = s["watches"]["tunnel"][-1]["rss_mib"]
        total = sum(v for k, v in rss.items() if k in ("relay", "agent", "aadproxy"))
        detail = ", ".join(f"{k} {v:.0f}" for k, v in rss.items())
        peer_rss = sum(peer("watches")[-1]["rss_mib"].values()) if peer("watches") else None
        gcell = ""
        if gateway("watches"):
            grss = gateway("watches")[-1]["rss_mib"]
            gcell = (f"{sum(v for k, v in grss.items() if k in ('relay', 'agent', 'aadproxy')):.0f}"
                     f" (+gateway {grss.get('gateway', 0):.0f})")
        out.append(("watches", "RSS relay+agent+aadproxy (MiB)", "", f"{total:.0f}", gcell,
                    f"{peer_rss:.0f} (server+agent)" if peer_rss is not None else "", detail, ""))
    if "head_of_line" in s:
        def stalled_ratio(rounds: list[dict]) -> float:
            return percentile(_pool(rounds, "loaded"), 99) / percentile(_pool(rounds, "unloaded"), 99)

        def hol_cell(rounds: list[dict] | None) -> str:
            if not rounds:
                return ""
            blocked = [r["blocked"] for r in rounds if r.get("blocked")]
            if blocked:  # a stalled reader held up everything: no ratio to give
                return f"blocked in {len(blocked)}/{len(rounds)} rounds: {blocked[0]}"
            return f"{stalled_ratio(rounds):.2f}×"

        rounds = s["head_of_line"]["tunnel"]
        unloaded, loaded = _pool(rounds, "unloaded"), _pool(rounds, "loaded")
        ratio = stalled_ratio(rounds)
        cell = hol_cell(peer("head_of_line"))
        gcell = hol_cell(gateway("head_of_line"))
        out.append(("head-of-line", "probe p99 stalled / unloaded",
                    f"{stalled_ratio(s['head_of_line']['direct']):.2f}×", f"{ratio:.2f}×", gcell, cell,
                    f"{percentile(unloaded, 99) * MS:.2f} → {percentile(loaded, 99) * MS:.2f} ms",
                    f"≤ 1.5× {_mark(ratio <= 1.5)}"))
    for entry in s.get("scale", []):
        n = entry["agents"]
        ok_time = entry["connect_seconds"] <= 60
        ok_rss = entry["relay_kib_per_agent"] <= 150
        out.append((f"scale {n:,} agents", "all connected (s)", "", f"{entry['connect_seconds']:.1f}", "", "",
                    f"{entry['connected']:,} connected", f"≤ 60 s {_mark(ok_time)}"))
        out.append((f"scale {n:,} agents", "relay RSS per agent (KiB)", "", f"{entry['relay_kib_per_agent']:.0f}",
                    "", "", f"{entry['relay_rss_mib_before']:.0f} → {entry['relay_rss_mib_after']:.0f} MiB",
                    f"≤ 150 KiB {_mark(ok_rss)}"))
        dial_p50 = percentile(entry["dial_latencies"], 50) * MS
        out.append((f"scale {n:,} agents", "dial p50 (ms)", "", f"{dial_p50:.2f}", "", "", "", ""))
    if "replicas" in s:
        out += replica_rows(s["replicas"])
    return out


def round_rows(results: dict) -> list[tuple[str, ...]]:
    """Each round's figures of the issue #15 targets, tunnel against Konnectivity, and their median over the
    rounds (the main table pools the rounds' samples): (metric, round 1, ..., median of rounds). Only the
    scenarios that ran with the peer; each round compares the endpoints measured alternately within it."""
    s = results["scenarios"]
    out: list[tuple[str, ...]] = []

    def pairs(name: str) -> list[tuple[dict, dict, dict]]:
        if name not in s or not s[name].get(PEER):
            return []
        return list(zip(s[name]["direct"], s[name]["tunnel"], s[name][PEER], strict=False))

    def row(metric: str, figures: list[tuple[float, float]], unit: str, ratio_of: str) -> None:
        """figures: (tunnel, Konnectivity) per round; the cell gives both and the tunnel's multiple."""
        if not figures:
            return
        cells = [f"{t:{unit}} / {k:{unit}} ({t / k:.1f}×)" if k > 0 else f"{t:{unit}} / {k:{unit}}"
                 for t, k in figures]
        ratios = [t / k for t, k in figures if k > 0]
        median = statistics.median(ratios) if ratios else float("nan")
        out.append((metric, *cells, f"{median:.2f}× {ratio_of}"))

    def added(name: str, q: int) -> list[tuple[float, float]]:
        """Per round: the tunnel's and Konnectivity's latency at percentile q over direct's, in ms."""
        return [((percentile(t["latencies"], q) - percentile(d["latencies"], q)) * MS,
                 (percentile(k["latencies"], q) - percentile(d["latencies"], q)) * MS) for d, t, k in pairs(name)]

    for q in (50, 99):
        row(f"small GET p{q} added (ms)", added("small_get", q), "+.2f", "(target ≤ 2×)")
    for name, label in (("big_list", "LIST"), ("port_forward", "port-forward")):
        row(f"{label} MB/s", [(t["bytes"] / t["seconds"] / 1e6, k["bytes"] / k["seconds"] / 1e6)
                               for _, t, k in pairs(name)], ".0f", "(target ≥ 1×)")
    row("dial p50 added (ms)", added("dial", 50), "+.2f", "(target ≤ 1.5×)")
    return out


def replica_rows(r: dict) -> list[tuple[str, ...]]:
    """3 replicas on etcd (issue #12): the tunnel column is the forwarded Dial (or the fleet's figure),
    the next one what it adds over a local Dial."""
    out: list[tuple[str, ...]] = [("replicas", "failed", "", "", "", "", e[:200], "❌") for e in r.get("errors", [])]
    if "forwarding" not in r:
        return out
    f = r["forwarding"]
    for name, label in (("dial", "dial, connect → first byte"), ("small_get", "small GET")):
        local, forwarded = _pool(f[name]["local"], "latencies"), _pool(f[name]["forwarded"], "latencies")
        for q in (50, 99):
            added = (percentile(forwarded, q) - percentile(local, q)) * MS
            target = f"added ≤ 5 ms {_mark(added <= 5)}" if q == 50 else ""
            out.append((f"replicas: {label}", f"forwarded p{q} (ms)", "", f"{percentile(forwarded, q) * MS:.2f}",
                        "", "", f"{added:+.2f} ms over local {percentile(local, q) * MS:.2f}", target))
    if "rehome" not in r:
        return out
    h = r["rehome"]
    worst = max(h["seconds"])
    out.append(("replicas: kill -9 of the agent's replica", "request works again p50 / max (s)", "",
                f"{percentile(h['seconds'], 50):.2f} / {worst:.2f}", "", "",
                f"{h['trials']} trials; its routes gone after ≤ {max(h['routes_gone_seconds']):.1f} s",
                f"≤ 10 s each {_mark(worst <= 10)}"))
    if "agents" not in r:
        return out
    a = r["agents"]
    n = a["agents"]
    counts = a["per_replica"]
    spread = max(abs(c - n / 3) / (n / 3) for c in counts.values())
    out += [
        (f"replicas: {n:,} agents on 3", "all connected (s)", "", f"{a['connect_seconds']:.1f}", "", "",
         f"{sum(counts.values()):,} connected, {a['failed_attempts']} failed attempts",
         f"≤ 120 s {_mark(a['connect_seconds'] <= 120)}"),
        (f"replicas: {n:,} agents on 3", "agents per replica", "", " / ".join(f"{c:,}" for c in counts.values()),
         "", "",
         f"at most {spread:.1%} off a third" + (f"; lease lost: {', '.join(a['lease_lost'])}" if a.get("lease_lost")
                                                 else ""), f"±15 % {_mark(spread <= 0.15)}"),
        (f"replicas: {n:,} agents on 3", "routes in etcd", "", f"{a['routes']:,}", "", "",
         f"{a['routes_distinct_clusters']:,} clusters", f"= {n:,} {_mark(a['routes'] == n)}"),
        (f"replicas: {n:,} agents on 3", "steady etcd writes/s", "", f"{a['steady_writes_per_second']:.2f}", "", "",
         f"{a['steady_revisions']} revisions in {a['steady_window_seconds']:.0f} s",
         f"≤ 5/s {_mark(a['steady_writes_per_second'] <= 5)}"),
    ]
    return out


def markdown(results: dict, stamp: str) -> str:
    header = ("| scenario | metric | direct | tunnel | gateway | Konnectivity | tunnel vs direct | target |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |\n")
    body = "\n".join("| " + " | ".join(row) + " |" for row in rows(results))
    kind = "smoke run (tiny sizes; figures mean nothing)" if results["smoke"] else f"{results['rounds']} rounds"
    machine = results["machine"]
    observed = results.get("observed")
    note = (f"\n\"traced + scraped\": a second chain exporting traces over OTLP ({observed['spans_received']:,} spans"
            f" received) with every service's /metrics scraped every {observed['scrape_interval_seconds']:g} s"
            f" ({observed['scrapes']:,} scrapes, {observed['scrape_failures']} failed); bench/observed.py.\n"
            if observed else "")
    errors = "".join(f"- failed: {error[:300]}\n" for error in results.get("errors", []))
    per_round = round_rows(results)
    rounds = ""
    if per_round:
        count = len(per_round[0]) - 2
        rounds = ("\nEach round: tunnel / Konnectivity (the tunnel's multiple), and the median of those multiples.\n\n"
                  "| metric | " + " | ".join(f"round {i + 1}" for i in range(count)) + " | median of rounds |\n"
                  "|" + " --- |" * (count + 2) + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in per_round)
                  + "\n")
    return (f"# Benchmark {stamp}\n\n{kind}; {machine['cores']} cores; Python {machine['python']}. "
            f"Produced by `make bench`.\n\n{header}{body}\n{rounds}{note}" + (f"\n{errors}" if errors else ""))


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(n, k) for n, k in (("small_get", "latencies"), ("dial", "latencies"), ("watches", "latencies"))
              if n in results["scenarios"]]
    if not panels:
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for axis, (name, key) in zip(axes[0], panels, strict=True):
        for endpoint in ("direct", "tunnel", GATEWAY, PEER):
            samples = sorted(x * MS for x in _pool(results["scenarios"][name].get(endpoint, []), key))
            if samples:
                axis.plot(samples, [i / len(samples) for i in range(len(samples))], label=endpoint)
        axis.set_title(name.replace("_", " "))
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction ≤ x")
        axis.set_xscale("log")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(results: dict, out: Path, stamp: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stamp}.json").write_text(json.dumps(results))
    plot(results, out / f"{stamp}.png")
    text = markdown(results, stamp) + f"\n![latency distributions]({stamp}.png)\n"
    report = out / f"{stamp}.md"
    report.write_text(text)
    if not results["smoke"]:
        (out / "latest.md").write_text(text)
    return report
