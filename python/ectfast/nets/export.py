"""``ectfast export-onnx``: the estimation network as an ONNX file that ONNX Runtime runs without
torch (``ectfast.nets.engine.OnnxEstimator``).

The graph: input ``image`` (B, 3, S, S) float32 RGB in [0, 1] at the network's own input size S
(128 for ``lite``, 256 for ``paper``; normalised inside, as the PyTorch model), outputs
``primary`` and ``maps`` (the final response maps: 32 x 32 for lite, the FusionNet's 64 x 64 for
paper). The batch axis is dynamic. Weights are stored in float32.

The file's ``metadata_props`` hold the key ``"ectfast"``: a JSON object with format, version,
arch, input_size, crop_size (256, the fit's frame), map_size, n_landmarks, sha256 (the checksum
of the ``.pt`` state dict it was exported from), opset, torch version and ``meta`` (the weights'
metadata, e.g. ``meta["fit"]``: the fit options chosen for this network).

After writing, the ONNX file is run with onnxruntime and compared with PyTorch on random and
smooth inputs (max abs difference of the maps <= 1e-3, and the same argmax per map); a file
that fails the check is removed (exit 1). The regeneration of the shipped file is one command:

    ectfast export-onnx --weights python/ectfast/assets/lite_300w.pt --out python/ectfast/assets/lite_300w.onnx

(both paths are the defaults, so ``ectfast export-onnx`` alone does the same.)

int8 (``--int8``, :func:`quantize_int8`): ONNX Runtime's static quantisation of the float file
(QDQ format, weights int8 per output channel, activations uint8 with ranges calibrated on
canonical crops of training faces that training held out, never test faces; the first
convolution and the convolutions that write the maps stay float, :func:`float_convolutions`), written beside it
as ``NAME_int8.onnx`` with the same metadata plus ``precision: "int8"`` and the calibration;
the engine runs it with ``precision="int8"`` (``ectfast.nets.engine``). Shipped file:

    ectfast export-onnx --int8 --calibration-data ../shared/data/300w
"""
from __future__ import annotations

import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from ectfast.nets import engine as E
from ectfast.nets.model import ARCHS, DEFAULT_ARCH, build, load_pretrained, read_weights

TOLERANCE = 1e-3


