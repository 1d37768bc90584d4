"""The backend's `mode=` and `options=`; anything unknown is rejected with the valid choices."""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Optional, Tuple

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

def known_modes() -> tuple:
    """MODES and any other mode this torch's Inductor knows ("lite" in torch 2.13): the mode
    goes to Inductor as its own mode options."""
    import torch._inductor

    try:
        return tuple(dict.fromkeys(MODES + tuple(torch._inductor.list_mode_options())))
    except Exception:  # noqa: BLE001 - a torch whose list_mode_options takes a mode: the documented ones
        return MODES


# Documented keys of options={...} (README "Options" lists the same, with defaults).
OPTION_DOCS = {
    "patterns": "names of the patterns to enable (default: all registered but the experimental ones)",
    "autotune": "benchmark configs (and the unfused path) per shape key; False = heuristic pick (default True)",
    "tune_budget_s": "time budget in seconds for tuning one key (default 30)",
    "only_named_devices": "fuse only on the MI300X and RTX 4090 profiles (and the CPU interpreter profile, which "
                          "exists for tests), Inductor alone elsewhere (default False)",
    "trial": "where the fused sites take under 1 ms of GPU time a call, also compile the original graph and "
             "time both over the first calls at run time, keeping the faster (default True; off under CUDA graphs)",
    "inline": "launch a fused kernel from Inductor's generated code (torch.library.triton_op) where its tuned "
              "config is a plain pointer kernel and the shapes are static, instead of through the opaque op: "
              "less host time a call (default True; GPU profiles only)",
    "mode": "Inductor mode for the rest of the graph; use this when also passing options, since "
            "torch.compile accepts mode= or options=, not both",
    "inductor_options": "dict of extra Inductor config patches for the rest of the graph; keys as "
                        "torch._inductor.list_options() names them, nested ones dotted ('triton.cudagraphs')",
}


def _check_type(key, value, current) -> None:
    """A value of the type Inductor's current one has, for the plain types (as torch.compile's
    options= checks them): {"triton.cudagraphs": "no"} was taken, and read as True."""
    for kind, ok in ((bool, (bool,)), (int, (int,)), (float, (int, float)), (str, (str,))):
        if type(current) is kind:
            if type(value) not in ok or (kind is not bool and isinstance(value, bool)):
                raise ValueError(f"fusedtriton: options['inductor_options'][{key!r}] must be of type {kind.__name__} "
                                 f"(Inductor's is {current!r}), got {type(value).__name__} {value!r}")
            return


def _inductor_patches(extra) -> dict:
    """options['inductor_options'] checked against torch._inductor.config here, so that a typo is
    a ValueError naming the key, not an Inductor failure deep in the compile (after a fallback
    and a second compile). Keys are spelled as torch.compile's own options= takes them:
    dotted for nested configs ("triton.cudagraphs"), '-' accepted for '_'."""
    if not isinstance(extra, Mapping):
        raise ValueError("fusedtriton: options['inductor_options'] must be a dict of Inductor config patches")
    import difflib

    import torch._inductor.config

    valid = torch._inductor.config.get_config_copy()
    patches, bad = {}, []
    for key, value in extra.items():
        name = key.replace("-", "_") if isinstance(key, str) else key
        if name in valid:
            _check_type(key, value, valid[name])
            patches[name] = value
        else:
            bad.append(key)
    if bad:
        bad = sorted(bad, key=str)
        close = {k: difflib.get_close_matches(k, list(valid), n=1) for k in bad if isinstance(k, str)}
        hints = ", ".join(f"{m[0]!r} for {k!r}" for k, m in close.items() if m)
        raise ValueError(
            f"fusedtriton: unknown Inductor option(s) {bad} in options['inductor_options']"
            + (f" (did you mean {hints}?)" if hints else "")
            + "; valid keys are listed by torch._inductor.list_options(), nested ones dotted as in "
              "'triton.cudagraphs'"
        )
    return patches


