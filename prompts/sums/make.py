"""Generate the `sums` prompt set: add 4 to 6 digits, by several valid paths (the study task).

Writes `train.jsonl` and `test.jsonl` next to this script (or under --out). Each row is
{"id", "question", "answer", "solutions"}; `solutions` holds several distinct worked
completions of the same problem, each a valid path, and the study teacher (`make teacher
CONFIG=configs/teacher-sums.yaml`) is trained on all of them:

    What is 7 + 3 + 9 + 4?

    <think>                       <think>
    7+3=10: 10 + 9 + 4            9+4=13: 7 + 3 + 13
    9+4=13: 10 + 13               7+3=10: 10 + 13
    10+13=23: 23                  10+13=23: 23
    </think>                      </think>
    The answer is \\boxed{23}.

Each line adds one pair of neighbours, then rewrites the line before with the pair replaced by
its sum, so every path has the same number of lines and what differs is which pair is added
when: a teacher trained on them samples several distinct correct traces per prompt at T = 1,
unlike the column-by-column arithmetic set, whose single path leaves nothing to choose. The
pair comes first so that the choice is made, in one token, before anything depends on it:
written as bare rewrites ("10 + 9 + 4"), the sum's digits were sampled before the pair was
chosen, and the same teacher scored 0.54. This version's teacher scores 0.69, under the 0.85
it was meant to reach: it finds the pair it chose by the pair's values and, with a repeated
digit, sometimes rewrites another occurrence (a version with 4 or 5 distinct digits scored
0.59: training noise is as large as that difference). Output is deterministic for a given
--seed, every path is checked, and no problem (as a sequence of digits) is in both splits.

    python prompts/sums/make.py [--seed 0] [--train 4000] [--test 200] [--paths 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

MIN_TERMS, MAX_TERMS = 4, 6


def random_problem(rng: random.Random) -> list[int]:
    return [rng.randint(1, 9) for _ in range(rng.randint(MIN_TERMS, MAX_TERMS))]


def question(terms: list[int]) -> str:
    return "What is " + " + ".join(map(str, terms)) + "?"


def line(terms: list[int]) -> str:
    return " + ".join(map(str, terms))


def random_path(terms: list[int], rng: random.Random) -> list[str]:
    """Add a random pair of neighbours at each step until one number is left."""
    lines = []
    while len(terms) > 1:
        i = rng.randrange(len(terms) - 1)
        a, b = terms[i], terms[i + 1]
        terms = terms[:i] + [a + b] + terms[i + 2:]
        lines.append(f"{a}+{b}={a + b}: {line(terms)}")
    return lines


def solution(lines: list[str]) -> str:
    total = lines[-1].split(": ")[1]
    return "\n".join(["<think>", *lines, "</think>", f"The answer is \\boxed{{{total}}}."])


def solutions(terms: list[int], n_paths: int, rng: random.Random) -> list[str]:
    """Up to n_paths distinct paths (a problem of 4 terms has only 6)."""
    found: list[str] = []
    for _ in range(20 * n_paths):
        text = solution(random_path(terms, rng))
        if text not in found:
            found.append(text)
        if len(found) == n_paths:
            break
    return found


def check_solution(terms: list[int], text: str) -> None:
    """Raise ValueError unless each line adds a pair of neighbours of the line before and
    rewrites it with that pair replaced by its sum, and the boxed answer is the total."""
    previous = terms
    for written in text.split("<think>\n")[1].split("\n</think>")[0].splitlines():
        pair, _, rest = written.partition(": ")
        a, b, total = map(int, pair.replace("=", "+").split("+"))
        current = [int(x) for x in rest.split(" + ")]
        follows = any(previous[i:i + 2] == [a, b] and previous[:i] + [total] + previous[i + 2:] == current
                      for i in range(len(previous) - 1))
        if a + b != total or not follows:
            raise ValueError(f"{question(terms)}: {written!r} does not follow from {line(previous)!r}")
        previous = current
    if previous != [sum(terms)] or not text.endswith(f"\\boxed{{{sum(terms)}}}."):
        raise ValueError(f"{question(terms)}: the path does not end in the total {sum(terms)}")


def generate(seed: int, n_train: int, n_test: int) -> tuple[list[list[int]], list[list[int]]]:
    """Draw n_test + n_train distinct problems; the first n_test form the test split."""
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    problems: list[list[int]] = []
    while len(problems) < n_train + n_test:
        p = random_problem(rng)
        if tuple(p) not in seen:
            seen.add(tuple(p))
            problems.append(p)
    return problems[n_test:], problems[:n_test]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=4000, help="number of train rows")
    parser.add_argument("--test", type=int, default=200, help="number of test rows")
    parser.add_argument("--paths", type=int, default=4, help="worked solutions per row")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()

    rng = random.Random(args.seed + 1)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, problems in zip(("train", "test"), generate(args.seed, args.train, args.test)):
        with (args.out / f"{split}.jsonl").open("w", encoding="ascii") as f:
            for i, terms in enumerate(problems):
                paths = solutions(terms, args.paths, rng)
                for text in paths:
                    check_solution(terms, text)
                row = {"id": f"sums-{split}-{i:05d}", "question": question(terms),
                       "answer": str(sum(terms)), "solutions": paths}
                f.write(json.dumps(row) + "\n")
        print(f"wrote {len(problems)} rows to {args.out / f'{split}.jsonl'}")


if __name__ == "__main__":
    main()
