"""`import contrastive_kernels` must work on a bare CPU torch: no native extension, no triton."""
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None                    # as if triton were not installed
    sys.modules["contrastive_kernels._C"] = None    # as if the native extension were not built
    import torch
    import contrastive_kernels as ck
    from contrastive_kernels.__main__ import info

    assert info() == 0
    ok, why = ck.availability("cpu")
    assert not ok and "_C" in why, why
    ok, why = ck.availability("triton")
    assert not ok and "not installed" in why, why
    a = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    loss = ck.clip_loss(a, b, 3.0)                  # auto -> chunked
    loss.backward()
    torch.testing.assert_close(loss, ck.reference.clip_loss(a.detach(), b.detach(), 3.0))
    try:
        ck.clip_loss(a, b, 3.0, backend="cpu")
    except RuntimeError as exc:
        assert "not usable" in str(exc) and "_C" in str(exc), exc
    else:
        raise AssertionError("an explicit unavailable backend must raise")
    print("BARE-OK")
""")


def test_import_and_losses_without_native_extension_or_triton():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "BARE-OK" in proc.stdout, proc.stdout + proc.stderr
