"""The targets fxquant compiles for: their specs (defaults with the measurements behind them) and the kernel
backends that run fxquant's ops on each device.
"""
