"""The step format against the authors' released examples (tests/fixtures/rstar_format)."""

from __future__ import annotations

import json

import pytest

from conftest import RSTAR_FORMAT
from rstar.steps import (
    END_OF_STEP,
    build_prompt,
    extract_boxed,
    final_answer,
    parse_step,
    ppm_prompt,
    program,
    sft_prompt,
    split_steps,
    wrap_output,
)

DATA = RSTAR_FORMAT
SFT = json.loads((DATA / "sft_data_examples.json").read_text())
PAIRS = json.loads((DATA / "ppm_pair_examples.json").read_text())
TEXTS = [r["response"] for r in SFT] + [r[k] for r in PAIRS for k in ("pos", "neg")]


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_every_released_response_splits_and_joins_byte_identical(text):
    steps = split_steps(text)
    assert "".join(steps) == text
    assert len(steps) >= 1
    for s in steps[:-1]:  # every step but an unfinished last one ends with a tag
        assert s.rstrip().endswith(("<end_of_step>", "<end_of_output>", "<end_of_answer>", "<end_of_code>"))


def test_sft_responses_have_the_full_step_structure():
    for rec in SFT:
        kinds = [parse_step(s).kind for s in split_steps(rec["response"])]
        assert kinds[-2:] == ["code_end", "answer"] and set(kinds[:-2]) <= {"code"}
        assert final_answer(split_steps(rec["response"])) is not None


def test_known_final_answers_and_programs():
    first = SFT[0]["response"]
    assert final_answer(split_steps(first)) == "4"
    prog = program(split_steps(first))
    assert "def G(m, n, p, q):" in prog and "print(4)" in prog
    assert "<end_of_step>" not in prog and "<output>" not in prog and "<code>" not in prog
    assert final_answer(split_steps(SFT[1]["response"])) == r"[0, \arcsin(\frac{\sqrt{2}}{3})]"


def test_pair_prompts_and_headers_match_the_authors_format():
    whole = [r for r in PAIRS if r["pos"].startswith("\n<|assistant|>")]
    assert whole, "the examples hold whole-trajectory pairs"
    for r in whole:
        q = r["prompt"][len("<|user|>:\n") :]
        assert ppm_prompt(q) + r["pos"][: len("\n<|assistant|>: Let's think")] in sft_prompt(q) + "<code>"
    # a step pair: the prompt is question + earlier steps, pos/neg are one step each
    step_pairs = [r for r in PAIRS if not r["pos"].startswith("\n<|assistant|>")]
    for r in step_pairs:
        assert len(split_steps(r["pos"])) == 1 and r["prompt"].endswith(END_OF_STEP)


def test_code_of_pair_with_indentation_error_is_kept_verbatim():
    neg = PAIRS[0]["neg"]
    prog = program(split_steps(neg))
    assert "\n XM = h\n" in prog  # the bad indent that produced the recorded IndentationError


def test_sft_prompt_and_fewshot():
    assert (
        sft_prompt("Q?")
        == "<|user|>:\nQ?\n<|assistant|>: Let's think step by step and solve the problem with code."
    )
    few = build_prompt("Q?", "fewshot")
    assert few.endswith(sft_prompt("Q?")) and "<end_of_code>" in few
    with pytest.raises(ValueError):
        build_prompt("Q?", "chat")


@pytest.mark.parametrize(
    "text,expected",
    [
        (r"so \boxed{5}.", "5"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{a{b{c}}d}", "a{b{c}}d"),
        (r"\boxed 7", "7"),
        (r"\fbox{x}", "x"),
        (r"\boxed{unclosed", None),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


def test_parse_kinds_and_output_wrapping():
    assert parse_step("# s\nx = 1\n<end_of_step>").kind == "code"
    end = parse_step("\n\nprint(x)\n<end_of_code>")
    assert end.kind == "code_end" and end.code.strip() == "print(x)"
    assert parse_step("\n<answer>\\boxed{2}<end_of_answer>").kind == "answer"
    assert parse_step("x = (1 +").kind == "partial"
    assert wrap_output("16\n") == "\n<output>16<end_of_output>"
    joined = (
        "<code>\nx=1\n<end_of_step>"
        + "\nprint(x)\n<end_of_code>"
        + wrap_output("1")
        + "\n<answer>\\boxed{1}<end_of_answer>"
    )
    assert [parse_step(s).kind for s in split_steps(joined)] == ["code", "code_end", "answer"]
