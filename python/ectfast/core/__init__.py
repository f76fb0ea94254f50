"""The fit core: Algorithm 1 (``fit.py``) and its backends (the NumPy reference
``_reference.py``, the C++ ``_cpu.py``, the CUDA ``_cuda.py``), the point distribution model, peaks,
metrics and synthetic maps. Needs NumPy and the compiled extension only; imports nothing above it
(``ectfast.io`` at most)."""
