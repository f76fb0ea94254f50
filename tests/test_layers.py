"""The package's layers import one way only (issue 12), and the fit core loads neither torch nor
onnxruntime.

Layers, lowest first (docs/ARCHITECTURE.md): ``assets`` (file locations) and ``io`` (pts, images,
300-W folders) at the bottom; ``core`` (the fit, its backends, PDM, peaks, metrics) above them;
``faces`` (face detectors) and ``nets`` (networks, training, engines) above the core, and not
importing each other; ``app`` (detector pipeline, evaluation) above those; ``cli`` on top. A
module may import its own layer and any layer below, never one above. Every import counts, also
the ones inside functions.
"""
import ast
import os
import subprocess
import sys
import textwrap

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "ectfast")

#: layer -> rank; equal ranks in different layers may not import each other
RANK = {"assets": 0, "io": 1, "core": 2, "faces": 3, "nets": 3, "app": 4, "cli": 5}


def layer_of(module: str):
    """'ectfast.core.fit' -> 'core'; the package's own __init__ (the public facade) -> None."""
    parts = module.split(".")
    if parts[0] != "ectfast" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in RANK else None


def imports_of(source: str, module: str):
    """Every ectfast module that ``source`` (of ``module``) imports, with its line."""
    pkg = module.rsplit(".", 1)[0]  # the package a relative import starts from (also for __init__)
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("ectfast")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if not name.startswith("ectfast"):
                continue
            if name in ("ectfast",):  # from ectfast import X: X may be a subpackage
                out += [(f"ectfast.{a.name}", node.lineno) for a in node.names]
            else:
                out.append((name, node.lineno))
    return out


def violations(source: str, module: str):
    me = layer_of(module)
    if me is None:
        return []
    bad = []
    for target, line in imports_of(source, module):
        other = layer_of(target)
        if other is None or other == me:
            continue
        if RANK[other] >= RANK[me]:
            bad.append(f"{module}:{line} ({me}) imports {target} ({other})")
    return bad


def package_modules():
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
                yield rel, path


def test_every_module_sits_in_a_layer():
    stray = [m for m, _ in package_modules() if m != "ectfast.__init__" and layer_of(m) is None]
    assert not stray, f"modules outside the layers (put each in io, core, faces, nets, app or cli): {stray}"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for module, path in package_modules():
        with open(path, encoding="utf-8") as f:
            bad += violations(f.read(), module)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, source, want", [
    ("ectfast.core.fit", "from ectfast.nets import model", 1),            # core -> nets
    ("ectfast.core.fit", "def f():\n    import ectfast.app.detector\n", 1),  # inside a function
    ("ectfast.io.pts", "from ectfast.core.fit import fit", 1),             # io -> core
    ("ectfast.nets.train", "from ectfast import faces", 1),                # nets -> faces (same rank)
    ("ectfast.faces.crop", "from ..nets import data", 1),                  # relative, faces -> nets
    ("ectfast.nets.train", "from ectfast.core import metrics\nfrom ectfast.io.pts import read_pts", 0),
    ("ectfast.app.detector", "from ectfast.nets import engine\nfrom ectfast import faces", 0),
    ("ectfast.cli.detect", "from ectfast.app.detector import Detector", 0),
])
def test_the_layer_check_itself(module, source, want):
    assert len(violations(source, module)) == want, violations(source, module)


def test_import_ectfast_and_fit_load_neither_torch_nor_onnxruntime():
    """With torch and onnxruntime made unimportable, the public fit API works and neither is
    loaded; ``ectfast bench --help`` works too."""
    code = textwrap.dedent("""
        import contextlib, io, sys
        import importlib.abc

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "onnxruntime"):
                    raise ImportError(f"{name} is blocked in this test")
                return None

        sys.meta_path.insert(0, Block())
        import numpy as np
        import ectfast
        from ectfast.core.synthetic import make_maps, random_pdm_shapes

        pdm = ectfast.default_pdm()
        shapes = random_pdm_shapes(pdm, 2, seed=0)
        r = ectfast.fit(make_maps(shapes, seed=0).maps, pdm)
        err = np.abs(r.landmarks - shapes).max()
        assert err < 2.0, err
        assert ectfast.read_pts and ectfast.write_pts and ectfast.PDM and "reference" in ectfast.backends()
        from ectfast.cli import main
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                main(["bench", "--help"])
            except SystemExit as e:
                assert e.code == 0, e.code
        assert "--batch" in out.getvalue()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "onnxruntime"))
        assert not loaded, loaded
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-2000:]
