"""Export of trained models for deployment (ONNX now)."""
