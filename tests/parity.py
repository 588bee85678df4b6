"""Measured parity figures: every comparison against diffusers/transformers records its max abs diff here, and
with PARITY_REPORT=path set, appends "test id<TAB>max abs diff" to that file (docs/parity.md is made from it)."""

import os


def record(diff: float) -> float:
    path = os.environ.get("PARITY_REPORT")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{diff:.3g}\n")
    return diff


def table(path: str) -> str:
    """Markdown table of the worst diff per test from a PARITY_REPORT file."""
    worst: dict[str, float] = {}
    for line in open(path):
        test, diff = line.rstrip("\n").split("\t")
        worst[test] = max(worst.get(test, 0.0), float(diff))
    rows = [f"| `{t.removeprefix('tests/')}` | {d:.2g} |" for t, d in sorted(worst.items())]
    return "\n".join(["| comparison | max abs diff (fp32) |", "|---|---|", *rows])


if __name__ == "__main__":
    import sys

    print(table(sys.argv[1]))