@dataclasses.dataclass(frozen=True)
class Options:
    mode: Optional[str] = None
    patterns: Optional[Tuple[str, ...]] = None  # None = all registered
    autotune: bool = True
    tune_budget_s: float = 30.0
    only_named_devices: bool = False
    trial: bool = True
    inline: bool = True
    inductor_options: Tuple[Tuple[str, Any], ...] = ()

    @staticmethod
    def parse(mode: Optional[str] = None, options: Optional[Mapping[str, Any]] = None) -> "Options":
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"fusedtriton: options must be a dict, got {type(options).__name__}; valid keys are "
                            f"{sorted(OPTION_DOCS)}, e.g. options={{'autotune': False}}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(OPTION_DOCS), key=repr)  # (keys of any type: {1: True})
        if unknown:
            raise ValueError(
                f"fusedtriton: unknown option(s) {unknown}; valid keys are {sorted(OPTION_DOCS)}"
            )
        if "mode" in options:
            if mode not in (None, "default") and options["mode"] != mode:
                raise ValueError(f"fusedtriton: mode={mode!r} and options['mode']={options['mode']!r} disagree")
            mode = options["mode"]
        modes = known_modes()
        if mode not in modes:
            raise ValueError(f"fusedtriton: unknown mode {mode!r}; valid modes are {list(modes)}")
        patterns = options.get("patterns")
        if patterns is not None:
            if isinstance(patterns, str):
                patterns = (patterns,)
            from .registry import pattern_names

            known = pattern_names()
            if not isinstance(patterns, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in patterns):
                raise ValueError(f"fusedtriton: options['patterns'] must be a list of names; registered patterns are {known}, "
                                 f"got {patterns!r}")
            bad = sorted(set(patterns) - set(known))
            if bad:
                raise ValueError(f"fusedtriton: unknown pattern(s) {bad}; registered patterns are {known}")
            patterns = tuple(patterns)
        autotune = options.get("autotune", True)
        if not isinstance(autotune, bool):
            raise ValueError(f"fusedtriton: options['autotune'] must be True or False, got {autotune!r}")
        budget = _positive_seconds(options.get("tune_budget_s", 30.0))
        only_named = options.get("only_named_devices", False)
        if not isinstance(only_named, bool):
            raise ValueError(f"fusedtriton: options['only_named_devices'] must be True or False, got {only_named!r}")
        trial = options.get("trial", True)
        if not isinstance(trial, bool):
            raise ValueError(f"fusedtriton: options['trial'] must be True or False, got {trial!r}")
        inline = options.get("inline", True)
        if not isinstance(inline, bool):
            raise ValueError(f"fusedtriton: options['inline'] must be True or False, got {inline!r}")
        extra = _inductor_patches(options.get("inductor_options", {}))
        return Options(
            mode=None if mode == "default" else mode, patterns=patterns, autotune=autotune,
            tune_budget_s=budget, only_named_devices=only_named, trial=trial, inline=inline,
            inductor_options=tuple(sorted(extra.items())),
        )

    @property
    def cudagraphs(self) -> bool:
        """Whether Inductor will run the graph under CUDA graphs (host time per call vanishes):
        by the mode, the user's Inductor patches, or Inductor's global config."""
        import torch._inductor.config

        default = torch._inductor.config.triton.cudagraphs
        return bool(self.inductor_config_patches().get("triton.cudagraphs", default))

    def inductor_config_patches(self) -> dict:
        """Inductor's own options for the mode, plus the user's extra patches."""
        import torch._inductor

        patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
        patches.update(dict(self.inductor_options))
        return patches


def _positive_seconds(budget) -> float:
    """`tune_budget_s` as a float: any real number (numpy's too) that is positive and finite."""
    if isinstance(budget, numbers.Real) and not isinstance(budget, bool):
        try:
            seconds = float(budget)
        except OverflowError:  # an int beyond float's range
            seconds = math.inf
        if 0 < seconds < math.inf:
            return seconds
    shown = repr(budget)
    shown = shown if len(shown) <= 40 else shown[:37] + "..."  # 10**400 is 401 digits
    raise ValueError(f"fusedtriton: options['tune_budget_s'] must be a positive number of seconds (finite), got {shown}")
