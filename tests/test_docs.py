"""The documentation runs as written: every shell block of README.md and docs/*.md that needs
no GPU, no network and no model hub, and every Python snippet.

How the blocks run (the stand-ins README.md names):
- the documents in order (README.md first, then docs/*.md by name), each block in turn, in one
  fresh working directory that holds `.venv` (a link to this checkout's) and nothing else, so
  a later block sees what an earlier one wrote (the tour's `runs/r2` for docs/VIEWER.md);
- `sh`/`bash` blocks with `bash -e -o pipefail`, `python` blocks with the checkout's Python;
  fenced blocks without a language (diagrams, sample output) are not run;
- a block right after `<!-- docs-test: skip (WHY) -->` is not run (a GPU, the hub, a cluster,
  a server that runs until stopped, the whole demo or suite);
- with `HF_HUB_OFFLINE=1` (no hub), and `rstar model tiny --pretrain --preset quick --out tiny`
  finds `tiny` already pre-trained with those settings by the session's fixture (conftest.py's
  `pretrained_tiny`: the base policy of test_evolve's quick run, which pre-trains with the same
  recipe in the background while the rest of the suite runs; or once per machine with
  `RSTAR_DOCS_CACHE=DIR`), so the tour's one slow command runs in seconds (the test checks
  that it kept `tiny`); everything else runs for real.
A block that fails fails the test with its document, line, command output and exit status.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"^<!--\s*docs-test:\s*skip\b\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```\s*([\w+-]*)\s*$")
RUN_LANGS = {"sh": "sh", "bash": "sh", "shell": "sh", "python": "python", "py": "python"}
BLOCK_TIMEOUT_S = 900


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str  # "sh", "python" or "" (not run)
    code: str
    skip: str | None  # the reason, for a block marked to skip

    @property
    def where(self) -> str:
        doc = self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc.name
        return f"{doc}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with their language and skip marker."""
    out: list[Block] = []
    lines = doc.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(prev.strip())
        out.append(
            Block(
                doc=doc,
                line=start + 1,
                lang=RUN_LANGS.get(lang, ""),
                code="\n".join(lines[start + 1 : j]) + "\n",
                skip=(skip.group(1) or "marked") if skip else None,
            )
        )
        i = j + 1
    return out


def doc_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(VENV)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env[var] = "1"
    env.pop("PYTHONPATH", None)
    return env


def run_block(block: Block, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    if block.lang == "sh":
        cmd = ["bash", "-e", "-o", "pipefail", "-c", block.code]
    else:
        cmd = [str(VENV / "bin" / "python"), "-c", block.code]
    return subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )


def run_docs(docs: list[Path], cwd: Path, env: dict[str, str]) -> tuple[list[str], list[str]]:
    """Run every runnable block of `docs` in order in `cwd`; (blocks run, failures)."""
    ran, failures = [], []
    for doc in docs:
        for b in blocks(doc):
            if not b.lang or b.skip:
                continue
            t0 = time.perf_counter()
            res = run_block(b, cwd, env)
            ran.append(b.where)
            # where the docs test's time goes (pytest shows it with -s, or for a failing test)
            print(f"{b.where}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            if res.returncode != 0:
                failures.append(
                    f"{b.where} ({b.lang} block) exited {res.returncode}\n--- block\n{b.code}"
                    f"--- stdout (end)\n{res.stdout[-3000:]}\n--- stderr (end)\n{res.stderr[-3000:]}"
                )
                return ran, failures  # later blocks of the tour build on this one
    return ran, failures


PRETRAIN_TIMEOUT_S = 1800


def start_pretraining(out: Path) -> subprocess.Popen:
    """`rstar model tiny --pretrain --preset quick --out OUT` (the tour's command), started in
    the background; its log goes to OUT.log. Called by conftest.py once the tests that need it
    are collected, when the quick evolve run (whose base is the same policy) is not part of the
    session (fixture `pretrained_tiny`); an OUT already pre-trained is kept as it is."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            [
                str(VENV / "bin" / "rstar"),
                "model",
                "tiny",
                "--pretrain",
                "--preset",
                "quick",
                "--out",
                str(out),
            ],
            env=doc_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def finish_pretraining(proc: subprocess.Popen, out: Path) -> None:
    """Wait for `start_pretraining`'s process; its log's end if it failed."""
    try:
        code = proc.wait(timeout=PRETRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, (
        f"rstar model tiny --pretrain exited {code}:\n" + out.with_suffix(".log").read_text()[-3000:]
    )


def test_every_fenced_block_is_run_or_marked():
    """A shell or Python block is run unless marked; an unknown language is a mistake to fix."""
    for doc in DOCS:
        for b in blocks(doc):
            lang = FENCE.match(b.doc.read_text().splitlines()[b.line - 1]).group(1).lower()
            assert lang in ("", *RUN_LANGS), f"{b.where}: fence language {lang!r}: use sh, python or none"
            if b.skip is not None:
                assert b.lang, f"{b.where}: a skip marker before a block that is never run"
                assert b.skip != "marked" and b.skip.startswith("("), f"{b.where}: say why: skip (REASON)"


def test_a_failing_command_fails_the_run(tmp_path):
    doc = tmp_path / "broken.md"
    doc.write_text(
        "```sh\nrstar grade 1 1\n```\n\n<!-- docs-test: skip (not run) -->\n```sh\nfalse\n```\n\n"
        "```sh\nrstar no-such-command\n```\n\n```python\nprint(undefined_name)\n```\n"
    )
    ran, failures = run_docs([doc], tmp_path, doc_env())
    assert len(ran) == 2 and len(failures) == 1  # the skipped block is not run; the run stops at a failure
    assert "broken.md:10 (sh block) exited 2" in failures[0] and "unknown command" in failures[0]
    doc.write_text("```python\nprint(undefined_name)\n```\n")
    _, failures = run_docs([doc], tmp_path, doc_env())
    assert failures and "NameError" in failures[0]


@pytest.mark.slow
@pytest.mark.timeout(2400)  # with the fixture: pre-training (~3 min on 2 idle cores) and the tour
def test_docs_run_as_written(tmp_path, pretrained_tiny):
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    shutil.copytree(pretrained_tiny, work / "tiny")
    weights = (work / "tiny" / "model.safetensors").read_bytes()
    ran, failures = run_docs(DOCS, work, doc_env())
    assert not failures, "\n\n".join(failures)
    # the tour's pre-training command recognised the fixture's policy as its own recipe
    assert (work / "tiny" / "model.safetensors").read_bytes() == weights, "the tour pre-trained `tiny` again"
    # the tour ran end to end: a trained policy and PPM, an evaluation, a viewer page
    assert any(w.startswith("README.md") for w in ran), ran
    for path in ("policy_r2/rstar_training.json", "ppm_r2/rstar_training.json", "runs/eval/summary.json"):
        assert (work / path).is_file(), path
    print(f"ran {len(ran)} blocks: {', '.join(ran)}", file=sys.stderr)
