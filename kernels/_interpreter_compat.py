"""Triton interpreter fix-up, applied on import when TRITON_INTERPRET=1 (CPU tests only)."""

from __future__ import annotations

import os


def _patch_interpreter_loop_bounds() -> None:
    """Let the Triton interpreter run `for j in range(n)` with a runtime n under NumPy >= 2.4.

    Triton 3.6's interpreter turns a loop bound into a Python int with `int(ndarray)`, but its
    scalars are arrays of shape (1,), which NumPy 2.4 refuses to convert. Only the interpreter
    (CPU tests) is touched; compiled GPU kernels never go through this code.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_sea_patched", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._sea_patched = True
    interpreter._patch_lang_tensor = patched


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Triton 3.6's interpreter multiplies bf16 operands of tl.dot wrongly (errors ~1e9 on 16 x 16 tiles of [0, 1)
# values): a kernel whose dot takes bf16 operands rounds them to bf16 and multiplies in fp32 there instead,
# the same products (exact in fp32) as the GPU's bf16 MMA with fp32 accumulation.
BF16_DOT_WORKS = not INTERPRETING

if INTERPRETING:
    _patch_interpreter_loop_bounds()
