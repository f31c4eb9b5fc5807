"""The end-to-end benchmark cases (benchmarks/cases/e2e.py) in their quick settings: each builds, the patched model
really is patched, and one call of the patched and the unpatched model agree (the first training step's loss; the
sampling loop's samples)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.cases import e2e  # noqa: E402


def test_quick_cases_agree():
    cases = list(e2e.cases(torch.device("cpu"), True, None, None))
    names = {c.name for c in cases}
    expected = {lib: name for name, lib in (("open_clip_tiny_train", "open_clip"), ("hf_clip_tiny_train", "transformers"),
                                            ("timm_vit_tiny_train", "timm"), ("diffusers_ddim4_cfg", "diffusers"))}
    for lib, name in expected.items():
        if e2e._have(lib):
            assert name in names
    if not cases:
        pytest.skip("none of open_clip, transformers, timm, diffusers is installed")
    for case in cases:
        assert "patched:" in case.note and "->" in case.note, case.note  # something was replaced
        inp = case.make()
        a, b = case.eager(inp), case.fused(inp)
        assert torch.isfinite(a).all() and torch.isfinite(b).all()
        assert case.check(a, b) <= 1e-5, case.name


def test_unknown_size_label_runs_nothing():
    assert list(e2e.cases(torch.device("cpu"), True, {"headline"}, None)) == []
