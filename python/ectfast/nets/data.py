"""Face crops, training targets, augmentation and the 300-W data pipeline of the FCN.

Crops
-----
A face is cut out of its image as a square crop of ``size`` x ``size`` pixels (256 for the FCN)
by one affine warp (``cv2.warpAffine``); the 2x3 transform ``A`` (image pixel -> crop pixel) is
kept so that landmarks map both ways (:func:`transform_points`, and ``cv2.invertAffineTransform`` back). Pixel
coordinates are 0-based pixel centres everywhere.

* The box of a face: :func:`box_from_landmarks` takes the landmarks' bounding box and returns
  the square of side ``scale`` (default **1.3**) x its larger side, centred on the bounding
  box's centre, as (x0, y0, x1, y1). A detector's box may be used instead; :func:`crop_transform`
  squares any box (centre kept, side = its larger side).
* :func:`crop_transform` maps the box centre to the crop centre ((size - 1) / 2) and the box
  side to ``size`` pixels.

Targets (DESIGN.md)
-------------------
At 256: ``M_i(z) = 16 / (sigma sqrt(2 pi)) exp(-|z - x_i|^2 / (2 sigma^2))``, sigma = 6 px
(``ectfast.core.synthetic.gaussian_maps``): peak 1.064. At 64, the same map sampled on the 64 grid:
sigma = 1.5 (64-pixels), centre ``(x - 1.5) / 4`` (the x4 upsampling's pixel alignment, see
``ectfast.nets.model``), and **the same peak 1.064** -- not 16 / (1.5 sqrt(2 pi)) = 4.26 -- so that the
64x64 FusionNet target and its bilinear x4 upsampling agree with the 256x256 target (the three L2
losses then pull the same way, and the final maps keep the peak that the confidence weights of
Eq. 15 assume). Landmarks marked invisible get an all-zero map.

Augmentation (paper + jitter), one affine per sample plus colour
----------------------------------------------------------------
Training reads *margin crops* (stored crops): the canonical 256 crop's box enlarged by
``context`` (default 1.35) and stored at ``stored_size`` (default 288) pixels, so that rotation
and shifts have real image context. Per sample, :func:`sample_augmentation` draws a rotation
uniform in [-30, 30] deg, a box scale jitter in [0.9, 1.1], a box shift of up to 5 % of the side
per axis, a random 248 x 248 window of the 256 crop rescaled to 256 (the paper's random crop),
and a horizontal flip with probability 0.5 (landmarks re-ordered by :data:`FLIP_68`); these
compose into one 2x3 matrix (stored crop -> network input). Colour: brightness x U(0.75, 1.25),
contrast x U(0.75, 1.25) about the image mean, saturation x U(0.75, 1.25). The warp runs batched with torch
``affine_grid``/``grid_sample`` (:func:`warp_torch`; no OpenCV is needed for packed data).

Data
----
:func:`load_crops` reads 300-W-layout folders (``ectfast.io.datasets.find_faces``: the official
full-size release and the compact copy) into a :class:`CropSet` (decoded, margin-cropped uint8
RGB images in memory: the decoded-image cache). :func:`pack` writes the training and validation
crops into one ``.npz`` of JPEG-encoded crops (``python -m ectfast.cli.pack --data DIR --out
FILE``; 34 MiB at JPEG quality 85 for the 2012 + 224 faces of the compact copy). Packed files are derived from
research-only data: keep them in an ignored folder (``.devdata/``), never commit them.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ectfast.io.datasets import TRAIN_SUBSETS, find_faces
from ectfast.io.images import load_image
from ectfast.io.pts import N_LANDMARKS, read_pts
from ectfast.core.synthetic import TARGET_SIGMA_256, gaussian_maps, peak_scale

BOX_SCALE = 1.3
INPUT_SIZE = 256
STORED_SIZE = 288
CONTEXT = 1.35
#: stored crops that keep the 256 frame's full resolution (>= 256 x CONTEXT): for ``lite-hr``
STORED_SIZE_FULL = 352
PACK_FORMAT = "ectfast-packed-crops"
PACK_VERSION = 1

# iBUG 68-point mirror permutation (0-based): the landmark that takes index i after a flip.
_PAIRS = ([(i, 16 - i) for i in range(8)]                       # jaw
          + [(17 + i, 26 - i) for i in range(5)]                # eyebrows
          + [(31, 35), (32, 34)]                                # nose bottom
          + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]  # eyes
          + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]  # outer lips
          + [(60, 64), (61, 63), (65, 67)])                     # inner lips
FLIP_68 = np.arange(N_LANDMARKS)
for _a, _b in _PAIRS:
    FLIP_68[_a], FLIP_68[_b] = _b, _a
FLIP_68.setflags(write=False)


# ------------------------------------------------------------------ crops and transforms


def _check_points(points, name="landmarks") -> np.ndarray:
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"{name}: expected an (n, 2) array, got shape {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name}: non-finite coordinates")
    return p


def box_from_landmarks(landmarks, scale: float = BOX_SCALE) -> Tuple[float, float, float, float]:
    """Square box (x0, y0, x1, y1) of side ``scale`` x the larger side of the landmarks'
    bounding box, centred on that bounding box."""
    p = _check_points(landmarks)
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale}")
    lo, hi = p.min(0), p.max(0)
    c = (lo + hi) / 2
    side = scale * max(hi - lo)
    if not side > 0:
        raise ValueError("landmarks: all points coincide, no box")
    return (c[0] - side / 2, c[1] - side / 2, c[0] + side / 2, c[1] + side / 2)


def crop_transform(box, size: int = INPUT_SIZE, scale: float = 1.0) -> np.ndarray:
    """2x3 affine (image pixel -> crop pixel) of the square ``size`` crop of ``box``
    (x0, y0, x1, y1), enlarged by ``scale``: the box centre goes to ((size-1)/2, (size-1)/2),
    its larger side (x scale) spans ``size`` pixels."""
    b = np.asarray(box, dtype=np.float64)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise ValueError(f"box: expected finite (x0, y0, x1, y1), got {box!r}")
    side = max(b[2] - b[0], b[3] - b[1]) * scale
    if not side > 0:
        raise ValueError(f"box: empty box {box!r}")
    if int(size) != size or size < 4:
        raise ValueError(f"size: expected an integer >= 4, got {size!r}")
    s = size / side
    c = (b[:2] + b[2:]) / 2
    h = (size - 1) / 2.0
    return np.array([[s, 0.0, h - s * c[0]], [0.0, s, h - s * c[1]]])


def transform_points(A, points) -> np.ndarray:
    """Apply a 2x3 affine to points (..., 2)."""
    A = np.asarray(A, dtype=np.float64)
    if A.shape != (2, 3):
        raise ValueError(f"A: expected a 2x3 matrix, got shape {A.shape}")
    p = np.asarray(points, dtype=np.float64)
    return p @ A[:, :2].T + A[:, 2]


def compose(A, B) -> np.ndarray:
    """The 2x3 affine 'A after B' (x -> A(B(x)))."""
    A3 = np.vstack([np.asarray(A, np.float64), [0, 0, 1]])
    B3 = np.vstack([np.asarray(B, np.float64), [0, 0, 1]])
    return (A3 @ B3)[:2]


def crop_face(image, box, size: int = INPUT_SIZE, scale: float = 1.0):
    """(crop (size, size[, C]) same dtype as image, A) with cv2.warpAffine, bilinear, zero border."""
    import cv2

    img = np.asarray(image)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"image: expected (H, W) or (H, W, C), got shape {img.shape}")
    A = crop_transform(box, size, scale)
    crop = cv2.warpAffine(img, A, (int(size), int(size)), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return crop, A


# ------------------------------------------------------------------ targets


def to_map64(points, factor: int = 4) -> np.ndarray:
    """256-map coordinates -> coordinates on the 64 grid of the FCN (pixel i at 4 i + 1.5)."""
    return (np.asarray(points, dtype=np.float64) - (factor - 1) / 2.0) / factor


def make_targets(landmarks, visible=None, size: int = INPUT_SIZE, sigma: Optional[float] = None,
                 factor: int = 4):
    """Training targets for landmarks (B, n, 2) in ``size`` crop pixels: (maps (B, n, size,
    size), maps_low (B, n, size/f, size/f)) float32, see the module docstring."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.ndim != 3 or lm.shape[-1] != 2:
        raise ValueError(f"landmarks: expected (B, n, 2), got shape {lm.shape}")
    if size % factor:
        raise ValueError(f"size: must be a multiple of {factor}, got {size}")
    sigma = TARGET_SIGMA_256 * size / 256.0 if sigma is None else float(sigma)
    hi = gaussian_maps(lm, size, size, sigma)
    s = size // factor
    lo = gaussian_maps(to_map64(lm, factor), s, s, sigma / factor)
    lo *= np.float32(peak_scale(sigma) / peak_scale(sigma / factor))
    if visible is not None:
        vis = np.asarray(visible, dtype=bool)
        if vis.shape != lm.shape[:2]:
            raise ValueError(f"visible: expected shape {lm.shape[:2]}, got {vis.shape}")
        hi[~vis] = 0
        lo[~vis] = 0
    return hi, lo


