"""A scripted policy and reward model for search tests: the right answer is known.

Questions are "What is A + B?". At the first step the policy proposes adding (right),
subtracting (wrong) or using an undefined name (a code error); then it prints x; then it
copies the executor's output into \\boxed{}. Greedy decoding (temperature 0) takes the
*wrong* first candidate, so search has something to win. The reward model prefers steps that
add and answers equal to A + B. Every prompt the policy sees is recorded, so tests can check
which prefix each step was generated from.
"""

from __future__ import annotations

import random
import re
import time

from rstar.models.base import Completion, GenRequest

FIRST_STEPS = [
    "<code>\n# Step 1: subtract the numbers\nx = {a} - {b}\n<end_of_step>",
    "<code>\n# Step 1: add the numbers\nx = {a} + {b}\n<end_of_step>",
    "<code>\n# Step 1: use a helper\nx = {a} + undefined_helper({b})\n<end_of_step>",
]
PRINT_STEP = "\n\n# Now print the final answer\nprint(x)\n<end_of_code>"
ANSWER_STEP = "\n<answer>The answer is \\boxed{{{out}}}.<end_of_answer>"


def numbers(text: str) -> tuple[int, int]:
    a, b = re.search(r"What is (\d+) \+ (\d+)\?", text).groups()
    return int(a), int(b)


