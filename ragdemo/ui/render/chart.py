"""The comparison chart: TTFT, tokens and storage per method, one row each (matplotlib, no pyplot)."""
from __future__ import annotations

from ...methods.base import Result
from ...units import fmt_bytes, fmt_s
from .shared import method_colour


def comparison_figure(results: list[Result], labels: dict[str, str] | None = None,
                      storage: dict[str, tuple[int, int]] | None = None):
    """Three panels sharing one row per method (horizontal bars, names once on the left, so they never overlap
    and the figure stays readable at 800 px): TTFT on a log scale, tokens, storage split per-chunk/shared.
    `storage` is {method: (per-chunk bytes, shared bytes)} from each method's storage account. None when
    nothing ran."""
    from matplotlib.figure import Figure  # no pyplot: thread-safe inside the server
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    done = [r for r in results if not r.error]
    if not done:
        return None
    names = [_wrap((labels or {}).get(r.method, r.method)) for r in done]
    y = list(range(len(done)))[::-1]  # first method on top
    colours = [method_colour(r.method) for r in done]
    figure = Figure(figsize=(10, 1.3 + 0.55 * len(done)), dpi=100, layout="constrained")
    ttft, tokens, stored = figure.subplots(1, 3, sharey=True)
    spread = [r.timings.get("ttft_s") if r.timings.get("repeats", 1) > 1 else None for r in done]
    ranges = [[r.ttft_s - min(runs) if runs else 0 for r, runs in zip(done, spread)],
              [max(runs) - r.ttft_s if runs else 0 for r, runs in zip(done, spread)]]
    ttft.barh(y, [max(r.ttft_s, 1e-3) for r in done], color=colours,
              xerr=ranges if any(spread) else None, capsize=3, error_kw={"elinewidth": 1})  # the runs' range
    ttft.set_xscale("log")
    ttft.set_title("time to first token (log scale" + ("; median and range of the runs)" if any(spread) else ")"),
                   fontsize=10)
    ttft.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_s(v)))
    ttft.xaxis.set_minor_formatter(NullFormatter())  # "2 x 10^0" minor labels overlap at 800 px
    for yi, r in zip(y, done):
        ttft.text(max(r.ttft_s, 1e-3), yi, " " + fmt_s(r.ttft_s), va="center", fontsize=8)
    ttft.set_xlim(right=max(r.ttft_s for r in done) * 8)
    height = 0.27
    for offset, (field_name, shade) in zip((height, 0, -height), (("prompt_tokens", "#9ca3af"),
                                                                 ("processed_tokens", "#f59e0b"),
                                                                 ("cached_tokens", "#3b82f6"))):
        tokens.barh([v + offset for v in y], [getattr(r, field_name) for r in done], height, color=shade,
                    label=field_name.replace("_tokens", ""))
    tokens.set_title("tokens", fontsize=10)
    tokens.legend(fontsize=7, loc="best")
    parts = [(storage or {}).get(r.method, (r.storage_bytes, 0)) for r in done]
    stored.barh(y, [c for c, _ in parts], color=colours, label="per-chunk")
    stored.barh(y, [s_ for _, s_ in parts], left=[c for c, _ in parts], color=colours, hatch="//", alpha=0.45,
                label="shared (decoder, adapter…)")
    stored.set_title("stored for the collection", fontsize=10)
    stored.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_bytes(v)))
    most = max(c + s_ for c, s_ in parts)
    stored.set_xlim(left=0, right=max(1, most) * 1.15)
    if most:
        stored.legend(fontsize=7, loc="best")
    else:  # nothing stored by any of these methods: say so instead of an axis of "0 B" ticks
        stored.xaxis.set_major_locator(NullLocator())
        stored.text(0.5, 0.5, "nothing stored:\nthese methods read text", transform=stored.transAxes,
                    ha="center", va="center", fontsize=9, color="#6b7280")
    ttft.set_yticks(y, names, fontsize=9)
    for axis in (tokens, stored) if most else (tokens,):
        axis.xaxis.set_major_locator(MaxNLocator(4))  # few ticks: labels stay apart at 800 px
    for axis in (ttft, tokens, stored):
        axis.grid(axis="x", alpha=0.3)
        axis.tick_params(axis="x", labelsize=8)
    return figure


def _wrap(label: str, width: int = 18) -> str:
    words, lines = label.split(), [""]
    for word in words:
        if lines[-1] and len(lines[-1]) + len(word) > width:
            lines.append("")
        lines[-1] = (lines[-1] + " " + word).strip()
    return "\n".join(lines[:3])