def target_maps_torch(landmarks, visible, size: int, frame: int = INPUT_SIZE):
    """Training targets on torch tensors (any device) for landmarks (B, n, 2) in the ``frame``
    (256) pixels of the crop: (B, n, size, size) maps, ``frame / size`` times coarser, sampled
    as in :func:`make_targets` (sigma 6 * size / frame, the 256 target's peak 1.064, centre
    ``(x - (f - 1) / 2) / f``); all-zero where ``visible`` (B, n) is False."""
    import torch

    factor = frame / size
    sigma = TARGET_SIGMA_256 * frame / 256.0 / factor
    amp = peak_scale(TARGET_SIGMA_256 * frame / 256.0)
    dev = landmarks.device
    c = (landmarks.float() - (factor - 1) / 2.0) / factor
    vis = visible.to(torch.float32)
    ax = torch.arange(size, device=dev, dtype=torch.float32)
    gx = torch.exp(-(ax - c[..., 0:1]) ** 2 / (2 * sigma * sigma))
    gy = torch.exp(-(ax - c[..., 1:2]) ** 2 / (2 * sigma * sigma)) * (amp * vis)[..., None]
    return gy[..., :, None] * gx[..., None, :]


# ------------------------------------------------------------------ augmentation


@dataclass
class AugmentConfig:
    rotation_deg: float = 30.0
    scale_jitter: Tuple[float, float] = (0.9, 1.1)
    shift: float = 0.05          #: fraction of the crop side, each axis
    crop: int = 248              #: random crop of the 256 canvas, rescaled to 256
    flip: float = 0.5
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.25


