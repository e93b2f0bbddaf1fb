"""The report of `minimind bench --server`: a rich table (with the per-round HTTP cost quartiles under it) and a
chart of aggregate tokens/s and TTFT per (model, dtype)."""
from __future__ import annotations

from pathlib import Path

from . import bench
from .bench_http import percentile

ENGINE, SERVE, LLAMA = "minimind LLM (no HTTP)", "minimind serve", "llama-server"  # implementation labels


def _triple(r: dict, key: str, conc: list[int], digits: int = 0, suffix: str = "") -> str:
    cells = ["err" if f"error@{n}" in r else bench._fmt(r.get(f"{key}@{n}"), digits) for n in conc]
    return " / ".join(cells) + (suffix if any(c not in ("-", "err") for c in cells) else "")


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    a = report["args"]
    conc = a["concurrency"]
    at = "@" + "/".join(map(str, conc))
    table = Table(title=f"minimind bench --server ({a['decode_tokens']} tokens per streaming request over HTTP, "
                        f"{a['prompt_len']}-token prompts; aggregate tokens/s best of {a['repeats']}; "
                        f"threads={a['threads']})")
    for col in ["model", "dtype", "impl", *[f"agg@{n}" for n in conc], f"x llama {at}",
                f"TTFT p50 ms {at}", f"TTFT p99 ms {at}", f"HTTP cost {at}", "tokens/req", "peak RSS MB"]:
        table.add_column(col, justify="left" if col in ("model", "dtype", "impl") else "right")
    for r in report["results"]:
        tokens = sorted({t for n in conc for t in r.get(f"completion_tokens@{n}", [])})
        rss = [r[f"peak_rss_mb@{n}"] for n in conc if r.get(f"peak_rss_mb@{n}")]
        table.add_row(r["model"], r["dtype"], r["impl"],
                      *["err" if f"error@{n}" in r else bench._fmt(r.get(f"agg_tps@{n}")) for n in conc],
                      _triple(r, "x_llama", conc, 2) if r["impl"] == SERVE else "",
                      _triple(r, "ttft_p50_ms", conc), _triple(r, "ttft_p99_ms", conc),
                      _triple(r, "http_overhead_pct", conc, 1, " %") if r["impl"] == SERVE else "",
                      "-" if not tokens else "/".join(map(str, tokens)) if len(tokens) < 4 else f"{tokens[0]}-{tokens[-1]}",
                      bench._fmt(max(rss) if rss else None))
    console = Console(width=max(Console().width, 220))
    console.print(table)
    spread = [f"{r['dtype']} " + ", ".join(
        f"@{n} {percentile(r[key], 25):.0f} to {percentile(r[key], 75):.0f}"
        for n in conc if (key := f"http_overhead_rounds_pct@{n}") in r) for r in report["results"]
        if r["impl"] == SERVE and any(f"http_overhead_rounds_pct@{n}" in r for n in conc)]
    if spread:  # how far one cell can be trusted: rounds seconds apart still differ by many points here
        console.print("HTTP cost per round, quartiles (%): " + "; ".join(spread))
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")


def draw_chart(report: dict, path: Path) -> None:
    """One column per (model, dtype): aggregate tokens/s on top, TTFT p50 (solid) and p99 (dashed) below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    conc = report["args"]["concurrency"]
    rows = report["results"]
    groups = list(dict.fromkeys((r["model"], r["dtype"]) for r in rows)) or [("", "")]
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 7.2), squeeze=False)
    colors = {ENGINE: "C0", SERVE: "C1", LLAMA: "C2"}
    for col, (model, dtype) in enumerate(groups):
        top, bottom = axes[0][col], axes[1][col]
        for r in (r for r in rows if (r["model"], r["dtype"]) == (model, dtype)):
            color = colors.get(r["impl"].split(" ")[0] if r["impl"].startswith(LLAMA) else r["impl"], "C3")
            xs = [n for n in conc if r.get(f"agg_tps@{n}")]
            top.plot(xs, [r[f"agg_tps@{n}"] for n in xs], "o-", color=color, label=r["impl"])
            bottom.plot(xs, [r[f"ttft_p50_ms@{n}"] for n in xs], "o-", color=color, label=f"{r['impl']} p50")
            bottom.plot(xs, [r[f"ttft_p99_ms@{n}"] for n in xs], "x--", color=color, alpha=0.6)
        top.set_title(f"{model.split(' ')[0]} {dtype}: aggregate tokens/s", fontsize=9)
        bottom.set_title("TTFT ms (p50 solid, p99 dashed)", fontsize=9)
        bottom.set_yscale("log")
        bottom.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        bottom.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc)
            ax.set_xticklabels([str(n) for n in conc])
            ax.grid(alpha=0.3)
        bottom.set_xlabel("concurrent streaming clients")
        top.set_ylim(bottom=0)
        top.legend(fontsize=7)
    m = report["machine"]
    fig.suptitle(f"minimind bench --server on {m['cpu']} ({m['cores']} cores, threads={report['args']['threads']}, "
                 f"{report['args']['decode_tokens']} tokens per request)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
