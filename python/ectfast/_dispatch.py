"""Which backends are built, and picking one for ``ectfast.fit``."""
from __future__ import annotations

from typing import List, Optional

from ._reference import ReferenceOps


def _core():
    try:
        from . import _core  # the compiled extension
    except ImportError:
        return None
    return _core


def cuda_available() -> bool:
    """True when the extension was built with CUDA and a CUDA device is usable now."""
    core = _core()
    return bool(core is not None and getattr(core, "cuda_built", False) and core.cuda_device_count() > 0)


def backends() -> List[str]:
    """The backends usable here, fastest last: "reference" always; "cpu" when the extension is
    built; "cuda" when it was built with CUDA and a device is present."""
    out = ["reference"]
    if _core() is not None:
        out.append("cpu")
    if cuda_available():
        out.append("cuda")
    return out


def get_ops(name: str = "auto", *, on_device: bool = False, num_threads: Optional[int] = None):
    if name not in ("auto", "reference", "cpu", "cuda"):
        raise ValueError(f"backend: expected 'auto', 'reference', 'cpu' or 'cuda', got {name!r}")
    available = backends()
    if name == "auto":
        name = "cuda" if on_device else ("cpu" if "cpu" in available else "reference")
    if on_device and name != "cuda":
        raise ValueError(f"backend: the response maps are on a CUDA device; backend {name!r} "
                         "needs host arrays (move them with .cpu() or use backend='cuda')")
    if name not in available:
        raise ValueError(f"backend: {name!r} is not available here (built: {available})")
    if name == "reference":
        return ReferenceOps()
    if name == "cpu":
        from ._cpu import CpuOps

        return CpuOps(num_threads=num_threads)
    from ._cuda import CudaOps

    return CudaOps()
