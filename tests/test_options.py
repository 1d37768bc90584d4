"""mode= and options=: documented values accepted, anything else rejected with the valid choices."""
import math

import numpy as np
import pytest
import torch

import fusion_backend
from fusion_backend import MODES, OPTION_DOCS, Options
from fusion_backend import backend as backend_mod


@pytest.mark.parametrize("mode", MODES)
def test_modes_accepted(mode):
    expected = None if mode in (None, "default") else mode
    assert Options.parse(mode).mode == expected
    assert Options.parse(None, {"mode": mode}).mode == expected


def test_five_modes():
    assert set(MODES) == {None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"}


def test_defaults():
    opts = Options.parse()
    assert opts == Options()
    assert (opts.mode, opts.patterns, opts.autotune, opts.tune_budget_s, opts.only_named_devices,
            opts.inductor_options) == (None, None, True, 30.0, False, ())
    assert opts.inductor_config_patches() == {}


def test_all_documented_keys_accepted():
    name = fusion_backend.pattern_names()[0]
    opts = Options.parse(None, {
        "patterns": [name], "autotune": False, "tune_budget_s": 5, "only_named_devices": True, "trial": False,
        "inline": False, "mode": "max-autotune", "inductor_options": {"max_autotune_gemm": False},
    })
    assert set(OPTION_DOCS) == {"patterns", "autotune", "tune_budget_s", "only_named_devices", "trial", "inline",
                                "mode", "inductor_options"}
    assert opts.trial is False and opts.inline is False
    assert opts.patterns == (name,)
    assert opts.autotune is False
    assert opts.tune_budget_s == 5.0 and isinstance(opts.tune_budget_s, float)
    assert opts.only_named_devices is True
    assert opts.mode == "max-autotune"
    patches = opts.inductor_config_patches()
    assert patches["max_autotune"] is True
    assert patches["max_autotune_gemm"] is False  # the user's patch wins over the mode's


def test_patterns_as_string():
    assert Options.parse(None, {"patterns": "linear_bn_gelu_relu"}).patterns == ("linear_bn_gelu_relu",)
    assert Options.parse(None, {"patterns": []}).patterns == ()


def test_registered_patterns():
    assert "linear_bn_gelu_relu" in fusion_backend.pattern_names()


# ----------------------------------------------------------------------------- rejections

def test_unknown_mode_lists_modes():
    with pytest.raises(ValueError) as err:
        Options.parse("fastest")
    msg = str(err.value)
    assert "fastest" in msg
    for mode in MODES:
        assert repr(mode) in msg


def test_unknown_key_lists_keys():
    with pytest.raises(ValueError) as err:
        Options.parse(None, {"bogus": 1, "autotune": True})
    msg = str(err.value)
    assert "bogus" in msg
    for key in OPTION_DOCS:
        assert key in msg


def test_unknown_pattern_lists_patterns():
    with pytest.raises(ValueError) as err:
        Options.parse(None, {"patterns": ["linear_bn_gelu_relu", "no_such_pattern"]})
    msg = str(err.value)
    assert "no_such_pattern" in msg
    for name in fusion_backend.pattern_names():
        assert name in msg


def test_mode_disagreement():
    with pytest.raises(ValueError, match="disagree"):
        Options.parse("max-autotune", {"mode": "reduce-overhead"})
    # agreeing twice is fine
    assert Options.parse("max-autotune", {"mode": "max-autotune"}).mode == "max-autotune"


@pytest.mark.parametrize("value", [5, 5.0, np.float32(5.0), np.int64(5), np.float64(5.0)])
def test_budget_takes_any_real_number(value):
    """numpy's float32 and int64 were refused ("must be a positive number, got
    np.float32(5.0)") while its float64, a float subclass, was taken."""
    budget = Options.parse(None, {"tune_budget_s": value}).tune_budget_s
    assert budget == 5.0 and type(budget) is float


@pytest.mark.parametrize("key, value, words", [
    ("autotune", "yes", "True or False"),
    ("autotune", 1, "True or False"),
    ("autotune", None, "True or False"),
    ("only_named_devices", "no", "True or False"),
    ("only_named_devices", 0, "True or False"),
    ("trial", "off", "True or False"),
    ("inline", 1, "True or False"),
    ("tune_budget_s", 0, "positive number"),
    ("tune_budget_s", -1.5, "positive number"),
    ("tune_budget_s", "30", "positive number"),
    ("tune_budget_s", True, "positive number"),
    ("inductor_options", [("max_autotune", True)], "dict"),
    ("inductor_options", "max_autotune", "dict"),
    ("tune_budget_s", math.nan, "positive number"),
    ("tune_budget_s", math.inf, "positive number"),
    pytest.param("tune_budget_s", 10 ** 400, "positive number", id="tune_budget_s-10**400"),  # was OverflowError
    ("patterns", 5, "registered patterns"),
])
def test_bad_types(key, value, words):
    with pytest.raises(ValueError) as err:
        Options.parse(None, {key: value})
    assert len(str(err.value)) < 400, "the value is shown shortened (10**400 printed 401 digits)"
    assert key in str(err.value)
    assert words in str(err.value)


# ----------------------------------------------------------------------------- inductor patches

@pytest.mark.parametrize("key,value", [("triton.cudagraphs", "no"), ("triton.cudagraphs", 0),
                                       ("max_autotune", None), ("compile_threads", 2.5), ("compile_threads", True)])
def test_inductor_option_of_the_wrong_type(key, value):
    """Checked as torch.compile's options= checks them ("no" for a bool was taken, and read
    as True): the error names the key and the type."""
    with pytest.raises(ValueError) as err:
        Options.parse(None, {"inductor_options": {key: value}})
    assert repr(key) in str(err.value) and type(value).__name__ in str(err.value)


def test_inductor_options_of_the_right_type_pass():
    opts = Options.parse(None, {"inductor_options": {"triton.cudagraphs": False, "compile_threads": 1,
                                                      "max_autotune": True}})
    assert not opts.cudagraphs and dict(opts.inductor_options)["compile_threads"] == 1


def test_mode_patches():
    patches = Options.parse("max-autotune-no-cudagraphs").inductor_config_patches()
    assert patches.get("max_autotune") is True
    assert not patches.get("triton.cudagraphs")
    assert Options.parse(None, {"mode": "max-autotune-no-cudagraphs"}).inductor_config_patches() == patches
    assert Options.parse("max-autotune").inductor_config_patches().get("triton.cudagraphs") is True
    assert Options.parse("reduce-overhead").inductor_config_patches().get("triton.cudagraphs") is True
    assert Options.parse("default").inductor_config_patches() == {}
    assert patches == dict(torch._inductor.list_mode_options("max-autotune-no-cudagraphs"))


def test_cudagraphs_by_mode_patch_or_inductor_global_config():
    """Whether a graph runs under CUDA graphs (no host time per call to weigh, no run-time
    trial): by the mode, by the user's Inductor patch, or by Inductor's own global setting."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"triton.cudagraphs": False}):
        assert Options.parse("reduce-overhead").cudagraphs and not Options.parse(None).cudagraphs
        assert not Options.parse("max-autotune-no-cudagraphs").cudagraphs
        assert Options.parse(None, {"inductor_options": {"triton.cudagraphs": True}}).cudagraphs
    with inductor_config.patch({"triton.cudagraphs": True}):
        assert Options.parse(None).cudagraphs
        assert not Options.parse(None, {"inductor_options": {"triton.cudagraphs": False}}).cudagraphs


# ----------------------------------------------------------------------------- through torch.compile

def _f(x):
    return torch.cos(x) * 2 + 1


def test_compile_rejects_unknown_option():
    x = torch.randn(8)
    with pytest.raises(Exception) as err:
        torch.compile(_f, backend="fusedtriton", options={"bogus": 1})(x)
    msg = str(err.value)
    assert "bogus" in msg
    assert "valid keys" in msg
    # Dynamo wraps backend errors; the ValueError is the cause or is named in the message
    assert isinstance(err.value, ValueError) or "ValueError" in msg or isinstance(err.value.__cause__, ValueError)


def test_compile_rejects_unknown_mode():
    with pytest.raises(Exception) as err:
        torch.compile(_f, backend="fusedtriton", mode="fastest")(torch.randn(8))
    assert "fastest" in str(err.value) and "max-autotune-no-cudagraphs" in str(err.value)


@pytest.mark.parametrize("kwargs", [
    {"options": {"mode": "max-autotune-no-cudagraphs"}},
    {"mode": "max-autotune-no-cudagraphs"},
], ids=["options", "mode"])
def test_compile_mode_reaches_inductor(monkeypatch, kwargs):
    """The mode arrives at the backend and becomes Inductor config patches (Inductor itself is
    stubbed out here; test_compile_max_autotune_no_cudagraphs runs it for real)."""
    seen = []

    def fake_inductor(gm, example_inputs, options):
        seen.append(options.inductor_config_patches())
        return gm.forward

    monkeypatch.setattr(backend_mod, "_inductor", fake_inductor)
    x = torch.randn(8)
    torch.testing.assert_close(torch.compile(_f, backend="fusedtriton", **kwargs)(x), _f(x))
    assert seen and seen[0].get("max_autotune") is True


def test_compile_max_autotune_no_cudagraphs():
    x = torch.randn(8)
    out = torch.compile(_f, backend="fusedtriton", options={"mode": "max-autotune-no-cudagraphs"})(x)
    torch.testing.assert_close(out, _f(x))


# ----------------------------------------------------------------------------- inductor_options keys

def test_inductor_options_keys_checked_against_inductor_config():
    with pytest.raises(ValueError) as err:
        Options.parse(None, {"inductor_options": {"no_such_knob": 1, "max_autotune_gem": True,
                                                  "max_autotune_gemm": False}})
    msg = str(err.value)
    assert "no_such_knob" in msg and "'max_autotune_gem'" in msg and "inductor_options" in msg
    assert "'max_autotune_gemm' for 'max_autotune_gem'" in msg  # the close match is suggested
    assert "torch._inductor.list_options()" in msg  # how to list the valid keys


def test_inductor_options_nested_key_checked():
    with pytest.raises(ValueError, match=r"triton\.cudagraph\b.*list_options"):
        Options.parse(None, {"inductor_options": {"triton.cudagraph": True}})
    with pytest.raises(ValueError, match="no_such_knob"):
        Options.parse(None, {"inductor_options": {"triton.no_such_knob": True}})


def test_inductor_options_spelled_as_torch_compile_takes_them():
    """Dotted names for nested configs, '-' for '_', as torch.compile(options=...) accepts."""
    opts = Options.parse(None, {"inductor_options": {"triton.cudagraphs": False, "max-autotune-gemm": True}})
    assert opts.inductor_config_patches() == {"triton.cudagraphs": False, "max_autotune_gemm": True}
    assert not opts.cudagraphs
    with torch._inductor.config.patch(opts.inductor_config_patches()):  # Inductor takes them as they are
        assert torch._inductor.config.max_autotune_gemm is True


def test_compile_rejects_unknown_inductor_option(monkeypatch, recwarn):
    """Rejected before anything is compiled: no 'Inductor failed' fallback, no second compile."""
    compiles = []
    real = backend_mod._inductor
    monkeypatch.setattr(backend_mod, "_inductor", lambda *a: compiles.append(1) or real(*a))
    with pytest.raises(Exception) as err:
        torch.compile(_f, backend="fusedtriton", options={"inductor_options": {"no_such_knob": 1}})(torch.randn(8))
    msg = str(err.value)
    assert "no_such_knob" in msg and "list_options" in msg
    assert isinstance(err.value, ValueError) or "ValueError" in msg or isinstance(err.value.__cause__, ValueError)
    assert compiles == []
    assert not [w for w in recwarn if "fusedtriton" in str(w.message)]


def test_options_must_be_a_mapping():
    """A list or string for options= was read as a dict's update sequence (an error about
    'sequence element #0'); keys of other types broke the sorting of the unknown ones."""
    for bad in (["autotune"], "autotune", 3):
        with pytest.raises(TypeError, match=r"fusedtriton: options must be a dict, got .*valid keys"):
            Options.parse(None, bad)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['autotun', 1\]"):
        Options.parse(None, {1: True, "autotun": 2})


def test_every_inductor_mode_accepted():
    """Modes this torch's Inductor knows beyond the documented ones ("lite" in torch 2.13) go
    to Inductor as its mode options."""
    import torch._inductor

    for mode in torch._inductor.list_mode_options():
        expected = None if mode == "default" else mode
        assert Options.parse(mode).mode == expected
        assert Options.parse(mode).inductor_config_patches() == dict(torch._inductor.list_mode_options(mode))


def test_explain_error_names_the_backend():
    """explain()'s backend is a closure: Dynamo named it in errors as backend='backend'."""
    with pytest.raises(Exception, match=r"(?s)backend='fusedtriton'.*unknown option"):
        fusion_backend.explain(_f, torch.randn(8), options={"bogus": 1})
