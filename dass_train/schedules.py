"""Learning-rate schedules: the paper's single poly decay, and the authors' rounds of poly with a halving LR."""

from __future__ import annotations

import math


def poly_factor(iteration: int, total: int, power: float) -> float:
    """(1 - it / total) ** power, the DeepLab poly decay (paper 4.1); 0 at and after ``total``."""
    return (1.0 - min(iteration, total) / max(total, 1)) ** power


def round_length(total: int, rounds: int) -> int:
    """Iterations per round when ``total`` is split into ``rounds`` equal rounds (the last may be shorter)."""
    return max(1, math.ceil(total / max(rounds, 1)))


def rounds_factor(iteration: int, total: int, power: float, rounds: int, decay: float) -> float:
    """The authors' schedule: round r = it // length starts at decay ** r and decays by poly within the round.

    With 10 rounds and decay 0.5 the last round runs at 1/512 of the initial LR; the static pseudo labels are
    regenerated at the start of every round (the adapt stage reads ``round_length`` for that).
    """
    length = round_length(total, rounds)
    r = min(iteration, total) // length
    start = r * length
    return decay**r * poly_factor(iteration - start, min(length, total - start), power)


__all__ = ["poly_factor", "round_length", "rounds_factor"]
