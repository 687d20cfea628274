"""The code-augmented chain-of-thought step format of rStar-Math (paper section 1).

A solution is a sequence of steps. Each step is Python comments (the reasoning) plus the
code that does the step, ended by `<end_of_step>`; the last code step ends with
`<end_of_code>`, after which the executor's output of the whole program is appended as
`<output>...<end_of_output>`; an answer step `<answer>...\\boxed{..}<end_of_answer>` ends the
solution. One generated chunk (generation stops at one of STOP_STRINGS) is one step and one
tree node.

The tags and the prompt match the authors' models and released data byte for byte
(examples in tests/fixtures/rstar_format/): `split_steps(text)` partitions any response into steps and
`"".join(split_steps(text)) == text`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

END_OF_STEP = "<end_of_step>"
END_OF_CODE = "<end_of_code>"
END_OF_ANSWER = "<end_of_answer>"
CODE_OPEN = "<code>"
OUTPUT_OPEN = "<output>"
END_OF_OUTPUT = "<end_of_output>"
ANSWER_OPEN = "<answer>"
STEP_TAGS = [CODE_OPEN, END_OF_STEP, END_OF_CODE, OUTPUT_OPEN, END_OF_OUTPUT, ANSWER_OPEN, END_OF_ANSWER]

# Generation stops at these; round 1 (a bootstrap model prompted few-shot) also stops at
# END_OF_OUTPUT so that it cannot invent the executor's output.
STOP_STRINGS = [END_OF_STEP, END_OF_CODE, END_OF_ANSWER]
ROUND1_STOP_STRINGS = [*STOP_STRINGS, END_OF_OUTPUT]

USER_TAG = "<|user|>:\n"
ASSISTANT_HEADER = "<|assistant|>: Let's think step by step and solve the problem with code."

FEWSHOT_INSTRUCTIONS = """You are a powerful agent with broad math knowledge and great Python programming skills.
Solve the math problem step by step. Write each step as Python comments that explain the
reasoning, followed by the code that performs it, and end each step with <end_of_step>.
Every step's code runs together with the code of the previous steps. In the last step,
print the final answer and end with <end_of_code>; the program's output is then shown to
you as <output>...<end_of_output>. Finally write <answer>, a short conclusion with the final
answer in \\boxed{}, and <end_of_answer>.
"""

FEWSHOT_EXAMPLE = (
    "<|user|>:\nA farmer has 3 fields with 12 rows of 15 plants each. How many plants are there?\n"
    f"{ASSISTANT_HEADER}<code>\n# Step 1: Count the plants in one field\n"
    f"per_field = 12 * 15\n{END_OF_STEP}\n\n# Step 2: Multiply by the number of fields\n"
    f"total = 3 * per_field\n{END_OF_STEP}\n\n# Now print the final answer\nprint(total)\n"
    f"{END_OF_CODE}\n{OUTPUT_OPEN}540{END_OF_OUTPUT}\n"
    f"{ANSWER_OPEN}The fields hold \\boxed{{540}} plants.{END_OF_ANSWER}\n\n"
)


def sft_prompt(question: str) -> str:
    """The prompt the authors' SFT policies were trained with; the response starts with `<code>`.

    Their training data is `query`/`response`; the training text is
    `sft_prompt(query) + response`. (The authors' inference prompt differs from it by a
    newline; we use this one at training and at inference.)
    """
    return f"{USER_TAG}{question}\n{ASSISTANT_HEADER}"


def fewshot_prompt(question: str) -> str:
    """Round-1 prompt for a model that was not trained on the format: instructions + one example."""
    return FEWSHOT_INSTRUCTIONS + "\n" + FEWSHOT_EXAMPLE + sft_prompt(question)


def ppm_prompt(question: str) -> str:
    """The `prompt` field of the authors' PPM pairs: the question without the assistant header
    (their `pos`/`neg` begin with "\\n" + ASSISTANT_HEADER)."""
    return f"{USER_TAG}{question}"


def build_prompt(question: str, style: str = "sft") -> str:
    if style == "sft":
        return sft_prompt(question)
    if style == "fewshot":
        return fewshot_prompt(question)
    raise ValueError(f"unknown prompt style {style!r} (expected 'sft' or 'fewshot')")


# --- steps -------------------------------------------------------------------------------

# A step ends at one of these. An `<end_of_code>` step owns the `<output>...<end_of_output>`
# block that the executor appends after it, so the whole block is one step.
_STEP_END = re.compile(
    re.escape(END_OF_STEP)
    + "|"
    + re.escape(END_OF_CODE)
    + r"(?:\s*"
    + re.escape(OUTPUT_OPEN)
    + r".*?"
    + re.escape(END_OF_OUTPUT)
    + ")?"
    + "|"
    + re.escape(END_OF_ANSWER),
    re.DOTALL,
)


def split_steps(text: str) -> list[str]:
    """Partition a response (or any run of steps) into steps; joining them gives `text` back.

    Text after the last step end (an unfinished step) is its own final step.
    """
    steps, start = [], 0
    for m in _STEP_END.finditer(text):
        steps.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        steps.append(text[start:])
    return steps


@dataclass(frozen=True)
class Step:
    """One parsed step (one generated chunk)."""

    text: str  # exactly as generated (the tree stores this; joining steps rebuilds the response)
    kind: str  # "code" (<end_of_step>), "code_end" (<end_of_code>), "answer", or "partial"
    code: str  # the Python this step adds to the trajectory's program ("" for answer steps)

    @property
    def is_answer(self) -> bool:
        return self.kind == "answer"


def parse_step(text: str) -> Step:
    """Classify one generated chunk and pull out the code it contributes.

    The code of a step is its text with the tags removed (the comments are Python comments,
    so they stay: they are harmless and keep line numbers meaningful).
    """
    if ANSWER_OPEN in text or text.rstrip().endswith(END_OF_ANSWER):
        # Anything before <answer> in the same chunk that is code (rare) is kept as code.
        before = text.split(ANSWER_OPEN, 1)[0] if ANSWER_OPEN in text else ""
        return Step(text=text, kind="answer", code=_strip_tags(_drop_output(before)))
    if END_OF_CODE in text:
        return Step(text=text, kind="code_end", code=_strip_tags(_drop_output(text.split(END_OF_CODE, 1)[0])))
    if END_OF_STEP in text:
        return Step(text=text, kind="code", code=_strip_tags(text.split(END_OF_STEP, 1)[0]))
    return Step(text=text, kind="partial", code=_strip_tags(_drop_output(text)))


def _drop_output(text: str) -> str:
    return re.sub(
        re.escape(OUTPUT_OPEN) + r".*?(" + re.escape(END_OF_OUTPUT) + r"|$)", "", text, flags=re.DOTALL
    )


def _strip_tags(text: str) -> str:
    # The assistant header can sit in front of the first step (PPM pair format).
    text = text.replace(ASSISTANT_HEADER, "")
    for tag in STEP_TAGS:
        text = text.replace(tag, "")
    return text


def program(steps: list[Step] | list[str]) -> str:
    """The cumulative program of a trajectory: the code of every step so far, in order.

    Steps are generated as fragments of one program (the authors execute the code of all
    steps so far), so they are joined as they are; a newline is added only where a step's
    code does not end with one, so that two fragments never fuse into one line.
    """
    parts = []
    for s in steps:
        code = (s if isinstance(s, Step) else parse_step(s)).code
        if code and not code.endswith("\n"):
            code += "\n"
        parts.append(code)
    return "".join(parts)


def wrap_output(observation: str) -> str:
    """What is appended after an `<end_of_code>` step: the executor's output block."""
    return f"\n{OUTPUT_OPEN}{observation.rstrip()}{END_OF_OUTPUT}"


# --- answers -----------------------------------------------------------------------------


def extract_boxed(text: str, partial: bool = False) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in `text`,
    nested and escaped braces included, stripped; None if there is none. A box whose braces
    never close gives None, or with `partial` the rest of the text (graders prefer a guess)."""
    # Hand-written brace matching: a regex cannot balance nested braces.
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    m = re.match(r"\\(?:boxed|fbox)\s*", text[idx:])
    i = idx + m.end()
    if i >= len(text) or text[i] != "{":
        tok = re.match(r"[^\s$]+", text[i:])  # `\boxed 5` (no braces) is valid LaTeX for one token
        return tok.group(0) if tok else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] in "{}" and text[j - 1] == "\\":  # \{ and \} are characters, not groups
            continue
        depth += 1 if text[j] == "{" else -1 if text[j] == "}" else 0
        if depth == 0:
            return text[i + 1 : j].strip()
    return text[i + 1 :].strip() if partial else None


def final_answer(steps: list[str] | list[Step]) -> str | None:
    """The final answer of a trajectory: the last `\\boxed{}` of its answer step."""
    for s in reversed(steps):
        st = s if isinstance(s, Step) else parse_step(s)
        if st.is_answer:
            return extract_boxed(st.text)
    return None
