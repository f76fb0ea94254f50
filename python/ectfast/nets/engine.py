"""Inference engines for the estimation network: ONNX Runtime (no torch needed) and PyTorch.

An *estimator* maps face crops ``(B, 3, 256, 256)`` float32 RGB in [0, 1] (the fit's frame) to
response maps ``(B, 68, h, h)`` (h = 32 for the lite network: ``ectfast.fit`` then runs with
``upsample = 256 / h``). Crops larger than the network's input are averaged down to it by
2 x 2 (or k x k) block means, as the training crops are. Every estimator has

* ``input_size``: the network's input side (128 for ``lite``, 256 for ``paper``);
* ``fit_options``: ``ectfast.fit`` keyword arguments chosen for this network (from its weights'
  metadata, ``meta["fit"]``);
* ``landmark_offset``: (dx, dy) in image pixels that the detector adds to every landmark mapped
  back to the image (:func:`landmark_offset`; (0, 0) when the weights' metadata has none);
* ``engine``, ``device``, ``arch``, ``sha256`` (of the PyTorch state dict it comes from);
* ``flip``: test-time flip (:func:`flip_average`): the network also runs on the mirrored crops
  and the two sets of maps are averaged, landmarks re-ordered by the 68-point mirror. Twice the
  network's time; off by default (bench/RESULTS.md, "Lite network").

Engines
-------
``onnxruntime`` (:class:`OnnxEstimator`) runs an ONNX file written by ``ectfast export-onnx``.
Everything it needs (architecture, input size, fit options, the weights' sha256) is read from
the file's ``metadata_props`` (key ``"ectfast"``, a JSON object), so neither torch nor the onnx
package is needed. ``torch`` (:class:`TorchEstimator`) runs a ``.pt`` weights file (needs
``pip install 'ectfast[torch]'``); it is the engine for GPUs and for the ``paper``
architecture.

Precision (``precision``): ``"fp32"`` (default) or ``"int8"``: ONNX Runtime runs the int8 file
written by ``ectfast export-onnx --int8`` (static quantisation, ``ectfast.nets.export``), the
shipped ``assets/lite_300w_int8.onnx`` or ``NAME_int8.onnx`` beside the weights given. Measured:
the same LFPW NME as fp32; on this project's AVX2 CPU (no VNNI) barely faster; meant for CPUs
with int8 dot-product instructions (VNNI) (bench/RESULTS.md, "Lite network"). int8 needs the
onnxruntime engine. A ``.onnx`` file given as weights runs at its own precision (its metadata says which;
asking for the other one is a ValueError).

``engine="auto"`` (:func:`choose_engine`): on CPU, ONNX Runtime when it is installed and an ONNX
file of the same weights exists (the shipped ``assets/lite_300w.onnx``, or ``NAME.onnx`` beside a
``NAME.pt`` given as weights): it was measured faster than PyTorch on CPU (bench/pipeline.py,
bench/RESULTS.md "torch-free inference"); otherwise PyTorch. On a CUDA device: PyTorch.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import Optional

import numpy as np

from ectfast.assets import asset
from ectfast.nets.data import FLIP_68

ENGINES = ("auto", "onnxruntime", "torch")
#: the order engine="auto" tries on CPU (measured: ONNX Runtime is faster, bench/RESULTS.md)
CPU_PREFERENCE = ("onnxruntime", "torch")
CROP_SIZE = 256
DEFAULT_PT = asset("lite_300w.pt")
DEFAULT_ONNX = asset("lite_300w.onnx")
DEFAULT_ONNX_INT8 = asset("lite_300w_int8.onnx")
PRECISIONS = ("fp32", "int8")
DEFAULT_PRECISION = "fp32"
#: metadata_props key of the ONNX file, and the format tag inside its JSON value
META_KEY = "ectfast"
ONNX_FORMAT = "ectfast-onnx"
ONNX_VERSION = 1
INPUT_NAME = "image"
OUTPUT_NAMES = ("primary", "maps")

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")

NO_WEIGHTS_MESSAGE = ("no trained network is available: this installation of ectfast ships neither "
                      f"{os.path.basename(DEFAULT_ONNX)} nor {os.path.basename(DEFAULT_PT)}. Pass "
                      "--weights PATH (a .onnx from `ectfast export-onnx`, or a .pt from `ectfast train`).")


# ------------------------------------------------------------------ devices


def check_device(device) -> str:
    """Validate the spelling of ``device``: 'auto', 'cpu', 'cuda' or 'cuda:N'."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device) or device.startswith(("auto:", "cpu:")):
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def check_device_available(device: str, engine: str) -> None:
    """ValueError (naming ``device``) when a CUDA device is asked for and ``engine`` cannot use
    it here: torch without CUDA or without that device, onnxruntime without its CUDA provider."""
    device = check_device(device)
    if not device.startswith("cuda"):
        return
    if engine == "torch":
        _torch_cuda_check(_torch(), device)
    elif engine == "onnxruntime":
        providers = _ort().get_available_providers()
        if "CUDAExecutionProvider" not in providers:
            raise ValueError(f"device: {device!r} was requested but onnxruntime has no CUDA provider "
                             f"here (providers: {providers}); use --device cpu")


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