class ScriptedPolicy:
    def __init__(self, delay_s: float = 0.0):
        self.calls: list[list[GenRequest]] = []
        self.delay_s = delay_s

    def _next_steps(self, prompt: str) -> list[str]:
        a, b = numbers(prompt)
        tail = prompt.rsplit("Let's think step by step and solve the problem with code.", 1)[1]
        if "<end_of_output>" in tail:
            out = re.findall(r"<output>(.*?)<end_of_output>", tail, re.S)[-1].strip()
            return [ANSWER_STEP.format(out=out)]
        if "<end_of_step>" in tail:
            return [PRINT_STEP]
        return [s.format(a=a, b=b) for s in FIRST_STEPS]

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for r in requests:
            options = self._next_steps(r.prompt)
            # Sampling cycles through the options from a seeded offset: n >= 3 samples always
            # cover the right step, so tests do not hinge on one seed's luck.
            start = random.Random(r.seed).randrange(len(options))
            picks = (
                [options[0]] * r.n
                if r.temperature == 0
                else [options[(start + i) % len(options)] for i in range(r.n)]
            )
            out.append([Completion(text=t, stop_reason="stop", n_tokens=len(t) // 4) for t in picks])
        return out


class ScriptedReward:
    def __init__(self):
        self.calls = 0

    def score(self, prefixes: list[str], steps: list[str]) -> list[float]:
        self.calls += 1
        values = []
        for prefix, step in zip(prefixes, steps):
            a, b = numbers(prefix)
            if "\\boxed{" in step:
                got = re.search(r"\\boxed\{(.*?)\}", step).group(1)
                values.append(0.9 if got == str(a + b) else -0.9)
            elif "undefined_helper" in step:
                values.append(-0.5)
            elif f"x = {a} + {b}" in step:
                values.append(0.6)
            elif f"x = {a} - {b}" in step:
                values.append(-0.6)
            else:  # the print step: as good as the code it prints (the prefix's first step)
                values.append(0.5 if f"x = {a} + {b}" in prefix else -0.5)
        return values


class BranchingPolicy:
    """A policy whose trees have a known shape, for the search's invariants.

    Questions are "What is A + B?". A program is `depth` code steps, then a print step, then an
    answer that copies the executed output. At each code step the candidates are `valid`
    distinct steps that keep x = A + B, `wrong` that set x = A - B, and `failing` whose code
    raises a NameError. Sampling takes the candidates in turn from a seeded offset (n >= the
    number of candidates covers them all), or, with `fail_p`, each sample independently fails
    with that probability and is otherwise a random valid step.
    """

    def __init__(self, depth=2, valid=1, wrong=0, failing=0, fail_p=None):
        self.depth, self.valid, self.wrong, self.failing, self.fail_p = depth, valid, wrong, failing, fail_p
        self.calls: list[list[GenRequest]] = []

    @staticmethod
    def step(k: int, code: str, tag: str) -> str:
        return ("<code>\n" if k == 0 else "\n\n") + f"# Step {k + 1}: {tag}\n{code}\n<end_of_step>"

    @staticmethod
    def position(prompt: str) -> tuple[int, int, int, str | None]:
        """(A, B, code steps so far, the executed output once the program has ended)."""
        a, b = numbers(prompt)
        tail = prompt.rsplit("Let's think step by step and solve the problem with code.", 1)[1]
        outs = re.findall(r"<output>(.*?)<end_of_output>", tail, re.S)
        return a, b, tail.count("<end_of_step>"), outs[-1].strip() if outs else None

    def _candidates(self, prompt: str) -> tuple[list[str], list[str]]:
        """(valid or wrong candidates, failing candidates) for the next step of `prompt`."""
        a, b, k, out = self.position(prompt)
        if out is not None:
            return [ANSWER_STEP.format(out=out)], []
        if k >= self.depth:
            return [PRINT_STEP], []
        # A step keeps the previous x (or sets it at the first step), so that every valid path
        # prints A + B and a wrong step anywhere makes the answer wrong.
        keep = f"x = {a} + {b}" if k == 0 else "x = x"
        runs = [self.step(k, f"{keep}  # way {j}", f"keep the sum, way {j}") for j in range(self.valid)]
        runs += [self.step(k, f"x = {a} - {b} + {j} * 0", f"subtract, way {j}") for j in range(self.wrong)]
        fails = [self.step(k, f"x = undefined_{j}", f"a helper, way {j}") for j in range(self.failing)]
        return runs, fails

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            runs, fails = self._candidates(r.prompt)
            rng = random.Random(r.seed)
            if self.fail_p is not None and fails:
                picks = [
                    rng.choice(fails) if rng.random() < self.fail_p else rng.choice(runs) for _ in range(r.n)
                ]
            else:
                options = runs + fails
                start = rng.randrange(len(options))
                picks = [options[(start + i) % len(options)] for i in range(r.n)]
            out.append([Completion(text=t, stop_reason="stop", n_tokens=len(t) // 4) for t in picks])
        return out


class TableReward:
    """A reward model that scores a step by the first of `table`'s substrings it contains
    (else `default`): e.g. {"way 7": 0.95} makes one sibling the favourite."""

    def __init__(self, table: dict[str, float] | None = None, default: float = 0.0):
        self.table, self.default = table or {}, default
        self.calls = 0

    def score(self, prefixes: list[str], steps: list[str]) -> list[float]:
        self.calls += 1
        return [next((v for k, v in self.table.items() if k in step), self.default) for step in steps]


class ExplicitPolicy:
    """A policy that writes a tree given label by label (issue 22): `children` maps a step's
    label ("" for the root) to the labels of its candidate next steps. A label starting with
    "p" is a step that prints x and ends the code; any other is a code step that keeps x
    (the first sets x = A + B); after an output comes the answer. Every sample draws from the
    candidates in turn, so n >= their number yields each once (identical samples merge)."""

    def __init__(self, children: dict[str, list[str]]):
        self.children = children
        self.calls: list[list[GenRequest]] = []

    def _candidates(self, prompt: str) -> list[str]:
        a, b = numbers(prompt)
        tail = prompt.rsplit("Let's think step by step and solve the problem with code.", 1)[1]
        if tail.endswith("<end_of_output>"):
            out = re.findall(r"<output>(.*?)<end_of_output>", tail, re.S)[-1].strip()
            return [ANSWER_STEP.format(out=out)]
        labels = re.findall(r"# label (\w+)\n", tail)
        out = []
        for c in self.children.get(labels[-1] if labels else "", []):
            if c.startswith("p"):
                out.append(f"\n\n# label {c}\nprint(x)\n<end_of_code>")
            elif not labels:
                out.append(f"<code>\n# label {c}\nx = {a} + {b}\n<end_of_step>")
            else:
                out.append(f"\n\n# label {c}\nx = x\n<end_of_step>")
        return out

    def generate(self, requests: list[GenRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        out = []
        for r in requests:
            options = self._candidates(r.prompt)
            picks = [options[i % len(options)] for i in range(r.n)]
            out.append([Completion(text=t, stop_reason="stop", n_tokens=len(t) // 4) for t in picks])
        return out
