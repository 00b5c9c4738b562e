"""Turning batches of request results into rows, markdown tables and summary lines.

Per row (one stack x scenario x level):
  output tok/s    completion tokens of the row's requests / the row's wall time
  TTFT, TPOT      client side (bench/load.py), p50 and p99 over the successful requests
  goodput         requests meeting both SLOs (TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms;
                  a one-token answer has no TPOT and meets that SLO) / wall time
  SLO met         the fraction of all the row's requests meeting both; a failed request
                  meets neither
Percentiles interpolate linearly between the closest ranks (numpy's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.load import Batch, RequestResult

TABLE_COLUMNS = (
    ("stack", "stack"),
    ("level", "level"),
    ("requests", "num_requests"),
    ("errors", "num_errors"),
    ("output tok/s", "output_tokens_per_s"),
    ("TTFT p50 ms", "ttft_ms_p50"),
    ("TTFT p99 ms", "ttft_ms_p99"),
    ("TPOT p50 ms", "tpot_ms_p50"),
    ("TPOT p99 ms", "tpot_ms_p99"),
    ("goodput req/s", "goodput_per_s"),
    ("SLO met", "slo_fraction"),
)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float
    tpot_ms: float

    def is_met(self, r: RequestResult) -> bool:
        return (
            not r.error
            and r.ttft_ms is not None
            and r.ttft_ms <= self.ttft_ms
            and (r.tpot_ms is None or r.tpot_ms <= self.tpot_ms)
        )


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(batch: Batch, slo: Slo) -> dict[str, Any]:
    done = [r for r in batch.requests if not r.error]
    ttfts = [r.ttft_ms for r in done if r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in done if r.tpot_ms is not None]
    num_output_tokens = sum(r.completion_tokens for r in done)
    num_slo_met = sum(slo.is_met(r) for r in batch.requests)
    return {
        "num_requests": len(batch.requests),
        "num_errors": len(batch.requests) - len(done),
        "wall_s": batch.wall_s,
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / batch.wall_s,
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p99": percentile(ttfts, 99),
        "tpot_ms_p50": percentile(tpots, 50),
        "tpot_ms_p99": percentile(tpots, 99),
        "goodput_per_s": num_slo_met / batch.wall_s,
        "slo_fraction": num_slo_met / len(batch.requests) if batch.requests else None,
        "prompt_tokens_mean": mean([r.prompt_tokens for r in done]),
        "completion_tokens_mean": mean([r.completion_tokens for r in done]),
        "server_ttft_ms_mean": mean([r.server_ttft_ms for r in done if r.server_ttft_ms is not None]),
        "server_tpot_ms_mean": mean([r.server_tpot_ms for r in done if r.server_tpot_ms is not None]),
        "errors": sorted({r.error for r in batch.requests if r.error}),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    def cell(key: str, value: Any) -> str:
        if value is None:
            return "-"
        if key == "slo_fraction":
            return f"{value:.0%}"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(key, row[key]) for _, key in TABLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def tables(results: list[dict[str, Any]], scenarios: list[str]) -> str:
    """One table per scenario, rows ordered by level (as run) and then by stack."""
    parts = []
    for scenario in scenarios:
        rows = [r for r in results if r["scenario"] == scenario]
        levels = list(dict.fromkeys(r["level"] for r in rows))
        rows.sort(key=lambda r: levels.index(r["level"]))  # stable: stacks keep their run order
        if rows:
            parts.append(f"### {scenario}\n\n{markdown_table(rows)}")
    return "\n\n".join(parts)


def summary_lines(results: list[dict[str, Any]], stacks: list[str], low: int, high: int) -> list[str]:
    """Closed-loop scaling per stack (c=high vs c=low) and the mix's short-stream TPOT p99 per stack."""

    def find(stack: str, scenario: str, level: str) -> dict[str, Any] | None:
        return next((r for r in results if (r["stack"], r["scenario"], r["level"]) == (stack, scenario, level)), None)

    lines = []
    for stack in stacks:
        lo, hi = find(stack, "closed", f"c={low}"), find(stack, "closed", f"c={high}")
        if lo and hi and low != high and lo["output_tokens_per_s"]:
            ratio = hi["output_tokens_per_s"] / lo["output_tokens_per_s"]
            lines.append(f"{stack}: throughput c={high} / c={low} = {ratio:.1f}x")
    tpots = {s: r["tpot_ms_p99"] for s in stacks if (r := find(s, "mix", "short")) and r["tpot_ms_p99"] is not None}
    if tpots:
        lines.append("short-stream TPOT p99: " + " vs ".join(f"{s} {v:.0f} ms" for s, v in tpots.items()))
    return lines