def _torch_cuda_check(torch, device: str) -> None:
    if not torch.cuda.is_available():
        why = ("this torch is built without CUDA" if getattr(torch.version, "cuda", None) is None
               else "torch sees no CUDA device")
        raise ValueError(f"device: {device!r} was requested but {why} (torch {torch.__version__}); "
                         "use --device cpu")
    n = torch.cuda.device_count()
    if _cuda_index(device) >= n:
        raise ValueError(f"device: {device!r} was requested but torch sees {n} CUDA device(s) "
                         f"(cuda:0..cuda:{n - 1})")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError("the onnxruntime engine needs ONNX Runtime: pip install onnxruntime "
                          "(a dependency of ectfast; or choose --engine torch)") from None
    return onnxruntime


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("the torch engine needs PyTorch: pip install 'ectfast[torch]' "
                          "(or use --engine onnxruntime with a .onnx file)") from None
    return torch


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available_engines() -> list:
    """The engines whose runtime is installed here: a subset of ['onnxruntime', 'torch']."""
    return [e for e, m in (("onnxruntime", "onnxruntime"), ("torch", "torch")) if _installed(m)]


# ------------------------------------------------------------------ crops -> the net's input


def pool_to(x: np.ndarray, size: int) -> np.ndarray:
    """(B, C, S, S) -> (B, C, size, size) by k x k block means (k = S / size, an integer), the
    same as torch's avg_pool2d(k)."""
    s = x.shape[-1]
    if s == size:
        return x
    if s % size or x.shape[-2] != s:
        raise ValueError(f"crops: {x.shape[-2]}x{s} crops cannot be averaged down to the network's "
                         f"{size}x{size} input")
    k = s // size
    b, c = x.shape[:2]
    return x.reshape(b, c, size, k, size, k).mean(axis=(3, 5), dtype=np.float32)


def landmark_offset(meta, source="weights") -> np.ndarray:
    """The (dx, dy) image-pixel offset stored in a network's metadata (``meta["landmark_offset"]``),
    float64 (2,); (0, 0) when there is none. Why it exists: 300-W's annotations sit about one
    image pixel to the right of where a network trained with flip augmentation puts the points:
    a flip mirrors the image content and the labels alike, so a constant offset of the labels
    from the content along x is learned with opposite signs and averages out (along y it is
    learned). ``bench/lite_eval.py tune`` measures the mean residual (annotation - ECT) on the
    held-out training faces in their image pixels and stores it with the weights
    (bench/RESULTS.md, "Lite network")."""
    v = (meta or {}).get("landmark_offset")
    return np.zeros(2) if v is None else check_offset(v, f"{source}: landmark_offset in the metadata")


