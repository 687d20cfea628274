"""`rstar view`: one self-contained HTML page that shows the search trees of a tree file.

The page (template: viewer/viewer.html) draws one search tree at a time on a canvas: nodes
sized by visits, coloured by Q or by the reward model's value, terminals marked by kind and
grade, the chosen trajectory (path to `best_answer_node`) highlighted; clicking a node shows
its step, code, output and numbers; a list switches between the file's searches.

Everything the page needs is inside it: the records are embedded as JSON (one script element
per search, parsed only when shown) and the JavaScript library it uses, d3 (layout, zoom,
colour scales, hit testing), is the registry's own build from the npm registry, installed
into viewer/node_modules on first use by `ensure_js` and inlined. See docs/VIEWER.md.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rstar import RstarError

VIEWER_DIR = Path(__file__).resolve().parent / "viewer"
TEMPLATE = VIEWER_DIR / "viewer.html"
D3_REL = Path("node_modules") / "d3" / "dist" / "d3.min.js"
# Used instead of viewer/node_modules when the package directory is not writable
# (a non-editable install into a system site-packages).
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rstar" / "viewer"

# Node fields the page uses; `children` is rebuilt from `parent` (ids are in generation order).
NODE_FIELDS = (
    "id",
    "parent",
    "depth",
    "text",
    "kind",
    "N",
    "q",
    "value",
    "terminal",
    "answer",
    "correct",
    "exec_ok",
    "observation",
    "error_streak",
    "expanded",
    "stop_reason",
    "n_tokens",
)
RECORD_FIELDS = ("key", "problem", "search_index", "seed", "mode", "answer", "correct", "stats")


class ViewerError(RstarError):
    pass


def ensure_js(quiet: bool = False) -> Path:
    """The path of d3.min.js, installed from the npm registry (version pinned in
    viewer/package.json) on first use. `RSTAR_D3_JS` names a file to use instead."""
    env = os.environ.get("RSTAR_D3_JS")
    if env:
        if not Path(env).is_file():
            raise ViewerError(f"RSTAR_D3_JS={env}: no such file")
        return Path(env)
    for base in (VIEWER_DIR, CACHE_DIR):
        if (base / D3_REL).is_file():
            return base / D3_REL
    target = VIEWER_DIR if os.access(VIEWER_DIR, os.W_OK) else CACHE_DIR
    npm = shutil.which("npm")
    if npm is None:
        raise ViewerError(
            "rstar view needs d3 from the npm registry and npm is not installed: install Node.js "
            "and npm (Debian: apt-get install -y npm), or set RSTAR_D3_JS to a d3.min.js (d3 7.9.0)"
        )
    target.mkdir(parents=True, exist_ok=True)
    if target != VIEWER_DIR:
        shutil.copy(VIEWER_DIR / "package.json", target / "package.json")
    # One installer at a time (tests and reports may call this concurrently); the lock file
    # lives in node_modules/, which is git-ignored.
    (target / "node_modules").mkdir(exist_ok=True)
    with open(target / "node_modules" / ".rstar-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / D3_REL).is_file():
            if not quiet:
                print(f"rstar view: installing d3 from the npm registry into {target}", file=sys.stderr)
            cmd = [npm, "install", "--prefix", str(target), "--no-audit", "--no-fund"]
            cmd += ["--no-package-lock", "--loglevel=error"]
            proc = subprocess.run(cmd, cwd=target, capture_output=True, text=True)
            if proc.returncode != 0 or not (target / D3_REL).is_file():
                raise ViewerError(
                    f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
                )
    return target / D3_REL


def _script_json(obj) -> str:
    """JSON safe inside a <script> element: no '<' (so no '</script>' or '<!--'), and no
    U+2028/U+2029, escaped as JSON string escapes that JSON.parse reads back unchanged."""
    s = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for ch, esc in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        s = s.replace(ch, esc)
    return s


def _finite(x):
    """NaN/inf are not JSON: the page shows them as missing."""
    if isinstance(x, float) and (x != x or x in (float("inf"), float("-inf"))):
        return None
    return x


def chosen_path(tree: dict, by_value: bool | None = None) -> list[int]:
    """Ids from the root down to the answer the search settles on (`best_answer_node`)."""
    from rstar.search.expand import best_answer_node
    from rstar.search.tree import Tree

    t = Tree.from_dict(tree)
    node = best_answer_node(t, by_value)
    if node is None:
        return []
    return [0] + [n.id for n in t.path(node)]


def check_record(rec: dict, where: str) -> None:
    """The checks `rstar extract` makes (fields, node ids, child links), and that each node's
    parent comes before it (ids are in generation order), so the links form one tree."""
    from rstar.data.extract import parse_search

    origin = f"{where} (record {rec.get('key')!r})" if isinstance(rec, dict) else where
    try:
        search = parse_search(origin, rec)
    except RstarError as e:
        raise ViewerError(str(e)) from None
    for node in search.tree.nodes[1:]:
        if not isinstance(node.parent, int) or not 0 <= node.parent < node.id:
            raise ViewerError(
                f"{origin}: tree.nodes[{node.id}]: parent {node.parent!r} is not an earlier node"
            )
        if node.id not in search.tree.nodes[node.parent].children:
            raise ViewerError(f"{origin}: tree.nodes[{node.id}] is missing from its parent's children")


def _page_record(rec: dict, where: str) -> dict:
    check_record(rec, where)
    tree = rec.get("tree")
    if not isinstance(tree, dict) or not isinstance(tree.get("nodes"), list) or not tree["nodes"]:
        raise ViewerError(f"{where}: record {rec.get('key')!r} has no tree with nodes")
    nodes = []
    for i, n in enumerate(tree["nodes"]):
        if n.get("id") != i:
            raise ViewerError(f"{where}: record {rec.get('key')!r}: node {i} has id {n.get('id')!r}")
        nodes.append({f: _finite(n[f]) for f in NODE_FIELDS if f in n and n[f] is not None})
    try:
        from rstar.search.treefile import record_by_value

        chosen = chosen_path(tree, record_by_value(rec))
    except (TypeError, KeyError) as e:  # a tree that does not load as rstar's Tree
        raise ViewerError(f"{where}: record {rec.get('key')!r}: bad tree ({e})") from e
    out = {f: rec.get(f) for f in RECORD_FIELDS}
    out["tree"] = {"question": tree.get("question", ""), "prompt": tree.get("prompt", ""), "nodes": nodes}
    out["chosen"] = chosen
    return out


def _index_entry(i: int, rec: dict) -> dict:
    problem = rec.get("problem") or {}
    return {
        "i": i,
        "key": rec.get("key"),
        "pid": problem.get("id"),
        "question": (problem.get("question") or rec["tree"].get("question") or "")[:200],
        "gold": problem.get("answer"),
        "answer": rec.get("answer"),
        "correct": rec.get("correct"),
        "mode": rec.get("mode"),
        "nodes": len(rec["tree"]["nodes"]),
    }


def render_html(records: list[dict], selected: int = 0, title: str = "rstar search trees") -> str:
    """The page's HTML for `records` (tree-file records), showing records[selected] first."""
    if not records:
        raise ViewerError("no records to show")
    if not 0 <= selected < len(records):
        raise ViewerError(f"problem index {selected} out of range (the file has {len(records)} records)")
    page = [_page_record(r, f"record {i}") for i, r in enumerate(records)]
    index = {
        "title": title,
        "selected": selected,
        "records": [_index_entry(i, r) for i, r in enumerate(page)],
    }
    d3 = ensure_js().read_text(encoding="utf-8")
    if "</script" in d3.lower():
        raise ViewerError("the d3 build contains '</script' and cannot be inlined")  # never so in 7.9.0
    data = "\n".join(
        f'<script type="application/json" id="rec-{i}">{_script_json(r)}</script>' for i, r in enumerate(page)
    )
    html = TEMPLATE.read_text(encoding="utf-8")
    # Each marker is replaced once, in this order, so a marker-like string inside the data
    # or d3 cannot be replaced again.
    head, rest = html.split("/*__D3_JS__*/", 1)
    mid, tail = rest.split("<!--__RECORDS__-->", 1)
    mid = mid.replace("/*__INDEX_JSON__*/", _script_json(index), 1)
    head = head.replace("__TITLE__", _escape_html(title), 1)
    return head + d3 + mid + data + tail


