"""Generate the `arithmetic` prompt set: 3-digit addition and subtraction, worked by columns.

Writes `train.jsonl` and `test.jsonl` next to this script (or under --out). Each row is
{"id", "question", "answer", "solution"}; `solution` is a DeepSeek-R1 style completion that
the demo teacher (`make teacher`) is trained on:

    <think>
    7+9+0=16
    8+5+1=14
    6+4+1=11
    Digits: 1146
    </think>
    The answer is \\boxed{1146}.

Each line is one column, from the right: top+bottom+carry, written with two digits (the
first is the next carry). Subtraction (never below 0) writes 10+top-bottom-borrow, so a
first digit 0 means a borrow. Every line of a kind has the same width, so a digit of the question or of an
earlier line is always the same number of tokens away: a model of a million parameters
learns the algorithm in minutes on a CPU. Output is deterministic for a given --seed, every
solution is checked against its answer, and no problem (+ taken as commutative) is in both
splits.

    python prompts/arithmetic/make.py [--seed 0] [--train 5000] [--test 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

Problem = tuple[int, str, int]  # (a, op, b) with op in "+-"

BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def random_problem(rng: random.Random) -> Problem:
    op, a, b = rng.choice("+-"), rng.randint(100, 999), rng.randint(100, 999)
    return (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)


def problem_key(p: Problem) -> Problem:
    """Identity of a problem for de-duplication: a + b is the same as b + a."""
    a, op, b = p
    return (min(a, b), op, max(a, b)) if op == "+" else p


def compute(p: Problem) -> int:
    a, op, b = p
    return a + b if op == "+" else a - b


def question(p: Problem) -> str:
    a, op, b = p
    return f"What is {a} {op} {b}?"


def solution(p: Problem) -> str:
    """The worked completion; the boxed value is what the columns spell, not compute(p)."""
    a, op, b = p
    lines, digits, carry = [], "", 0
    for x, y in zip(map(int, reversed(str(a))), map(int, reversed(str(b)))):
        if op == "+":
            s = x + y + carry
            lines.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        else:
            s = 10 + x - y - carry
            lines.append(f"10+{x}-{y}-{carry}={s:02d}")
            carry = 1 - s // 10  # the borrow
        digits = str(s % 10) + digits
    if op == "+":
        digits = str(carry) + digits
    return "\n".join(["<think>", *lines, f"Digits: {digits}", "</think>",
                      f"The answer is \\boxed{{{int(digits)}}}."])


def make_rows(problems: list[Problem], split: str) -> list[dict[str, str]]:
    return [{"id": f"arith-{split}-{i:05d}", "question": question(p), "answer": str(compute(p)),
             "solution": solution(p)} for i, p in enumerate(problems)]


def check_rows(rows: list[dict[str, str]]) -> None:
    """Raise ValueError if a solution's last boxed value differs from its answer."""
    for row in rows:
        boxed = BOXED.findall(row["solution"])
        if not boxed or boxed[-1] != row["answer"]:
            raise ValueError(f"{row['id']}: solution ends in {boxed[-1:]} but answer is {row['answer']!r}")
        a, op, b = row["question"].removeprefix("What is ").removesuffix("?").split(" ")
        if str(compute((int(a), op, int(b)))) != row["answer"]:
            raise ValueError(f"{row['id']}: wrong answer {row['answer']!r} for {row['question']!r}")


def generate(seed: int, n_train: int, n_test: int) -> tuple[list[Problem], list[Problem]]:
    """Draw n_test + n_train distinct problems; the first n_test form the test split."""
    rng = random.Random(seed)
    seen: set[Problem] = set()
    problems: list[Problem] = []
    while len(problems) < n_train + n_test:
        p = random_problem(rng)
        if problem_key(p) not in seen:
            seen.add(problem_key(p))
            problems.append(p)
    return problems[n_test:], problems[:n_test]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="ascii") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=5000, help="number of train rows")
    parser.add_argument("--test", type=int, default=200, help="number of test rows")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    train, test = generate(args.seed, args.train, args.test)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, problems in (("train", train), ("test", test)):
        rows = make_rows(problems, split)
        check_rows(rows)
        write_jsonl(args.out / f"{split}.jsonl", rows)
        print(f"wrote {len(rows)} rows to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
