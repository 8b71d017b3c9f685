"""The IR: fxquant's op contracts (schemas, fake implementations, typed records), typed views of ATen nodes,
node metadata (decisions, rules, notes), the reference numerics, the golden printer and the pattern engine.
"""
