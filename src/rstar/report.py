"""The report of an `rstar evolve` run: RUN/report.{md,json,png} and RUN/trees.html.

Per round: training-set coverage per difficulty level (the paper's Table 2), test accuracy per
level for greedy, best-of-N + PPM and MCTS + PPM at the same number of complete solutions,
the PPM's held-out pairwise accuracy, and the time of each stage.
"""

from __future__ import annotations

import json
from pathlib import Path

GREEDY, BON, MCTS = "greedy", "bon-ppm", "mcts-ppm"
# the answer-selection rule each method is reported with
RULE = {GREEDY: "best_of_n", BON: "best_of_n", MCTS: "topk_vote"}


def _metrics(summary: dict, run: str, level: str | None = None) -> dict | None:
    """Metrics of one eval run at its largest budget (overall or for one level)."""
    r = (summary or {}).get("runs", {}).get(run)
    if not r:
        return None
    m = r["metrics"][max(r["metrics"], key=int)]
    return m if level is None else m["levels"].get(level)


def _acc(summary: dict, run: str, level: str | None = None) -> float | None:
    """Accuracy of one eval run at its largest budget (overall or for one level)."""
    m = _metrics(summary, run, level)
    return None if m is None else m[RULE[run]]


def _count(summary: dict, run: str, level: str | None = None) -> int | None:
    """Problems behind that accuracy."""
    m = _metrics(summary, run, level)
    return None if m is None else m.get("n")


def level_coverage(round_data: dict, level: str) -> float | None:
    """Share of a level's training problems with a correct trajectory (rstar extract coverage)."""
    return round_data["coverage"].get("by_level", {}).get(level, {}).get("coverage")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _pct_n(x: float | None, n: int | None) -> str:
    """An accuracy with its count: "40.0 (6/15)"."""
    if x is None:
        return "-"
    return _pct(x) if n is None else f"{_pct(x)} ({round(x * n)}/{n})"


def collect(state: dict) -> dict:
    """The report's numbers from the run state (every stage's recorded result)."""
    stages = state["stages"]
    rounds = sorted({int(k.split("/")[0][5:]) for k in stages if k.startswith("round")})
    levels: set[str] = set()
    out: dict = {"rounds": [], "times": {k: v["seconds"] for k, v in stages.items()}}
    out["resumed"] = [k for k, v in stages.items() if v.get("resumed")]
    for name in ("eval_base", "eval_compare"):
        if name in stages:
            out[name] = {"all": _acc(stages[name]["result"], GREEDY)}
    for r in rounds:
        ex = (stages.get(f"round{r}/extract") or {}).get("result") or {}
        tr = (stages.get(f"round{r}/train") or {}).get("result") or {}
        ev = (stages.get(f"round{r}/eval") or {}).get("result") or {}
        cov = ex.get("coverage", {})
        levels |= {lv for lv in cov.get("by_level", {}) if lv != "none"}
        for run in ev.get("runs", {}).values():
            levels |= set(run["metrics"][max(run["metrics"], key=int)]["levels"])
        out["rounds"].append(
            {
                "round": r,
                "coverage": cov,
                "sft_records": ex.get("sft_records"),
                "pairs": ex.get("pairs"),
                "coverage_by_steps": ex.get("coverage_by_steps") or {},
                "ppm_heldout_accuracy": tr.get("ppm", {}).get("heldout_accuracy"),
                "ppm_heldout_pairs": tr.get("ppm", {}).get("heldout_pairs"),
                "test": {
                    run: {"all": _acc(ev, run), **{lv: _acc(ev, run, lv) for lv in sorted(levels)}}
                    for run in (GREEDY, BON, MCTS)
                    if run in ev.get("runs", {})
                },
                "test_n": {
                    run: {"all": _count(ev, run), **{lv: _count(ev, run, lv) for lv in sorted(levels)}}
                    for run in (GREEDY, BON, MCTS)
                    if run in ev.get("runs", {})
                },
                "eval_samples": (ev.get("budgets") or [None])[-1],
                "seconds": {
                    k.split("/")[1]: v["seconds"] for k, v in stages.items() if k.startswith(f"round{r}/")
                },
            }
        )
    for name in ("eval_base", "eval_compare"):
        if name in stages:
            res = stages[name]["result"]
            out[name].update({lv: _acc(res, GREEDY, lv) for lv in sorted(levels)})
            out[name]["n"] = {"all": _count(res, GREEDY), **{lv: _count(res, GREEDY, lv) for lv in levels}}
    out["levels"] = sorted(levels, key=lambda x: (len(x), x))
    return out


