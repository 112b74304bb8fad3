"""Mutation fuzzing of open_slide and the slide readers (the harness is benchmarks/fuzz_slides.py)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").exists())  # the repository
HARNESS = ROOT / "benchmarks" / "fuzz_slides.py"
MUTANTS = 1000  # 250 per seed (classic TIFF, BigTIFF) and backend (OpenSlide, tifffile)


def _harness():
    spec = importlib.util.spec_from_file_location("fuzz_slides", HARNESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_no_mutant_slide_kills_hangs_or_escapes_the_project_errors(tmp_path):
    fuzz = _harness()
    result = fuzz.run_fuzz(MUTANTS, seed=0, jobs=2, timeout=60, folder=tmp_path)
    report = fuzz.summary(result)
    print(report)
    counts = result["counts"]
    findings = "\n".join(f"  mutant {f['mutant']} ({f['mutation']}): {f['outcome']}: {f['detail'][:300]}"
                         for f in result["findings"])
    assert sum(counts.values()) == MUTANTS, report
    assert counts["abort"] == counts["hang"] == counts["uncaught"] == 0, f"{report}\n{findings}"
    # the mutants do exercise both sides: many are refused, many still read
    assert counts["clean_error"] > MUTANTS // 5 and counts["unchanged"] > MUTANTS // 5, report
