"""The terminal loop of `keel label`: one text at a time, answered by number or label name.

Texts are printed as plain text (never as rich markup), so a pool text cannot restyle or hide the prompt.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from keel.label.session import Session


def _choices(labels: list[str]) -> str:
    return "  ".join(f"[{i}] {name}" for i, name in enumerate(labels, 1)) + "  [s] skip  [q] quit"


def parse_answer(reply: str, labels: list[str]) -> str | None:
    """A label name, "skip", "quit", or None when the reply means none of them."""
    reply = reply.strip()
    if reply.lower() in ("s", "skip"):
        return "skip"
    if reply.lower() in ("q", "quit"):
        return "quit"
    if reply.isdigit() and 1 <= int(reply) <= len(labels):
        return labels[int(reply) - 1]
    return reply if reply in labels else None


def run_terminal(session: Session, ask: Callable[[str], str] = input, write=None) -> int:
    """Ask until the rounds are done, the pool is empty, or the person quits (q, or end of input); returns the
    number of labels given in this session."""
    write = write or (lambda s: print(s, file=sys.stdout, flush=True))
    given = 0
    while (row := session.current()) is not None:
        left = len(session.batch)
        write(
            f"\nround {session.round + 1}/{session.rounds} - {left} left in this batch - pool row {row} "
            f"(model guesses {session.prediction(row)}, uncertainty {session.score(row):.3f})"
        )
        write(session.texts[row].replace("\r", " "))
        write(_choices(session.labels))
        while True:
            try:
                reply = ask("> ")
            except EOFError:
                return given
            answer = parse_answer(reply, session.labels)
            if answer is not None:
                break
            write(f"type a number from 1 to {len(session.labels)}, a label name, s or q")
        if answer == "quit":
            return given
        session.answer(row, None if answer == "skip" else answer)
        given += answer != "skip"
    return given
