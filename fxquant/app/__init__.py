"""The shell and the demo: ``fxquant`` / ``python -m fxquant`` (above the API).
"""
