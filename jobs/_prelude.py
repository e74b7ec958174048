"""Makes ``aesformer`` importable for a job's driver process.

When the project is installed (``pip install -e .``) this does nothing. On a
cluster whose image has only the dependencies (a ``ray job submit
--working-dir .`` run), it builds a wheel of the source tree with the
standard library and imports from it; the Ray helper then ships the same wheel
to every worker.
"""
import importlib.util
import sys
from pathlib import Path


def ensure_package() -> None:
    try:
        import aesformer.actors  # noqa: F401
        return
    except ImportError:
        for name in [m for m in sys.modules if m == "aesformer" or m.startswith("aesformer.")]:
            del sys.modules[name]
    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("_aesformer_shipping", root / "platform" / "aesformer" / "shipping.py")
    shipping = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipping)
    sys.path.insert(0, str(shipping.build_wheel(root)))


ensure_package()
