"""Plots of benchmark tables (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Union

# The measured latency table: {batch size: {number of terms: seconds per decode step}}.
LatencyTable = Mapping[int, Mapping[int, float]]


def plot_latency(table: LatencyTable, path: Union[str, Path],
                 baselines: Optional[Mapping[int, float]] = None,
                 title: str = "lmarith decode latency") -> Path:
    """Draw decode latency (ms/step) against the number of terms, one line per batch size,
    and save it to path (format from its suffix, e.g. .png). baselines: an optional
    {batch size: seconds per step} drawn as a dotted line in the batch's colour (e.g.
    transformers' single-model step). Returns the path written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not table or not any(table.values()):
        raise ValueError("the latency table is empty: nothing to plot")
    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    axes = figure.add_subplot()
    for index, (batch, by_terms) in enumerate(sorted(table.items())):
        colour = f"C{index % 10}"
        terms = sorted(by_terms)
        axes.plot(terms, [by_terms[t] * 1e3 for t in terms], marker="o", color=colour,
                  label=f"batch {batch}")
        if baselines and batch in baselines:
            axes.axhline(baselines[batch] * 1e3, color=colour, linestyle=":", linewidth=1,
                         label=f"transformers, batch {batch}")
    all_terms = sorted({t for by_terms in table.values() for t in by_terms})
    axes.set_xticks(all_terms)
    axes.set_xlabel("terms in the formula")
    axes.set_ylabel("decode latency (ms/step)")
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path