def markdown(data: dict, total_s: float) -> str:
    levels = data["levels"]
    lines = ["# rstar evolve report", ""]
    lines += ["## Training-set coverage (share of problems with a correct trajectory, %)", ""]
    lines += ["| round | " + " | ".join(f"level {lv}" for lv in levels) + " | all | SFT records | pairs |"]
    lines += ["|" + " --- |" * (len(levels) + 4)]
    for r in data["rounds"]:
        cells = [_pct(level_coverage(r, lv)) for lv in levels]
        total = _pct(r["coverage"].get("coverage"))
        lines.append(
            f"| {r['round']} | " + " | ".join(cells) + f" | {total} | {r['sft_records']} | {r['pairs']} |"
        )
    lengths = sorted({n for r in data["rounds"] for n in r["coverage_by_steps"]}, key=int)
    if lengths:
        lines += ["", "## Coverage by the reference solution's length (code steps; covered / problems)", ""]
        lines += ["| round | " + " | ".join(f"{n} steps" for n in lengths) + " |"]
        lines += ["|" + " --- |" * (len(lengths) + 1)]
        for r in data["rounds"]:
            by = r["coverage_by_steps"]
            cells = [f"{by[n]['covered']}/{by[n]['problems']}" if n in by else "-" for n in lengths]
            lines.append(f"| {r['round']} | " + " | ".join(cells) + " |")
    lines += ["", "## Test accuracy (%)", ""]
    n = next((r["eval_samples"] for r in data["rounds"] if r["eval_samples"]), None)
    lines += [
        f"greedy: one greedy solution; best-of-N: the PPM's best of N={n} sampled solutions; MCTS+PPM: one "
        f"search of N={n} rollouts, majority vote over the top-K answers by PPM score.",
        "",
        "| policy | method | " + " | ".join(f"level {lv}" for lv in levels) + " | all |",
        "|" + " --- |" * (len(levels) + 3),
    ]
    for name, label in (("eval_compare", "larger model (seed only)"), ("eval_base", "base (seed only)")):
        if name in data:
            row, ns = data[name], data[name].get("n", {})
            lines.append(
                f"| {label} | greedy | "
                + " | ".join(_pct_n(row.get(lv), ns.get(lv)) for lv in levels)
                + f" | {_pct_n(row['all'], ns.get('all'))} |"
            )
    for r in data["rounds"]:
        for run, label in ((GREEDY, "greedy"), (BON, f"best-of-{n} + PPM"), (MCTS, "MCTS + PPM")):
            if run in r["test"]:
                row, ns = r["test"][run], r.get("test_n", {}).get(run, {})
                lines.append(
                    f"| round {r['round']} | {label} | "
                    + " | ".join(_pct_n(row.get(lv), ns.get(lv)) for lv in levels)
                    + f" | {_pct_n(row['all'], ns.get('all'))} |"
                )
    lines += ["", "## PPM held-out pairwise accuracy (%)", ""]
    lines += ["| round | accuracy | held-out pairs |", "| --- | --- | --- |"]
    for r in data["rounds"]:
        held = r["ppm_heldout_pairs"]
        lines.append(
            f"| {r['round']} | {_pct(r['ppm_heldout_accuracy'])} | {'-' if held is None else held} |"
        )
    lines += ["", "## Time per stage (s)", "", "| stage | seconds |", "| --- | --- |"]
    for k, v in data["times"].items():
        resumed = " (resumed: all attempts)" if k in data.get("resumed", ()) else ""
        lines.append(f"| {k}{resumed} | {v:.1f} |")
    lines += ["", f"Total wall time of this invocation: {total_s:.0f} s.", ""]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    """Coverage per level by round, and test accuracy per level by round for each method: every
    level on a fixed 0-100% axis, so that a level stuck at 0% reads as 0%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in data["rounds"]]
    levels = data["levels"]
    fig, axes = plt.subplots(
        1, 1 + max(len(levels), 1), figsize=(4 * (1 + max(len(levels), 1)), 3.6), squeeze=False
    )
    axes = axes[0]
    ax = axes[0]
    for j, lv in enumerate(levels):
        # A level no round searched (embedded-full's levels 1-2) has no coverage: no line,
        # rather than one drawn at 0% as if the search had failed there.
        pts = [(r["round"], level_coverage(r, lv)) for r in data["rounds"]]
        pts = [(x, 100 * y) for x, y in pts if y is not None]
        if pts:  # color by level, so a level keeps its color whichever levels are drawn
            ax.plot(*zip(*pts), marker="o", color=f"C{j}", label=f"level {lv}")
    ax.set(
        title="training-set coverage",
        xlabel="round",
        ylabel="% problems with a correct trajectory",
        xticks=rounds,
    )
    for i, lv in enumerate(levels, start=1):
        ax = axes[i]
        for run, label in ((GREEDY, "greedy"), (BON, "best-of-N + PPM"), (MCTS, "MCTS + PPM")):
            pts = [(r["round"], r["test"][run].get(lv)) for r in data["rounds"] if run in r["test"]]
            pts = [(x, 100 * y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        if "eval_base" in data and data["eval_base"].get(lv) is not None:
            ax.axhline(100 * data["eval_base"][lv], color="gray", ls="--", lw=1, label="base greedy")
        ax.set(title=f"test accuracy, level {lv}", xlabel="round", ylabel="%", xticks=rounds)
    for ax in axes:
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(run: Path, state: dict, total_s: float) -> dict:
    data = collect(state)
    md = markdown(data, total_s)
    if data["rounds"]:
        plot(data, run / "report.png")
        md += "\n![coverage and accuracy by round](report.png)\n"
        viewer = _write_viewer(run, data["rounds"][-1]["round"])
        if viewer:
            md += (
                f"\nSearch trees of the last round, to explore in a browser: [{viewer.name}]({viewer.name})\n"
            )
    (run / "report.md").write_text(md)
    (run / "report.json").write_text(json.dumps(data, indent=1))
    return {"markdown": md, **data}


def _write_viewer(run: Path, r: int, n: int = 12) -> Path | None:
    """A few of the last round's trees (all its passes), hardest levels first and solved
    before unsolved, as HTML."""
    from rstar.search.treefile import run_records

    recs = run_records(run / f"round{r}")
    if not recs:
        return None
    recs.sort(key=lambda rec: (-(int(rec["problem"].get("level") or 0)), not rec.get("correct")))
    try:
        from rstar.view import write_viewer

        return write_viewer(recs[:n], run / "trees.html", title=f"round {r} search trees")
    except Exception as e:  # the viewer needs npm on first use; the report stands without it
        print(f"[evolve] tree viewer not written: {e}")
        return None


# --- several runs: median and range -----------------------------------------------------------


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def _spread(xs: list[float | None]) -> str:
    """ "median (min-max)" in %, over the runs that have the figure."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return _pct(xs[0])
    return f"{_pct(_median(xs))} ({_pct(min(xs))}-{_pct(max(xs))})"


