"""The plot of `make bench-peers`: aggregate decode tok/s vs concurrent streams, one line per system
and core setting, from bench/results/peers.json. Runs under the peers venv, where matplotlib is
(bench/peers-requirements.txt): `python -m bench.peers_plot peers.json peers.png`."""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


def main(argv: list[str]) -> int:
    source, target = argv
    data = json.loads(open(source).read())
    streams = data["meta"]["streams"]
    fig, ax = plt.subplots(figsize=(9, 5))
    systems = list(dict.fromkeys(row["system"] for row in data["results"]))
    for row in data["results"]:
        points = [(s, row[f"streams_{s}"]["tokens_per_s"]) for s in streams if f"streams_{s}" in row]
        if points:
            style = "-" if row["cores"] == "all" else "--"
            ax.plot(*zip(*points), style, marker="o", color=f"C{systems.index(row['system'])}", label=f"{row['system']} ({row['cores']} core{'s' if row['cores'] == 'all' else ''})")
    meta = data["meta"]
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="decode tok/s (all streams)",
           title=f"{meta['model']} on {meta['num_cpus']} CPUs, load avg {meta['load_average_before'][0]:.1f}")
    ax.set_xticks(streams, [str(s) for s in streams])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(target, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
