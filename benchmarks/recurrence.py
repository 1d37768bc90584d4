"""Recurrence-kernel sweep on a GPU: h_t = tanh(p_t + h_{t-1} W^T) over T steps, for the
configs of the `recurrence` family and variants of them (programs, tile widths, warps).

    python benchmarks/recurrence.py [--T 256 --B 8 --H 256]

Median do_bench ms per variant and the error vs an fp64 loop; prints a table last.
"""
import argparse
import itertools

import torch

import fusion_backend.patterns.rnn_sequence as seq
from bench import bench
from fusion_backend import devices


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=256)
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--H", type=int, default=256)
    args = ap.parse_args()
    T, B, H = args.T, args.B, args.H
    torch.manual_seed(0)
    p = torch.randn(T, B, H, device="cuda")
    h0 = torch.randn(B, H, device="cuda")
    w_h = torch.randn(H, H, device="cuda") / H ** 0.5
    profile = devices.device_profile(p.device)
    ref = torch.empty(T + 1, B, H, device="cuda", dtype=torch.float64)
    ref[0] = h0.double()
    ref = seq._reference(p.double(), w_h.double(), ref)
    rows = []
    hs = torch.empty(T + 1, B, H, device="cuda")
    hs[0] = h0
    torch_loop = bench(lambda: seq._reference(p, w_h, hs))
    rows.append(("torch loop (fp32 matmul setting)", torch_loop, float("nan")))
    print(f"torch loop: {torch_loop:.4f} ms", flush=True)
    variants = [dict(BLOCK_N=n, BLOCK_K=128, GRID_SYNC=True, RESIDENT=True, RESIDENT_MAX_K=1024, num_warps=w,
                     K_SPLIT=s) for n, w, s in itertools.product((16, 32), (4, 8), (1, 2, 4, 8))]
    variants += [dict(BLOCK_N=16, BLOCK_K=128, GRID_SYNC=True, RESIDENT=False, num_warps=4)]
    for precision, config in itertools.product(("tf32", "tf32x3"), variants):
        config = dict(config, num_stages=1)
        kind = ("grid" if config["GRID_SYNC"] else "one program") + (" resident W" if config["RESIDENT"] else "")
        block_n, block_k, warps = config["BLOCK_N"], config["BLOCK_K"], config["num_warps"]
        name = f"{precision} N{block_n} K{block_k} w{warps} S{config.get('K_SPLIT', 1)} {kind}"
        try:
            out = torch.full((T + 1, B, H), float("nan"), device="cuda")
            out[0] = h0
            launch_args = seq.plan(config, profile, B, H)
            seq.launch(p, w_h, out, precision, *launch_args)
            err = ((out.double() - ref).norm() / ref.norm()).item()
            ms = bench(lambda: seq.launch(p, w_h, out, precision, *launch_args))
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile is reported
            print(name, "failed:", type(exc).__name__, str(exc)[:200], flush=True)
            continue
        rows.append((name, ms, err))
        print(f"{name}: {ms:.4f} ms err {err:.2e}", flush=True)
    rows.sort(key=lambda r: r[1])
    print(f"\nT={T} B={B} H={H} fp32, {torch.cuda.get_device_name()}\n| variant | ms | rel err |\n|---|---|---|")
    for name, ms, err in rows[:20]:
        print(f"| {name} | {ms:.4f} | {err:.2e} |")


if __name__ == "__main__":
    main()
