"""Pass ``fuse_patterns``: apply ``fxquant.patterns.REGISTRY`` in order (each pattern's float subgraph →
its int8 replacement, int8 weights from the program's store).

Before::

    %linear = aten.linear(%x, @fc.weight, @fc.bias)

After::

    %0 = fxquant.int8_linear(%x, @fc.weight:int8[N,K], @fc.weight_scale:float32[N,1], @fc.bias, 'none', ...)
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir.rewrite import Pattern, run_patterns
from ..patterns import REGISTRY
from .base import FxquantPass


class FusePatterns(FxquantPass):
    name = "fuse_patterns"

    def __init__(self, ctx, patterns: Optional[Sequence[Pattern]] = None):
        super().__init__(ctx)
        self.patterns = tuple(REGISTRY if patterns is None else patterns)

    def call(self, gm: fx.GraphModule) -> PassResult:
        stats = run_patterns(gm, self.patterns, self.ctx.store)
        for name, s in stats.items():
            self.ctx.record(name, s)
        return PassResult(gm, any(s.matched for s in stats.values()))