def _escape_html(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_viewer(
    records: list[dict],
    out_path: str | Path,
    max_problems: int | None = None,
    selected: int = 0,
    title: str | None = None,
) -> Path:
    """Write the viewer page for tree-file `records` (docs/TREE_FILES.md) to `out_path`.

    `max_problems` keeps only the first records (a page embeds every tree it lists; a
    large evaluation file can make a page of hundreds of MB). Returns the path written."""
    if max_problems is not None:
        records = records[:max_problems]
    out_path = Path(out_path)
    html = render_html(
        records, selected=min(selected, max(len(records) - 1, 0)), title=title or out_path.stem
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out_path)
    return out_path


def _select(records: list[dict], problem: str | None) -> int:
    """--problem: a position in the file (0-based), else a record key, else a problem id."""
    if problem is None:
        return 0
    if problem.lstrip("-").isdigit():
        i = int(problem)
        if not -len(records) <= i < len(records):
            raise ViewerError(f"--problem {i}: out of range (the file has {len(records)} records)")
        return i % len(records)
    for i, r in enumerate(records):
        if r.get("key") == problem:
            return i
    for i, r in enumerate(records):
        if str((r.get("problem") or {}).get("id")) == problem:
            return i
    raise ViewerError(f"--problem {problem!r}: no record with that index, key or problem id")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "trees", help="tree file (trees.jsonl, docs/TREE_FILES.md), or a run directory holding one"
    )
    parser.add_argument("--out", required=True, help="HTML file to write")
    parser.add_argument(
        "--problem",
        help="search shown first: position in the file (0-based), record key or problem id (default 0)",
    )
    parser.add_argument("--max-problems", type=int, help="only the first N records of the file")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from rstar.search.treefile import numbered_records

    path = Path(args.trees)
    if path.is_dir():  # a run directory, as `rstar extract` takes it
        if not (path / "trees.jsonl").is_file():
            raise ViewerError(f"{path}: a directory without a trees.jsonl")
        path = path / "trees.jsonl"
    if not path.is_file():
        raise ViewerError(f"{path}: no such file")
    numbered = list(numbered_records(path))
    if args.max_problems is not None:
        numbered = numbered[: args.max_problems]
    for origin, rec in numbered:
        check_record(rec, origin)
    records = [rec for _, rec in numbered]
    if not records:
        raise ViewerError(f"{path}: no records")
    selected = _select(records, args.problem)
    out = write_viewer(records, args.out, selected=selected, title=path.name)
    nodes = sum(len(r["tree"]["nodes"]) for r in records)
    print(f"wrote {out} ({len(records)} searches, {nodes} nodes, {out.stat().st_size / 1e6:.1f} MB)")
    return 0