def canonical_matrix(stored_size: int = STORED_SIZE, context: float = CONTEXT,
                     size: int = INPUT_SIZE) -> np.ndarray:
    """Stored margin crop -> the plain ``size`` crop of the face box (no augmentation)."""
    s = size * context / stored_size
    cs, co = (stored_size - 1) / 2.0, (size - 1) / 2.0
    return np.array([[s, 0, co - s * cs], [0, s, co - s * cs]])


def sample_augmentation(rng: np.random.Generator, batch: int, cfg: AugmentConfig = AugmentConfig(),
                        stored_size: int = STORED_SIZE, context: float = CONTEXT,
                        size: int = INPUT_SIZE):
    """Per sample: (A (B, 2, 3) stored crop -> input pixels, flip (B,) bool, colour (B, 3))."""
    A = np.empty((batch, 2, 3))
    flips = rng.random(batch) < cfg.flip
    colour = np.stack([rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, batch),
                       rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, batch),
                       rng.uniform(1 - cfg.saturation, 1 + cfg.saturation, batch)], 1)
    cs, co = (stored_size - 1) / 2.0, (size - 1) / 2.0
    for b in range(batch):
        th = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg))
        s = size * context / stored_size * rng.uniform(*cfg.scale_jitter)
        t = rng.uniform(-cfg.shift, cfg.shift, 2) * size
        R = s * np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
        M = np.concatenate([R, (co + t - R @ [cs, cs])[:, None]], 1)
        if cfg.crop and cfg.crop < size:  # random crop window [o, o + crop) -> [0, size)
            o = rng.uniform(0, size - cfg.crop, 2)
            k = size / cfg.crop
            M = compose([[k, 0, (0.5 - o[0]) * k - 0.5], [0, k, (0.5 - o[1]) * k - 0.5]], M)
        if flips[b]:
            M = compose([[-1, 0, size - 1], [0, 1, 0]], M)
        A[b] = M
    return A, flips, colour


def augment_landmarks(A, flips, landmarks, visible=None):
    """Landmarks (B, n, 2) in stored-crop pixels -> input pixels, flipped ones re-ordered."""
    lm = np.einsum("bij,bnj->bni", A[:, :, :2], np.asarray(landmarks, np.float64)) + A[:, None, :, 2]
    vis = None if visible is None else np.array(visible, dtype=bool, copy=True)
    for b in np.nonzero(flips)[0]:
        if lm.shape[1] != N_LANDMARKS:
            raise ValueError("flip augmentation needs 68 iBUG landmarks")
        lm[b] = lm[b, FLIP_68]
        if vis is not None:
            vis[b] = vis[b, FLIP_68]
    return lm, vis


