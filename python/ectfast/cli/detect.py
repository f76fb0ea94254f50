"""``ectfast detect``: faces and 68 landmarks in image files and folders, in bulk.

Crops are batched through the network and the fit (:class:`ectfast.app.detector.Detector`),
results are written as each batch finishes (atomically; a rerun skips what is done), one line
names each failed image, and a summary ends the run; ``--help`` (EPILOG below) has the outputs,
resuming and exit statuses.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import List, Optional, Sequence

from ectfast.app.detector import Detector, ImageResult
from ectfast.app.draw import draw_faces
from ectfast.assets import asset
from ectfast.cli._argtypes import device_arg, megapixels, positive_int, unit_float
from ectfast.core.fit import METHODS
from ectfast.io.images import _STDERR_LOCK, IMAGE_EXTENSIONS, MAX_PIXELS
from ectfast.nets import engine as E

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_INTERRUPTED = 130
EXAMPLE_IMAGE = asset("einstein.jpg")
EXAMPLE_OUT = "ectfast-example"
DEFAULT_OUT = "ectfast-detect"

EPILOG = f"""\
outputs:
  For each image, NAME.json (image size, engine, method, threshold, and per face: crop box,
  detector score, eye-line angle, 68 landmarks in the file's pixels, confidences, visibility)
  next to NAME_landmarks.EXT (the image with boxes and landmarks drawn; --no-draw skips it), in
  --out DIR. Images found in a folder keep their sub-folders under DIR. With --jsonl FILE, one
  JSON object per line goes to FILE (or stdout for '-') instead of the per-image JSON files
  (annotated images then only with --out). Files are written as each batch finishes, atomically,
  so a crash or Ctrl-C loses nothing already written; a rerun of the same command skips the
  images already done (--overwrite redoes them). An image without a face is a result: its JSON
  has "faces": [].

bad input:
  An unreadable, empty, truncated or corrupt file, a non-image, an image over --max-megapixels
  (large JPEGs are decoded reduced instead) gets one line 'ectfast detect: PATH: reason' on
  stderr and the rest goes on. A summary line ends the run.

exit status:
  {EXIT_OK}    every image was processed (with or without faces)
  {EXIT_FAILED}    some images could not be processed (each named on stderr); the others were written
  {EXIT_USAGE}    usage or setup error: bad option, no input images, no network weights, engine or
       device not available (e.g. --device cuda without CUDA)
  {EXIT_OUTPUT}    the output cannot be written (folder not creatable/writable, disk full): stops at once
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C); what was written is kept, rerun to continue
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("images", nargs="*", metavar="PATH",
                   help="image files, or folders searched recursively for "
                        f"{', '.join(e[1:] for e in IMAGE_EXTENSIONS[:6])}, ... files")
    p.add_argument("--example", action="store_true",
                   help="run on the photograph shipped with ectfast (einstein.jpg: two faces), "
                        f"writing to --out (default {EXAMPLE_OUT}/)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"folder for NAME.json and NAME_landmarks.EXT (default: {DEFAULT_OUT}/)")
    p.add_argument("--jsonl", default=None, metavar="FILE",
                   help="write one JSON line per image to FILE ('-': stdout) instead of NAME.json files")
    p.add_argument("--no-draw", action="store_true", help="do not write the annotated images")
    p.add_argument("--overwrite", action="store_true", help="redo images already done by an earlier run")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # always on now; kept for old scripts
    p.add_argument("--weights", default=None, metavar="PATH",
                   help="the network: a .onnx (ectfast export-onnx) or .pt file (default: the shipped one)")
    p.add_argument("--engine", default="auto", choices=E.ENGINES,
                   help="inference engine: auto (ONNX Runtime on CPU when an ONNX file is there, "
                        "measured faster; else PyTorch), onnxruntime, torch (default: auto)")
    p.add_argument("--device", default="auto", type=device_arg,
                   help="where the network runs: auto, cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="the engine's CPU threads (default: its own)")
    p.add_argument("--face-detector", default="auto", metavar="NAME",
                   help="auto (BlazeFace, falling back to Haar), blazeface-short, blazeface-full, haar, "
                        "dlib-hog (default: auto)")
    p.add_argument("--no-align", action="store_true", help="do not rotate crops by the detector's eye line")
    p.add_argument("--precision", default=E.DEFAULT_PRECISION, choices=E.PRECISIONS,
                   help="the network's precision: fp32, or int8 (the shipped int8 ONNX file on ONNX Runtime: "
                        "as accurate as fp32, faster only on CPUs with VNNI; default: %(default)s)")
    p.add_argument("--flip", action="store_true",
                   help="test-time flip: the network also runs on the mirrored crops (twice its time; no lower error measured with the shipped network)")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "cpu", "cuda"),
                   help="ectfast.fit backend (default: auto)")
    p.add_argument("--method", default="ect", choices=METHODS, help="fitting method (default: ect)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="faces per network/fit batch (default: 16)")
    p.add_argument("--workers", type=positive_int, default=2,
                   help="threads reading and searching images ahead of the network (default: 2)")
    p.add_argument("--threshold", type=unit_float, default=None,
                   help="visibility threshold tau in [0, 1] on the landmark confidence (default: the "
                        "network's own, stored with its weights, else 0.5)")
    p.add_argument("--max-megapixels", type=megapixels, default=MAX_PIXELS / 1e6,
                   help="largest image decoded in full; larger JPEGs are decoded at 1/2, 1/4 or 1/8, "
                        "other formats refused (default: %(default)g)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-q", "--quiet", action="store_true", help="no line per finished image on stdout")
    p.epilog = EPILOG


class _Reporter:
    """stdout/stderr lines that keep the progress bar intact, all through the lock that the
    image decoder takes while it captures the C libraries' stderr."""

    class _Locked:
        def __init__(self, stream):
            self.stream = stream

        def write(self, s):
            with _STDERR_LOCK:
                n = self.stream.write(s)
                self.stream.flush()
                return n

        def flush(self):
            with _STDERR_LOCK:
                self.stream.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)

    def __init__(self, total: int, progress: bool):
        self.err_stream = self._Locked(sys.stderr)
        self.stdout_closed = False
        self.bar = None
        if progress and total > 1:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="img", file=self.err_stream, dynamic_ncols=True,
                            disable=None, desc="detect")

    def _write(self, msg, stream):
        with _STDERR_LOCK:
            if self.bar is not None and not self.bar.disable:
                self.bar.write(msg, file=stream)
            else:
                print(msg, file=stream, flush=True)

    def err(self, msg):
        self._write(f"ectfast detect: {msg}", self.err_stream)

    def out(self, msg):
        if self.stdout_closed:
            return
        try:
            self._write(msg, sys.stdout)
        except BrokenPipeError:  # e.g. `ectfast detect ... | head`: the work goes on, unprinted
            self.stdout_closed = True

    def step(self, n=1):
        if self.bar is not None:
            with _STDERR_LOCK:
                self.bar.update(n)

    def close(self):
        if self.bar is not None:
            with _STDERR_LOCK:
                self.bar.close()


