"""Estimation networks: architectures, training data, training, ONNX export and the inference
engines (PyTorch, ONNX Runtime). Imports ``ectfast.core`` and ``ectfast.io`` at most; torch and
onnxruntime are imported by the modules that need them, never by this package's ``__init__``."""
