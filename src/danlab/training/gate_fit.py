"""A gated gain fitted by least squares on a trained, frozen network (net.gate; see nets/cnn.py).

The gate adds sum_j G_j,i(h) zeta_(i+j-W//2) to the increment, G = conv(h) the W channels of one convolution of
the last hidden layer h. With h fixed that term is linear in the convolution's weights and bias: it is Phi theta,
where each row of Phi (one site of one state) holds the products zeta_(i+j-W//2) h_c,(i+k-K//2) and zeta_(i+j-W//2)
(the bias). So the gate that minimises the analysis error of one cycle, given the forecasts it is applied to, is
the solution of the normal equations (Phi^T Phi + lambda I) theta = Phi^T r, r = truth - forecast - the body's
increment: an exact minimiser, with no learning-rate noise near a converged network, where the windows' gradients
are mostly noise (docs/results/gradient_noise.md). The forecasts come from the network's own cycling, and each
round cycles with the gate fitted so far and adds its rows to the earlier ones' (DAgger), so the gate is fitted
on the states it will meet.
"""

from __future__ import annotations

import torch

from danlab.nets.cnn import AnalysisNet


def hidden(net: AnalysisNet, E: torch.Tensor, zeta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden layer h (B*N, Nf, Nx) and the body's increment without the gate, out(h) + gain zeta, for a
    network that averages over no reflection and takes no precision input (scripts/fit_gate.py refuses those)."""
    B, N, Nx = E.shape
    h = net.hidden(E, zeta)
    return h, net.out(h).view(B, N, Nx) + net.gain * zeta.unsqueeze(1)


def design(h: torch.Tensor, zeta: torch.Tensor, W: int, K: int) -> torch.Tensor:
    """Phi (rows, W * (C*K + 1)), one row per site of each state: the gated term is Phi @ theta with theta the
    gate's weight (W, C, K) and bias (W,) as `pack` lays them out. h (rows, C, Nx), zeta (rows, Nx)."""
    R, C, Nx = h.shape
    hk = torch.stack([h.roll(K // 2 - k, -1) for k in range(K)], 2)  # hk[..., k, i] = h[..., (i + k - K//2) mod Nx]
    P = torch.cat([hk.reshape(R, C * K, Nx), torch.ones(R, 1, Nx, dtype=h.dtype)], 1)  # (R, C*K + 1, Nx)
    Z = torch.stack([zeta.roll(W // 2 - j, -1) for j in range(W)], 1)  # Z[:, j, i] = zeta[(i + j - W//2) mod Nx]
    return (Z.unsqueeze(2) * P.unsqueeze(1)).permute(0, 3, 1, 2).reshape(R * Nx, W * (C * K + 1))


def pack(gate: torch.nn.Conv1d) -> torch.Tensor:
    W, C, K = gate.weight.shape
    return torch.cat([gate.weight.reshape(W, C * K), gate.bias.view(W, 1)], 1).reshape(-1)


def unpack(theta: torch.Tensor, gate: torch.nn.Conv1d) -> None:
    W, C, K = gate.weight.shape
    t = theta.reshape(W, C * K + 1).to(gate.weight.dtype)
    with torch.no_grad():
        gate.weight.copy_(t[:, :-1].reshape(W, C, K))
        gate.bias.copy_(t[:, -1])


class NormalEquations:
    """Running sums Phi^T Phi and Phi^T r in float64 (rows added in float32 blocks), and their ridge solution."""

    def __init__(self, n: int):
        self.A = torch.zeros(n, n, dtype=torch.float64)
        self.b = torch.zeros(n, dtype=torch.float64)
        self.rows = 0
        self.rr = 0.0  # r^T r: the residual's sum of squares with theta = 0

    def add(self, Phi: torch.Tensor, r: torch.Tensor) -> None:
        self.A += (Phi.T @ Phi).double()
        self.b += (Phi.T @ r).double()
        self.rr += float((r.double() ** 2).sum())
        self.rows += len(r)

    def solve(self, ridge: float) -> torch.Tensor:
        """theta = (A + ridge * mean(diag A) I)^-1 b: the ridge relative to the features' mean square."""
        if not self.rows:
            raise ValueError("gate fit: no rows were added")
        lam = ridge * float(self.A.diagonal().mean())
        L = torch.linalg.cholesky(self.A + lam * torch.eye(len(self.b), dtype=torch.float64))
        return torch.cholesky_solve(self.b.unsqueeze(1), L).squeeze(1)

    def mse(self, theta: torch.Tensor) -> float:
        """Mean squared residual per row of the fit theta on the rows added: (r^T r - 2 theta^T b + theta^T A theta) / rows."""
        return (self.rr - 2 * float(theta @ self.b) + float(theta @ self.A @ theta)) / self.rows
