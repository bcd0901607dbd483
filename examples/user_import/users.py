"""A CSV of users to import, made deterministically from a seed, with a few percent of bad rows.

::

    python users.py data/users.csv --users 100000 --seed 7

Columns: ``id,email,name``. About 1 row in 100 each (3% in all) is bad in one of the
three ways a real export is: no e-mail address, a malformed one (``ada(at)example.com``,
``ada@``, a space inside), or an id that an earlier row already has, with other data.
A duplicate always copies the id of a good row, so every bad row is bad for exactly one
reason and the counts below are exact. :func:`read` gives each row with its line number,
which is what the import's held reasons name.
"""

from __future__ import annotations

import argparse
import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BAD_KINDS", "Counts", "generate", "read"]

#: The kinds of bad rows, in the words the held reasons use.
BAD_KINDS = ("missing e-mail", "malformed e-mail", "duplicate id")

_FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Niklaus", "Anita"]
_LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Perlman", "Wirth"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com"]


@dataclass(frozen=True)
class Counts:
    """What a generated file holds: rows in all, and the bad rows of each kind."""

    rows: int
    missing_email: int
    malformed_email: int
    duplicate_id: int

    @property
    def bad(self) -> int:
        return self.missing_email + self.malformed_email + self.duplicate_id

    @property
    def good(self) -> int:
        return self.rows - self.bad


def generate(path: Path, users: int, *, seed: int = 7, bad_rate: float = 0.03) -> Counts:
    """Write ``users`` rows to ``path`` (a CSV with a header line) and say what they hold.

    The same ``users``, ``seed`` and ``bad_rate`` always give the same file.
    """
    rng = random.Random(seed)
    good_ids: list[int] = []
    missing = malformed = duplicate = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow(("id", "email", "name"))
        next_id = 1000
        for _ in range(users):
            next_id += 1
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            name = f"{first} {last}"
            email = f"{first}.{last}.{next_id}@{rng.choice(_DOMAINS)}".lower()
            draw = rng.random()
            if draw < bad_rate / 3:
                missing += 1
                email = ""
            elif draw < 2 * bad_rate / 3:
                malformed += 1
                local, _, domain = email.partition("@")
                email = rng.choice([f"{local}(at){domain}", f"{local}@", f"{local} @{domain}", f"@{domain}"])
            elif draw < bad_rate and good_ids:
                duplicate += 1
                # Another user's id with this row's own name and address: a merge gone wrong.
                writer.writerow((rng.choice(good_ids), email, name))
                continue
            else:
                good_ids.append(next_id)
            writer.writerow((next_id, email, name))
    return Counts(rows=users, missing_email=missing, malformed_email=malformed, duplicate_id=duplicate)


def read(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """Each row as ``(line number, {"id": ..., "email": ..., "name": ...})``; the header is line 1."""
    with path.open(encoding="utf-8", newline="") as stream:
        reader = csv.DictReader(stream)
        for row in reader:
            yield reader.line_num, {"id": row["id"], "email": row["email"] or "", "name": row["name"] or ""}


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a CSV of users with a few percent of bad rows.")
    parser.add_argument("path", type=Path, nargs="?", default=Path("data/users.csv"), help="(default: data/users.csv)")
    parser.add_argument("--users", type=int, default=100_000, help="rows to write (default: 100000)")
    parser.add_argument("--seed", type=int, default=7, help="the same seed gives the same file (default: 7)")
    args = parser.parse_args()
    counts = generate(args.path, args.users, seed=args.seed)
    print(
        f"{args.path}: {counts.rows:,} users, {counts.bad:,} bad ({counts.missing_email:,} missing e-mail,"
        f" {counts.malformed_email:,} malformed e-mail, {counts.duplicate_id:,} duplicate id)"
    )


if __name__ == "__main__":
    main()
