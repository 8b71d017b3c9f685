"""Capture a model into the canonical ATen graph (torch.export / symbolic_trace), canonicalize it, and
simplify shape-only attention masks.
"""
