"""The evolve report: every accuracy carries its count, and plots use a fixed 0-100% axis."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest

from rstar.report import collect, markdown, plot


def _eval(acc_by_level: dict[str, tuple[int, int]]) -> dict:
    """An eval summary with one greedy run at budget 1: {level: (correct, n)}."""
    levels = {lv: {"best_of_n": c / n, "topk_vote": c / n, "n": n} for lv, (c, n) in acc_by_level.items()}
    correct = sum(c for c, _ in acc_by_level.values())
    total = sum(n for _, n in acc_by_level.values())
    return {
        "runs": {"greedy": {"metrics": {"1": {"best_of_n": correct / total, "n": total, "levels": levels}}}}
    }


@pytest.fixture
def plotted(tmp_path, monkeypatch) -> Iterator[Callable]:
    """plotted(data): `plot` writes tmp_path/report.png and the figure comes back to be
    inspected (plt.close is held back until the test ends)."""
    import matplotlib.pyplot as plt

    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", figs.append)

    def run(data: dict):
        plot(data, tmp_path / "report.png")
        return figs[-1]

    yield run
    for fig in figs:
        real_close(fig)


def test_accuracies_carry_counts_and_plots_fix_the_axis(tmp_path, plotted):
    state = {
        "stages": {
            "eval_base": {"seconds": 1.0, "result": _eval({"1": (14, 15), "4": (0, 15)})},
            "round1/extract": {
                "seconds": 1.0,
                "result": {
                    "coverage": {
                        "coverage": 0.5,
                        "by_level": {"1": {"coverage": 1.0}, "4": {"coverage": 0.0}},
                    }
                },
            },
            "round1/eval": {"seconds": 1.0, "result": _eval({"1": (15, 15), "4": (3, 15)})},
        }
    }
    data = collect(state)
    md = markdown(data, 3.0)
    assert "| base (seed only) | greedy | 93.3 (14/15) | 0.0 (0/15) | 46.7 (14/30) |" in md
    assert "| round 1 | greedy | 100.0 (15/15) | 20.0 (3/15) | 60.0 (18/30) |" in md
    fig = plotted(data)
    # coverage, level 1, level 4: each on 0-100%, a level at 0% included
    assert len(fig.axes) == 3 and all(ax.get_ylim() == (-2.0, 102.0) for ax in fig.axes)
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_a_level_no_round_searched_gets_no_coverage_line(plotted):
    # embedded-full searches levels 3-4 only: levels 1-2 have test accuracy but no coverage
    cover = {"coverage": 0.2, "by_level": {"3": {"coverage": 0.4}, "4": {"coverage": 0.0}}}
    state = {
        "stages": {
            "round1/extract": {"seconds": 1.0, "result": {"coverage": cover}},
            "round1/eval": {"seconds": 1.0, "result": _eval({"1": (5, 5), "3": (2, 5), "4": (0, 5)})},
        }
    }
    data = collect(state)
    assert "| 1 | - | 40.0 | 0.0 | 20.0 |" in markdown(data, 1.0)
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in plotted(data).axes[0].get_lines()}
    assert lines == {"level 3": [40.0], "level 4": [0.0]}  # a searched level at 0% is drawn


def test_several_runs_combine_into_median_and_range(tmp_path):
    from rstar.cli import main

    runs = []
    for i, (c4, t4) in enumerate([(0.2, 3), (0.4, 9), (0.3, 6)]):
        state = {
            "stages": {
                "eval_base": {"seconds": 1.0, "result": _eval({"4": (0, 15)})},
                "round1/extract": {
                    "seconds": 1.0,
                    "result": {"coverage": {"coverage": c4, "by_level": {"4": {"coverage": c4}}}},
                },
                "round1/eval": {"seconds": 1.0, "result": _eval({"4": (t4, 15)})},
            }
        }
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "state.json").write_text(json.dumps(state))
        assert main(["report", str(run)]) == 0  # one run: the report rewritten from its state
        runs.append(run)
    out = tmp_path / "combined.md"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    md = out.read_text()
    assert "| 1 | 30.0 (20.0-40.0) |" in md  # coverage: median (min-max)
    assert "| round 1 | greedy | 40.0 (20.0-60.0) | 40.0 (20.0-60.0) |" in md
    assert main(["report", str(tmp_path / "run0"), str(tmp_path / "missing")]) == 2
