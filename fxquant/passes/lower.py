"""Pass ``lower``: write the kernel backend the target's registry chooses (``fxquant.targets.backends.
backend_for_target``, the one place it is chosen) into every fused Linear and its decisions; the backend is
re-checked per call for the device and M it runs at (``backends.pick_backend``).

Before::

    %0 = fxquant.int8_linear(%x, @fc.weight, @fc.weight_scale, @fc.bias, 'none', 'auto', 127)

After (on a CPU with oneDNN)::

    %0 = fxquant.int8_linear(%x, @fc.weight, @fc.weight_scale, @fc.bias, 'none', 'onednn', 127)
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ..ir import ops
from ..ir.meta import members_of, set_members
from ..targets import backends
from .base import FxquantPass


def lower(gm: fx.GraphModule, spec, weight_qmax: int, requested=None) -> fx.GraphModule:
    backend = backends.backend_for_target(spec, weight_qmax, requested)
    for node in gm.graph.nodes:
        if ops.FusedLinear.is_fused_linear(node):
            ops.FusedLinear.of(node)._replace(backend=backend).set(node)
            set_members(node, [d.replace(backend=backend) for d in members_of(node)])
    gm.graph.lint()
    gm.recompile()
    return gm


class Lower(FxquantPass):
    name = "lower"

    def call(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(lower(gm, self.ctx.spec, self.ctx.weight_qmax, self.ctx.config.backend), True)
