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

// A packed batch (--seqlens) is reported as rows token * H + head of one [T * H, d] matrix, its LSE as [H, Tq].
Layout o_layout(const Problem& p, int tile_rows) {
    if (p.varlen()) return {1, p.tokens_q() * p.H, size_t(p.d), 1, tile_rows};
    return {size_t(p.B) * p.H, size_t(p.Nq), size_t(p.d), p.H, tile_rows};
}
Layout lse_layout(const Problem& p, int tile_rows) {
    if (p.varlen()) return {size_t(p.H), p.tokens_q(), 1, p.H, tile_rows};
    return {size_t(p.B) * p.H, size_t(p.Nq), 1, p.H, tile_rows};
}
Layout kv_layout(const Problem& p, int tile_rows) {
    if (p.varlen()) return {1, p.tokens_k() * p.kv_heads(), size_t(p.d), 1, tile_rows};
    return {size_t(p.B) * p.kv_heads(), size_t(p.Nk), size_t(p.d), p.kv_heads(), tile_rows};
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

// What hint() knows about a row with a mismatch beyond its bad values, over all its finite columns: |got|^2,
// |want|^2 and got . want.
struct RowNorms {
    double got = 0, want = 0, dot = 0;
};

// A guess at the cause, from where the mismatches are and what they look like. Heuristics, worded as such; each
// classic bug of docs/exercises.md ("Classic bugs and their hints") lands on its own line (tests/test_hints.cu).
std::string hint(const Layout& L, const Comparison& c, const std::vector<Mismatch>& bad_all,
                 const std::map<size_t, RowNorms>& bad_rows) {
    if (c.nan == c.bad && c.bad == c.checked)
        return "every value is NaN: look for (-inf) - (-inf), 0/0 or 0 * inf in the softmax; an inverted rescale "
               "factor 1/exp(m_old - m_new) is inf at the first tile (m_old = -inf), the stray ^-1 of FlashAttention-2's "
               "Algorithm 1, line 10";
    if (c.nan > 0) return "NaN values: -inf arithmetic in a fully masked row or tile, or an output never written";
    // Blame the last partial tile only when each head also has a full tile, all of whose checked rows are right.
    const size_t partial = L.rows % L.tile_rows;
    bool only_last_tile = partial != 0 && L.rows > size_t(L.tile_rows);
    for (const Mismatch& m : bad_all)
        if (m.row % L.rows < L.rows - partial) only_last_tile = false;
    if (only_last_tile)
        return "only rows of the last partial tile are wrong: check the tile count (ceil, not floor) and the bounds "
               "guards on partial tiles";
    if (L.cols == 1) {  // one value per row (LSE): which way is it off?
        bool all_high = true, all_low = true;
        for (const Mismatch& m : bad_all) {
            all_high = all_high && std::isfinite(m.got) && std::isfinite(m.want) && m.got > m.want;
            all_low = all_low && std::isfinite(m.got) && std::isfinite(m.want) && m.got < m.want;
        }
        if (all_high)
            return "LSE too large in every wrong row, so l is too large: the sum of the earlier tiles was not rescaled by "
                   "exp(m_old - m_new) when the row max grew (or keys counted that the mask hides)";
        if (all_low) return "LSE too small in every wrong row, so l is too small: keys were missed (a tile skipped, or a mask hiding too much)";
        return "errors spread over rows and tiles: check indexing, or the causal mask if only some rows are wrong";
    }
    // Each wrong row against the row it should be: the factor r that best maps want onto got (least squares over the
    // whole row), and whether the error lies along want, i.e. the row is want scaled by r (within 1% of the error).
    size_t scaled = 0, smaller = 0, larger = 0;
    for (const auto& [row, n] : bad_rows) {
        const double r = n.want > 0 ? n.dot / n.want : 0;
        const double off_line = std::max(0.0, n.got - (n.want > 0 ? n.dot * n.dot / n.want : 0));  // squared
        const double err = std::max(0.0, n.got - 2 * n.dot + n.want);                               // squared
        scaled += off_line <= 1e-4 * err && r != 0;
        smaller += r > 0 && r < 1;
        larger += r > 1.02;
    }
    const size_t rows = bad_rows.size();
    const std::string twice = "O divided by l more than once (normalise once, after the last tile; inside the loop "
                              "FlashAttention-2 keeps O unnormalised)";
    if (scaled == rows && smaller == rows) return "whole rows are scaled down by a constant factor: " + twice;
    if (scaled == rows && larger == rows)
        return "whole rows are scaled up by a constant factor: O was not divided by l at the end (or by too small an l)";
    if (scaled == rows) return "whole rows are off by a constant factor: check the rescaling of O and l by exp(m_old - m_new)";
    if (smaller * 10 >= rows * 9) return "wrong rows are too small: " + twice;
    if (larger * 10 >= rows * 9)
        return "wrong rows are too large (weights that sum to more than 1): O was not rescaled by exp(m_old - m_new) "
               "when the row max grew";
    return "errors spread over rows and tiles: check indexing, or the causal mask if only some rows are wrong";
}

template <class Ref>
Comparison compare_impl(const char* what, const float* got, const Ref* ref, const Layout& L, Tolerance tol,
                        const std::vector<size_t>& only_rows) {
    Comparison c;
    std::vector<Mismatch> bad;
    std::map<size_t, RowNorms> bad_rows;
    auto check_row = [&](size_t row) {
        RowNorms norms;
        bool row_bad = false;
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
            if (std::isfinite(x) && std::isfinite(y)) norms.got += x * x, norms.want += y * y, norms.dot += x * y;
            if (!ok) {
                ++c.bad;
                row_bad = true;
                if (bad.size() < 100000) bad.push_back({row, col, x, y});
            }
        }
        if (row_bad && bad_rows.size() < 100000) bad_rows[row] = norms;
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
    c.report += "\n  hint: " + hint(L, c, bad, bad_rows);
    return c;
}

// Replaces the hint line of a failed comparison's report.
void set_hint(Comparison* c, const std::string& hint) {
    const size_t at = c->report.rfind("\n  hint: ");
    if (!c->ok && at != std::string::npos) c->report = c->report.substr(0, at) + "\n  hint: " + hint;
}

// The first `keep` rows of every head of a [heads, n, d] tensor.
std::vector<float> first_rows(const std::vector<float>& t, size_t heads, int n, int keep, int d) {
    std::vector<float> out;
    for (size_t h = 0; h < heads; ++h)
        out.insert(out.end(), t.begin() + h * n * d, t.begin() + (h * n + keep) * d);
    return out;
}

std::vector<size_t> all_rows(const Problem& p) {
    std::vector<size_t> all(p.lse_elems());
    for (size_t r = 0; r < all.size(); ++r) all[r] = r;
    return all;
}

// Attention with the causal mask aligned top-left (row i sees keys j <= i, PyTorch's is_causal), on the rows listed
// (all when empty), built from the bottom-right reference. With Nk >= Nq it is the bottom-right mask on the first Nq
// keys. With Nk < Nq, rows i < Nk are the square bottom-right problem of the first Nk rows, and rows i >= Nk see
// every key.
Reference top_left_reference(const Problem& p, const HostTensors& in, const std::vector<size_t>& rows) {
    const size_t heads = size_t(p.B) * p.H;
    if (p.Nk >= p.Nq) {
        Problem q = p;
        q.Nk = p.Nq;
        const size_t kv_heads = size_t(p.B) * p.kv_heads();
        const HostTensors cut{in.q, first_rows(in.k, kv_heads, p.Nk, p.Nq, p.d), first_rows(in.v, kv_heads, p.Nk, p.Nq, p.d), {}, {}};
        return reference_forward(q, cut, rows);
    }
    std::vector<size_t> square_rows, full_rows;
    for (size_t r : rows.empty() ? all_rows(p) : rows) {
        const size_t bh = r / p.Nq, i = r % p.Nq;
        if (i < size_t(p.Nk)) square_rows.push_back(bh * p.Nk + i);
        else full_rows.push_back(r);
    }
    Problem square = p, unmasked = p;
    square.Nq = p.Nk;
    unmasked.causal = false;
    const HostTensors first{first_rows(in.q, heads, p.Nq, p.Nk, p.d), in.k, in.v, {}, {}};
    const Reference a = square_rows.empty() ? Reference{} : reference_forward(square, first, square_rows);
    Reference r;
    if (full_rows.empty()) r.o.assign(p.q_elems(), NAN), r.lse.assign(p.lse_elems(), NAN);
    else r = reference_forward(unmasked, in, full_rows);
    for (size_t s : square_rows) {
        const size_t row = s / p.Nk * p.Nq + s % p.Nk;
        r.lse[row] = a.lse[s];
        std::copy(a.o.begin() + s * p.d, a.o.begin() + (s + 1) * p.d, r.o.begin() + row * p.d);
    }
    return r;
}

// The hints of a forward check that need the problem and not only the numbers; they replace compare()'s guess.
void refine_forward_hints(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                          const std::vector<float>& lse, const std::vector<size_t>& rows, Tolerance tol, Comparison* co,
                          Comparison* cl) {
    if (co->ok && cl->ok) return;
    // NaN exactly in the rows that see no key (causal, Nq > Nk: rows 0 .. Nq - Nk - 1 of every head).
    const int empty_rows = p.causal ? std::max(0, p.Nq - p.Nk) : 0;
    if (empty_rows > 0 && co->nan + cl->nan > 0) {
        bool only_empty_rows = true;
        for (size_t r : rows.empty() ? all_rows(p) : rows) {
            bool nan = std::isnan(lse[r]);
            for (int c = 0; c < p.d; ++c) nan = nan || std::isnan(o[r * p.d + c]);
            only_empty_rows = only_empty_rows && (!nan || int(r % p.Nq) < empty_rows);
        }
        if (only_empty_rows) {
            const std::string h = "NaN only in rows that see no key (causal, Nq > Nk): (-inf) - (-inf) = NaN; such a row "
                                  "must end with O = 0 and LSE = -inf (an empty part's exp factor is 0: rescale_factor)";
            set_hint(co, h), set_hint(cl, h);
            return;
        }
    }
    auto matches = [&](const Reference& r) {
        return compare("O", o.data(), r.o.data(), o_layout(p), tol, rows).ok &&
               compare("LSE", lse.data(), r.lse.data(), lse_layout(p), fp32_tolerance(p, in), rows).ok;
    };
    if (p.causal && p.Nq != p.Nk && !p.has_extensions() && matches(top_left_reference(p, in, rows))) {
        const std::string h = "these are the outputs of a causal mask aligned top-left (key j <= i, PyTorch's is_causal); "
                              "this project aligns it bottom-right: j <= i + Nk - Nq (causal_key_end, tests/problem.h)";
        set_hint(co, h), set_hint(cl, h);
        return;
    }
    if (p.causal) {
        Problem unmasked = p;
        unmasked.causal = false;
        if (matches(reference_forward(unmasked, in, rows))) {
            set_hint(co, "these are the outputs without the causal mask: the mask was not applied"), set_hint(cl, "the causal mask was not applied");
            return;
        }
    }
    if (co->ok || cl->ok || cl->report.find("LSE too large") == std::string::npos) return;
    // l too large: by keys that should not count (O then shrinks by one factor per row, l_true / l), or by earlier
    // tiles that were not rescaled (O's weights are then wrong, not just scaled).
    if (co->report.find("scaled down by a constant factor") != std::string::npos) {
        const std::string h = "O scaled down and LSE too large: keys counted in l that no row may see, e.g. zero-padded "
                              "keys past Nk in the last K/V tile scored 0 and not masked (an unguarded last tile)";
        set_hint(co, h), set_hint(cl, h);
    } else {
        set_hint(co, "O wrong and LSE too large in every wrong row: l and O were not rescaled by exp(m_old - m_new) "
                     "when the row max grew, so the earlier tiles weigh too much");
    }
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
    Comparison co = compare("O", o.data(), ref.o.data(), o_layout(p), tol, rows);
    Comparison cl = compare("LSE", lse.data(), ref.lse.data(), lse_layout(p), fp32_tolerance(p, in), rows);
    if (!p.varlen()) refine_forward_hints(p, in, o, lse, rows, tol, &co, &cl);  // its hints read the padded layout
    return {co, cl};
}

std::vector<Comparison> compare_grads(const Problem& p, const HostTensors& in, const HostGrads& got,
                                      const HostGrads* want) {
    const ReferenceGrads ref = reference_backward(p, in);
    ReferenceGrads same;
    if (p.dtype != DType::fp32) same = reference_backward(p, in, p.dtype);
    auto tolerance = [&](const std::vector<double>& lp, const std::vector<double>& r) {
        return p.dtype == DType::fp32 ? fp32_tolerance(p, in) : low_precision_tolerance(p.dtype, max_abs_error(lp, r, {}, p.d));
    };
    std::vector<Comparison> cs;
    if (want)
        cs = {compare("dQ", got.dq.data(), want->dq.data(), o_layout(p), tolerance(same.dq, ref.dq)),
              compare("dK", got.dk.data(), want->dk.data(), kv_layout(p), tolerance(same.dk, ref.dk)),
              compare("dV", got.dv.data(), want->dv.data(), kv_layout(p), tolerance(same.dv, ref.dv))};
    else
        cs = {compare("dQ", got.dq.data(), ref.dq.data(), o_layout(p), tolerance(same.dq, ref.dq)),
              compare("dK", got.dk.data(), ref.dk.data(), kv_layout(p), tolerance(same.dk, ref.dk)),
              compare("dV", got.dv.data(), ref.dv.data(), kv_layout(p), tolerance(same.dv, ref.dv))};
    if (p.has_bias()) {  // dbias = dS summed over the broadcast dimensions, [bias_batch, bias_heads, Nq, Nk]
        const Layout bias_layout{size_t(p.bias_batch) * p.bias_heads, size_t(p.Nq), size_t(p.Nk), p.bias_heads, 64};
        const Tolerance tol = p.dtype == DType::fp32 ? fp32_tolerance(p, in)
                                                     : low_precision_tolerance(p.dtype, max_abs_error(same.dbias, ref.dbias, {}, p.Nk));
        if (got.dbias.size() != p.bias_elems() || (want && want->dbias.size() != p.bias_elems()))
            cs.push_back(Comparison{false, 0, 0, 0, 0, 0, 0, "dbias: missing (the gradient of --bias was not computed)"});
        else if (want)
            cs.push_back(compare("dbias", got.dbias.data(), want->dbias.data(), bias_layout, tol));
        else
            cs.push_back(compare("dbias", got.dbias.data(), ref.dbias.data(), bias_layout, tol));
    }
    return cs;
}
