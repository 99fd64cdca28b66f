// compare.cu: the comparison every check in the project goes through.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <set>

#include "harness.h"

// fp32: two sources of error. (1) Sums of up to Nk terms in a different order, and fast exp: ~1e-5 relative,
// covered by the base 1e-4. (2) The scores: an fp32 dot product is off by a few ulps of the largest score it
// could produce, scale * |q|_2 * |k|_2, and a score error e changes exp(s - m) by a factor exp(e). For normal
// inputs that bound is ~8 (negligible); for the outlier rows (x30 q and k) it is ~7000, i.e. ~4e-4 per ulp,
// and fp32 cannot do better. So atol = rtol = 1e-4 + 4 ulps (2^-22) of the score bound.
Tolerance fp32_tolerance(const Problem& p, const HostTensors& in) {
    auto max_row_norm = [&](const std::vector<float>& t) {
        double m = 0;
        for (size_t r = 0; r < t.size() / p.d; ++r) {
            double n2 = 0;
            for (int c = 0; c < p.d; ++c) n2 += double(t[r * p.d + c]) * t[r * p.d + c];
            m = std::max(m, n2);
        }
        return std::sqrt(m);
    };
    const double score_bound = p.resolved_scale() * max_row_norm(in.q) * max_row_norm(in.k);
    // Capped at 0.1: past it the fp32 scores themselves carry rounding errors near 1, the softmax weights are not
    // determined by fp32 arithmetic, and an uncapped bound would exceed any possible |O| <= max |V|, so the check
    // could no longer fail. Inputs that large are legal (only overflowing ones are refused) but checked loosely.
    const double tol = std::min(0.1, 1e-4 + 0x1p-22 * score_bound);
    return {tol, tol};
}

// fp16/bf16: twice the error of the same-precision reference, plus a small atol for outputs near zero
// (a quarter of the type's unit roundoff: 2^-13 for fp16, 2^-10 for bf16). rtol is 0: the bound is absolute.
Tolerance low_precision_tolerance(DType t, double same_precision_max_abs_err) {
    const double atol = t == DType::bf16 ? 1.0 / 1024 : 1.0 / 8192;
    return {2.0 * same_precision_max_abs_err + atol, 0.0};
}

Layout o_layout(const Problem& p, int tile_rows) {
    return {size_t(p.B) * p.H, size_t(p.Nq), size_t(p.d), p.H, tile_rows};
}
Layout lse_layout(const Problem& p, int tile_rows) { return {size_t(p.B) * p.H, size_t(p.Nq), 1, p.H, tile_rows}; }
Layout kv_layout(const Problem& p, int tile_rows) {
    return {size_t(p.B) * p.H, size_t(p.Nk), size_t(p.d), p.H, tile_rows};
}

double max_abs_error(const std::vector<double>& a, const std::vector<double>& ref, const std::vector<size_t>& rows,
                     size_t cols) {
    double worst = 0;
    auto row_err = [&](size_t r) {
        for (size_t c = 0; c < cols; ++c) {
            const double x = a[r * cols + c], y = ref[r * cols + c];
            if (std::isinf(x) && x == y) continue;
            worst = std::max(worst, std::fabs(x - y));
        }
    };
    if (rows.empty())
        for (size_t r = 0; r < a.size() / cols; ++r) row_err(r);
    else
        for (size_t r : rows) row_err(r);
    return worst;
}

