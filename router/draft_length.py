"""How many tokens the edge drafts per speculative round: k adapts to the recent acceptance rate.

alpha, the probability that a draft is accepted given that the ones before it were, is estimated as
accepted / (accepted + rejections) over recent rounds (exponential averages; accepted / drafted would
underestimate it, since every draft after a rejection counts as lost). k is the smallest k with
alpha^k <= 0.1, i.e. drafting until the accepted run has probably ended, within 1..``--draft-tokens``: the
cloud's pass then rarely ends with drafts to spare, and the edge does not draft far past the likely rejection.
Plain Python (no Ray, no gRPC), so that in-process benchmarks (bench/verify_profile.py) use the router's rule.
"""

from __future__ import annotations

import math

# Weight of the newest round in the averages behind the acceptance estimate.
ACCEPTANCE_EMA = 0.3
# Before the first round: 1.5 accepted drafts per rejection, i.e. alpha = 0.6 (k starts at 5).
INITIAL_ACCEPTED, INITIAL_REJECTED = 1.5, 1.0
# Draft until the run of accepted drafts has probably ended: the smallest k with alpha^k <= RUN_END.
RUN_END = 0.1


class DraftLength:
    """k from the recent per-token acceptance probability, in 1..max_k (see the module docstring)."""

    def __init__(self, max_k: int) -> None:
        if max_k < 1:
            raise ValueError(f"--draft-tokens must be >= 1, got {max_k}")
        self.max_k = max_k
        # exponential averages per round of accepted drafts and of rejections (0 or 1)
        self.accepted, self.rejected = INITIAL_ACCEPTED, INITIAL_REJECTED

    @property
    def alpha(self) -> float:
        """Estimated probability that a draft is accepted given that the ones before it were."""
        return self.accepted / (self.accepted + self.rejected)

    @property
    def k(self) -> int:
        alpha = self.alpha
        if alpha >= 1.0:
            return self.max_k
        if alpha <= 0.0:
            return 1
        return max(1, min(self.max_k, math.ceil(math.log(RUN_END) / math.log(alpha))))

    def update(self, drafted: int, accepted: int) -> None:
        if drafted:
            self.accepted += ACCEPTANCE_EMA * (accepted - self.accepted)
            self.rejected += ACCEPTANCE_EMA * (float(accepted < drafted) - self.rejected)
