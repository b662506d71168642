"""The native few-row kernel (engine/models/native_linear.py): built here, checked, cached, and left out
cleanly where it cannot be built."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch
from torch.nn import functional

from engine.models import few_rows, native_linear

needs_compiler = pytest.mark.skipif(native_linear._compiler() is None, reason="no C compiler here")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state with no kernel loaded yet and an empty cache directory."""
    monkeypatch.setenv("POLLINATE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native_linear, "_STATE", {})
    return tmp_path


@needs_compiler
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 9, 16])
def test_equals_float64_products_at_model_shapes(rows):
    assert native_linear.available()
    generator = torch.Generator().manual_seed(rows)
    # SmolLM2's and the bench model's widths, and one with a remainder below the vector width
    for outputs, inputs in [(3072, 576), (576, 1536), (5632, 1024), (7, 203)]:
        weight = torch.randn(outputs, inputs, generator=generator) * 0.05
        x = torch.randn(rows, inputs, generator=generator)
        expected = (x.double() @ weight.double().t()).float()
        got = native_linear.linear(x, weight)
        assert got.shape == (rows, outputs) and got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


@needs_compiler
@pytest.mark.parametrize(
    "target, needs",
    [
        ("-march=haswell", {"avx2", "fma"}),
        ("-march=x86-64", set()),
        ("-march=skylake-avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
    ],
    ids=["avx2-8-lanes", "sse2-4-lanes", "avx512-16-lanes"],
)
def test_every_vector_width_equals_float64_products(tmp_path, target, needs):
    """-march=native makes only this CPU's width; a user's CPU may have another (a gaming PC: AVX2)."""
    if platform.machine() not in ("x86_64", "AMD64") or not needs <= native_linear.cpu_flags():
        pytest.skip(f"this CPU cannot run {target} code")
    kernel = native_linear.build_at(("-O3", target), tmp_path / "few_rows.so")
    assert native_linear._matches_torch(kernel)
    generator = torch.Generator().manual_seed(1)
    for rows in (1, 2, 3, 4, 5, 8, 9):
        for outputs, inputs in [(576, 1536), (64, 203)]:
            weight = torch.randn(outputs, inputs, generator=generator) * 0.05
            x = torch.randn(rows, inputs, generator=generator)
            expected = (x.double() @ weight.double().t()).float()
            torch.testing.assert_close(
                native_linear._product(kernel, x, weight), expected, rtol=1e-5, atol=2e-5
            )


@needs_compiler
def test_builds_once_then_loads_the_cached_build(fresh, monkeypatch):
    assert native_linear.available()
    built = list((fresh / "kernels").iterdir())
    assert len(built) == 1 and built[0].name.startswith("few_rows-")

    def no_build(*args):
        raise AssertionError("the cached build should have been loaded")

    monkeypatch.setattr(native_linear, "_STATE", {})
    monkeypatch.setattr(native_linear, "_build", no_build)
    assert native_linear.available()
    # another CPU (a home directory copied to another machine) must not load this machine's -march=native code
    here = native_linear._cache_path("cc", ("-O3",), b"source")
    monkeypatch.setattr(native_linear, "_cpu_identity", lambda: "another cpu")
    assert native_linear._cache_path("cc", ("-O3",), b"source") != here


def test_no_compiler_or_switched_off_keeps_torchs_kernels(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native_linear, "_compiler", lambda: None)
    with caplog.at_level("INFO", logger="engine.models.native_linear"):
        assert not native_linear.available()
    assert "No C compiler found" in caplog.text
    weight, x = torch.randn(48, 32), torch.randn(1, 2, 32)
    torch.testing.assert_close(few_rows.few_rows_linear(x, weight), functional.linear(x, weight))

    monkeypatch.setattr(native_linear, "_STATE", {})
    monkeypatch.setenv("POLLINATE_NATIVE_KERNELS", "0")
    monkeypatch.setattr(native_linear, "_compiler", lambda: pytest.fail("switched off: nothing is built"))
    assert not native_linear.available()


def test_a_failed_build_is_reported_and_left_out(fresh, monkeypatch, caplog):
    monkeypatch.setattr(native_linear, "_compiler", lambda: shutil.which("false") or "/bin/false")
    with caplog.at_level("INFO", logger="engine.models.native_linear"):
        assert not native_linear.available()
    assert "could not be built" in caplog.text
    assert not any((fresh / "kernels").iterdir())  # no half-written file left behind


@needs_compiler
def test_a_kernel_with_wrong_results_is_never_used(fresh, monkeypatch, tmp_path, caplog):
    wrong = tmp_path / "few_rows.c"
    wrong.write_text(
        "void pollinate_few_rows(const float *w, const float *x, float *y, long o, long i, long r)"
        " { for (long k = 0; k < o * r; k++) y[k] = 0; }\n"
    )
    monkeypatch.setattr(native_linear, "SOURCE", wrong)
    with caplog.at_level("WARNING", logger="engine.models.native_linear"):
        assert not native_linear.available()
    assert "wrong results" in caplog.text


@needs_compiler
def test_non_contiguous_weights_take_torchs_kernels():
    weight = torch.randn(32, 48).t()  # a transposed view: rows are not contiguous
    x = torch.randn(1, 1, 32)
    with pytest.raises(ValueError, match="contiguous"):
        native_linear.linear(x[0], weight)
    torch.testing.assert_close(few_rows.few_rows_linear(x, weight), functional.linear(x, weight))
