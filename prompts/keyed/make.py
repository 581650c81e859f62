"""Generate the `keyed` prompt set: a keyed running sum, the bench for distillation studies.

Writes `train.jsonl`, `validation.jsonl` and `test.jsonl` next to this script (or under --out).
Each row is {"id", "question", "answer", "solutions"}; `solutions` holds several distinct worked
completions, and the study teacher (`make teacher CONFIG=configs/teacher-keyed.yaml`) is trained
on all of them:

    Sum c=9 a=7 d=4 b=3

    <think>                 <think>
    a 7 >7                  d 4 >4
    c 9 >16                 b 3 >7
    b 3 >19                 a 7 >15      <- a slip: 7 + 7 is 14
    d 4 >23                 fix >14
    </think>                c 9 >23
                            </think>
    The answer is \\boxed{23}.

Each line takes one key not used yet, copies its value and writes the running total. The order
is the only free choice (n! valid traces: a teacher trained on several samples distinct correct
traces at T = 1), and every step is a local lookup: a key's value, the last total. Half of
the training paths (`--slips`) hold one wrong total followed by a `fix` line with the right one,
so the teacher learns to check a total and recover (at a tenth, a teacher trained 6 epochs never
wrote a fix: from a slipped prefix it reached the right answer 0.13 of the time). Deterministic
for a given --seed; every path is checked; no problem (as a set of key-value pairs) is in two splits.

    python prompts/keyed/make.py [--seed 0] [--train 4000] [--validation 200] [--test 200]
                                 [--paths 4] [--slips 0.5] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

MIN_KEYS, MAX_KEYS = 4, 6
KEYS = "abcdefghijklmnopqrstuvwxyz"
LINE = re.compile(r"([a-z]) (\d) >(\d+)")
FIX = re.compile(r"fix >(\d+)")


def random_problem(rng: random.Random) -> dict[str, int]:
    keys = rng.sample(KEYS, rng.randint(MIN_KEYS, MAX_KEYS))
    return {k: rng.randint(1, 9) for k in keys}


def question(problem: dict[str, int]) -> str:
    return "Sum " + " ".join(f"{k}={v}" for k, v in problem.items())


def path_lines(problem: dict[str, int], order: list[str], slip_at: int | None = None,
               rng: random.Random | None = None) -> list[str]:
    """The lines of one path; with slip_at, that line's total is wrong and a `fix` line follows."""
    lines, total = [], 0
    for i, key in enumerate(order):
        total += problem[key]
        if i == slip_at:
            wrong = total + rng.choice([d for d in (-2, -1, 1, 2, 10, -10) if total + d >= 0])
            lines += [f"{key} {problem[key]} >{wrong}", f"fix >{total}"]
        else:
            lines.append(f"{key} {problem[key]} >{total}")
    return lines


def solution(lines: list[str], total: int) -> str:
    return "\n".join(["<think>", *lines, "</think>", f"The answer is \\boxed{{{total}}}."])


def solutions(problem: dict[str, int], n_paths: int, slips: float, rng: random.Random) -> list[str]:
    """n_paths distinct orders; each path, with probability `slips`, holds one slip and its fix."""
    found: list[str] = []
    orders: set[tuple[str, ...]] = set()
    while len(found) < n_paths:
        order = rng.sample(list(problem), len(problem))
        if tuple(order) in orders:
            continue
        orders.add(tuple(order))
        slip_at = rng.randrange(len(order)) if rng.random() < slips else None
        found.append(solution(path_lines(problem, order, slip_at, rng), sum(problem.values())))
    return found


def check_solution(problem: dict[str, int], text: str) -> None:
    """Raise ValueError unless every key is used once with its value, each total is the last one
    plus that value (or is wrong and the next line fixes it), and the boxed answer is the sum."""
    lines = text.split("<think>\n")[1].split("\n</think>")[0].splitlines()
    total, used, i = 0, [], 0
    while i < len(lines):
        match = LINE.fullmatch(lines[i])
        if not match or problem.get(match[1]) != int(match[2]) or match[1] in used:
            raise ValueError(f"{question(problem)}: line {lines[i]!r} does not take an unused key's value")
        used.append(match[1])
        total += int(match[2])
        if int(match[3]) != total:
            fix = FIX.fullmatch(lines[i + 1]) if i + 1 < len(lines) else None
            if not fix or int(fix[1]) != total:
                raise ValueError(f"{question(problem)}: {lines[i]!r} is wrong and not fixed")
            i += 1
        i += 1
    if sorted(used) != sorted(problem) or not text.endswith(f"\\boxed{{{total}}}."):
        raise ValueError(f"{question(problem)}: the path does not use every key or end in the sum {total}")


def generate(seed: int, sizes: list[int]) -> list[list[dict[str, int]]]:
    """Distinct problems for each split, in the order of `sizes`."""
    rng = random.Random(seed)
    seen: set[frozenset] = set()
    problems: list[dict[str, int]] = []
    while len(problems) < sum(sizes):
        p = random_problem(rng)
        if frozenset(p.items()) not in seen:
            seen.add(frozenset(p.items()))
            problems.append(p)
    splits, start = [], 0
    for size in sizes:
        splits.append(problems[start:start + size])
        start += size
    return splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="number of train rows")
    parser.add_argument("--validation", type=int, default=200, help="number of validation rows")
    parser.add_argument("--test", type=int, default=200, help="number of test rows")
    parser.add_argument("--paths", type=int, default=4, help="worked solutions per row")
    parser.add_argument("--slips", type=float, default=0.5, help="share of paths with one slip and its fix")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    rng = random.Random(args.seed + 1)
    args.out.mkdir(parents=True, exist_ok=True)
    names = ("test", "validation", "train")  # test first: its problems do not depend on --train
    for split, problems in zip(names, generate(args.seed, [args.test, args.validation, args.train])):
        with (args.out / f"{split}.jsonl").open("w", encoding="ascii") as f:
            for i, problem in enumerate(problems):
                paths = solutions(problem, args.paths, args.slips if split == "train" else 0.0, rng)
                for text in paths:
                    check_solution(problem, text)
                row = {"id": f"keyed-{split}-{i:05d}", "question": question(problem),
                       "answer": str(sum(problem.values())), "solutions": paths}
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(problems)} rows to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
