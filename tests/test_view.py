"""`rstar view`: the page builder, and the page itself in a real headless Chromium.

The browser tests install what they need: Debian's chromium (apt-get, as root) when
/usr/bin/chromium is missing, and d3 from the npm registry on first use (rstar.view.ensure_js).
They drive Chromium with playwright-python (the `playwright` pip package; its own browser
download is not used). A screenshot is left in test-artifacts/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers import viewer_trees
from rstar import view
from rstar.cli import main as rstar_main
from rstar.search.expand import best_answer_node
from rstar.search.tree import Tree

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return viewer_trees.records(big=4000)


@pytest.fixture(scope="module")
def tree_file(records, tmp_path_factory) -> Path:
    return viewer_trees.write(tmp_path_factory.mktemp("view") / "trees.jsonl", records)


@pytest.fixture(scope="module")
def page_file(tree_file) -> Path:
    out = tree_file.parent / "view.html"
    assert rstar_main(["view", str(tree_file), "--out", str(out)]) == 0
    return out


# ---------- the page builder ----------


def test_script_json_cannot_leave_its_script_element():
    obj = {"t": "</script><script>x()</script> <!-- & \u2028\u2029 </SCRIPT >", "n": [1, 2.5, None]}
    s = view._script_json(obj)
    assert "<" not in s and ">" not in s and "\u2028" not in s and "\u2029" not in s
    assert json.loads(s) == obj


def test_page_embeds_every_search_once(records, page_file):
    html = page_file.read_text(encoding="utf-8")
    for i, rec in enumerate(records):
        m = re.search(rf'<script type="application/json" id="rec-{i}">(.*?)</script>', html, re.S)
        assert m, f"record {i} not embedded"
        data = json.loads(m.group(1))
        assert data["key"] == rec["key"]
        assert len(data["tree"]["nodes"]) == len(rec["tree"]["nodes"])
        # the texts come back unchanged, '</script>' included
        assert [n["text"] for n in data["tree"]["nodes"]] == [n["text"] for n in rec["tree"]["nodes"]]
    assert viewer_trees.NASTY.strip() in "".join(n["text"] for n in records[0]["tree"]["nodes"])
    # no script element was cut short by the data: every '</script' closes one that was opened
    assert html.lower().count("</script") == html.lower().count("<script")
    assert "d3js.org v7.9.0" in html  # the library is inlined, not linked
    assert not re.search(r"<script[^>]+src=|<link[^>]+stylesheet", html)


def test_chosen_path_is_the_path_to_best_answer_node(records):
    for rec in records:
        tree = Tree.from_dict(rec["tree"])
        best = best_answer_node(tree)
        chosen = view.chosen_path(rec["tree"])
        if best is None:
            assert chosen == []
        else:
            assert chosen == [0] + [n.id for n in tree.path(best)]
            assert tree.nodes[chosen[-1]].answer == rec["answer"]


def test_cli_problem_selection_and_errors(tree_file, records, tmp_path, capsys):
    out = tmp_path / "v.html"
    key = records[2]["key"]
    assert rstar_main(["view", str(tree_file), "--out", str(out), "--problem", key]) == 0
    index = json.loads(
        re.search(r'<script type="application/json" id="index">(.*?)</script>', out.read_text(), re.S)[1]
    )
    assert index["selected"] == 2
    assert [r["key"] for r in index["records"]] == [r["key"] for r in records]
    assert [r["correct"] for r in index["records"]] == [r["correct"] for r in records]
    assert rstar_main(["view", str(tree_file), "--out", str(out), "--problem", "1"]) == 0
    assert rstar_main(["view", str(tree_file), "--out", str(out), "--problem", "99"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert rstar_main(["view", str(tree_file), "--out", str(out), "--problem", "nope"]) == 2
    assert rstar_main(["view", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2


def test_write_viewer_max_problems(records, tmp_path):
    out = view.write_viewer(records, tmp_path / "sub" / "v.html", max_problems=2)
    html = out.read_text(encoding="utf-8")
    assert 'id="rec-1"' in html and 'id="rec-2"' not in html


def test_ensure_js_without_npm_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("RSTAR_D3_JS", raising=False)
    monkeypatch.setattr(view, "VIEWER_DIR", tmp_path / "viewer")
    monkeypatch.setattr(view, "CACHE_DIR", tmp_path / "cache")
    (tmp_path / "viewer").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    with pytest.raises(view.ViewerError, match="npm"):
        view.ensure_js()


# ---------- the page in Chromium ----------


@pytest.fixture(scope="session")
def chromium() -> str:
    if not Path(CHROMIUM).exists():
        if shutil.which("apt-get") is None:
            pytest.skip("Chromium is not installed and apt-get is unavailable to install it")
        if os.geteuid() != 0:
            pytest.skip("Chromium is not installed and installing it with apt-get needs root")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=1200)
    assert Path(CHROMIUM).exists()
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="needs playwright-python (pip install playwright; in the dev extra)"
    )
    with tempfile.TemporaryDirectory() as profile, sync_api.sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(
            profile,
            executable_path=chromium,
            headless=True,
            args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 900},
        )
        try:
            yield ctx
        finally:
            ctx.close()


@pytest.fixture
def page(browser, page_file):
    page = browser.new_page()
    page.problems = []  # console errors and page errors
    page.requests = []
    page.on(
        "console", lambda m: m.type in ("error", "warning") and page.problems.append(f"{m.type}: {m.text}")
    )
    page.on("pageerror", lambda e: page.problems.append(f"pageerror: {e}"))
    page.on("request", lambda r: page.requests.append(r.url))
    t0 = time.perf_counter()
    page.goto(page_file.as_uri())
    page.wait_for_selector("body[data-ready='1']", timeout=30_000)
    page.load_seconds = time.perf_counter() - t0
    yield page
    page.close()


def _click_node(page, node_id: int, zoom: float = 2.0) -> None:
    """Centre node `node_id` and click where it is drawn, with the mouse (real hit testing)."""
    pos = page.evaluate(
        "([id, k]) => { rstarViewer.focusNode(id, k); return rstarViewer.nodeClientPos(id); }",
        [node_id, zoom],
    )
    page.mouse.click(pos["x"], pos["y"])
    page.wait_for_function("id => rstarViewer.selected === id", arg=node_id)


def test_page_loads_and_shows_the_tree(page, records):
    big = records[0]
    n = len(big["tree"]["nodes"])
    timing = page.evaluate("rstarViewer.timing")
    print(
        f"\n{n}-node tree: page load + first render {page.load_seconds:.2f} s "
        f"(parse {timing['parse_ms']:.0f} ms, layout {timing['layout_ms']:.0f} ms, draw {timing['draw_ms']:.0f} ms)"
    )
    assert page.problems == []
    assert all(u.startswith(("file:", "data:")) for u in page.requests), page.requests
    assert page.evaluate("window.__pwned") is None  # the '</script>' in a step stayed text
    assert page.text_content("#rec-key") == big["key"]
    assert page.text_content("#node-count") == str(n)
    assert page.evaluate("rstarViewer.shown") == n  # every node was laid out
    assert page.text_content("#gold") == big["problem"]["answer"]
    assert page.text_content("#answer") == big["answer"]
    # the list: every search, with solved or not
    rows = page.query_selector_all("#records li")
    assert len(rows) == len(records)
    marks = {True: "✓", False: "✗", None: "?"}
    for row, rec in zip(rows, records):
        assert row.query_selector(".k").text_content() == rec["key"]
        assert row.query_selector("span").text_content() == marks[rec["correct"]]
    # stays usable: a redraw of the whole tree (pan/zoom) is well under a frame budget of ~100 ms
    draws = []
    for k in (0.5, 1.0, 2.0, 0.3):
        draws.append(
            page.evaluate("k => { rstarViewer.focusNode(0, k); return rstarViewer.timing.draw_ms; }", k)
        )
    for _ in range(3):  # the whole tree on screen
        draws.append(page.evaluate("() => { rstarViewer.fit(); return rstarViewer.timing.draw_ms; }"))
    print(f"redraws (zoomed in, then whole tree): {', '.join(f'{d:.0f}' for d in draws)} ms")
    assert max(draws) < 500
    assert page.load_seconds < 20


def test_clicking_a_node_shows_code_output_and_numbers(page, records):
    big = records[0]
    nodes = big["tree"]["nodes"]
    chosen = view.chosen_path(big["tree"])
    # the program step that printed the chosen answer
    code_end = nodes[chosen[-2]]
    assert code_end["kind"] == "code_end"
    _click_node(page, code_end["id"])
    assert page.text_content("#node-title").startswith(f"#{code_end['id']} ")
    code = page.text_content("#node-code")
    assert "print(" in code and "<end_of_code>" not in code
    assert page.text_content("#node-output") == code_end["observation"]
    fields = {
        row.query_selector("td").text_content(): row.query_selector_all("td")[1].text_content()
        for row in page.query_selector_all("#node-fields tr")
    }
    assert fields["N (visits)"] == str(code_end["N"])
    q = code_end["q"] / code_end["N"] if code_end["N"] else code_end["q"]
    assert float(fields["Q = q / N"]) == pytest.approx(q, abs=1e-4)
    assert float(fields["value (PPM)"]) == pytest.approx(code_end["value"], abs=1e-4)
    # the chosen answer itself
    _click_node(page, chosen[-1])
    assert page.text_content("#node-terminal") == "answer, correct"
    assert "\\boxed{" + big["answer"] + "}" in page.text_content("#node-code")
    # a failed step: its code and the executor's error
    err = next(n for n in nodes if n.get("terminal") == "code_error")
    _click_node(page, err["id"])
    assert page.text_content("#node-terminal") == "code error"
    assert "total / count" in page.text_content("#node-code")
    assert page.text_content("#node-output") == err["observation"]
    # a step holding '</script>' shows it verbatim
    nasty = next(n for n in nodes if viewer_trees.NASTY.strip() in n["text"])
    _click_node(page, nasty["id"])
    assert viewer_trees.NASTY.strip() in page.text_content("#node-code")
    assert page.problems == []
    # the screenshot: the whole tree, chosen trajectory highlighted, chosen answer selected
    page.keyboard.press("c")
    page.evaluate("rstarViewer.fit()")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "viewer.png"))
    _click_node(page, code_end["id"], zoom=3.0)
    page.screenshot(path=str(ARTIFACTS / "viewer-node.png"))


def test_switching_problems(page, records):
    for i in (3, 1):
        page.click(f"#records li[data-index='{i}']")
        rec = records[i]
        assert page.text_content("#rec-key") == rec["key"]
        assert page.text_content("#node-count") == str(len(rec["tree"]["nodes"]))
        assert page.evaluate("rstarViewer.shown") == len(rec["tree"]["nodes"])
        assert page.text_content("#node-body") == ""  # selection cleared
    # a small tree in the tidy layout: click its first step
    first = records[1]["tree"]["nodes"][1]
    _click_node(page, first["id"], zoom=1.5)
    assert "# Step 1:" in page.text_content("#node-code")
    page.evaluate("rstarViewer.fit()")
    page.screenshot(path=str(ARTIFACTS / "viewer-small.png"))
    # the list filter
    page.select_option("#solved-filter", "unsolved")
    shown = [li.get_attribute("data-index") for li in page.query_selector_all("#records li")]
    assert shown == [str(i) for i, r in enumerate(records) if r["correct"] is not True]
    # hiding unvisited nodes keeps the chosen path
    page.evaluate("rstarViewer.showRecord(0)")
    page.check("#hide-unvisited")
    chosen = view.chosen_path(records[0]["tree"])
    visible = page.evaluate("ids => ids.map(i => rstarViewer.visible[i])", chosen)
    assert all(visible)
    expected = sum(1 for n in records[0]["tree"]["nodes"] if n["N"] > 0 or n["id"] in chosen)
    assert page.evaluate("rstarViewer.shown") == expected
    assert page.problems == []


def test_address_selects_search_and_node(browser, page_file, records):
    page = browser.new_page()
    key = records[2]["key"]
    page.goto(page_file.as_uri() + f"#key={key}&node=3")
    page.wait_for_selector("body[data-ready='1']")
    assert page.text_content("#rec-key") == key
    assert page.text_content("#node-title").startswith("#3 ")
    page.close()