class OutputError(OSError):
    """The output cannot be written (exit status 3)."""


def discover_inputs(args_paths: Sequence[str], exclude: Optional[str] = None):
    """(path, relative stem) of every image to process: files as given (stem = their name),
    folders searched recursively for IMAGE_EXTENSIONS (stem = the path inside the folder),
    sorted; ``exclude`` (the output folder) is never searched. Missing paths are returned too
    (they fail with 'no such file')."""
    ex = os.path.realpath(exclude) if exclude else None
    found = []
    for a in args_paths:
        if os.path.isdir(a):
            for root, dirs, files in os.walk(a):
                dirs[:] = sorted(d for d in dirs if not (ex and os.path.realpath(os.path.join(root, d)) == ex))
                for f in sorted(files):
                    if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                        full = os.path.join(root, f)
                        found.append((full, os.path.splitext(os.path.relpath(full, a))[0]))
        else:
            found.append((a, os.path.splitext(os.path.basename(a))[0] or "image"))
    used, out = set(), []
    for path, stem in found:
        name, k = stem, 1
        while name in used:
            k += 1
            name = f"{stem}_{k}"
        used.add(name)
        out.append((path, name))
    return out


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        d = os.path.dirname(path)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise OutputError(e.errno, f"cannot write {path}: {e.strerror or e}") from None


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(e.errno, f"cannot create the output folder {folder}: {e.strerror or e}") from None
    probe = os.path.join(folder, f".ectfast-write-test-{os.getpid()}")
    try:
        with open(probe, "wb") as fh:
            fh.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise OutputError(e.errno, f"the output folder {folder} is not writable: {e.strerror or e}") from None


