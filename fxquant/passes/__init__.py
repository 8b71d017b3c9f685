"""The passes of ``fxquant.compile``, one file each, and the pipeline that runs them (:mod:`.pipeline`).

Analysis, per method: ``install_checkpoint`` → ``annotate``; then one plan for the program
(:class:`fxquant.plan.planner.QuantPlan`); then per method: ``apply_plan`` → ``smoothquant`` →
``fuse_patterns`` → ``share_input_quant`` → ``fuse_siblings`` (targets that fuse siblings) → ``lower`` →
``install_smoothing``. See :mod:`.base` for the context, the pass type and the debug dumps.
"""
