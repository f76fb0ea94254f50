"""Training the estimation networks on 300-W (``ectfast train``; DESIGN.md "FCN" and
"Estimation network sized for CPU").

Architectures (``--arch``, ``ectfast.nets.model``): ``lite`` (default, 128 x 128 in, 32 x 32
maps), ``lite64`` (``lite`` + a 64-px refinement head, 64 x 64 maps; ``--init`` with trained
``lite`` weights starts it as that network), ``lite-hr`` (``lite`` reading the 256 x 256 crop
itself through a high-resolution stem branch; train it on ``--stored-size 352`` crops, which
keep the 256 frame's resolution) and ``paper`` (the 93 GFLOP FCN). Landmarks and
targets live in the fit's 256 frame: training crops are warped at 256 (``warp_torch``) and
averaged 2 x 2 to the lite net's 128 input, exactly as the detector resizes its 256 crops;
every network output gets a target at its own resolution (``data.target_maps_torch``: sigma 6
px of the 256 frame, the 256 target's peak 1.064).

Loss (``--loss``, :mod:`ectfast.nets.losses`): L2 per output for ``paper`` (the paper's), Adaptive Wing (foreground-weighted)
for ``lite``, summed over the outputs (intermediate supervision). AdamW with a linear warm-up
(first 3 % of the steps) then a cosine decay to 1 % of the peak learning rate; gradient-norm
clipping. ``--minutes N`` sizes the schedule from the measured speed and re-plans it at every
validation so that the run ends inside N minutes even when the machine slows down. An
exponential moving average of the weights and BatchNorm statistics (``--ema``, default decay
0.998, ramped up as (1 + n) / (10 + n)) is what is validated, kept and exported (held-out NME
3.30 % against 3.41 % for a run without it, which also had fewer steps: 2533 against 3878;
bench/RESULTS.md).

Augmentation: the paper's (flip with the 68-point mirror, random 248 crop, rotation +-30 deg),
face-box jitter (shift +-8 %, scale 0.88-1.12, the face detector's box noise), colour; then
(``data.occlude_and_degrade``) synthetic occluders whose covered landmarks get all-zero targets
(Eq. 15's confidence learns occlusion), blur, grey and noise. ``--label-offset-x PX``: the
labels sit PX original-image pixels right of the image content (300-W: ~1, measured); each
flipped sample's labels are shifted (``data.flip_label_shift``) so that the flip keeps that
convention instead of teaching it with the opposite sign (bench/RESULTS.md, "landmark offset").

Measured on the 2-core AVX2 CPU of this project (1 torch thread): bf16 autocast is 5-9x
*slower* than fp32 there (no native bf16), channels_last is 1.4x faster; so CPU training
uses fp32 + channels_last (``--amp auto``), bf16 on CUDA.

Determinism and exact resume: the data order of epoch e is a permutation drawn from
(seed, e); the augmentation of step k from (seed, k). A checkpoint (``OUT/last.pt``: model,
optimizer, scheduler, grad scaler, RNG states, step, epoch, best NME, history, config) is written
atomically every ``--ckpt-every`` steps, when ``--max-minutes`` is reached and at the end, so a
run stopped by a time limit resumes with ``--resume`` at the same step with the same batches
(bit-identical on CPU; on CUDA up to cuDNN's non-determinism).
(:mod:`ectfast.nets.checkpoint`: atomic writes, RNG states.)

``OUT/light.pt`` is the shipped-weights format (fp16, checksum, ``ectfast.nets.model.read_weights``)
plus the training position: small enough (about 20 MB) to carry between machines. Resuming from
it alone (no ``last.pt``) is a *warm* resume: same step, data order and schedule, but fresh
optimizer moments and fp16-rounded weights.

Validation: every ``--val-every`` steps (default: each epoch), NME (inter-ocular: outer eye
corners 36 and 45) of the sub-pixel peaks (``ectfast.core.peaks``, DARK) of the final maps on
``--holdout`` training faces held out of training (default 150; the LFPW test faces are never
seen: ``--holdout 0`` validates on lfpw/testset as before), face boxes from the landmarks. The best model goes to
``OUT/best.pt``; ``--export-weights FILE`` writes it (or the last model when no validation ran)
as the shipped fp16 weights.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ectfast.nets import data as D
from ectfast.io.datasets import TRAIN_SUBSETS, VALIDATION_SUBSETS
from ectfast.nets import model as netmod
from ectfast.nets.model import count_parameters, read_weights, save_weights
from ectfast.core import metrics
from ectfast.nets.checkpoint import CKPT_FORMAT, atomic_save, rng_states, set_rng_states
from ectfast.nets.losses import DEFAULT_LOSS, LOSSES, heatmap_loss
from ectfast.core.peaks import subpixel_peaks

#: settings that fix the run's data order and schedule: a resume must keep them
RUN_KEYS = ("arch", "loss", "epochs", "batch_size", "lr", "weight_decay", "seed", "input_size", "warmup",
            "n_train", "holdout", "ema", "label_offset_x")
DEFAULTS = dict(arch="lite", loss=None, epochs=60, batch_size=32, lr=2e-3, weight_decay=1e-4, seed=0,
                input_size=None, warmup=0.03, clip=5.0, holdout=150, ema=0.998, stored_size=D.STORED_SIZE,
                label_offset_x=0.0)
FRAME = D.INPUT_SIZE  # the fit's frame: landmarks and targets are placed in the 256 crop


def _lr_lambda(total: int, warmup: float):
    w = max(1, int(round(warmup * total)))

    def f(step):
        if step < w:
            return (step + 1) / w
        t = min(1.0, (step - w) / max(1, total - w))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return f


def ema_avg_fn(decay: float):
    """The weight average of ``AveragedModel``: an exponential moving average whose decay ramps
    up as min(decay, (1 + n) / (10 + n)) after n updates, so that the early, poor weights fade
    quickly; integer buffers (BatchNorm's batch count) follow the model."""

    def avg(averaged, current, n):
        if not averaged.is_floating_point():
            return current
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        return averaged + (current - averaged) * (1.0 - d)

    return avg


class Trainer:
    """One training run (see the module docstring). ``train()`` is the function to call."""

    def __init__(self, train_set: D.CropSet, val_set: Optional[D.CropSet], out: str, *, arch, loss, epochs,
                 batch_size, lr, weight_decay, seed, input_size, warmup, clip, device, amp, channels_last,
                 compile_model, ckpt_every, val_every, log_every, progress, augment, data_desc, holdout=0,
                 ema=0.0, total_steps=None, label_offset_x=0.0):
        native = netmod.input_size(arch)
        if not (np.isfinite(label_offset_x) and abs(label_offset_x) <= 8):
            raise ValueError(f"label_offset_x: expected image pixels in [-8, 8], got {label_offset_x!r}")
        if label_offset_x and augment and train_set.pixel_scale is None:
            raise ValueError("label_offset_x: needs the crops' pixel scale (crops read with --data, or packed "
                             "by `python -m ectfast.cli.pack` since the scale was added)")
        input_size = native if input_size is None else int(input_size)
        if len(train_set) < batch_size:
            raise ValueError(f"batch_size: {batch_size} is larger than the training set ({len(train_set)} faces)")
        if input_size % 8 or input_size < 16:
            raise ValueError(f"input_size: expected a multiple of 8 >= 16, got {input_size}")
        loss = DEFAULT_LOSS[arch] if loss is None else loss
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        self.out = os.fspath(out)
        os.makedirs(self.out, exist_ok=True)
        self.cfg = dict(arch=arch, loss=loss, epochs=int(epochs), batch_size=int(batch_size), lr=float(lr),
                        weight_decay=float(weight_decay), seed=int(seed), input_size=input_size,
                        warmup=float(warmup), clip=float(clip) if clip else 0.0, n_train=len(train_set),
                        holdout=int(holdout), ema=float(ema), label_offset_x=float(label_offset_x),
                        stored_size=train_set.stored_size,
                        context=train_set.context,
                        augment=bool(augment), data=data_desc)
        #: the crop the landmarks and targets live in: 256 at the native input size (the fit's frame)
        self.frame = input_size * FRAME // native
        self.device = torch.device(device)
        self.amp = amp
        self.channels_last = channels_last
        self.ckpt_every, self.log_every = ckpt_every, log_every
        self.progress = progress is True  # True: tqdm bar; "lines": one line per log record; False: silent
        self.verbose = progress == "lines"
        self.steps_per_epoch = len(train_set) // batch_size
        self.cfg["total_steps"] = int(total_steps) if total_steps else self.cfg["epochs"] * self.steps_per_epoch
        self.val_every = val_every or self.steps_per_epoch
        self.augment_cfg = D.AugmentConfig(shift=0.08, scale_jitter=(0.88, 1.12)) if augment else None

        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        self.model = netmod.build(arch).to(self.device)
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.fwd = torch.compile(self.model) if compile_model else self.model
        #: the exponential moving average of the weights (and BatchNorm statistics): what is
        #: validated, kept as best.pt and exported; None with ema = 0
        self.ema = None
        if self.cfg["ema"]:
            self.ema = torch.optim.swa_utils.AveragedModel(self.model, avg_fn=ema_avg_fn(self.cfg["ema"]),
                                                           use_buffers=True)
        decay = [p for n, p in self.model.named_parameters() if p.ndim > 1]
        no_decay = [p for n, p in self.model.named_parameters() if p.ndim <= 1]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg["weight_decay"]},
                                      {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg["lr"],
                                     betas=(0.9, 0.999))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, self._lr_factor)
        self.scaler = torch.amp.GradScaler("cuda", enabled=(amp == "fp16"))
        self.step, self.best_nme, self.history = 0, float("inf"), []

        self.train_set, self.val_set = train_set, val_set
        self.images = torch.from_numpy(train_set.images).permute(0, 3, 1, 2).contiguous().to(self.device)
        self._perm_epoch, self._perm = -1, None

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and shipped: the moving average when there is one."""
        return self.model if self.ema is None else self.ema.module

    @property
    def total_steps(self) -> int:
        return self.cfg["total_steps"]

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine to 1 % of the peak over ``total_steps`` (read at each step,
        so that a time budget can fix the run's length after its first steps)."""
        return _lr_lambda(self.total_steps, self.cfg["warmup"])(step)

    # -------------------------------------------------------------- state
    def state(self) -> dict:
        return {"format": CKPT_FORMAT, "version": 1, "model": self.model.state_dict(),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(), "rng": rng_states(), "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "best_nme": self.best_nme,
                "history": self.history, "config": self.cfg,
                "ema": None if self.ema is None else self.ema.state_dict()}

    def save(self) -> None:
        atomic_save(self.state(), os.path.join(self.out, "last.pt"))
        save_weights(self.eval_model, os.path.join(self.out, "light.pt"), meta=self._position())

    def _position(self) -> dict:
        return {"train_state": {"step": self.step, "best_nme": self.best_nme, "config": self.cfg,
                                "history": self.history[-200:]}}

    def _check_config(self, saved: dict, source: str) -> None:
        for k in RUN_KEYS:
            if k in saved and saved[k] != self.cfg[k]:
                raise ValueError(f"resume: {k} = {self.cfg[k]!r} differs from {saved[k]!r} in {source}; "
                                 "keep the run's settings or start a new --out")

    def _restore_length(self, saved: dict) -> None:
        """A resumed run keeps the length (and so the LR schedule) its time budget fixed."""
        for k in ("total_steps", "epochs"):
            if k in saved:
                self.cfg[k] = saved[k]

    def load(self, path) -> None:
        """Exact resume from a full checkpoint."""
        ck = torch.load(path, map_location=self.device, weights_only=False)
        if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
            raise ValueError(f"{path}: not an ectfast FCN checkpoint")
        self._check_config(ck["config"], path)
        self._restore_length(ck["config"])
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        set_rng_states(ck["rng"])
        if self.ema is not None and ck.get("ema") is not None:
            self.ema.load_state_dict(ck["ema"])
        elif self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step, self.best_nme, self.history = ck["step"], ck["best_nme"], ck["history"]

    def init_from(self, path) -> int:
        """Initialise a fresh run from a weights file (``--init``): every tensor whose name and
        shape match the network's is copied (a ``lite`` network into ``lite64`` or ``lite-hr``); the rest keep
        their initialisation. Returns the number of tensors copied."""
        blob = read_weights(path)
        own = self.model.state_dict()
        sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()
              if k in own and own[k].shape == v.shape}
        params = dict(self.model.named_parameters())
        if not any(k in params for k in sd):  # the normalisation buffers alone do not count
            raise ValueError(f"init: {path} shares no tensor with the {self.cfg['arch']} network")
        self.model.load_state_dict(sd, strict=False)
        self.cfg["init"] = {"file": os.path.basename(os.fspath(path)), "sha256": blob["sha256"],
                            "arch": blob["arch"], "tensors": len(sd), "of": len(own)}
        return len(sd)

    def load_light(self, path) -> None:
        """Warm resume from a light checkpoint (weights + position, no optimizer moments)."""
        blob = read_weights(path)
        ts = blob.get("meta", {}).get("train_state")
        if not ts:
            raise ValueError(f"{path}: weights without a training position; cannot resume from it")
        self._check_config(ts["config"], path)
        self._restore_length(ts["config"])
        sd = {k: v.float() if v.is_floating_point() else v for k, v in blob["state_dict"].items()}
        self.model.load_state_dict(sd, strict=False)
        if self.ema is not None:  # the light weights are the average: restart it from them
            self.ema.update_parameters(self.model)
        self.step, self.best_nme, self.history = ts["step"], ts["best_nme"], list(ts["history"])
        if not os.path.isfile(os.path.join(self.out, "best.pt")):
            # a cold machine: the best model of earlier calls is not here, so track the best of
            # this call (else a validation worse than the carried best never writes best.pt and
            # --export-weights falls back to the last model without its NME)
            self.best_nme = float("inf")
        with warnings.catch_warnings():  # the schedule's position (no optimizer step taken)
            warnings.simplefilter("ignore")
            for _ in range(self.step):
                self.sched.step()

    # -------------------------------------------------------------- data
    def batch(self, step: int):
        """(x (B, 3, S, S) float, [target per network output], landmarks (B, n, 2) in the frame,
        visible) of a global step: fixed by (seed, step)."""
        B, seed = self.cfg["batch_size"], self.cfg["seed"]
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([seed, 1, epoch]).permutation(len(self.train_set))
            self._perm_epoch = epoch
        idx = np.sort(self._perm[k * B:(k + 1) * B])
        ts = self.train_set
        frame = self.frame
        rng = np.random.default_rng([seed, 2, step])
        if self.augment_cfg is not None:
            A, flips, colour = D.sample_augmentation(rng, B, self.augment_cfg, ts.stored_size, ts.context, frame)
        else:
            A = np.repeat(D.canonical_matrix(ts.stored_size, ts.context, frame)[None], B, 0)
            flips, colour = np.zeros(B, bool), None
        x = D.warp_torch(self.images[torch.as_tensor(idx, device=self.device)], A, frame, colour)
        lm, vis = D.augment_landmarks(A, flips, ts.landmarks[idx], ts.visible[idx])
        if self.cfg["label_offset_x"] and self.augment_cfg is not None:  # the labels' convention survives flips
            lm[:, :, 0] += D.flip_label_shift(A, flips, ts.pixel_scale[idx], self.cfg["label_offset_x"])[:, None]
        if self.augment_cfg is not None:
            x, vis = D.occlude_and_degrade(x, lm, vis, rng)
        return self._input(x), lm, vis

    def targets(self, outputs, lm, vis):
        """One target per network output, at that output's resolution, in the frame."""
        lm_t = torch.as_tensor(lm, dtype=torch.float32, device=self.device)
        vis_t = torch.as_tensor(vis, device=self.device)
        return [D.target_maps_torch(lm_t, vis_t, o.shape[-1], self.frame) for o in outputs]

    def _input(self, x):
        """Frame crops -> the network's input size (2x2 averaging for the lite net, as the
        detector's INTER_AREA resize of its 256 crops)."""
        f = self.frame // self.cfg["input_size"]
        return F.avg_pool2d(x, f) if f > 1 else x

    def _autocast(self):
        if self.amp in ("bf16", "fp16"):
            return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.amp == "bf16" else torch.float16)
        return torch.autocast(self.device.type, enabled=False)

    def _prep(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -------------------------------------------------------------- steps
    def loss(self, x, lm, vis):
        with self._autocast():
            outs = self.fwd(self._prep(x))
        outs = [o.float() for o in outs]
        tgts = self.targets(outs, lm, vis)
        parts = [heatmap_loss(self.cfg["loss"], o, t) for o, t in zip(outs, tgts)]
        return sum(parts), parts

    def train_step(self):
        self.model.train()
        x, lm, vis = self.batch(self.step)
        loss, parts = self.loss(x, lm, vis)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg["clip"]:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["clip"])
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        return loss.detach(), [p.detach() for p in parts]

    @torch.no_grad()
    def predict(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """Sub-pixel peaks (B, n, 2) in the frame of the final maps of stored crops (N, S, S, 3)
        cut canonically (no augmentation)."""
        model = self.eval_model.eval()
        vs = self.val_set
        A1 = D.canonical_matrix(vs.stored_size, vs.context, self.frame)
        preds = []
        for i in range(0, len(images), batch_size):
            imgs = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).to(self.device)
            x = self._input(D.warp_torch(imgs, np.repeat(A1[None], len(imgs), 0), self.frame))
            with self._autocast():
                maps = model(self._prep(x))[1].float().cpu().numpy()
            preds.append(subpixel_peaks(maps, self.frame / maps.shape[-1]))
        return np.concatenate(preds)

    def validate(self, batch_size: int = 32) -> float:
        """Mean NME (inter-ocular) of the sub-pixel peaks of the final maps on the validation set."""
        vs = self.val_set
        if vs is None or len(vs) == 0:
            return float("nan")
        gt = D.transform_points(D.canonical_matrix(vs.stored_size, vs.context, self.frame), vs.landmarks)
        return float(metrics.nme(self.predict(vs.images, batch_size), gt, "inter-ocular").mean())

    # -------------------------------------------------------------- the loop
    def plan(self, deadline: float, per_step: float, per_val: float) -> None:
        """Size the run (``total_steps``, hence the cosine LR schedule) so that it ends by
        ``deadline`` (time.monotonic()) at the measured speed, with a 5 % margin. Called after a
        short timing at the start and again at every validation, so that a machine that gets
        slower or faster (other processes on the same cores) still ends its schedule in time."""
        left = deadline - time.monotonic() - 2 * per_val
        steps = self.step + max(1, int(0.95 * left / (per_step + per_val / self.val_every)))
        self.cfg.update(total_steps=steps, epochs=math.ceil(steps / self.steps_per_epoch))

    def _time_steps(self, n: int) -> float:
        t = time.monotonic()
        for _ in range(n):
            self.train_step()
        return (time.monotonic() - t) / n

    def run(self, max_minutes=None, max_steps=None, t0=None, minutes=None) -> dict:
        t0 = time.monotonic() if t0 is None else t0
        deadline = None
        if minutes is not None:  # this call's time budget: time a few steps, then plan the schedule
            deadline = t0 + 60 * float(minutes)
            max_minutes = minutes if max_minutes is None else min(minutes, max_minutes)
            per_step = self._time_steps(min(20, max(1, self.total_steps - self.step)))
            tv = time.monotonic()
            self.validate()
            per_val = time.monotonic() - tv
            self.plan(deadline, per_step, per_val)
            print(f"time budget {minutes} min: {per_step:.2f} s/step, {per_val:.1f} s/validation -> "
                  f"{self.total_steps} steps ({self.total_steps / self.steps_per_epoch:.1f} epochs), "
                  "re-planned at every validation", file=sys.stderr, flush=True)
            t_plan, s_plan = time.monotonic(), self.step
        stop_at = self.total_steps if max_steps is None else min(self.total_steps, int(max_steps))
        log_path = os.path.join(self.out, "log.jsonl")
        B = self.cfg["batch_size"]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, unit="step", dynamic_ncols=True,
                       desc=f"FCN epoch {self.step // self.steps_per_epoch}")
        reason = "done" if self.step >= stop_at else None
        t_log, n_log = time.monotonic(), 0
        last = {}
        while self.step < stop_at:
            loss, parts = self.train_step()
            n_log += 1
            timed_out = max_minutes is not None and time.monotonic() - t0 > 60 * max_minutes
            if self.step % self.log_every == 0 or self.step == stop_at or timed_out:
                now = time.monotonic()
                last = self._log_step(loss, parts, n_log * B / max(now - t_log, 1e-9), log_path, bar)
                t_log, n_log = now, 0
            if bar is not None:
                bar.update(1)
                bar.set_description(f"FCN epoch {self.step // self.steps_per_epoch}")
            if self.step % self.val_every == 0 or self.step == self.total_steps:
                tv = time.monotonic()
                nme = self.validate()
                if deadline is not None and self.step < self.total_steps:
                    now = time.monotonic()
                    self.plan(deadline, (tv - t_plan) / max(1, self.step - s_plan), now - tv)
                    t_plan, s_plan = now, self.step
                    stop_at = self.total_steps if max_steps is None else min(self.total_steps, int(max_steps))
                    if bar is not None:
                        bar.total = self.total_steps
                if math.isfinite(nme):
                    self._log_validation(nme, loss, log_path, bar)
            if timed_out:
                reason = "max-minutes"
                break
            if self.ckpt_every and self.step % self.ckpt_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        if reason is None:
            reason = "done" if self.step >= self.total_steps else "max-steps"
        self.save()
        return {"step": self.step, "total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch,
                "stopped": reason, "best_nme": self.best_nme, "last": last,
                "checkpoint": os.path.join(self.out, "last.pt")}

    def _log_step(self, loss, parts, ips: float, log_path: str, bar) -> dict:
        """One training log record: to the history, OUT/log.jsonl and the bar (or a line)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        last = {"step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": float(loss),
                "parts": [float(p) for p in parts], "lr": self.sched.get_last_lr()[0], "img_per_s": ips}
        if not math.isfinite(last["loss"]):
            raise FloatingPointError(f"training diverged at step {self.step}: loss {last['loss']}")
        self.history.append(last)
        with open(log_path, "a") as f:
            f.write(json.dumps(last) + "\n")
        if bar is not None:
            bar.set_postfix(loss=f"{last['loss']:.5f}", img_s=f"{ips:.0f}")
        elif self.verbose:
            print(f"step {self.step}/{self.total_steps} epoch {last['epoch']:.2f} loss {last['loss']:.5f} "
                  f"(outputs {' '.join(f'{p:.5f}' for p in last['parts'])}) "
                  f"lr {last['lr']:.2e} {ips:.0f} img/s", file=sys.stderr, flush=True)
        return last

    def _log_validation(self, nme: float, loss, log_path: str, bar) -> None:
        """One validation record; the best model so far goes to OUT/best.pt."""
        rec = {"step": self.step, "val_nme": nme}
        self.history.append(rec)
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        msg = f"step {self.step}: validation NME (inter-ocular, sub-pixel peaks) {nme:.4f}"
        if bar is not None:
            bar.write(msg)
            bar.set_postfix(loss=f"{float(loss):.5f}", val_nme=f"{nme:.4f}")
        elif self.verbose:
            print(msg, file=sys.stderr, flush=True)
        if nme < self.best_nme:
            self.best_nme = nme
            atomic_save({"model": self.eval_model.state_dict(), "step": self.step, "val_nme": nme,
                         "config": self.cfg}, os.path.join(self.out, "best.pt"))

    def export(self, path) -> str:
        best = os.path.join(self.out, "best.pt")
        meta = {"arch": self.cfg["arch"], "loss": self.cfg["loss"], "n_train": self.cfg["n_train"],
                "holdout": self.cfg["holdout"], "epochs": self.cfg["epochs"], "step": self.step,
                "total_steps": self.total_steps, "input_size": self.cfg["input_size"],
                "data": self.cfg["data"], "label_offset_x": self.cfg["label_offset_x"]}
        if os.path.isfile(best):
            ck = torch.load(best, map_location="cpu", weights_only=False)
            meta.update(val_nme_interocular_subpixel=ck["val_nme"], best_step=ck["step"])
            return save_weights(ck["model"], path, meta=meta)
        return save_weights(self.eval_model, path, meta=meta)


def _resolve(value, key, saved_cfg):
    if value is not None:
        return value
    if saved_cfg and key in saved_cfg:
        return saved_cfg[key]
    return DEFAULTS[key]


def _saved_config(out: str):
    last, light = os.path.join(out, "last.pt"), os.path.join(out, "light.pt")
    if os.path.isfile(last):
        return torch.load(last, map_location="cpu", weights_only=False)["config"], last, "full"
    if os.path.isfile(light):
        return read_weights(light)["meta"]["train_state"]["config"], light, "light"
    return None, None, None


def split_holdout(cs: D.CropSet, n: int, seed: int):
    """(training part, held-out part) of a CropSet: ``n`` faces drawn by ``seed``."""
    if not 0 <= n < len(cs):
        raise ValueError(f"holdout: expected 0 <= holdout < {len(cs)} (the training faces), got {n}")
    perm = np.random.default_rng([seed, 3]).permutation(len(cs))
    return cs.subset(np.sort(perm[n:])), cs.subset(np.sort(perm[:n]))


def train(data=None, out="runs/fcn", *, arch=None, loss=None, holdout=None, minutes=None, threads=None,
          packed=None, epochs=None, batch_size=None, lr=None,
          weight_decay=None, seed=None, input_size=None, warmup=None, clip=None, ema=None, max_minutes=None,
          max_steps=None, resume=False, device=None, amp="auto", channels_last="auto", label_offset_x=None,
          compile_model=False, ckpt_every=500, val_every=None, log_every=10, limit=None,
          augment=True, progress=True, export_weights=None, workers=4, init=None, stored_size=None,
          train_set: Optional[D.CropSet] = None, val_set: Optional[D.CropSet] = None) -> dict:
    """Train (or resume) the FCN; returns a summary dict. Data: ``packed`` (a file from
    ``python -m ectfast.cli.pack``), else ``data`` (a 300-W root: TRAIN_SUBSETS for training,
    lfpw/testset for validation), else ``train_set``/``val_set`` CropSets. Settings left None
    come from the checkpoint when resuming, else DEFAULTS. ``init``: a weights file whose matching
    tensors start a fresh run (:meth:`Trainer.init_from`)."""
    t0 = time.monotonic()
    out = os.fspath(out)
    saved_cfg, src, kind = _saved_config(out) if resume else (None, None, None)
    if not resume and os.path.isfile(os.path.join(out, "last.pt")):
        raise ValueError(f"out: {out!r} already holds a checkpoint; pass resume=True (--resume) or another --out")
    cfg = {k: _resolve(v, k, saved_cfg) for k, v in dict(
        arch=arch, loss=loss, holdout=holdout, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed, input_size=input_size, warmup=warmup, clip=clip, ema=ema,
        label_offset_x=label_offset_x).items()}
    stored_size = int(_resolve(stored_size, "stored_size", saved_cfg))  # of the crops read from ``data``
    if not 0.0 <= float(cfg["ema"]) < 1.0:
        raise ValueError(f"ema: expected a decay in [0, 1) (0 = no moving average), got {cfg['ema']!r}")
    if saved_cfg and saved_cfg.get("total_steps"):
        cfg["total_steps"] = saved_cfg["total_steps"]
    if threads is not None:
        if int(threads) < 1:
            raise ValueError(f"threads: expected >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if amp == "auto":
        amp = "bf16" if dev.type == "cuda" else "none"
    if amp not in ("bf16", "fp16", "none"):
        raise ValueError(f"amp: expected 'auto', 'bf16', 'fp16' or 'none', got {amp!r}")
    if channels_last == "auto":  # measured faster on CPU too (fp32; bf16 autocast is slower on AVX2-only CPUs)
        channels_last = True

    if train_set is not None:
        desc = "in-memory"
    elif packed is not None:
        train_set = D.load_packed(packed, "train", workers)
        try:
            val_set = D.load_packed(packed, "val", workers)
        except ValueError:
            val_set = None
        desc = f"packed:{os.path.basename(os.fspath(packed))}"
    elif data is not None:
        train_set = D.load_crops(data, TRAIN_SUBSETS, stored_size, limit=limit, workers=workers, progress=progress)
        try:
            val_set = D.load_crops(data, VALIDATION_SUBSETS, stored_size, limit=limit, workers=workers,
                                   progress=progress)
        except ValueError:
            val_set = None
        desc = f"folder:{os.path.basename(os.path.normpath(os.fspath(data)))}"
    else:
        raise ValueError("data: give a 300-W folder (--data) or a packed file (--packed)")
    if limit is not None and (packed is not None):
        train_set = train_set.subset(np.arange(min(limit, len(train_set))))
        if val_set is not None:
            val_set = val_set.subset(np.arange(min(limit, len(val_set))))
    if cfg["holdout"]:  # validate on training faces held out of training, never on the test faces
        train_set, val_set = split_holdout(train_set, int(cfg["holdout"]), int(cfg["seed"]))

    trainer = Trainer(train_set, val_set, out, **cfg, device=dev, amp=amp, channels_last=channels_last,
                      compile_model=compile_model, ckpt_every=ckpt_every, val_every=val_every,
                      log_every=log_every, progress=progress, augment=augment, data_desc=desc)
    if kind == "full":
        trainer.load(src)
        print(f"resumed exactly from {src} at step {trainer.step}/{trainer.total_steps}", file=sys.stderr)
    elif kind == "light":
        trainer.load_light(src)
        print(f"warm resume from {src} at step {trainer.step}/{trainer.total_steps} "
              "(weights only: optimizer moments restart)", file=sys.stderr)
    elif resume:
        print(f"no checkpoint in {out}: starting a new run", file=sys.stderr)
    if saved_cfg and saved_cfg.get("init"):
        trainer.cfg["init"] = saved_cfg["init"]
    if init is not None and kind is None:  # a fresh run only: a resume carries its own weights
        n = trainer.init_from(init)
        print(f"initialised {n} of {len(trainer.model.state_dict())} tensors from {init}", file=sys.stderr)
    if progress:
        print(f"FCN {count_parameters(trainer.model) / 1e6:.2f} M parameters; {len(train_set)} training faces, "
              f"{0 if val_set is None else len(val_set)} validation; {trainer.steps_per_epoch} steps/epoch, "
              f"{trainer.total_steps} steps; device {dev}, amp {amp}, channels_last {channels_last}",
              file=sys.stderr)
    summary = trainer.run(max_minutes=max_minutes, max_steps=max_steps, t0=t0, minutes=minutes)
    if export_weights:
        summary["weights_sha256"] = trainer.export(export_weights)
        summary["weights"] = os.fspath(export_weights)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=float)
    return summary
