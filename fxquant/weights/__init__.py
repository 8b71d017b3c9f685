"""The weight store of a program and what fills it: checkpoints (read), calibration and SmoothQuant.
"""
