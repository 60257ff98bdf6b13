"""Integer length distributions for prompt and output lengths, parsed from short specs.

    fixed:N                  always N
    uniform:LO:HI            integers in [LO, HI], both ends included
    normal:MEAN:STD[:LO:HI]  rounded, clipped to [LO, HI] (default [1, inf))
    lognormal:MEAN:SIGMA[:LO:HI]
                             a lognormal with that mean and log-space sigma (long right tail,
                             like real prompt lengths), rounded and clipped like normal

`LengthDist.parse(spec)` raises ValueError naming what is wrong; `str(dist)` gives the spec
back, so a run's configuration records it in the same words.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("fixed", "uniform", "normal", "lognormal")


@dataclass(frozen=True)
class LengthDist:
    kind: str  # one of KINDS
    a: float  # fixed: N; uniform: LO; normal/lognormal: MEAN
    b: float = 0.0  # uniform: HI; normal: STD; lognormal: SIGMA
    lo: int = 1  # clip bounds (normal/lognormal)
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"length distribution {self.kind!r}: must be one of "
                             f"{', '.join(KINDS)}")
        if self.kind == "fixed" and (self.a < 1 or self.a != int(self.a)):
            raise ValueError(f"fixed:{self.a}: must be an integer >= 1")
        if self.kind == "uniform" and not 1 <= self.a <= self.b:
            raise ValueError(f"uniform:{self.a:g}:{self.b:g}: need 1 <= LO <= HI")
        if self.kind in ("normal", "lognormal"):
            if self.a <= 0 or self.b < 0:
                raise ValueError(f"{self.kind}:{self.a:g}:{self.b:g}: need MEAN > 0 and a "
                                 "spread >= 0")
            if self.lo < 1 or (self.hi is not None and self.hi < self.lo):
                raise ValueError(f"{self}: clip bounds need 1 <= LO <= HI")

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        if isinstance(spec, int):
            return cls("fixed", spec)
        kind, _, rest = spec.strip().partition(":")
        if kind.isdigit() and not rest:  # a bare number means fixed
            return cls("fixed", int(kind))
        try:
            args = [float(x) for x in rest.split(":")] if rest else []
        except ValueError:
            raise ValueError(f"length distribution {spec!r}: arguments must be numbers") from None
        want = {"fixed": (1,), "uniform": (2,), "normal": (2, 4), "lognormal": (2, 4)}
        if kind not in want:
            raise ValueError(f"length distribution {spec!r}: kind must be one of "
                             f"{', '.join(KINDS)}")
        if len(args) not in want[kind]:
            raise ValueError(f"length distribution {spec!r}: {kind} takes "
                             f"{' or '.join(str(n) for n in want[kind])} numbers "
                             "(see loadgen/distributions.py)")
        if kind == "fixed":
            return cls(kind, args[0])
        if kind == "uniform":
            if args[0] != int(args[0]) or args[1] != int(args[1]):
                raise ValueError(f"length distribution {spec!r}: bounds must be integers")
            return cls(kind, args[0], args[1])
        lo, hi = (int(args[2]), int(args[3])) if len(args) == 4 else (1, None)
        return cls(kind, args[0], args[1], lo, hi)

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(rng.integers(int(self.a), int(self.b) + 1))
        if self.kind == "normal":
            x = rng.normal(self.a, self.b)
        else:  # lognormal with mean a: exp(mu + sigma^2 / 2) = a
            x = rng.lognormal(math.log(self.a) - self.b ** 2 / 2, self.b)
        x = max(self.lo, round(x))
        return int(x if self.hi is None else min(self.hi, x))

    @property
    def max(self) -> int | None:
        """The largest value it can produce (None: unbounded)."""
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return self.hi

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        clip = f":{self.lo}:{self.hi}" if self.hi is not None else ""
        return f"{self.kind}:{self.a:g}:{self.b:g}{clip}"
