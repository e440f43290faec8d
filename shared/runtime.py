"""Where a tool runs: the ``--device`` flag and dtype names, resolved the same way by every stage.

``--device`` is ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:K``; dtype names are
``float32``, ``bfloat16`` and ``float16``. Validation (:func:`check_device_flag`) needs no torch, so a
CLI can refuse a bad flag before anything heavy is imported.
"""

from __future__ import annotations

from shared.errors import MedAlignError

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def check_device_flag(flag: str, what: str = "--device") -> str:
    """``flag`` itself when it is auto, cpu, cuda or cuda:K; else a :class:`MedAlignError`."""
    flag = str(flag)
    if flag in ("auto", "cpu", "cuda") or (flag.startswith("cuda:") and flag[5:].isdigit()):
        return flag
    raise MedAlignError(f"{what} must be auto, cpu, cuda or cuda:K, got {flag!r}")


def resolve_device(flag: str, what: str = "--device"):
    """The ``torch.device`` for ``flag``: auto -> cuda when available, else cpu; asking for CUDA on a
    machine without it is a :class:`MedAlignError`."""
    import torch

    check_device_flag(flag, what)
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag.startswith("cuda") and not torch.cuda.is_available():
        raise MedAlignError(f"{what} {flag}: CUDA is not available on this machine")
    return torch.device(flag)


def check_dtype_name(name: str, what: str = "--dtype", extra: tuple[str, ...] = ()) -> str:
    """``name`` itself when it is one of :data:`DTYPE_NAMES` (or ``extra``); else an error listing them."""
    if name in DTYPE_NAMES or name in extra:
        return name
    raise MedAlignError(f"unknown {what} {name!r}; valid: {', '.join((*extra, *DTYPE_NAMES))}")


def torch_dtype(name: str):
    """``torch.float32`` / ``torch.bfloat16`` / ``torch.float16`` for its name."""
    import torch

    check_dtype_name(name)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


__all__ = ["DTYPE_NAMES", "check_device_flag", "resolve_device", "check_dtype_name", "torch_dtype"]
