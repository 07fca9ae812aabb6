"""Compatibility shims for running the kernels under Triton's CPU interpreter (``TRITON_INTERPRET=1``).

Triton 3.6's interpreter turns a scalar tensor into a Python int with ``int(ndarray)``; its scalars are
1-element arrays, which NumPy ≥ 2.4 refuses to convert ("only 0-dimensional arrays can be converted"),
so any ``range()`` with a run-time bound fails there. :func:`patch_interpreter` makes ``__index__`` read
the single element instead. It touches only the interpreter module and is a no-op when it is not needed.
"""

from __future__ import annotations

_PATCHED = False


def patch_interpreter() -> None:
    global _PATCHED
    if _PATCHED:
        return
    try:
        import numpy as np
        from triton.runtime import interpreter as _interp
    except Exception:  # pragma: no cover - no triton, nothing to patch
        return
    orig = getattr(_interp, "_patch_lang_tensor", None)
    if orig is None:
        return

    def _patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    _interp._patch_lang_tensor = _patched
    _PATCHED = True
