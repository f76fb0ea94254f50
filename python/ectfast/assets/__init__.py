"""Files shipped with the package: the trained lite network (``lite_300w.pt``, ``lite_300w.onnx``
and its int8 form ``lite_300w_int8.onnx``), the 300-W point distribution model
(``pdm_300w.npz``), the BlazeFace face detectors (with their licence) and the example photograph
(with its notice). One home for their location."""
import os

ASSETS = os.path.dirname(os.path.abspath(__file__))


def asset(name: str) -> str:
    """The path of the shipped file ``name``."""
    return os.path.join(ASSETS, name)
