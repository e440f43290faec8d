"""Test helper: ``teacher_cache.cli`` with a3_cache_fakes' SAM and geometry installed, for the processes
torchrun starts (pytest's monkeypatch does not reach them): ``torchrun ... a3_fake_cli.py build ...``."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

if __name__ == "__main__":
    import pytest

    import a3_cache_fakes

    a3_cache_fakes.install(pytest.MonkeyPatch())
    from teacher_cache.cli import main

    main()
