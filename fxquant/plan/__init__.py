"""The planner: the rules deciding int8 or float per Linear, and the program's one quantization plan.
"""
