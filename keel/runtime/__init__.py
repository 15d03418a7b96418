"""The inference layer: load a trained run's model (PyTorch, ONNX Runtime, int8) and run it. Below every stage."""
