"""The seeds' models, as the examples, benchmarks and GPU tests build them: the shapes of
network this backend is meant to speed up. Importing this costs nothing beyond torch."""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLPBlock(nn.Module):
    """Linear -> BatchNorm1d -> GELU -> ReLU (seed 004)."""

    def __init__(self, in_features, out_features, approximate="none"):
        super().__init__()
        self.gemm = nn.Linear(in_features, out_features)
        self.batch_norm = nn.BatchNorm1d(out_features)
        self.approximate = approximate

    def forward(self, x):
        return torch.relu(F.gelu(self.batch_norm(self.gemm(x)), approximate=self.approximate))


class RNNCell(nn.Module):
    """One vanilla RNN step with the hidden state as an argument (seed 002's cell)."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.h2o = nn.Linear(hidden_size, output_size)

    def forward(self, x, h):
        h = torch.tanh(self.i2h(torch.cat((x, h), dim=1)))
        return self.h2o(h), h


class VanillaRNN(nn.Module):
    """KernelBench style: the hidden state lives on the module between calls."""

    def __init__(self, input_size, hidden_size, output_size, batch_size):
        super().__init__()
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.h2o = nn.Linear(hidden_size, output_size)
        self.register_buffer("hidden", torch.randn(batch_size, hidden_size))

    def forward(self, x):
        self.hidden = torch.tanh(self.i2h(torch.cat((x, self.hidden), dim=1)))
        return self.h2o(self.hidden)


class UnrolledRNN(nn.Module):
    """A Python loop over time steps (Dynamo unrolls it); the outputs stacked."""

    def __init__(self, input_size, hidden_size, output_size):
        super().__init__()
        self.i2h = nn.Linear(input_size + hidden_size, hidden_size)
        self.h2o = nn.Linear(hidden_size, output_size)

    def forward(self, xs, h):
        outputs = []
        for t in range(xs.shape[0]):
            h = torch.tanh(self.i2h(torch.cat((xs[t], h), dim=1)))
            outputs.append(self.h2o(h))
        return torch.stack(outputs), h


def fp64_reference(model: nn.Module, *inputs):
    """The model's result computed in float64 on a copy (train-mode BatchNorm uses the batch's
    statistics and updates only the copy's buffers); the first output if it returns several."""
    with torch.no_grad():
        out = copy.deepcopy(model).double()(*(t.double() for t in inputs))
    return out[0] if isinstance(out, tuple) else out
