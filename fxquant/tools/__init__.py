"""Inspecting a compiled program: the report, the golden text, networkx, drawings.
"""
