"""`/metrics`: Prometheus text exposition (format 0.0.4) of the run, its peers and the latest round.

Each family is written once, as a block: `# HELP`, `# TYPE`, then all its samples; counters end in
`_total`. Per-peer series cover the PAGE_MAX peers heard from most recently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import PlainTextResponse

from coordinator.history import ONLINE_WINDOW_S
from coordinator.routes import service
from coordinator.service import PAGE_MAX, RunService

router = APIRouter()
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class Family:
    """One metric family: its samples as (labels, value)."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float | None, **labels: str) -> None:
        if value is not None and math.isfinite(float(value)):
            self.samples.append((labels, float(value)))

    def text(self, run: str) -> list[str]:
        if not self.samples:
            return []
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for labels, value in self.samples:
            pairs = ",".join(f'{k}="{_escape_label(v)}"' for k, v in {"run": run, **labels}.items())
            lines.append(f"{self.name}{{{pairs}}} {value:.10g}")
        return lines


def prometheus_text(summary: dict[str, Any], peers: list[dict[str, Any]], latest: dict[str, float]) -> str:
    """The exposition text for `summary` (RunService.summary), `peers` and the latest round's metrics."""
    families = [
        Family("nord_round", "gauge", "Current (open) round."),
        Family("nord_sealed_rounds_total", "counter", "Rounds sealed so far."),
        Family("nord_tokens_seen_total", "counter", "Tokens trained on in accepted contributions."),
        Family("nord_parameters", "gauge", "Trainable parameters of the model."),
        Family("nord_peers", "gauge", "Peers ever seen."),
        Family("nord_peers_online", "gauge", f"Peers heard from in the last {ONLINE_WINDOW_S:g} s."),
    ]
    keys = ("round", "sealed_rounds", "tokens_seen", "parameters", "peers_total", "peers_online")
    for family, key in zip(families, keys, strict=True):
        family.add(summary[key])
    per_peer = {
        "accepted": Family("nord_peer_contributions_accepted_total", "counter", "Accepted contributions."),
        "rejected": Family(
            "nord_peer_contributions_rejected_total", "counter", "Rejected or revoked contributions."
        ),
        "bytes": Family("nord_peer_bytes_total", "counter", "Bytes of contributions received."),
        "tokens": Family("nord_peer_tokens_total", "counter", "Tokens in accepted contributions."),
    }
    for p in peers:
        for key, family in per_peer.items():
            family.add(p[key], peer=p["peer"])
    by_metric: dict[str, Family] = {}
    for name, value in sorted(latest.items()):
        metric, _, layer = name.partition("/")
        family_name = f"nord_{_metric_name(metric)}"
        family = by_metric.setdefault(
            family_name, Family(family_name, "gauge", f"{metric} at the latest sealed round.")
        )
        family.add(value, **({"layer": layer} if layer else {}))
    run = summary["run_id"]
    lines = [line for f in [*families, *per_peer.values(), *by_metric.values()] for line in f.text(run)]
    return "\n".join(lines) + "\n"


@router.get("/metrics", response_class=PlainTextResponse)
def prometheus(svc: Annotated[RunService, Depends(service)]) -> PlainTextResponse:
    """Prometheus text exposition: run gauges and counters, per-peer counters, latest round metrics."""
    latest = svc.history.rounds(limit=1, sealed_only=True)
    metrics = svc.history.metrics(first=latest[0]["round"], last=latest[0]["round"]) if latest else {}
    text = prometheus_text(svc.summary(), svc.peers(PAGE_MAX), next(iter(metrics.values()), {}))
    return PlainTextResponse(text, media_type=CONTENT_TYPE)


def _escape_label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _metric_name(name: str) -> str:
    """A Prometheus metric name part: ASCII letters, digits and '_' only."""
    return "".join(ch if (ch.isascii() and ch.isalnum()) or ch == "_" else "_" for ch in name)
