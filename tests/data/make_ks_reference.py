"""Reference trajectory of Kuramoto–Sivashinsky by ETDRK4, written independently of danlab in NumPy float64,
following the published MATLAB program kursiv.m of Kassam & Trefethen (2005, SIAM J. Sci. Comput. 26, 1214),
figure 4: full complex FFT (not rfft), wavenumbers k = [0..N/2-1, 0, -N/2+1..-1] * 2π/length (the Nyquist
mode frozen at k = 0, as there), contour of M points on the unit circle for the φ-functions.

    python tests/data/make_ks_reference.py

writes tests/data/ks_etdrk4_reference.npz: the initial state (Kassam & Trefethen's cos(x/16)(1 + sin(x/16))
run for 150 time units, on the attractor) and the 10 states after each of 10 steps of dt = 0.5, Nx = 128,
length 32π. tests/test_ks.py compares danlab's KuramotoSivashinsky with it.
"""

from pathlib import Path

import numpy as np

N, LENGTH, H, M = 128, 32 * np.pi, 0.5, 32


def setup(h):
    x = LENGTH * np.arange(1, N + 1) / N
    k = np.concatenate([np.arange(0, N // 2), [0], np.arange(-N // 2 + 1, 0)]) * (2 * np.pi / LENGTH)
    L = k**2 - k**4
    E, E2 = np.exp(h * L), np.exp(h * L / 2)
    r = np.exp(1j * np.pi * (np.arange(1, M + 1) - 0.5) / M)
    LR = h * L[:, None] + r[None, :]
    Q = h * np.real(np.mean((np.exp(LR / 2) - 1) / LR, axis=1))
    f1 = h * np.real(np.mean((-4 - LR + np.exp(LR) * (4 - 3 * LR + LR**2)) / LR**3, axis=1))
    f2 = h * np.real(np.mean((2 + LR + np.exp(LR) * (-2 + LR)) / LR**3, axis=1))
    f3 = h * np.real(np.mean((-4 - 3 * LR - LR**2 + np.exp(LR) * (4 - LR)) / LR**3, axis=1))
    g = -0.5j * k
    return x, (E, E2, Q, f1, f2, f3, g)


def etdrk4(u, nsteps, coeffs):
    E, E2, Q, f1, f2, f3, g = coeffs
    v = np.fft.fft(u)
    out = []
    for _ in range(nsteps):
        Nv = g * np.fft.fft(np.real(np.fft.ifft(v)) ** 2)
        a = E2 * v + Q * Nv
        Na = g * np.fft.fft(np.real(np.fft.ifft(a)) ** 2)
        b = E2 * v + Q * Na
        Nb = g * np.fft.fft(np.real(np.fft.ifft(b)) ** 2)
        c = E2 * a + Q * (2 * Nb - Nv)
        Nc = g * np.fft.fft(np.real(np.fft.ifft(c)) ** 2)
        v = E * v + Nv * f1 + 2 * (Na + Nb) * f2 + Nc * f3
        out.append(np.real(np.fft.ifft(v)))
    return np.array(out)


def main():
    x, coeffs = setup(H)
    u0 = np.cos(x / 16) * (1 + np.sin(x / 16))
    u0 = etdrk4(u0, int(150 / H), coeffs)[-1]
    traj = etdrk4(u0, 10, coeffs)
    # danlab's grid starts at x = 0: x_j = j length/N, j = 0..N-1; kursiv.m's at length/N. Roll so that
    # entry j is the value at j length/N.
    u0, traj = np.roll(u0, 1), np.roll(traj, 1, axis=-1)
    out = Path(__file__).with_name("ks_etdrk4_reference.npz")
    np.savez_compressed(out, u0=u0, traj=traj, Nx=N, length=LENGTH, dt=H, contour_points=M)
    print(f"wrote {out}: |u0|_max {np.abs(u0).max():.3f}, |u10|_max {np.abs(traj[-1]).max():.3f}")


if __name__ == "__main__":
    main()