class _Maps(nn.Module):
    """The network with two outputs (primary maps, final maps at the network's resolution)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        out = self.net(x)
        return out[0], out[1]


def load_model(weights=None, arch: str = DEFAULT_ARCH):
    """(network in eval mode, its weights' sha256 or None, its metadata) from a shipped-weights
    file (default: the packaged one), a training checkpoint (dict with 'model' and 'config'),
    or 'random' (an untrained ``arch`` network, seed 0)."""
    if weights == "random":
        torch.manual_seed(0)
        return build(arch).eval(), None, {}
    path = os.fspath(E.DEFAULT_PT if weights is None else weights)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights: no such file {path!r}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if isinstance(blob, dict) and "model" in blob and "state_dict" not in blob:  # a training checkpoint
        cfg = blob.get("config") or {}
        m = build(cfg.get("arch", "paper"))
        m.load_state_dict(blob["model"])
        return m.eval(), None, {"arch": m.arch, "from_checkpoint": os.path.basename(path)}
    info = read_weights(path)
    return load_pretrained(path), info["sha256"], dict(info.get("meta") or {})


def _json_meta(meta: dict) -> dict:
    """The weights' metadata without the training position (large, and not needed for inference)."""
    out = {}
    for k, v in meta.items():
        if k == "train_state":
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            v = str(v)
        out[k] = v
    return out


def export_onnx(model, path, size=None, dynamic_batch: bool = True, opset: int = 17, metadata=None) -> str:
    """Write ``model`` (a network of ectfast.nets.model) as ONNX to ``path`` with the ``ectfast``
    metadata (``metadata``: extra fields); returns the path."""
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx") from None
    model = model.eval().float().cpu()
    arch = getattr(model, "arch", "paper")
    size = int(size or getattr(model, "input_size", ARCHS[arch][1]))
    if size % 8 or size < 16:
        raise ValueError(f"size: expected a multiple of 8 >= 16, got {size}")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        primary, maps = _Maps(model)(x)
    path = os.fspath(path)
    tmp = path + ".tmp"
    kw = dict(input_names=[E.INPUT_NAME], output_names=list(E.OUTPUT_NAMES), opset_version=opset)
    dyn = {n: {0: "batch"} for n in (E.INPUT_NAME,) + E.OUTPUT_NAMES} if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(_Maps(model), (x,), tmp, dynamo=False, dynamic_axes=dyn, **kw)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(_Maps(model), (x,), tmp, dynamic_axes=dyn, **kw)
    proto = onnx.load(tmp)
    meta = {"format": E.ONNX_FORMAT, "version": E.ONNX_VERSION, "arch": arch, "input_size": size,
            "crop_size": E.CROP_SIZE, "map_size": int(maps.shape[-1]), "n_landmarks": int(maps.shape[1]),
            "opset": opset, "torch": torch.__version__, **(metadata or {})}
    onnx.helper.set_model_props(proto, {E.META_KEY: json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)
    os.replace(tmp, path)
    return path


def compare_onnx(model, path, size=None, batch: int = 3, seed: int = 0) -> dict:
    """Run the ONNX file with onnxruntime and ``model`` with PyTorch on the same random and smooth
    inputs at the network's input size: {"max_abs": largest difference of the maps,
    "argmax_agree": fraction of maps with the same peak, "maps": their shape}."""
    import onnxruntime as ort

    sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = int(size or inp.shape[-1])
    g = np.random.default_rng(seed)
    noise = g.random((batch, 3, size, size), dtype=np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / size
    smooth = np.stack([np.stack([0.5 + 0.4 * np.sin(6 * xx + c + k) * np.cos(5 * yy - k) for c in range(3)])
                       for k in range(batch)]).astype(np.float32)
    x = np.concatenate([noise, smooth])
    with torch.no_grad():
        ref = model.eval().float().cpu()(torch.from_numpy(x))[1].numpy()
    names = [o.name for o in sess.get_outputs()]
    got = sess.run([E.OUTPUT_NAMES[1] if E.OUTPUT_NAMES[1] in names else names[1]], {inp.name: x})[0]
    if got.shape != ref.shape:
        raise ValueError(f"{path}: onnxruntime gives maps {got.shape}, PyTorch {ref.shape}")
    flat_r, flat_g = ref.reshape(*ref.shape[:2], -1), got.reshape(*got.shape[:2], -1)
    agree = float((flat_r.argmax(-1) == flat_g.argmax(-1)).mean())
    return {"max_abs": float(np.abs(ref - got).max()), "argmax_agree": agree, "maps": list(got.shape)}


def check_onnx(model, path, size=None, batch: int = 3, seed: int = 0) -> float:
    """Max abs difference between onnxruntime and PyTorch (see :func:`compare_onnx`)."""
    return compare_onnx(model, path, size, batch, seed)["max_abs"]


def calibration_crops(root, n: int = 64, input_size: int = 128, holdout: int = 150, seed: int = 0) -> np.ndarray:
    """(n, 3, input_size, input_size) float32 RGB in [0, 1]: canonical crops (no augmentation;
    256 crops averaged to the input, as the detector feeds the network) of the first ``n`` of the
    training faces ``ectfast train`` holds out (``split_holdout``, same seed) under a 300-W root."""
    from ectfast.io.datasets import TRAIN_SUBSETS
    from ectfast.nets import data as D
    from ectfast.nets.train import split_holdout

    faces = D.load_crops(root, TRAIN_SUBSETS, D.STORED_SIZE_FULL)  # at the 256 frame's resolution
    _, held = split_holdout(faces, holdout, seed)
    if not 1 <= n <= len(held):
        raise ValueError(f"n: expected 1..{len(held)} calibration faces, got {n}")
    imgs = torch.from_numpy(held.images[:n]).permute(0, 3, 1, 2)
    A = np.repeat(D.canonical_matrix(held.stored_size, held.context, E.CROP_SIZE)[None], n, 0)
    x = D.warp_torch(imgs, A, E.CROP_SIZE).numpy()
    return E.pool_to(np.ascontiguousarray(x, np.float32), input_size)


def float_convolutions(proto) -> list:
    """The convolutions the int8 model keeps in float: those that read the image (the
    convolutions the graph input reaches without passing another convolution: the first one, and
    for ``lite-hr`` also its high-resolution branch's; in int8 the first cost 0.16 pp of held-out
    NME, 3.40 against 3.24 % for ECT) and those that write the response maps (the convolutions a
    graph output is computed from without passing another convolution; for ``lite64`` the 32-px
    fusion maps, upsampled, plus the 64-px head's residual). In graph order."""
    producer = {t: n for n in proto.graph.node for t in n.output}
    consumers = {}
    for n in proto.graph.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)

    def frontier(tensors, forward: bool):
        """Names of the convolutions reached from ``tensors`` through non-convolution nodes,
        towards the outputs (``forward``) or towards the input."""
        found, seen, todo = set(), set(), list(tensors)
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            if forward:
                nodes = consumers.get(t, [])
            else:
                nodes = [producer[t]] if t in producer else []
            for n in nodes:
                if n.op_type == "Conv":
                    found.add(n.name)
                else:
                    todo.extend(n.output if forward else n.input)
        return found

    keep = (frontier([i.name for i in proto.graph.input], True)
            | frontier([o.name for o in proto.graph.output], False))
    return [n.name for n in proto.graph.node if n.op_type == "Conv" and n.name in keep]


def quantize_int8(src, out, crops: np.ndarray, batch: int = 16, calibration: str = "") -> dict:
    """Static int8 quantisation of the float ONNX file ``src`` to ``out`` (see the module
    docstring), calibrated on ``crops`` (N, 3, S, S) float32 at the network's input size: the
    convolutions in int8 except :func:`float_convolutions`. Returns {"path", "bytes", "check"};
    the file carries ``src``'s metadata with ``precision`` 'int8'."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    meta = E.read_onnx_metadata(src)
    size = int(meta["input_size"])
    crops = np.asarray(crops)
    if crops.dtype != np.float32 or crops.ndim != 4 or crops.shape[1:] != (3, size, size) or not len(crops):
        raise ValueError(f"crops: expected (N >= 1, 3, {size}, {size}) float32 calibration crops, "
                         f"got {crops.dtype} {crops.shape}")

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.it = iter(range(0, len(crops), batch))

        def get_next(self):
            i = next(self.it, None)
            return None if i is None else {E.INPUT_NAME: crops[i:i + batch]}

    out = os.fspath(out)
    with tempfile.TemporaryDirectory(prefix="ectfast-int8-") as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(os.fspath(src), pre, skip_symbolic_shape=True)
        q = os.path.join(tmp, "int8.onnx")
        quantize_static(pre, q, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=["Conv"],
                        nodes_to_exclude=float_convolutions(onnx.load(pre)))
        proto = onnx.load(q)
    meta.update(precision="int8", calibration=calibration or f"{len(crops)} crops",
                float_file=os.path.basename(os.fspath(src)))
    onnx.helper.set_model_props(proto, {E.META_KEY: json.dumps(meta, sort_keys=True)})
    onnx.checker.check_model(proto)
    tmp_out = out + ".tmp"
    onnx.save(proto, tmp_out)
    os.replace(tmp_out, out)
    return {"path": out, "bytes": os.path.getsize(out), "check": compare_int8(src, out, crops)}


def compare_int8(float_path, int8_path, crops: np.ndarray) -> dict:
    """The int8 file against the float one on ``crops``: {"peak_shift_mean", "peak_shift_max"}
    (sub-pixel peak displacement, in map pixels, over every map) and "within_half_px" (the
    fraction of maps whose peaks are within half a map pixel)."""
    from ectfast.core.peaks import subpixel_peaks

    maps = []
    for path in (float_path, int8_path):
        est = E.OnnxEstimator(path, "cpu")
        maps.append(np.concatenate([est(crops[i:i + 16]) for i in range(0, len(crops), 16)]))
    d = np.linalg.norm(subpixel_peaks(maps[0], 1.0) - subpixel_peaks(maps[1], 1.0), axis=-1)
    return {"peak_shift_mean": float(d.mean()), "peak_shift_max": float(d.max()),
            "within_half_px": float((d <= 0.5).mean())}


def export_weights(weights=None, out=None, *, arch: str = DEFAULT_ARCH, opset: int = 17, check: bool = True) -> dict:
    """Export a weights file (default: the shipped .pt) to ``out`` (default: the same name with
    .onnx) with its metadata; with ``check``, compare with PyTorch and remove the file when
    they differ (ValueError). Returns {"path", "sha256", "bytes", "check"}."""
    model, sha, meta = load_model(weights, arch)
    if out is None:
        if weights in (None, "random"):
            out = E.DEFAULT_ONNX if weights is None else "random.onnx"
        else:
            out = os.path.splitext(os.fspath(weights))[0] + ".onnx"
    extra = {"sha256": sha, "meta": _json_meta(meta),
             "weights_file": None if weights in (None, "random") else os.path.basename(os.fspath(weights))}
    if weights is None:
        extra["weights_file"] = os.path.basename(E.DEFAULT_PT)
    path = export_onnx(model, out, opset=opset, metadata=extra)
    result = {"path": path, "sha256": sha, "bytes": os.path.getsize(path), "check": None}
    if check:
        c = compare_onnx(model, path)
        result["check"] = c
        if not (c["max_abs"] <= TOLERANCE and c["argmax_agree"] == 1.0):
            os.remove(path)
            raise ValueError(f"{path}: the ONNX model differs from PyTorch (max abs {c['max_abs']:.2e}, "
                             f"argmax agreement {c['argmax_agree']:.3f}); file removed")
    return result
