"""The main job: the seeds' two models (and an unrolled RNN) compiled with fusedtriton, checked
against eager, timed.

    python examples/quickstart.py                      # CUDA/ROCm GPU: fused; CPU: falls back to Inductor
    TRITON_INTERPRET=1 python examples/quickstart.py   # CPU: the fused path, run by Triton's interpreter
"""
import copy
import time

import torch
import fusion_backend
from fusion_backend.backend import _report_sinks
from fusion_backend.models import MLPBlock, UnrolledRNN, VanillaRNN
from fusion_backend.trial import TRIAL_CALLS


def timed(fn, reps):
    # compile, any recompile for grad mode / buffer state, and on a GPU fusedtriton's run-time
    # trial of small graphs (fused vs original, alternating calls) happen here
    for _ in range(3 + (2 * TRIAL_CALLS if torch.cuda.is_available() else 0)):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def first(out):
    """The outputs of a model that also returns its hidden state."""
    return out[0] if isinstance(out, tuple) else out


def main():
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    interpreter = fusion_backend.devices.interpreter_enabled()
    profile = fusion_backend.device_profile(dev)
    print(f"device {dev}, fusedtriton profile: {profile.name if profile else None}")
    if profile is None:
        print("no profile here: fusedtriton hands the whole graph to Inductor "
              "(set TRITON_INTERPRET=1 to run the fused kernels under Triton's interpreter)")
    torch.manual_seed(0)
    if gpu:
        # the sequence: issue 4's widths, 64 steps (Inductor takes ~70 s to compile 256)
        sizes = dict(rnn=(256, 4096, 4096, 1024), mlp=(4096, 2048, 2048), seq=(64, 8, 1024, 256, 128))
    else:
        sizes = dict(rnn=(8, 48, 40, 16), mlp=(37, 100, 75), seq=(12, 8, 48, 40, 16))  # the interpreter is slow
    B, I, H, O = sizes["rnn"]
    M, K, N = sizes["mlp"]
    T, SB, SI, SH, SO = sizes["seq"]
    models = {
        "rnn_cell": (VanillaRNN(I, H, O, B), lambda: (torch.randn(B, I, device=dev),)),
        "mlp_eval": (MLPBlock(K, N).eval(), lambda: (torch.randn(M, K, device=dev),)),
        "mlp_train": (MLPBlock(K, N).train(), lambda: (torch.randn(M, K, device=dev),)),
        "rnn_sequence": (UnrolledRNN(SI, SH, SO),
                         lambda: (torch.randn(T, SB, SI, device=dev), torch.randn(SB, SH, device=dev))),
    }
    reps = 20 if gpu or not interpreter else 3
    for name, (model, make_inputs) in models.items():
        model = model.to(dev)
        eager = copy.deepcopy(model)
        fusion_backend.counters.clear()
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="fusedtriton")
        reports = []  # what the backend did with each graph of `compiled`
        _report_sinks.append(reports)
        worst = 0.0
        with torch.no_grad():
            for _ in range(3):  # three calls: the RNN's hidden state carries over
                inputs = make_inputs()
                out, ref = first(compiled(*inputs)), first(eager(*inputs))
                worst = max(worst, ((out - ref).norm() / ref.norm()).item())
        print(f"\n== {name}: fused sites {dict(fusion_backend.counters)}, max rel. diff vs eager {worst:.2e}")
        with torch.no_grad():  # the graph timed below: inference (with grad the ops keep what a backward needs)
            report = fusion_backend.explain(model, *make_inputs())
        print(report)
        inputs = make_inputs()
        with torch.no_grad():
            # one backend after the other, each after its own warm-up (`timed`): a loop of
            # back-to-back calls, as a serving loop runs them
            t_eager = timed(lambda: eager(*inputs), reps)
            t_ft = timed(lambda: compiled(*inputs), reps)
            _report_sinks.remove(reports)
            torch._dynamo.reset()
            inductor = torch.compile(eager)
            t_ind = timed(lambda: inductor(*inputs), reps)
        for r in reports:  # graphs compiled for the first calls only (state, grad mode) never decide
            if "trial:" in r.note:
                print(r.note)
        print(f"time per call: eager {t_eager:.3f} ms, Inductor {t_ind:.3f} ms, fusedtriton {t_ft:.3f} ms"
              + ("" if gpu else "  (CPU: not a performance figure)"))


if __name__ == "__main__":
    main()
