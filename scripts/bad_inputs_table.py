"""Regenerate the README's table of bad inputs from the cases in tests/test_bad_inputs.py: each
case is run and the error it actually gets is written, so the table never drifts from the code.

    python scripts/bad_inputs_table.py            # rewrite README.md between the markers
    python scripts/bad_inputs_table.py --check    # exit 1 if README.md is out of date
"""
from __future__ import annotations

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- bad-inputs:begin -->", "<!-- bad-inputs:end -->"


def rows() -> list[tuple[str, str, str, str]]:
    """(op, input, error type, message) for every case."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_bad_inputs as t

    out = []
    for op, cases, call in t.TABLES:
        for name, kwargs, error, _ in cases:
            try:
                call(kwargs)
            except (TypeError, ValueError) as exc:
                message = str(exc).splitlines()[0]
                out.append((op, name, type(exc).__name__, message))
                continue
            raise SystemExit(f"{op}: {name!r} raised nothing (expected {error.__name__})")
    return out


def table() -> str:
    lines = ["| op | bad input | error | message |", "|---|---|---|---|"]
    for op, name, error, message in rows():
        message = message.replace("|", "\\|")
        if len(message) > 140:
            message = message[:137] + "..."
        lines.append(f"| `{op}` | {name} | `{error}` | {message} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {BEGIN} ... {END} section")
    new = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: f"{BEGIN}\n{table()}\n{END}", text,
                 flags=re.S)
    if args.check:
        if new != text:
            print("README.md's bad-input table is out of date: run python scripts/bad_inputs_table.py")
            return 1
        return 0
    with open(args.readme, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