def check_offset(value, what: str) -> np.ndarray:
    """``value`` as float64 (2,): two finite numbers of at most 8 image pixels, else ValueError
    naming ``what``."""
    try:
        off = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        off = np.zeros(0)
    if off.shape != (2,) or not np.isfinite(off).all() or (np.abs(off) > 8).any():
        raise ValueError(f"{what}: expected two finite numbers (dx, dy) of at most 8 image pixels, got {value!r}")
    return off


def check_flip(flip: bool, meta, source) -> bool:
    """``flip`` as a bool; a UserWarning when it is on for a network trained with a label offset
    kept through flips (``meta["label_offset_x"]``, ``ectfast train --label-offset-x``): the network
    puts the points that far right of the image content, as its labels were, and the mirrored
    crops' points mirrored back land that far left, so the average loses the convention (the
    shipped network: LFPW ECT 3.15 % with test-time flip against 2.99 % without)."""
    flip = bool(flip)
    if flip and float((meta or {}).get("label_offset_x") or 0.0):
        warnings.warn(f"{source}: test-time flip averages out this network's learned label offset "
                      f"(label_offset_x = {meta['label_offset_x']} px) and raises its error; leave flip off",
                      UserWarning, stacklevel=3)
    return flip


#: test-time flip off by default: on the `lite` network it did not lower ECT's error on LFPW test
#: (3.19 % either way) for twice the network's time, and on the shipped `lite-hr` it raises it
#: (:func:`check_flip`; bench/RESULTS.md, "Lite network")
DEFAULT_FLIP = False


def flip_average(maps, maps_of_mirrored):
    """Test-time flip: the maps of crops (B, 68, h, w) averaged with the maps the network gave for
    the same crops mirrored left-right, those mirrored back and their landmarks re-ordered by the
    68-point mirror (``FLIP_68``: the mirrored face's left eye is the face's right eye). NumPy
    arrays or torch tensors."""
    if maps.shape != maps_of_mirrored.shape or maps.shape[1] != len(FLIP_68):
        raise ValueError(f"maps: test-time flip needs two (B, {len(FLIP_68)}, h, w) sets of maps of the same "
                         f"shape, got {tuple(maps.shape)} and {tuple(maps_of_mirrored.shape)}")
    if isinstance(maps, np.ndarray):
        back = maps_of_mirrored[:, FLIP_68, :, ::-1]
    else:  # torch
        back = maps_of_mirrored[:, FLIP_68.tolist()].flip(-1)
    return 0.5 * (maps + back)


def _check_crops(crops) -> np.ndarray:
    x = np.ascontiguousarray(crops, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"crops: expected (B, 3, H, W) float32 RGB in [0, 1], got shape {x.shape}")
    return x


# ------------------------------------------------------------------ ONNX Runtime


def read_onnx_metadata(path) -> dict:
    """The ``ectfast`` metadata of an ONNX file (a dict: format, version, arch, input_size,
    map_size, n_landmarks, sha256, meta) read with onnxruntime (no onnx package needed).
    ValueError when the file is not an ectfast ONNX file."""
    ort = _ort()
    sess = _session(ort, path, ["CPUExecutionProvider"], None)
    return _metadata(sess, path)


def _session(ort, path, providers, threads):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX model not found at {path!r} (write one with `ectfast export-onnx`)")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only
    # no busy-waiting between runs: the pipeline's reading/face-search threads share the cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path, so, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ValueError(f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e).strip()[:200]})") from None


