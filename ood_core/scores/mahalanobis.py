"""(family module; filled in by its implementation)"""

from ood_core.scores.base import BaseScore

SCORES: tuple[type[BaseScore], ...] = ()
