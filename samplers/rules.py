"""Sheared-LLaMA's two domain-weight update rules, over dicts keyed by domain name.

w = current weights, l = per-domain held-out loss, r = reference loss, k = number of domains.

- ``sheared-paper`` (the paper's Algorithm 1): a = w * exp(max(l - r, 0)); w' = a / sum(a).
  A domain already below its reference keeps its relative weight; only domains whose loss
  exceeds the reference gain.
- ``sheared-code`` (what the released code does): w' = softmax(log w + eta * (l - r)), then
  w' = (1 - c) * w' + c / k with c = ``smoothing``. Here a domain below its reference *loses*
  weight, and the smoothing keeps every domain above c / k.

Plain ``math`` on Python floats: the contract check compares with an independent computation
at 1e-9, and seven domains need no vectorisation. Both rules subtract the largest exponent
before ``exp`` (this cancels in the normalisation) so a large excess loss cannot overflow.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

from common.errors import CurateError

RULES = ("sheared-paper", "sheared-code")


def update_weights(weights: Mapping[str, float], losses: Mapping[str, float],
                   reference: Mapping[str, float], rule: str = "sheared-paper",
                   eta: float = 1.0, smoothing: float = 1e-4) -> dict[str, float]:
    """New domain weights (a dict in the order of ``weights``) after one update by ``rule``."""
    domains = list(weights)
    _check_inputs(domains, weights, losses, reference, rule, eta, smoothing)
    w = [float(weights[d]) for d in domains]
    total = sum(w)
    w = [x / total for x in w]   # the rules assume a distribution; callers may pass raw preset numbers
    excess = [float(losses[d]) - float(reference[d]) for d in domains]

    if rule == "sheared-paper":
        z = [max(e, 0.0) for e in excess]
        top = max(z)
        a = [wi * math.exp(zi - top) for wi, zi in zip(w, z)]
        s = sum(a)
        new = [x / s for x in a]
    else:  # sheared-code
        # log(0) = -inf: a domain switched off stays at the smoothing floor c / k.
        z = [(math.log(wi) if wi > 0 else -math.inf) + eta * e for wi, e in zip(w, excess)]
        top = max(z)
        ex = [math.exp(zi - top) for zi in z]
        s = sum(ex)
        k = len(domains)
        new = [(1.0 - smoothing) * (x / s) + smoothing / k for x in ex]
    return dict(zip(domains, new))


def _check_inputs(domains, weights, losses, reference, rule, eta, smoothing) -> None:
    if rule not in RULES:
        raise CurateError(f"unknown update rule {rule!r}; use one of {', '.join(RULES)}")
    if not domains:
        raise CurateError("update_weights: no domains given")
    for name, table in (("losses", losses), ("reference", reference)):
        missing = [d for d in domains if d not in table]
        if missing:
            raise CurateError(f"update_weights: {name} has no value for domain(s) {', '.join(missing)}")
        bad = [d for d in domains if not math.isfinite(float(table[d]))]
        if bad:
            raise CurateError(f"update_weights: {name} is not finite for domain(s) {', '.join(bad)}")
    negative = [d for d in domains if not float(weights[d]) >= 0]
    if negative or sum(float(weights[d]) for d in domains) <= 0:
        raise CurateError(f"update_weights: weights must be >= 0 with a positive sum, got {dict(weights)}")
    if not (math.isfinite(eta) and eta >= 0):
        raise CurateError(f"update_weights: eta must be a finite number >= 0, got {eta!r}")
    if not 0.0 <= smoothing <= 1.0:
        raise CurateError(f"update_weights: smoothing must be in [0, 1], got {smoothing!r}")