def flip_label_shift(A, flips, pixel_scale, label_offset_x: float) -> np.ndarray:
    """(B,) x-shifts (input pixels) that keep a labelling convention through a flip: labels that
    sit ``label_offset_x`` original-image pixels to the right of the image content (300-W's sit
    about 1 px right of where a flip-trained network puts them: ``ectfast.nets.engine.landmark_offset``).
    A flip mirrors image and labels alike, which would put a flipped sample's labels that far to
    the *left* of the content: the network then learns the offset with both signs and it averages
    out. Shifting each flipped sample's labels by ``-2 d A[0, 0]`` (d = label_offset_x x the
    crop's ``pixel_scale``; ``A[0, 0]`` = -k cos(theta) for a flipped affine of scale k, rotation
    theta) puts them ``d`` to the right of the content along the augmented image's x axis, as in
    an unflipped sample. Zero for unflipped samples."""
    A = np.asarray(A, np.float64)
    d = float(label_offset_x) * np.asarray(pixel_scale, np.float64)
    return np.where(np.asarray(flips, bool), -2.0 * d * A[:, 0, 0], 0.0)


def affine_theta(A, in_size: int, out_size: int):
    """affine_grid's theta (B, 2, 3) (align_corners=False) for pixel maps A (B, 2, 3) in -> out."""
    A = np.asarray(A, np.float64)
    B = A.shape[0]
    A3 = np.concatenate([A, np.tile([[[0.0, 0.0, 1.0]]], (B, 1, 1))], 1)
    Ai = np.linalg.inv(A3)  # out px -> in px
    D_out = np.array([[out_size / 2, 0, (out_size - 1) / 2], [0, out_size / 2, (out_size - 1) / 2], [0, 0, 1]])
    N_in = np.array([[2 / in_size, 0, 1 / in_size - 1], [0, 2 / in_size, 1 / in_size - 1], [0, 0, 1]])
    return (N_in @ Ai @ D_out)[:, :2]


