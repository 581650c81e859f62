"""Generate the `arithmetic` prompt set: multi-digit +, - and * problems.

Writes `train.jsonl` and `test.jsonl` next to this script (or under --out).
Each row is {"id", "question", "answer", "solution"}:

- addition and subtraction of 2-4 digit numbers (subtraction never goes below 0),
- multiplication of a 2-3 digit number by a 1-digit number (2-9).

The `solution` is a short worked answer a tiny model can imitate: column by
column (with carries / borrows) for + and -, partial products for *. It always
ends with "So the answer is \\boxed{N}." and is checked against `answer`
before anything is written. Output is deterministic for a given --seed, and
no problem (same operator and operands, + taken as commutative) is in both
splits.

    python prompts/arithmetic/make.py [--seed 0] [--train 2000] [--test 200] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

Problem = tuple[int, str, int]  # (a, op, b) with op in "+-*"

OPS = ("+", "-", "*")
BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def random_operand(rng: random.Random, min_digits: int, max_digits: int) -> int:
    """A number whose digit count is uniform in [min_digits, max_digits]."""
    n = rng.randint(min_digits, max_digits)
    return rng.randint(10 ** (n - 1), 10**n - 1)


def random_problem(rng: random.Random, op: str) -> Problem:
    if op == "*":
        return random_operand(rng, 2, 3), op, rng.randint(2, 9)
    a, b = random_operand(rng, 2, 4), random_operand(rng, 2, 4)
    if op == "-" and a < b:
        a, b = b, a
    return a, op, b


def problem_key(p: Problem) -> Problem:
    """Identity of a problem for de-duplication: a + b is the same as b + a."""
    a, op, b = p
    return (min(a, b), op, max(a, b)) if op == "+" else p


def compute(p: Problem) -> int:
    a, op, b = p
    return a + b if op == "+" else a - b if op == "-" else a * b


def question(p: Problem) -> str:
    a, op, b = p
    return f"What is {a} {op} {b}?"


def digits_right_to_left(n: int, width: int) -> list[int]:
    return [int(c) for c in reversed(str(n).zfill(width))]


def solve_add(a: int, b: int) -> tuple[list[str], int]:
    """Column-by-column addition; returns the steps and the number the written digits spell."""
    width = max(len(str(a)), len(str(b)))
    steps, written, carry = [], "", 0
    for da, db in zip(digits_right_to_left(a, width), digits_right_to_left(b, width)):
        s = da + db + carry
        expr = f"{da}+{db}" + (f"+{carry}" if carry else "")
        carry = s // 10
        written = str(s % 10) + written
        steps.append(f"{expr}={s}, write {s % 10}" + (" carry 1." if carry else "."))
    if carry:
        written = "1" + written
        steps.append("Write the final carry 1.")
    return steps, int(written)


def solve_sub(a: int, b: int) -> tuple[list[str], int]:
    """Column-by-column subtraction (a >= b); returns the steps and the written result."""
    width = len(str(a))
    steps, written, borrow = [], "", 0
    for da, db in zip(digits_right_to_left(a, width), digits_right_to_left(b, width)):
        expr = f"{da}-{db}" + ("-1" if borrow else "")
        r = da - db - borrow
        if r >= 0:
            steps.append(f"{expr}={r}, write {r}.")
            borrow = 0
        else:
            r += 10
            steps.append(f"{expr} is negative, borrow 1: 1{expr}={r}, write {r} borrow 1.")
            borrow = 1
        written = str(r) + written
    if borrow:
        raise ValueError(f"{a} - {b} would be negative")
    return steps, int(written)


def solve_mul(a: int, b: int) -> tuple[list[str], int]:
    """Partial products by place value; returns the steps and the running total."""
    s = str(a)
    parts = [int(c) * 10 ** (len(s) - i - 1) for i, c in enumerate(s) if c != "0"]
    steps = [f"{a} * {b} = " + " + ".join(f"{p}*{b}" for p in parts) + "."]
    steps += [f"{p}*{b}={p * b}." for p in parts]
    total = parts[0] * b
    for p in parts[1:]:
        steps.append(f"{total}+{p * b}={total + p * b}.")
        total += p * b
    return steps, total


def solution(p: Problem) -> str:
    """Worked solution; the boxed value is what the steps produce, not compute(p)."""
    a, op, b = p
    if op == "+":
        intro, (steps, result) = "Add column by column from the right.", solve_add(a, b)
    elif op == "-":
        intro, (steps, result) = "Subtract column by column from the right.", solve_sub(a, b)
    else:
        intro, (steps, result) = f"Multiply each place value by {b} and add.", solve_mul(a, b)
    return " ".join([intro, *steps]) + f" So the answer is \\boxed{{{result}}}."


def make_rows(problems: list[Problem], split: str) -> list[dict[str, str]]:
    return [
        {
            "id": f"arith-{split}-{i:05d}",
            "question": question(p),
            "answer": str(compute(p)),
            "solution": solution(p),
        }
        for i, p in enumerate(problems)
    ]


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
        op = rng.choice(OPS)  # redraw operands, not the operator, on a repeat: keeps ops balanced
        p = random_problem(rng, op)
        for _ in range(100_000):
            if problem_key(p) not in seen:
                break
            p = random_problem(rng, op)
        else:
            raise ValueError(f"ran out of distinct {op!r} problems; ask for fewer rows")
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
    parser.add_argument("--train", type=int, default=2000, help="number of train rows")
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
