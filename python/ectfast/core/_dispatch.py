"""Which backends are built, and picking one for ``ectfast.fit``."""
from __future__ import annotations

from typing import List, Optional

from ectfast.core._reference import ReferenceOps


_CORE_ERROR: Optional[str] = None


def _core():
    """The compiled extension, or None when it is not built or does not load (the reason is
    kept: :func:`core_error`)."""
    global _CORE_ERROR
    try:
        from ectfast.core import _core  # the compiled extension
    except ImportError as e:
        _CORE_ERROR = f"{type(e).__name__}: {e}"
        return None
    return _core


def core_error() -> Optional[str]:
    """Why the compiled extension (the cpu and cuda backends) is not usable; None when it is."""
    return None if _core() is not None else _CORE_ERROR


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
        core = _core()
        if name == "cuda" and core is not None and getattr(core, "cuda_built", False):
            raise ValueError("backend: 'cuda' was built into this ectfast, but no CUDA device is "
                             "visible (check the driver, nvidia-smi and CUDA_VISIBLE_DEVICES); "
                             f"usable here: {available}")
        why = f"; the compiled core did not load ({core_error()})" if core is None else ""
        raise ValueError(f"backend: {name!r} is not available here (usable: {available}){why}")
    if name == "reference":
        return ReferenceOps()
    if name == "cpu":
        from ectfast.core._cpu import CpuOps

        return CpuOps(num_threads=num_threads)
    from ectfast.core._cuda import CudaOps

    return CudaOps()