def warp_torch(images, A, size: int = INPUT_SIZE, colour=None):
    """Batched warp on torch: images (B, 3, S, S) uint8 or float in [0, 1] (any device),
    A (B, 2, 3) numpy; returns float32 (B, 3, size, size) in [0, 1], colour-jittered when
    ``colour`` (B, 3) = (brightness, contrast, saturation) factors is given."""
    import torch
    import torch.nn.functional as F

    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    theta = torch.as_tensor(affine_theta(A, x.shape[-1], size), dtype=torch.float32, device=x.device)
    grid = F.affine_grid(theta, (x.shape[0], 3, size, size), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out if colour is None else colour_jitter(out, colour)


def colour_jitter(x, colour):
    """Brightness, contrast (about each image's mean), saturation (about its grey) factors
    (B, 3) applied to float images (B, 3, H, W) in [0, 1]; clamped to [0, 1]."""
    import torch

    c = torch.as_tensor(np.asarray(colour), dtype=torch.float32, device=x.device)
    out = x * c[:, 0, None, None, None]
    mean = out.mean((1, 2, 3), keepdim=True)
    out = (out - mean) * c[:, 1, None, None, None] + mean
    grey = (out * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    out = (out - grey) * c[:, 2, None, None, None] + grey
    return out.clamp_(0.0, 1.0)


@dataclass
class DegradeConfig:
    occlude: float = 0.5          #: probability of one synthetic occluder per face
    occluder_side: Tuple[float, float] = (0.15, 0.5)  #: occluder sides, fraction of the crop side
    blur: float = 0.2             #: probability of a box blur (3 or 5 px at the 256 frame)
    grey: float = 0.1             #: probability of converting to grey
    noise: float = 0.2            #: probability of Gaussian pixel noise (std 0.01 - 0.05)


def occlude_and_degrade(x, landmarks, visible, rng: np.random.Generator, cfg: DegradeConfig = DegradeConfig()):
    """Synthetic occluders and image degradations on a batch of crops x (B, 3, S, S) float in
    [0, 1] (torch) with landmarks (B, n, 2) in crop pixels: returns (x, visible) where the
    landmarks under an occluder are marked invisible (their target maps become all zero, as the
    paper's invisible points). An occluder is an axis-aligned rectangle over a random landmark,
    filled with a flat random colour plus noise or with a patch of another face of the batch
    (a real texture); then blur, grey and noise, each with its probability."""
    import torch
    import torch.nn.functional as F

    x = x.clone()
    B, _, S, _ = x.shape
    vis = np.ones(landmarks.shape[:2], bool) if visible is None else np.array(visible, dtype=bool, copy=True)
    lm = np.asarray(landmarks, np.float64)
    for b in range(B):
        if rng.random() < cfg.occlude:
            w, h = (rng.uniform(*cfg.occluder_side, 2) * S).astype(int) + 1
            c = lm[b, rng.integers(lm.shape[1])] + rng.normal(0, 0.05 * S, 2)
            x0, y0 = int(np.clip(c[0] - w / 2, 0, S - 1)), int(np.clip(c[1] - h / 2, 0, S - 1))
            x1, y1 = min(S, x0 + w), min(S, y0 + h)
            if rng.random() < 0.5 and B > 1:
                o = (b + 1 + rng.integers(B - 1)) % B
                sx, sy = rng.integers(0, S - (x1 - x0) + 1), rng.integers(0, S - (y1 - y0) + 1)
                x[b, :, y0:y1, x0:x1] = x[o, :, sy:sy + y1 - y0, sx:sx + x1 - x0]
            else:
                col = torch.as_tensor(rng.random(3), dtype=x.dtype, device=x.device)[:, None, None]
                x[b, :, y0:y1, x0:x1] = (col + 0.05 * torch.randn(3, y1 - y0, x1 - x0, dtype=x.dtype,
                                         device=x.device, generator=None)).clamp(0, 1)
            inside = ((lm[b, :, 0] >= x0 - 0.5) & (lm[b, :, 0] <= x1 - 0.5)
                      & (lm[b, :, 1] >= y0 - 0.5) & (lm[b, :, 1] <= y1 - 0.5))
            vis[b] &= ~inside
        if rng.random() < cfg.blur:
            k = int(rng.choice([3, 5]))
            x[b:b + 1] = F.avg_pool2d(x[b:b + 1], k, 1, k // 2, count_include_pad=False)
        if rng.random() < cfg.grey:
            g = (x[b] * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(3, 1, 1)).sum(0)
            x[b] = g[None].expand(3, -1, -1)
        if rng.random() < cfg.noise:
            x[b] = (x[b] + float(rng.uniform(0.01, 0.05)) * torch.randn_like(x[b])).clamp(0, 1)
    return x, vis


# ------------------------------------------------------------------ the data sets


@dataclass
class CropSet:
    """Decoded margin crops: images (N, S, S, 3) uint8 RGB, landmarks (N, n, 2) float32 in
    stored-crop pixels, visible (N, n) bool, names (N,) str, and pixel_scale (N,) float (stored-crop
    pixels per pixel of the face's original image; None where unknown: packed files written
    before it existed)."""
    images: np.ndarray
    landmarks: np.ndarray
    visible: np.ndarray
    names: np.ndarray
    stored_size: int = STORED_SIZE
    context: float = CONTEXT
    pixel_scale: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> "CropSet":
        idx = np.asarray(idx)
        return CropSet(self.images[idx], self.landmarks[idx], self.visible[idx], self.names[idx],
                       self.stored_size, self.context,
                       None if self.pixel_scale is None else self.pixel_scale[idx])


def margin_crop(image, landmarks, stored_size: int = STORED_SIZE, context: float = CONTEXT,
                box_scale: float = BOX_SCALE):
    """(crop (S, S, 3), landmarks in the crop, A) of one face's margin crop."""
    box = box_from_landmarks(landmarks, box_scale)
    crop, A = crop_face(image, box, stored_size, scale=context)
    return crop, transform_points(A, landmarks), A


def _load_one(args):
    image_path, pts_path, stored_size, context = args
    lm = read_pts(pts_path)
    if lm.shape != (N_LANDMARKS, 2):
        raise ValueError(f"{pts_path}: expected {N_LANDMARKS} points, got {lm.shape[0]}")
    crop, lm2, A = margin_crop(np.ascontiguousarray(load_image(image_path)[..., ::-1]), lm, stored_size, context)  # BGR -> RGB
    return crop, lm2.astype(np.float32), float(A[0, 0])


def list_faces(root, subsets: Sequence[str]) -> List[Tuple[str, str]]:
    """(image, pts) pairs of the given subsets under a 300-W root (a subset folder that does
    not exist is an error)."""
    root = os.fspath(root)
    out = []
    for sub in subsets:
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            raise ValueError(f"data: subset folder {folder!r} not found (expected the 300-W layout)")
        out += find_faces(folder)
    return out


def load_crops(root, subsets: Sequence[str] = TRAIN_SUBSETS, stored_size: int = STORED_SIZE,
               context: float = CONTEXT, limit: Optional[int] = None, workers: int = 4,
               progress: bool = False) -> CropSet:
    """Read 300-W-layout faces into a :class:`CropSet` (decoded once, in memory)."""
    faces = list_faces(root, subsets)
    if limit is not None:
        faces = faces[:int(limit)]
    if not faces:
        raise ValueError(f"data: no faces (image + .pts) under {root!r} in {list(subsets)}")
    jobs = [(i, p, stored_size, context) for i, p in faces]
    with ThreadPoolExecutor(max(1, workers)) as ex:
        it = ex.map(_load_one, jobs)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(jobs), desc="decoding faces", unit="face")
        res = list(it)
    names = np.array([os.path.relpath(p, os.fspath(root))[:-4] for _, p in faces])
    return CropSet(np.stack([r[0] for r in res]), np.stack([r[1] for r in res]),
                   np.ones((len(res), N_LANDMARKS), bool), names, stored_size, context,
                   np.array([r[2] for r in res]))


def pack(path, train: CropSet, val: Optional[CropSet] = None, quality: int = 85) -> int:
    """Write crops as JPEG bytes in one .npz (atomic). Returns the file size in bytes."""
    import cv2

    arrays = {"format": np.array(PACK_FORMAT), "version": np.array(PACK_VERSION),
              "stored_size": np.array(train.stored_size), "context": np.array(train.context)}
    for split, cs in (("train", train), ("val", val)):
        if cs is None:
            continue
        blobs = []
        for img in cs.images:
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                                   [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
            if not ok:
                raise ValueError("JPEG encoding failed")
            blobs.append(buf.reshape(-1))
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_jpeg"] = np.concatenate(blobs)
        arrays[f"{split}_landmarks"] = cs.landmarks.astype(np.float32)
        arrays[f"{split}_visible"] = cs.visible.astype(bool)
        arrays[f"{split}_names"] = cs.names.astype(str)
        if cs.pixel_scale is not None:
            arrays[f"{split}_pixel_scale"] = np.asarray(cs.pixel_scale, np.float64)
    path = os.fspath(path)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return os.path.getsize(path)


def _decode_jpeg(buf: np.ndarray) -> np.ndarray:
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError("packed data: a JPEG could not be decoded")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    import torch
    from torchvision.io import decode_jpeg  # the device image has torchvision

    return decode_jpeg(torch.from_numpy(buf.copy())).permute(1, 2, 0).numpy()


def load_packed(path, split: str = "train", workers: int = 8) -> CropSet:
    """Read one split of a packed file back into a :class:`CropSet` (JPEG-decoded with OpenCV,
    or torchvision where OpenCV is missing)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packed data not found: {path!r} (make it with `python -m ectfast.cli.pack`)")
    try:
        z = np.load(path, allow_pickle=False)
        fmt = str(z["format"])
    except Exception as e:
        raise ValueError(f"{path}: not a packed-crops file ({type(e).__name__}: {e})") from None
    if fmt != PACK_FORMAT or int(z["version"]) != PACK_VERSION:
        raise ValueError(f"{path}: format {fmt!r} v{int(z['version'])}, expected {PACK_FORMAT!r} v{PACK_VERSION}")
    if f"{split}_jpeg" not in z.files:
        raise ValueError(f"{path}: no {split!r} split (has {sorted({k.split('_')[0] for k in z.files if k.endswith('_jpeg')})})")
    off, buf = z[f"{split}_offsets"], z[f"{split}_jpeg"]
    with ThreadPoolExecutor(max(1, workers)) as ex:
        imgs = list(ex.map(lambda i: _decode_jpeg(buf[off[i]:off[i + 1]]), range(len(off) - 1)))
    return CropSet(np.stack(imgs), z[f"{split}_landmarks"], z[f"{split}_visible"], z[f"{split}_names"],
                   int(z["stored_size"]), float(z["context"]),
                   z[f"{split}_pixel_scale"] if f"{split}_pixel_scale" in z.files else None)
