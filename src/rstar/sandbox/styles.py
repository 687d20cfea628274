"""Output styles: how a program's run becomes the observation the policy reads.

"faithful" (default): stdout exactly as Python prints it; errors as Python's last traceback line.
"authors": the observation the authors' executor (microsoft/rStar, rStar-math branch, adapted from
MARIO's `PythonInterpreter`) produced, re-implemented here so that a policy trained on their
released data sees what it learned from. Runs in the program's process (`worker._child_main`)."""

from __future__ import annotations

import ast
import builtins
import contextlib
import io
import re
import sys

AUTHORS_TIMEOUT_MESSAGE = "Execution of the code snippet has timed out for exceeding {:g} seconds."
_MAX_MESSAGE_CHARS = 2000  # error messages (a KeyError of a huge key) are cut to this


def format_error(error_type: str, message: str, output_style: str = "faithful") -> str:
    """One line for an error, as Python's last traceback line ("faithful") or as the authors'
    executor wrote it ("authors": `"{}: {}".format(type, str(e))`, and its timeout exception
    printed its message with quotes)."""
    if output_style == "authors":
        if error_type == "TimeoutError" and message.startswith("Execution of the code snippet"):
            return f"TimeoutError: {message!r}"
        return f"{error_type}: {message}".strip()
    return f"{error_type}: {message}" if message else error_type


# -- the program's process ----------------------------------------------------------------------


class _OutputLimit(BaseException):
    """Raised by the authors-style capture buffer past the output limit (a BaseException so a
    program's `except Exception` does not swallow it)."""


def _exc_message(e: BaseException) -> str:
    try:
        msg = str(e)
    except BaseException:
        msg = "<unprintable exception>"
    return msg if len(msg) <= _MAX_MESSAGE_CHARS else msg[:_MAX_MESSAGE_CHARS] + "..."


def run_faithful(code: str) -> dict:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(code, "<string>", "exec"), namespace)
    except SystemExit as e:
        arg = "" if e.code is None else repr(e.code)
        return {
            "ok": False,
            "error_type": "SystemExit",
            "error_message": f"the program called sys.exit({arg})",
        }
    except BaseException as e:
        return {"ok": False, "error_type": type(e).__name__, "error_message": _exc_message(e)}
    return {"ok": True, "error_type": None, "error_message": None}


# -- the authors' executor, re-implemented (rStar-math python_tool.py / MARIO PythonInterpreter) --
# Their steps: strip ``` and a leading "python"; parse with ast (so syntax errors read
# "(<unknown>, line N)"); find top-level print statements (also inside the bodies of if/while/for/
# def); with at most one, run everything but the last statement unobserved and report what the
# last one printed (or its value, if it is an expression); with several, run the program in
# segments that end at each print and join "<print args>: <output>" for each; round an output
# that is one float to 4 decimals when that is shorter; cut it to 1024 characters; strip. Errors
# are "Type: message". Unlike theirs, each program starts from a fresh namespace.

_AUTHORS_PRINT_ARGS = re.compile(r"print\((.*?)\)")


class _CappedStringIO(io.StringIO):
    def __init__(self, cap: int):
        super().__init__()
        self._cap, self._n = cap, 0

    def write(self, s: str) -> int:
        self._n += len(s)
        if self._n > self._cap:
            raise _OutputLimit()
        return super().write(s)


class _NullWriter(io.TextIOBase):
    def write(self, s: str) -> int:
        return len(s)


def _authors_sanitize(query: str) -> str:
    query = re.sub(r"^(\s|`)*(?i:python)?\s*", "", query)
    return re.sub(r"(\s|`)*$", "", query)


def _authors_clip(value, max_chars: int):
    """Their `truncate_string`: a str that reads as one float is rounded to 4 decimals if that is
    shorter; anything longer than max_chars keeps its first and last halves around "..."."""
    if isinstance(value, str):
        try:
            rounded = str(round(float(value), 4)) + "\n"
            value = value if len(value) < len(rounded) else rounded
        except Exception:
            pass
    if len(str(value)) > max_chars:
        text = str(value)
        return text[: max_chars // 2] + "..." + text[(-max_chars) // 2 :]
    return value


def _authors_is_print(node: ast.AST) -> bool:
    if (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Call)
        and isinstance(node.value.func, ast.Name)
        and node.value.func.id == "print"
    ):
        return True
    if isinstance(node, (ast.If, ast.While, ast.For, ast.FunctionDef)):
        return any(_authors_is_print(n) for n in node.body)
    return False


def _authors_segment(body: list[ast.stmt], namespace: dict, max_chars: int, cap: int):
    buf = _CappedStringIO(cap)
    exec(ast.unparse(ast.Module(body[:-1], type_ignores=[])), namespace)  # output not observed
    last = ast.unparse(ast.Module(body[-1:], type_ignores=[]))
    try:
        with contextlib.redirect_stdout(buf):
            value = eval(last, namespace)
            return _authors_clip(buf.getvalue() if value is None else value, max_chars)
    except Exception:  # not an expression (or it raised): run it as a statement, same buffer
        with contextlib.redirect_stdout(buf):
            exec(last, namespace)
        return _authors_clip(buf.getvalue(), max_chars)


def _authors_observation(code: str, namespace: dict, max_chars: int, cap: int) -> str:
    code = _authors_sanitize(code)
    tree = ast.parse(code)
    prints = [i for i, node in enumerate(tree.body) if _authors_is_print(node)] or [len(tree.body) - 1]
    if len(prints) == 1:
        return f"{_authors_segment(tree.body, namespace, max_chars, cap)}"
    parts = []
    for start, end in zip([-1] + prints, prints):
        source = ast.get_source_segment(code, tree.body[end])
        args = _AUTHORS_PRINT_ARGS.findall(source)
        label = " ".join(args) + ":" if args else ""
        value = _authors_segment(tree.body[start + 1 : end + 1], namespace, max_chars, cap)
        parts.append(f"{label} {value}")
    return "".join(parts)


def run_authors(code: str, max_chars: int, cap: int) -> dict:
    namespace = {"__name__": "__main__", "__builtins__": builtins}
    sys.stdout = _NullWriter()  # what their executor did not capture is lost, as it was there
    try:
        obs = _authors_observation(code, namespace, max_chars, cap).strip()
    except _OutputLimit:
        return {
            "ok": False,
            "error_type": "OutputLimitExceeded",
            "error_message": f"more than {cap} characters",
        }
    except BaseException as e:
        return {"ok": False, "error_type": type(e).__name__, "error_message": _exc_message(e), "stdout": ""}
    if len(obs) > cap:
        return {
            "ok": False,
            "error_type": "OutputLimitExceeded",
            "error_message": f"more than {cap} characters",
        }
    return {"ok": True, "error_type": None, "error_message": None, "stdout": obs}
