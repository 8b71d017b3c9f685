"""What leaves fxquant: ONNX (dynamic and QDQ) and compressed-tensors W8A8 checkpoints.
"""