def _metadata(sess, path) -> dict:
    props = sess.get_modelmeta().custom_metadata_map
    raw = props.get(META_KEY)
    if raw is None:
        raise ValueError(f"{path}: no '{META_KEY}' metadata: not written by `ectfast export-onnx`")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ValueError(f"{path}: its '{META_KEY}' metadata is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
        raise ValueError(f"{path}: metadata format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                         f"expected {ONNX_FORMAT!r}")
    if meta.get("version") != ONNX_VERSION:
        raise ValueError(f"{path}: ectfast ONNX version {meta.get('version')!r}, this ectfast reads {ONNX_VERSION}")
    for key in ("arch", "input_size", "n_landmarks"):
        if key not in meta:
            raise ValueError(f"{path}: metadata has no {key!r}")
    if not isinstance(meta.get("meta", {}), dict):
        raise ValueError(f"{path}: metadata 'meta' is not an object")
    return meta


class OnnxEstimator:
    """The estimation network run by ONNX Runtime from an ``ectfast export-onnx`` file.

    path: the .onnx file (None: the shipped ``assets/lite_300w.onnx``). device: 'cpu' (or
    'auto'), or 'cuda'/'cuda:N' where onnxruntime has the CUDA provider. threads: ONNX Runtime's
    intra-op threads (None: its default, one per core). flip: test-time flip."""

    engine = "onnxruntime"

    def __init__(self, path=None, device: str = "cpu", threads: Optional[int] = None, flip: bool = DEFAULT_FLIP):
        ort = _ort()
        device = check_device(device)
        providers = ort.get_available_providers()
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in providers:
                raise ValueError(f"device: {device!r} was requested but onnxruntime has no CUDA provider "
                                 f"here (providers: {providers}); use --device cpu")
            chosen = [("CUDAExecutionProvider", {"device_id": _cuda_index(device)}), "CPUExecutionProvider"]
        else:
            device = "cpu"
            chosen = ["CPUExecutionProvider"]
        self.path = os.fspath(DEFAULT_ONNX if path is None else path)
        self.session = _session(ort, self.path, chosen, threads)
        self.meta = _metadata(self.session, self.path)
        self.device = device
        self.arch = self.meta["arch"]
        self.input_size = int(self.meta["input_size"])
        self.sha256 = self.meta.get("sha256")
        #: fit parameters chosen for this network's maps (stored with its weights)
        self.fit_options = dict((self.meta.get("meta") or {}).get("fit") or {})
        self.landmark_offset = landmark_offset(self.meta.get("meta"), self.path)
        self.flip = check_flip(flip, self.meta.get("meta"), self.path)
        #: "fp32" or "int8" (ectfast export-onnx --int8)
        self.precision = self.meta.get("precision", "fp32")
        inputs = self.session.get_inputs()
        self._input = inputs[0].name
        outs = [o.name for o in self.session.get_outputs()]
        self._output = OUTPUT_NAMES[1] if OUTPUT_NAMES[1] in outs else outs[-1]

    def __call__(self, crops) -> np.ndarray:
        x = pool_to(_check_crops(crops), self.input_size)
        if not self.flip:
            return self.session.run([self._output], {self._input: x})[0]
        both = self.session.run([self._output], {self._input: np.concatenate([x, x[..., ::-1]])})[0]
        return flip_average(both[:len(x)], both[len(x):])


# ------------------------------------------------------------------ PyTorch


class TorchEstimator:
    """The estimation network run by PyTorch from a ``.pt`` weights file (``ectfast.nets.model``).
    Maps stay on the GPU when the model runs there (ectfast.fit's cuda backend takes them)."""

    engine = "torch"

    def __init__(self, weights=None, device: str = "auto", threads: Optional[int] = None,
                 flip: bool = DEFAULT_FLIP):
        torch = _torch()
        device = check_device(device)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device.startswith("cuda"):
            _torch_cuda_check(torch, device)
        from ectfast.nets import model

        if threads:
            torch.set_num_threads(int(threads))
        self.torch = torch
        self.device = device
        self.path = os.fspath(DEFAULT_PT if weights is None else weights)
        net = model.load_pretrained(self.path, device=device)
        self.net = net.eval()
        self.arch = getattr(net, "arch", "paper")
        #: the network's input side: 256 crops are averaged down to it (the lite net takes 128)
        self.input_size = int(getattr(net, "input_size", CROP_SIZE))
        self.meta = dict(getattr(net, "meta", None) or {})
        self.sha256 = model.read_weights(self.path).get("sha256")
        #: fit parameters chosen for this network's maps (stored with its weights)
        self.fit_options = dict(self.meta.get("fit") or {})
        self.landmark_offset = landmark_offset(self.meta, self.path)
        self.precision = "fp32"
        self.flip = check_flip(flip, self.meta, self.path)

    def _maps(self, x):
        out = self.net(x)
        return out[-1] if isinstance(out, (tuple, list)) else out

    def __call__(self, crops):
        torch = self.torch
        with torch.inference_mode():
            x = torch.from_numpy(_check_crops(crops)).to(self.device)
            if x.shape[-1] > self.input_size:  # block averaging = the training crops' resize
                x = torch.nn.functional.avg_pool2d(x, x.shape[-1] // self.input_size)
            if not self.flip:
                return self._maps(x)
            both = self._maps(torch.cat([x, x.flip(-1)]))
            return flip_average(both[:len(x)], both[len(x):])


# ------------------------------------------------------------------ the choice


def _is_onnx(path) -> bool:
    return path is not None and os.fspath(path).lower().endswith(".onnx")


def int8_sibling(path) -> str:
    """NAME_int8.onnx for NAME.pt or NAME.onnx: where the int8 file of those weights lies."""
    return os.path.splitext(os.fspath(path))[0] + "_int8.onnx"


def _sibling_onnx(path, precision: str = DEFAULT_PRECISION) -> Optional[str]:
    """NAME.onnx (int8: NAME_int8.onnx) beside NAME.pt, if it exists; for path None the shipped one."""
    if path is None:
        cand = DEFAULT_ONNX_INT8 if precision == "int8" else DEFAULT_ONNX
    else:
        cand = int8_sibling(path) if precision == "int8" else os.path.splitext(os.fspath(path))[0] + ".onnx"
    return cand if os.path.isfile(cand) else None


def check_precision(precision) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision


def choose_engine(weights=None, device: str = "auto", engine: str = "auto",
                  precision: str = DEFAULT_PRECISION) -> str:
    """The engine ``make_estimator`` uses (see the module docstring). ValueError for an unknown
    engine or one that cannot run these weights; ImportError when the engine is not installed."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {engine!r}")
    device = check_device(device)
    if check_precision(precision) == "int8":
        if engine == "torch":
            raise ValueError("precision: 'int8' runs on the onnxruntime engine (the int8 file of "
                             "`ectfast export-onnx --int8`), not on 'torch'")
        _ort()
        return "onnxruntime"
    if engine == "torch":
        if _is_onnx(weights):
            raise ValueError(f"engine: 'torch' cannot run the ONNX file {os.fspath(weights)!r}; use "
                             "--engine onnxruntime, or pass the .pt weights")
        _torch()
        return "torch"
    if engine == "onnxruntime":
        _ort()
        return "onnxruntime"
    # auto
    if _is_onnx(weights):
        _ort()
        return "onnxruntime"
    have = available_engines()
    if device.startswith("cuda") or (device == "auto" and "torch" in have and _torch_cuda_available()):
        if "torch" in have:
            return "torch"
    for e in CPU_PREFERENCE:
        if e not in have:
            continue
        if e == "onnxruntime" and _sibling_onnx(weights) is None:
            continue  # no ONNX file of these weights: would need a conversion (torch + onnx)
        if e == "torch" and weights is None and not os.path.isfile(DEFAULT_PT):
            continue
        return e
    if not have:
        raise ImportError("no inference engine is installed: pip install onnxruntime (or 'ectfast[torch]')")
    if weights is not None and "torch" not in have:
        raise ImportError(f"weights: {os.fspath(weights)!r} is a PyTorch file and torch is not installed: "
                          "pip install 'ectfast[torch]', or pass the .onnx written by `ectfast export-onnx`")
    return have[0]


def _torch_cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def make_estimator(weights=None, device: str = "auto", engine: str = "auto", threads: Optional[int] = None,
                   flip: bool = DEFAULT_FLIP, precision: str = DEFAULT_PRECISION):
    """The network as an estimator (crops -> maps) on ``engine`` ('auto', 'onnxruntime', 'torch').

    weights: None (the shipped network), a ``.onnx`` file (ONNX Runtime) or a ``.pt`` weights
    file (PyTorch; with engine 'onnxruntime' it is converted in memory, which needs torch and
    onnx, unless NAME.onnx lies beside it). precision: 'fp32' or 'int8' (the int8 ONNX file:
    the shipped one, or NAME_int8.onnx beside NAME.pt). FileNotFoundError when nothing is shipped
    or the file is missing, ValueError for a bad file/device/engine/precision, ImportError for a
    missing engine."""
    chosen = choose_engine(weights, device, engine, precision)
    check_device_available(device, chosen)
    if weights is not None and not os.path.exists(os.fspath(weights)):
        raise FileNotFoundError(f"weights: no such file {os.fspath(weights)!r}")
    if precision == "int8":
        path = os.fspath(weights) if _is_onnx(weights) else _sibling_onnx(weights, "int8")
        if path is None:
            where = (f"{os.path.basename(DEFAULT_ONNX_INT8)} is not shipped with this installation" if weights is None
                     else f"no {os.path.basename(int8_sibling(weights))} beside it")
            raise FileNotFoundError(f"weights: precision 'int8' needs an int8 ONNX file ({where}); write one with "
                                    "`ectfast export-onnx --int8 --calibration-data DIR`")
        est = _at_precision(OnnxEstimator(path, device, threads, flip), precision)
        if weights is not None and not _is_onnx(weights):
            _check_same_weights(weights, est)
        return est
    if chosen == "torch":
        if weights is None and not os.path.isfile(DEFAULT_PT):
            raise FileNotFoundError(NO_WEIGHTS_MESSAGE)
        return TorchEstimator(weights, device, threads, flip)
    if _is_onnx(weights):
        return _at_precision(OnnxEstimator(weights, device, threads, flip), precision)
    onnx_path = _sibling_onnx(weights)
    if onnx_path is not None:
        est = OnnxEstimator(onnx_path, device, threads, flip)
        if weights is not None:
            _check_same_weights(weights, est)
        return est
    if weights is None:
        raise FileNotFoundError(NO_WEIGHTS_MESSAGE)
    return _converted(weights, device, threads, flip)


def _at_precision(est: "OnnxEstimator", precision: str) -> "OnnxEstimator":
    if est.precision != precision:
        raise ValueError(f"precision: {precision!r} was requested but {est.path} is a {est.precision} model")
    if precision == "int8" and est.device != "cpu":
        raise ValueError(f"device: the int8 model runs on the CPU, got {est.device!r}")
    return est


def _pt_sha256(path) -> Optional[str]:
    try:
        import torch
    except ImportError:
        return None
    try:
        blob = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception:
        return None
    return blob.get("sha256") if isinstance(blob, dict) else None


def _check_same_weights(weights, est) -> None:
    want = _pt_sha256(weights)
    if want is not None and est.sha256 is not None and want != est.sha256:
        raise ValueError(f"weights: {est.path} beside {os.fspath(weights)} was exported from other weights "
                         f"(sha256 {est.sha256[:12]}... vs {want[:12]}...): rerun `ectfast export-onnx "
                         f"--weights {os.fspath(weights)} --out {est.path}`")


def _converted(weights, device, threads, flip) -> OnnxEstimator:
    """A .pt converted to ONNX in memory (needs torch and onnx)."""
    import tempfile

    _torch()
    from ectfast.nets import export

    with tempfile.TemporaryDirectory(prefix="ectfast-onnx-") as tmp:
        path = os.path.join(tmp, "net.onnx")
        export.export_weights(weights, path, check=False)
        est = OnnxEstimator(path, device, threads, flip)
        est.path = f"{os.fspath(weights)} (converted to ONNX in memory)"
    return est
