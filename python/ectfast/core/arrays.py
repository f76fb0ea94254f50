"""What kind of array is this: the one home of "is this a torch tensor", "is it on a CUDA
device" and "give me NumPy" (torch is never imported here: a tensor is recognised by its type's
module, so NumPy-only installs never load torch)."""
from __future__ import annotations

import numpy as np


def is_torch(x) -> bool:
    """True for a torch.Tensor (or subclass; not torch.Size, torch.device, ...)."""
    return type(x).__module__.split(".")[0] == "torch" and hasattr(x, "detach") and hasattr(x, "data_ptr")


def on_cuda(x) -> bool:
    """True for an array on a CUDA device: a torch CUDA tensor, or any array exposing
    ``__cuda_array_interface__`` or a CUDA DLPack device (CuPy, ...)."""
    if is_torch(x):
        return x.device.type == "cuda"
    if hasattr(x, "__cuda_array_interface__"):
        return True
    dl = getattr(x, "__dlpack_device__", None)
    if dl is not None and not isinstance(x, np.ndarray):
        try:
            return int(dl()[0]) in (2, 3, 13)  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
        except Exception:
            return False
    return False


def to_numpy(x) -> np.ndarray:
    """Any array (NumPy, torch on any device, CuPy) -> NumPy on the host. Half-precision torch
    tensors become float32 (NumPy has no bfloat16)."""
    if is_torch(x):
        t = x.detach()
        if t.dtype.is_floating_point and t.element_size() < 4:
            t = t.float()
        return t.cpu().numpy()
    if hasattr(x, "__cuda_array_interface__") and hasattr(x, "get"):
        return x.get()
    return np.asarray(x)