def _json_done(json_path: str, image_path: str) -> bool:
    try:
        with open(json_path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("image") == image_path and "faces" in doc


def _jsonl_done(path: str) -> set:
    done = set()
    if not os.path.isfile(path):  # a new file, or a device/pipe (never read those back)
        return done
    try:
        with open(path, "r", encoding="utf-8") as fh:
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash
                if isinstance(rec, dict) and "error" not in rec and "image" in rec:
                    done.add(rec["image"])
    except FileNotFoundError:
        pass
    return done


def _record(det: Detector, r: ImageResult, annotated: Optional[str]) -> dict:
    from ectfast import __version__

    doc = {"image": r.path, "width": int(r.width), "height": int(r.height)}
    if r.scale != 1.0:
        doc["decoded_scale"] = r.scale
    doc.update({"ectfast": __version__, "engine": det.engine, "face_detector": det.face_detector_name,
                "method": det.method, "visibility_threshold": det.visibility_threshold,
                "flip": getattr(det.estimator, "flip", None),
                "precision": getattr(det.estimator, "precision", None),
                "faces": [f.to_dict() for f in r.original_faces()]})
    if r.note:
        doc["note"] = r.note
    doc["annotated"] = annotated
    return doc


def run(args, *, estimator=None) -> int:
    """``ectfast detect``; ``estimator`` (Python callers and tests only) replaces the network."""
    import cv2

    t0 = time.perf_counter()
    stdout_stream = args.jsonl == "-"
    if args.example:
        if args.images:
            print("ectfast detect: --example takes no PATH (it runs on the shipped photograph)", file=sys.stderr)
            return EXIT_USAGE
        if not os.path.isfile(EXAMPLE_IMAGE):
            print(f"ectfast detect: the example photograph {EXAMPLE_IMAGE} is missing from this installation",
                  file=sys.stderr)
            return EXIT_USAGE
        paths_in = [EXAMPLE_IMAGE]
        out_dir = args.out or EXAMPLE_OUT
    else:
        if not args.images:
            print("ectfast detect: no PATH given (image files or folders; or --example)", file=sys.stderr)
            return EXIT_USAGE
        paths_in = list(args.images)
        out_dir = args.out if args.out is not None else (None if args.jsonl else DEFAULT_OUT)
    draw = out_dir is not None and not args.no_draw
    inputs = discover_inputs(paths_in, exclude=out_dir)
    if not inputs:
        print(f"ectfast detect: no image files found in {', '.join(paths_in)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        det = Detector(device=args.device, backend=args.backend, weights=args.weights, estimator=estimator,
                       face_detector=args.face_detector, engine=args.engine, align=not args.no_align,
                       method=args.method, batch_size=args.batch_size, visibility_threshold=args.threshold,
                       threads=args.threads, flip=args.flip, precision=args.precision)
    except (FileNotFoundError, ImportError, ValueError, TypeError, RuntimeError) as e:
        print(f"ectfast detect: {e}", file=sys.stderr)
        return EXIT_USAGE
    overwrite = args.overwrite or args.example
    try:
        if out_dir is not None:
            _check_writable(out_dir)
        jsonl_fh = None
        done_jsonl = set()
        if args.jsonl and not stdout_stream:
            if not overwrite:
                done_jsonl = _jsonl_done(args.jsonl)
            d = os.path.dirname(os.path.abspath(args.jsonl))
            if not os.path.isdir(d):
                _check_writable(d)
            try:
                jsonl_fh = open(args.jsonl, "w" if overwrite else "a", encoding="utf-8")
                if os.path.isfile(args.jsonl) and jsonl_fh.tell() > 0:
                    with open(args.jsonl, "rb") as fh:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":
                            jsonl_fh.write("\n")  # end a line cut by a crash
            except OSError as e:
                raise OutputError(e.errno, f"cannot write {args.jsonl}: {e.strerror or e}") from None
        elif stdout_stream:
            jsonl_fh = sys.stdout
    except OutputError as e:
        print(f"ectfast detect: {e.strerror}", file=sys.stderr)
        return EXIT_OUTPUT

    todo, skipped = [], 0
    for path, stem in inputs:
        json_path = os.path.join(out_dir, stem + ".json") if out_dir is not None else None
        if not overwrite and ((args.jsonl and path in done_jsonl) or
                              (not args.jsonl and json_path and _json_done(json_path, path))):
            skipped += 1
            continue
        todo.append((path, stem))
    rep = _Reporter(len(todo), progress=not args.no_progress)
    if skipped:
        rep.err(f"skipping {skipped} image(s) already done by an earlier run (--overwrite redoes them)")
    n_ok = n_empty = n_faces = 0
    failed: List[str] = []
    status = None
    example_written: List[str] = []
    results = det.detect_files([p for p, _ in todo], max_pixels=int(args.max_megapixels * 1e6),
                               workers=args.workers, keep_images=draw)
    try:
        for (_, stem), r in zip(todo, results):  # results come in input order
            rep.step()
            if r.error is not None:
                failed.append(r.path)
                rep.err(r.error)
                if jsonl_fh is not None:
                    jsonl_fh.write(json.dumps({"image": r.path, "error": r.error}) + "\n")
                    jsonl_fh.flush()
                continue
            annotated = None
            if draw:
                ext = os.path.splitext(r.path)[1].lower()
                ext = ext if ext in (".jpg", ".jpeg", ".png") else ".png"
                annotated = os.path.join(out_dir, f"{stem}_landmarks{ext}")
                ok, buf = cv2.imencode(ext, draw_faces(r.image, r.faces))
                if not ok:
                    raise OutputError(0, f"cannot encode {annotated}")
                _atomic_write(annotated, buf.tobytes())
            doc = _record(det, r, annotated)
            written = [annotated] if annotated else []
            if jsonl_fh is not None:
                try:
                    jsonl_fh.write(json.dumps(doc) + "\n")
                    jsonl_fh.flush()
                except OSError as e:
                    raise OutputError(e.errno, f"cannot write {args.jsonl}: {e.strerror or e}") from None
            else:
                json_path = os.path.join(out_dir, stem + ".json")
                _atomic_write(json_path, json.dumps(doc, indent=1).encode("utf-8"))
                written.insert(0, json_path)
            n_faces += len(r.faces)
            if args.example:
                example_written = written
            if r.faces:
                n_ok += 1
                if not args.quiet and not stdout_stream:
                    rep.out(f"{r.path}: {len(r.faces)} face(s) -> {', '.join(written) or args.jsonl}")
            else:
                n_empty += 1
                rep.err(f"{r.path}: {r.note or 'no face found'}")
    except OutputError as e:
        rep.close()
        print(f"ectfast detect: {e.strerror}; stopped (outputs written so far are kept)", file=sys.stderr)
        status = EXIT_OUTPUT
    except KeyboardInterrupt:
        rep.close()
        print("ectfast detect: interrupted; outputs written so far are kept, rerun the same command to "
              "continue", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        results.close()
        if jsonl_fh is not None and jsonl_fh is not sys.stdout:
            try:
                jsonl_fh.close()
            except OSError as e:  # the last flush failed
                if status is None:
                    print(f"ectfast detect: cannot write {args.jsonl}: {e.strerror or e}", file=sys.stderr)
                    status = EXIT_OUTPUT
    rep.close()
    dt = time.perf_counter() - t0
    done = n_ok + n_empty
    where = out_dir if out_dir is not None else args.jsonl
    summary = (f"{done} image(s) processed ({n_ok} with faces, {n_empty} without; {n_faces} faces), "
               f"{len(failed)} failed, {skipped} skipped as already done; {dt:.1f} s"
               + (f", {done / dt:.1f} images/s" if dt > 0 and done else "")
               + (f"; results in {where}" if where and where != "-" else ""))
    print(f"ectfast detect: {summary}", file=sys.stderr)
    if args.example and status is None and example_written:
        print(f"example: wrote {' and '.join(example_written)}")
    if status is not None:
        return status
    return EXIT_FAILED if failed else EXIT_OK
