#!/usr/bin/env python3
"""The coefficients of v3/exp2_poly.h: p(f) = 1 + c1 f + c2 f^2 + c3 f^3 ~ 2^f on [0, 1], minimax in relative error.

p(0) = 1 is held exact (integers x give exact powers of two), so the unknowns are c1..cn and the relative error is
    r(f) = p(f) / 2^f - 1 = sum_k c_k f^k / 2^f - (1 - 1 / 2^f),
linear in c. The minimax fit (smallest max |r|) comes from Lawson's iteration: weighted least squares on a dense
grid, each point's weight multiplied by its |r| after every round, which converges to the equioscillating solution.
The coefficients are then rounded to float32 and the error measured again with float32 Horner and fma, as the
kernel evaluates it. Needs numpy only. Usage: python3 scripts/fit_exp2_poly.py [--degrees 3,4]
"""
import argparse

import numpy as np


def fit(degree, points=20001, rounds=200):
    f = np.linspace(0.0, 1.0, points)
    y = np.exp2(f)
    A = np.stack([f**k / y for k in range(1, degree + 1)], axis=1)
    b = 1.0 - 1.0 / y
    w = np.full(points, 1.0 / points)
    for _ in range(rounds):
        sw = np.sqrt(w)
        c = np.linalg.lstsq(A * sw[:, None], b * sw, rcond=None)[0]
        r = np.abs(A @ c - b)
        w = w * r
        w /= w.sum()
    return c, np.abs(A @ c - b).max()


def horner_f32(c32, f):
    """1 + f (c1 + f (c2 + ...)) with float32 fma: the product of two floats is exact in double, then one rounding."""
    p = np.full_like(f, c32[-1])
    for ck in list(c32[-2::-1]) + [np.float32(1.0)]:
        p = (p.astype(np.float64) * f.astype(np.float64) + np.float64(ck)).astype(np.float32)
    return p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--degrees", default="3,4")
    a = ap.parse_args()
    f = np.linspace(0.0, 1.0, (1 << 20) + 1).astype(np.float32)
    for degree in map(int, a.degrees.split(",")):
        c, err = fit(degree)
        c32 = c.astype(np.float32)
        rel = np.abs(horner_f32(c32, f).astype(np.float64) / np.exp2(f.astype(np.float64)) - 1.0).max()
        print(f"degree {degree}: max relative error {err:.3e} = 2^{np.log2(err):.2f} (fit, double); "
              f"{rel:.3e} = 2^{np.log2(rel):.2f} (float32 coefficients and arithmetic, {f.size} points)")
        for k, ck in enumerate(c32, start=1):
            print(f"  c{k} = {float(ck)!r}f  (0x{np.float32(ck).view(np.uint32):08x})")


if __name__ == "__main__":
    main()
