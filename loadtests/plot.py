"""PNG plots of a concurrency sweep: output tokens/s, and TTFT / ITL percentiles, against concurrency."""

from __future__ import annotations

from pathlib import Path


def plot_sweep(results: list[dict], out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [r["users"] for r in results]
    paths = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(users, [r["output_tokens_per_s"] for r in results], marker="o")
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title=f"Throughput\n{title}")
    ax.set_xticks(users, [str(u) for u in users])
    ax.grid(True, alpha=0.3)
    paths.append(out / "throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, key, label in ((axes[0], "ttft", "time to first token (ms)"), (axes[1], "itl", "inter-token latency (ms)")):
        for p in ("p50_ms", "p90_ms", "p99_ms"):
            ax.plot(users, [r[key].get(p, float("nan")) for r in results], marker="o", label=p.removesuffix("_ms"))
        ax.set(xscale="log", xlabel="concurrent streams", ylabel=label)
        ax.set_xticks(users, [str(u) for u in users])
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"Latency\n{title}")
    paths.append(out / "latency.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