def combine(runs: list[Path]) -> str:
    """Markdown of several runs of one preset (e.g. three seeds): for every round and level,
    the median and range of training coverage and of each method's test accuracy, then each
    run's own figures. Reads RUN/report.json of each run."""
    datas = []
    for run in runs:
        path = Path(run) / "report.json"
        if not path.exists():
            raise FileNotFoundError(2, "no report.json (run `rstar evolve` there first)", str(path))
        datas.append(json.loads(path.read_text()))
    levels = sorted({lv for d in datas for lv in d["levels"]}, key=lambda x: (len(x), x))
    rounds = sorted({r["round"] for d in datas for r in d["rounds"]})

    def per_round(d: dict, r: int) -> dict | None:
        return next((x for x in d["rounds"] if x["round"] == r), None)

    lines = [f"# {len(runs)} runs: median (min-max), %", "", "Runs: " + ", ".join(str(r) for r in runs), ""]
    lines += [
        "## Training-set coverage",
        "",
        "| round | " + " | ".join(f"level {lv}" for lv in levels) + " |",
    ]
    lines += ["|" + " --- |" * (len(levels) + 1)]
    for r in rounds:
        rows = [per_round(d, r) for d in datas]
        cells = [_spread([level_coverage(x, lv) if x else None for x in rows]) for lv in levels]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    lines += ["", "## Test accuracy", "", "| policy | method | " + " | ".join(f"level {lv}" for lv in levels)]
    lines[-1] += " | all |"
    lines += ["|" + " --- |" * (len(levels) + 3)]
    if any("eval_base" in d for d in datas):
        cells = [_spread([d.get("eval_base", {}).get(lv) for d in datas]) for lv in [*levels, "all"]]
        lines.append("| base | greedy | " + " | ".join(cells) + " |")
    for r in rounds:
        rows = [per_round(d, r) for d in datas]
        for run, label in ((GREEDY, "greedy"), (BON, "best-of-N + PPM"), (MCTS, "MCTS + PPM")):
            vals = [x["test"].get(run) if x else None for x in rows]
            if not any(vals):
                continue
            cells = [_spread([v.get(lv) if v else None for v in vals]) for lv in [*levels, "all"]]
            lines.append(f"| round {r} | {label} | " + " | ".join(cells) + " |")
    lines += ["", "## PPM held-out pairwise accuracy (per run; held-out pairs)", ""]
    for r in rounds:
        rows = [per_round(d, r) for d in datas]
        cells = [
            f"{_pct(x.get('ppm_heldout_accuracy'))} ({x.get('ppm_heldout_pairs')})" if x else "-"
            for x in rows
        ]
        lines.append(f"- round {r}: " + ", ".join(cells))
    return "\n".join(lines) + "\n"


def add_arguments(parser) -> None:
    parser.description = (
        "Rewrite an `rstar evolve` run's report from its state, or, given several runs of one "
        "preset (e.g. three seeds), print their median and range per round and level."
    )
    parser.add_argument("runs", nargs="+", help="run directories (RUN/state.json, RUN/report.json)")
    parser.add_argument("--out", help="also write the combined markdown here")
    parser.set_defaults(func=_cli)


def _cli(args) -> int:
    runs = [Path(r) for r in args.runs]
    if len(runs) == 1:
        state_path = runs[0] / "state.json"
        if not state_path.exists():
            raise FileNotFoundError(2, "no state.json (not an `rstar evolve` run directory)", str(state_path))
        state = json.loads(state_path.read_text())
        total = sum(v.get("seconds", 0.0) for v in state.get("stages", {}).values())
        print(write_report(runs[0], state, total)["markdown"])
        return 0
    md = combine(runs)
    if args.out:
        Path(args.out).write_text(md)
    print(md)
    return 0
