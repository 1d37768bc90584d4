"""The backend name works with and without importing fusion_backend, and the import is cheap.

Every check runs in a fresh interpreter (sys.modules and Dynamo's registry are process-wide),
from a temporary directory so the installed package (and its entry point) is what is found.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest


def _run(code, tmp_path, timeout=240):
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    env["FUSEDTRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last)


def test_entry_point_without_import(tmp_path):
    result = _run("""
        import json, sys
        import torch
        names = torch._dynamo.list_backends()
        f = torch.compile(lambda x: x.sin() + 1, backend="fusedtriton")
        x = torch.randn(4)
        torch.testing.assert_close(f(x), x.sin() + 1)
        print(json.dumps({"listed": "fusedtriton" in names}))
    """, tmp_path)
    assert result["listed"]


def test_import_first_then_compile(tmp_path):
    result = _run("""
        import json
        import fusion_backend
        import torch
        from torch._dynamo.backends.registry import lookup_backend
        f = torch.compile(lambda x: x.sin() + 1, backend="fusedtriton")
        x = torch.randn(4)
        torch.testing.assert_close(f(x), x.sin() + 1)
        import importlib
        importlib.reload(fusion_backend)  # registering twice must not fail either
        print(json.dumps({"same": lookup_backend("fusedtriton") is fusion_backend.fusedtriton,
                          "listed": "fusedtriton" in torch._dynamo.list_backends()}))
    """, tmp_path)
    assert result == {"same": True, "listed": True}


def test_registered_by_hand_without_entry_point(tmp_path):
    """Run from a source checkout that is not installed: no entry point, `import` registers."""
    result = _run("""
        import json
        import importlib.metadata as md
        _orig = md.entry_points
        def entry_points(**kw):
            if kw.get("group") == "torch_dynamo_backends":
                return md.EntryPoints([])
            return _orig(**kw)
        md.entry_points = entry_points
        import torch
        import fusion_backend
        from torch._dynamo.backends.registry import lookup_backend
        print(json.dumps({"same": lookup_backend("fusedtriton") is fusion_backend.fusedtriton,
                          "listed": "fusedtriton" in torch._dynamo.list_backends()}))
    """, tmp_path)
    assert result == {"same": True, "listed": True}


_IMPORT_ONLY = """
    import json, sys
    import fusion_backend
    import torch
    print(json.dumps({
        "triton": "triton" in sys.modules,
        "loaded": sorted(m for m in sys.modules
                         if m == "fusion_backend.patterns" or m.startswith("fusion_backend.patterns.")
                         or m == "fusion_backend.triton_lib"),
        "cuda_initialized": torch.cuda.is_initialized(),
    }))
"""


def test_import_loads_no_pattern_and_no_cuda(tmp_path):
    result = _run(_IMPORT_ONLY, tmp_path)
    assert result["loaded"] == [], "importing fusion_backend must not import the patterns or the Triton library"
    assert result["cuda_initialized"] is False, "importing fusion_backend must not create a CUDA context"


def test_import_does_not_import_triton(tmp_path):
    # Registering a backend needs torch._dynamo, which imports triton when it is installed
    # (torch/_dynamo/utils.py: has_triton_package()); hold fusion_backend to "no triton" only
    # where torch itself does not import it.
    baseline = _run("""
        import json, sys
        import torch._dynamo.backends.registry
        print(json.dumps({"triton": "triton" in sys.modules}))
    """, tmp_path)
    if baseline["triton"]:
        pytest.skip("torch._dynamo itself imports triton; see test_import_loads_no_pattern_and_no_cuda")
    assert _run(_IMPORT_ONLY, tmp_path)["triton"] is False


def test_a_users_own_patterns_module_does_not_shadow_ours(tmp_path):
    """The patterns live in `fusion_backend.patterns`: a `patterns.py` (or package) of the
    user's own, first on sys.path, is neither imported by the backend nor hides its patterns."""
    (tmp_path / "patterns.py").write_text("raise RuntimeError('the user module must not be imported')\n")
    result = _run("""
        import json, sys
        import torch
        import fusion_backend
        print(json.dumps({"names": fusion_backend.pattern_names(), "user": "patterns" in sys.modules}))
    """, tmp_path)
    assert result == {"names": ["cat_linear_tanh", "cell_h2o", "linear_bn_gelu_relu", "rnn_sequence"], "user": False}