namespace {

struct Mismatch {
    size_t row, col;  // row = outer * rows + r
    double got, want;
};

// A guess at the cause, from where the mismatches are. Heuristics, worded as such.
std::string hint(const Layout& L, const Comparison& c, const std::vector<Mismatch>& bad_all) {
    if (c.nan == c.bad && c.bad == c.checked) return "every value is NaN: look for (-inf) - (-inf) or 0/0 in the softmax";
    if (c.nan > 0) return "NaN values: -inf arithmetic in a fully masked row or tile, or an output never written";
    const size_t partial = L.rows % L.tile_rows;
    bool only_last_tile = partial != 0;
    std::map<size_t, std::vector<const Mismatch*>> by_row;
    for (const Mismatch& m : bad_all) {
        if (m.row % L.rows < L.rows - partial) only_last_tile = false;
        by_row[m.row].push_back(&m);
    }
    if (only_last_tile) return "only rows of the last partial tile are wrong: check the bounds guards on partial tiles";
    // Whole rows off by one factor: got/want is the same for every column of each bad row.
    if (L.cols > 1) {
        bool scaled_rows = true;
        for (auto& [row, ms] : by_row) {
            if (ms.size() < std::min<size_t>(L.cols, 4)) { scaled_rows = false; break; }
            double r0 = ms[0]->got / ms[0]->want;
            for (const Mismatch* m : ms)
                if (std::fabs(m->got / m->want - r0) > 1e-3 * std::fabs(r0)) { scaled_rows = false; break; }
            if (!scaled_rows) break;
        }
        if (scaled_rows) return "whole rows are off by a constant factor: check the rescaling of O and l by exp(m_old - m_new)";
    }
    return "errors spread over rows and tiles: check indexing, or the causal mask if only some rows are wrong";
}

template <class Ref>
Comparison compare_impl(const char* what, const float* got, const Ref* ref, const Layout& L, Tolerance tol,
                        const std::vector<size_t>& only_rows) {
    Comparison c;
    std::vector<Mismatch> bad;
    auto check_row = [&](size_t row) {
        for (size_t col = 0; col < L.cols; ++col) {
            const size_t i = row * L.cols + col;
            const double x = got[i], y = double(ref[i]);
            ++c.checked;
            bool ok;
            if (std::isnan(x) || std::isnan(y)) ok = false;
            else if (std::isinf(x) || std::isinf(y)) ok = (x == y);  // only an exactly matching Inf passes
            else {
                const double err = std::fabs(x - y);
                c.max_abs = std::max(c.max_abs, err);
                if (y != 0) c.max_rel = std::max(c.max_rel, err / std::fabs(y));
                ok = err <= tol.atol + tol.rtol * std::fabs(y);
            }
            if (std::isnan(x)) ++c.nan;
            if (std::isinf(x) && x != y) ++c.inf;
            if (!ok) {
                ++c.bad;
                if (bad.size() < 100000) bad.push_back({row, col, x, y});
            }
        }
    };
    if (only_rows.empty())
        for (size_t row = 0; row < L.outer * L.rows; ++row) check_row(row);
    else
        for (size_t row : only_rows) check_row(row);
    c.ok = c.bad == 0;
    char line[512];
    std::snprintf(line, sizeof line, "%s: %s, max abs err %.3g, max rel err %.3g over %zu values (atol %.3g, rtol %.3g)",
                  what, c.ok ? "ok" : "FAIL", c.max_abs, c.max_rel, c.checked, tol.atol, tol.rtol);
    c.report = line;
    if (c.ok) return c;
    std::snprintf(line, sizeof line, "\n  %zu of %zu values wrong (%zu NaN, %zu Inf); first mismatches:", c.bad,
                  c.checked, c.nan, c.inf);
    c.report += line;
    for (size_t k = 0; k < std::min<size_t>(bad.size(), 5); ++k) {
        const Mismatch& m = bad[k];
        const size_t outer = m.row / L.rows, r = m.row % L.rows;
        std::snprintf(line, sizeof line, "\n    (b=%zu, h=%zu, row=%zu, col=%zu) in row tile %zu: got %.6g, want %.6g",
                      outer / L.heads, outer % L.heads, r, m.col, r / L.tile_rows, m.got, m.want);
        c.report += line;
    }
    c.report += "\n  hint: " + hint(L, c, bad);
    return c;
}

}  // namespace

Comparison compare(const char* what, const float* got, const double* ref, const Layout& layout, Tolerance tol,
                   const std::vector<size_t>& only_rows) {
    return compare_impl(what, got, ref, layout, tol, only_rows);
}
Comparison compare(const char* what, const float* got, const float* ref, const Layout& layout, Tolerance tol,
                   const std::vector<size_t>& only_rows) {
    return compare_impl(what, got, ref, layout, tol, only_rows);
}

std::vector<Comparison> compare_forward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                                        const std::vector<float>& lse, const std::vector<size_t>& rows,
                                        std::string* note) {
    const Reference ref = reference_forward(p, in, rows);
    Tolerance tol = fp32_tolerance(p, in);
    if (p.dtype != DType::fp32) {
        const double err = max_abs_error(reference_forward(p, in, rows, p.dtype).o, ref.o, rows, p.d);
        tol = low_precision_tolerance(p.dtype, err);
        if (note) {
            char line[200];
            std::snprintf(line, sizeof line, "same-precision (%s) reference: max abs err %.3g vs float64; O tolerance 2x that + atol",
                          dtype_name(p.dtype), err);
            *note = line;
        }
    }
    return {compare("O", o.data(), ref.o.data(), o_layout(p), tol, rows),
            compare("LSE", lse.data(), ref.lse.data(), lse_layout(p), fp32_tolerance(p, in), rows)};
}

std::vector<Comparison> compare_grads(const Problem& p, const HostTensors& in, const HostGrads& got,
                                      const HostGrads* want) {
    const ReferenceGrads ref = reference_backward(p, in);
    ReferenceGrads same;
    if (p.dtype != DType::fp32) same = reference_backward(p, in, p.dtype);
    auto tolerance = [&](const std::vector<double>& lp, const std::vector<double>& r) {
        return p.dtype == DType::fp32 ? fp32_tolerance(p, in) : low_precision_tolerance(p.dtype, max_abs_error(lp, r, {}, p.d));
    };
    if (want)
        return {compare("dQ", got.dq.data(), want->dq.data(), o_layout(p), tolerance(same.dq, ref.dq)),
                compare("dK", got.dk.data(), want->dk.data(), kv_layout(p), tolerance(same.dk, ref.dk)),
                compare("dV", got.dv.data(), want->dv.data(), kv_layout(p), tolerance(same.dv, ref.dv))};
    return {compare("dQ", got.dq.data(), ref.dq.data(), o_layout(p), tolerance(same.dq, ref.dq)),
            compare("dK", got.dk.data(), ref.dk.data(), kv_layout(p), tolerance(same.dk, ref.dk)),
            compare("dV", got.dv.data(), ref.dv.data(), kv_layout(p), tolerance(same.dv, ref.dv))};
}
