// stage_main.cu: what a stage program's run does (its command line is parsed by cli.cu):
// inputs (random or --load), the stage on the GPU (or its CPU model), checks against the stage below and the
// float64 reference, timing, --save, and one summary row for the ladder printed by `make run`.
#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstring>
#include <tuple>
#include <sys/stat.h>

#include "cuda_check.h"
#include "harness.h"
#include "common/philox.cuh"  // dropout_threshold

// ------------------------------------------------------------------------------------------------ running
namespace {

// Exit code of a run in which a check that --check asked for did not run (docs/conventions.md, "Exit codes").
constexpr int kExitCheckSkipped = 4;
// The stages below v2 have none of the extensions: --check compares an extension run with float64 only.
constexpr const char* kBelowHasNoExtensions = "it has no --kv-heads, --window, --dropout, --bias, --alibi or --seqlens";

// The float64 reference backward costs about 8*B*H*Nq*Nk*d operations; beyond this budget it is skipped.
constexpr double kBackwardReferenceBudget = 4e9;
bool backward_reference_fits(const Problem& p) {
    return 8.0 * p.B * p.H * double(p.Nq) * p.Nk * p.d <= kBackwardReferenceBudget;
}
// The largest sizes like p's whose backward the float64 reference still checks, as flags to type.
std::string backward_reference_hint(const Problem& p) {
    const double max_nq_nk = kBackwardReferenceBudget / (8.0 * p.B * p.H * p.d);  // Nq * Nk may be this large
    if (max_nq_nk < 1.0) {  // not even N = 1 at this batch and head count: shrink those first
        Problem one = p;
        one.B = one.H = 1;
        return "--batch 1 --heads 1 " + backward_reference_hint(one);
    }
    const double f = std::sqrt(max_nq_nk / (double(p.Nq) * p.Nk));  // shrink Nq and Nk by the same factor
    const long nq = std::max(1L, long(p.Nq * f)), nk = std::max(1L, long(p.Nk * f));
    return p.Nq == p.Nk ? "--n " + std::to_string(nq) : "--nq " + std::to_string(nq) + " --nk " + std::to_string(nk);
}

struct Summary {
    std::string check = "not checked";
    bool skipped = false;  // a check asked for with --check did not run
    double ms = 0, tflops = 0, gbs = 0, mib = 0;
    double traffic_mib = 0;  // CPU model: the device-memory traffic it counted, in fp32 MiB
    bool ok = true;
};

// A float32 tensor of `dims` dimensions: 4, [B, H, N, d]; 3 in a packed batch, [T, H, d].
bool load_tensor(const std::string& dir, const char* name, std::vector<float>* data, std::vector<size_t>* shape,
                 std::string* err, size_t dims = 4) {
    if (!npy_read(dir + "/" + name, data, shape, err)) return false;
    if (shape->size() != dims)
        return *err = dir + "/" + name + (dims == 4 ? ": expected 4 dimensions [B,H,N,d]"
                                                    : ": expected 3 dimensions [T,H,d] (a packed batch)"), false;
    for (size_t s : *shape)
        if (s == 0 || s > size_t(INT_MAX)) return *err = dir + "/" + name + ": a dimension is 0 or too large", false;
    return true;
}

// A packed batch's sequence lengths from cu_seqlens (FlashAttention's form: {0, n_0, n_0 + n_1, ..., T}, int32):
// B + 1 entries from 0, each sequence at least one token long, the last one the tokens of its tensor.
bool load_seqlens(const std::string& dir, const char* name, size_t tokens, std::vector<int>* lengths, std::string* err) {
    std::vector<int32_t> cu;
    std::vector<size_t> shape;
    if (!npy_read_int32(dir + "/" + name, &cu, &shape, err)) return false;
    const std::string file = dir + "/" + name;
    if (shape.size() != 1 || cu.size() < 2)
        return *err = file + ": expected one dimension of B + 1 >= 2 entries {0, n_0, n_0 + n_1, ..., T}", false;
    if (cu[0] != 0) return *err = file + ": must start at 0", false;
    lengths->clear();
    for (size_t s = 1; s < cu.size(); ++s) {
        if (cu[s] <= cu[s - 1]) return *err = file + ": must increase (every sequence at least one token)", false;
        lengths->push_back(cu[s] - cu[s - 1]);
    }
    if (size_t(cu.back()) != tokens)
        return *err = file + ": ends at " + std::to_string(cu.back()) + ", but its tensor has " +
                      std::to_string(tokens) + " tokens", false;
    return true;
}

// Reads q, k, v (and dO for the backward pass) and sets the problem's sizes from their shapes. With
// cu_seqlens_q.npy in the folder the batch is packed: q, dO [Tq, H, d], k, v [Tk, Hk, d], and cu_seqlens_q.npy,
// cu_seqlens_k.npy give the sequences (as FlashAttention's varlen interface takes them).
bool load_inputs(const Options& o, Problem* p, HostTensors* in, std::string* err) {
    std::vector<size_t> sq, sk, sv, sdo;
    struct stat st;
    const bool packed = stat((o.load_dir + "/cu_seqlens_q.npy").c_str(), &st) == 0;
    const size_t dims = packed ? 3 : 4;
    if (!load_tensor(o.load_dir, "q.npy", &in->q, &sq, err, dims) ||
        !load_tensor(o.load_dir, "k.npy", &in->k, &sk, err, dims) ||
        !load_tensor(o.load_dir, "v.npy", &in->v, &sv, err, dims))
        return false;
    if (sk != sv) return *err = "k.npy and v.npy must have the same shape", false;
    if (packed) {  // [T, H, d]: the heads and d are dimensions 1 and 2
        if (sq[2] != sk[2] || sq[1] % sk[1] != 0)
            return *err = "q.npy and k.npy must agree in d, and k.npy's heads must divide q.npy's (grouped-query attention)", false;
        if (!load_seqlens(o.load_dir, "cu_seqlens_q.npy", sq[0], &p->seqlens_q, err) ||
            !load_seqlens(o.load_dir, "cu_seqlens_k.npy", sk[0], &p->seqlens_k, err))
            return false;
        if (p->seqlens_q.size() != p->seqlens_k.size())
            return *err = "cu_seqlens_q.npy and cu_seqlens_k.npy must list the same number of sequences", false;
        if (p->has_bias()) return *err = "--bias cannot be combined with a packed batch (a [B, H, Nq, Nk] bias has no packed form)", false;
        p->B = int(p->seqlens_q.size()), p->H = int(sq[1]), p->Hk = int(sk[1]), p->d = int(sq[2]);
        p->Nq = *std::max_element(p->seqlens_q.begin(), p->seqlens_q.end());
        p->Nk = *std::max_element(p->seqlens_k.begin(), p->seqlens_k.end());
    } else {
        if (sq[0] != sk[0] || sq[3] != sk[3] || sk[1] == 0 || sq[1] % sk[1] != 0)
            return *err = "q.npy and k.npy must agree in B and d, and k.npy's heads must divide q.npy's (grouped-query attention)", false;
        p->B = int(sq[0]), p->H = int(sq[1]), p->Nq = int(sq[2]), p->Nk = int(sk[2]), p->d = int(sq[3]);
        p->Hk = int(sk[1]);
    }
    if (p->has_bias()) {  // --bias with --load: bias.npy, [B or 1, H or 1, Nq, Nk]
        std::vector<size_t> sb;
        if (!load_tensor(o.load_dir, "bias.npy", &in->bias, &sb, err)) return false;
        if ((sb[0] != 1 && sb[0] != sq[0]) || (sb[1] != 1 && sb[1] != sq[1]) || sb[2] != sq[2] || sb[3] != sk[2])
            return *err = "bias.npy must be [B or 1, H or 1, Nq, Nk]", false;
        p->bias_batch = int(sb[0]), p->bias_heads = int(sb[1]);
    }
    if (o.backward) {
        if (!load_tensor(o.load_dir, "do.npy", &in->dO, &sdo, err, dims)) return false;
        if (sdo != sq) return *err = "do.npy must have the shape of q.npy", false;
    }
    for (auto* t : {&in->q, &in->k, &in->v, &in->dO, &in->bias})
        for (float& x : *t) {
            if (!std::isfinite(x)) return *err = "input files contain NaN or Inf", false;
            const float rounded = round_to(p->dtype, x);
            if (!std::isfinite(rounded))
                return *err = "input value " + std::to_string(x) + " is outside the range of " + dtype_name(p->dtype) +
                              " (largest finite fp16: 65504)", false;
            x = rounded;
        }
    // Every score scale * q_i . k_j, and every partial sum of its products, is at most scale * |q_i| |k_j|. Kept
    // under 1e37, the kernels' fp32 products, sums and the exp2 scaling (x 1.44) cannot overflow FLT_MAX (3.4e38).
    double q_norm = 0, k_norm = 0;
    for (auto [t, norm] : {std::pair{&in->q, &q_norm}, std::pair{&in->k, &k_norm}})
        for (size_t r = 0; r < t->size() / p->d; ++r) {  // every row of d values, padded layout or packed
            double n2 = 0;
            for (int c = 0; c < p->d; ++c) n2 += double((*t)[r * p->d + c]) * (*t)[r * p->d + c];
            *norm = std::max(*norm, std::sqrt(n2));
        }
    const double score_bound = double(p->resolved_scale()) * q_norm * k_norm;
    if (score_bound > 1e37 || q_norm * k_norm > 1e37) {
        char line[200];
        std::snprintf(line, sizeof line, "the inputs' scores reach %.3g (scale * |q| * |k|), beyond what fp32 can "
                      "accumulate (about 1e37 with headroom; FLT_MAX is 3.4e38): scale q and k down", score_bound);
        return *err = line, false;
    }
    return true;
}

bool save_outputs(const std::string& dir, const Problem& p, const std::vector<std::pair<const char*, const std::vector<float>*>>& files) {
    mkdir(dir.c_str(), 0755);  // may exist already; a real failure shows up when writing
    for (auto& [name, data] : files) {
        std::vector<size_t> shape = {size_t(p.B), size_t(p.H), size_t(p.Nq), size_t(p.d)};
        if (std::strcmp(name, "lse.npy") == 0) shape.pop_back();
        if (std::strcmp(name, "dk.npy") == 0 || std::strcmp(name, "dv.npy") == 0) shape[1] = size_t(p.kv_heads()), shape[2] = size_t(p.Nk);
        if (std::strcmp(name, "dbias.npy") == 0) shape = {size_t(p.bias_batch), size_t(p.bias_heads), size_t(p.Nq), size_t(p.Nk)};
        if (p.varlen()) {  // packed: [T, H, d], K/V gradients [Tk, Hk, d], LSE [H, Tq]
            const bool keys = std::strcmp(name, "dk.npy") == 0 || std::strcmp(name, "dv.npy") == 0;
            shape = {keys ? p.tokens_k() : p.tokens_q(), size_t(keys ? p.kv_heads() : p.H), size_t(p.d)};
            if (std::strcmp(name, "lse.npy") == 0) shape = {size_t(p.H), p.tokens_q()};
        }
        std::string err;
        if (!npy_write(dir + "/" + name, *data, shape, &err)) {
            std::fprintf(stderr, "error: %s\n", err.c_str());
            return false;
        }
    }
    std::printf("saved to %s\n", dir.c_str());
    return true;
}

// ------------------------------------------------------------------------------------------- CPU model runs
// A CPU model works on one core; long runs go head by head (every model treats the B*H heads independently, so the
// results and the counted traffic are the same; with grouped-query attention, K/V head by K/V head with the query
// heads that read it) with a progress line on stderr, which stays free of error lines.
double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

template <typename RunHead>
void by_head_with_progress(const Problem& p, double flops, const char* what, const RunHead& run_head) {
    const int heads = p.B * p.kv_heads();
    const bool long_run = flops > 2e10;  // several seconds for the models (a few GFLOP/s on one core)
    if (long_run)
        std::printf("  %s: about %.3g GFLOP on one CPU core, so this takes a while; progress on stderr\n", what,
                    flops / 1e9);
    std::fflush(stdout);  // the note comes before the wait, also when stdout is a pipe
    const double start = now_seconds();
    double shown = start;
    for (int bh = 0; bh < heads; ++bh) {
        run_head(bh);
        const double t = now_seconds();
        if (long_run && (t - shown > 1.0 || bh + 1 == heads)) {
            shown = t;
            std::fprintf(stderr, "\r  %s: head %d of %d, %.0f s, about %.0f s left   %s", what, bh + 1, heads,
                         t - start, (t - start) / (bh + 1) * (heads - bh - 1), bh + 1 == heads ? "\n" : "");
        }
    }
}

// Host memory a run takes, against what the machine has available: the inputs and outputs (and gradients) on the
// host, twice over for the CPU model's "device memory" copies and per-head slices, plus one head's Nq x Nk score
// matrices where the CPU model materialises them. Refused up front instead of failing in an allocation.
bool host_memory_fits(const Stage& s, const Options& o, std::string* why) {
    const Problem& p = o.p;
    const double tensors = (o.backward ? 4.0 * p.q_elems() + 4.0 * p.kv_elems() : 2.0 * p.q_elems() + 2.0 * p.kv_elems()) * 4;
    double need = (tensors + (o.backward ? 2.0 : 1.0) * p.bias_elems() * 4) * (o.cpu ? 2 : 1);
    if (o.cpu) need += s.cpu_model_score_matrices * (o.backward ? 3.0 : 1.0) * double(p.Nq) * p.Nk * 4;
    double available = 0;
    std::FILE* f = std::fopen("/proc/meminfo", "r");
    if (f) {
        char line[256];
        while (std::fgets(line, sizeof line, f))
            if (std::sscanf(line, "MemAvailable: %lf kB", &available) == 1) break;
        std::fclose(f);
    }
    available *= 1024;
    if (available == 0 || need <= available) return true;  // unknown (not Linux): try, as before
    char line[300];
    std::snprintf(line, sizeof line, "%s needs about %.1f GiB of host memory for this problem%s, %.1f GiB are "
                  "available: choose a smaller problem", s.name, need / 1073741824.0,
                  o.cpu ? " (CPU model)" : "", available / 1073741824.0);
    *why = line;
    return false;
}

// Part number bh of a tensor cut into equal consecutive parts of per_head elements (a head, or a group of heads, of
// a [B, H, rows, d] or [B, H, rows] tensor), and its inverse.
std::vector<float> head_slice(const std::vector<float>& t, int bh, size_t per_head) {
    return std::vector<float>(t.begin() + bh * per_head, t.begin() + (bh + 1) * per_head);
}
void put_head(std::vector<float>* t, int bh, const std::vector<float>& part) {
    std::copy(part.begin(), part.end(), t->begin() + size_t(bh) * part.size());
}

// The inputs of one K/V head and the query heads that read it (one head when there is no grouping): a problem of
// its own with B = 1, H = the group and Hk = 1, whose first head is head_offset = b * H + h of the whole batch.
HostTensors group_inputs(const Problem& p, const HostTensors& in, int bkv) {
    const size_t qn = size_t(p.group()) * p.Nq * p.d, kn = size_t(p.Nk) * p.d;
    HostTensors h{head_slice(in.q, bkv, qn), head_slice(in.k, bkv, kn), head_slice(in.v, bkv, kn), {}, {}};
    if (!in.dO.empty()) h.dO = head_slice(in.dO, bkv, qn);
    return h;
}
Problem group_problem(const Problem& p, int bkv) {
    Problem one = p;
    one.B = 1, one.H = p.group(), one.Hk = 1;
    one.alibi_H = p.alibi_heads();  // the slopes of the whole problem's heads
    one.head_offset = p.head_offset + int(p.first_query_head(bkv));  // dropout's key
    return one;
}

void cpu_forward(const Stage& s, const Problem& p, const HostTensors& in, std::vector<float>* O,
                 std::vector<float>* LSE, ModelTraffic* t) {
    if (p.varlen()) {  // a packed batch: each sequence as a problem of its own
        O->assign(p.q_elems(), 0.0f);
        LSE->assign(p.lse_elems(), 0.0f);
        for (int seq = 0; seq < p.B; ++seq) {
            std::vector<float> o, lse;
            cpu_forward(s, sequence_problem(p, seq), sequence_inputs(p, in, seq), &o, &lse, t);
            put_sequence_rows(p, seq, false, p.H, o, O);
            put_sequence_lse(p, seq, lse, LSE);
        }
        return;
    }
    if (p.has_bias()) {  // a bias broadcast over heads does not split by head: the whole problem at once
        s.cpu_forward(p, in, O, LSE, t);
        return;
    }
    O->assign(p.q_elems(), 0.0f);
    LSE->assign(p.lse_elems(), 0.0f);
    by_head_with_progress(p, p.forward_flops(), "CPU model", [&](int bkv) {
        std::vector<float> o, lse;
        s.cpu_forward(group_problem(p, bkv), group_inputs(p, in, bkv), &o, &lse, t);
        put_head(O, bkv, o);
        put_head(LSE, bkv, lse);
    });
}

void cpu_backward(const Stage& s, const Problem& p, const HostTensors& in, const std::vector<float>& O,
                  const std::vector<float>& LSE, HostGrads* g, ModelTraffic* t) {
    if (p.varlen()) {  // a packed batch: each sequence as a problem of its own
        g->dq.assign(p.q_elems(), 0.0f);
        g->dk.assign(p.kv_elems(), 0.0f);
        g->dv.assign(p.kv_elems(), 0.0f);
        std::vector<float> o_seq, lse_seq;
        for (int seq = 0; seq < p.B; ++seq) {
            const Problem one = sequence_problem(p, seq);
            const HostTensors in_seq = sequence_inputs(p, in, seq);
            sequence_outputs(p, O, LSE, seq, &o_seq, &lse_seq);
            HostGrads part;
            cpu_backward(s, one, in_seq, o_seq, lse_seq, &part, t);
            put_sequence_rows(p, seq, false, p.H, part.dq, &g->dq);
            put_sequence_rows(p, seq, true, p.kv_heads(), part.dk, &g->dk);
            put_sequence_rows(p, seq, true, p.kv_heads(), part.dv, &g->dv);
        }
        return;
    }
    if (p.has_bias()) {  // as in cpu_forward; dbias sums over the broadcast dimensions
        s.cpu_backward(p, in, O, LSE, g, t);
        return;
    }
    g->dq.assign(p.q_elems(), 0.0f);
    g->dk.assign(p.kv_elems(), 0.0f);
    g->dv.assign(p.kv_elems(), 0.0f);
    by_head_with_progress(p, p.backward_flops(), "CPU model backward", [&](int bkv) {
        HostGrads part;
        s.cpu_backward(group_problem(p, bkv), group_inputs(p, in, bkv), head_slice(O, bkv, size_t(p.group()) * p.Nq * p.d),
                       head_slice(LSE, bkv, size_t(p.group()) * p.Nq), &part, t);
        put_head(&g->dq, bkv, part.dq);
        put_head(&g->dk, bkv, part.dk);
        put_head(&g->dv, bkv, part.dv);
    });
}

void print_row(const Stage& s, const Options& o, const Summary& sum) {
    const Problem& p = o.p;
    if (o.bench)
        std::printf("csv,%s%s,%s,%s,%d,%d,%d,%d,%d,%d,%.4f,%.3f,%.1f,%.1f\n", s.name,
                    p.kernel > 0 ? (":k" + std::to_string(p.kernel)).c_str() : "", o.backward ? "bwd" : "fwd",
                    dtype_name(p.dtype), p.B, p.H, p.Nq, p.Nk, p.d, p.causal, sum.ms, sum.tflops, sum.gbs, sum.mib);
    char time[64] = "-", rate[64] = "-", mem[64] = "-";
    if (sum.ms > 0) {
        std::snprintf(time, sizeof time, "%.3f ms", sum.ms);
        std::snprintf(rate, sizeof rate, "%.2f", sum.tflops);
    }
    if (sum.mib > 0) std::snprintf(mem, sizeof mem, "%.0f MiB", sum.mib);
    if (sum.traffic_mib > 0) std::snprintf(mem, sizeof mem, "%.1f MiB moved", sum.traffic_mib);
    std::string label = s.name;  // e.g. "v2 bf16 bwd"
    if (s.has_dtype) label += std::string(" ") + dtype_name(p.dtype);
    if (o.backward) label += " bwd";
    if (p.kernel > 0) label += " k" + std::to_string(p.kernel);
    std::printf("| %-14s | %-58s | %10s | %8s TFLOP/s | %9s |\n", label.c_str(), sum.check.c_str(), time, rate, mem);
}

// Prints each comparison and folds it into the summary. Returns whether all passed.
bool report(const std::vector<Comparison>& cs, const char* against, Summary* sum) {
    bool ok = true;
    for (const Comparison& c : cs) {
        std::printf("  vs %s: %s\n", against, c.report.c_str());
        ok = ok && c.ok;
    }
    sum->ok = sum->ok && ok;
    return ok;
}

int run_forward(const Stage& s, const Options& o, const HostTensors& in) {
    const Problem& p = o.p;
    Summary sum;
    std::vector<float> O, LSE;
    if (o.cpu) {
        ModelTraffic t;
        cpu_forward(s, p, in, &O, &LSE, &t);
        sum.traffic_mib = (t.reads + t.writes) * 4 / 1048576.0;
        std::printf("  CPU model traffic: %.4g elements read, %.4g written (%.1f MiB in fp32)\n", t.reads, t.writes,
                    sum.traffic_mib);
    } else {
        if (const std::string why = s.describe ? s.describe(p) : ""; !why.empty()) {
            std::fprintf(stderr, "error: %s: %s\n", s.name, why.c_str());
            return 3;
        }
        DeviceBuffer::reset_peak();
        const size_t before = DeviceBuffer::live_bytes();
        DeviceBuffer q = upload(in.q, p.dtype, "Q"), k = upload(in.k, p.dtype, "K"), v = upload(in.v, p.dtype, "V");
        const ExtensionInputs ext = upload_extension_inputs(p, in);
        DeviceBuffer o_dev(p.q_elems() * dtype_bytes(p.dtype), "O"), lse(p.lse_elems() * 4, "LSE");
        DeviceBuffer ws(s.workspace_bytes ? s.workspace_bytes(p) : 0, "workspace");
        sum.mib = (DeviceBuffer::peak_bytes() - before) / 1048576.0;
        const ForwardArgs args = ext.with(ForwardArgs{q.get(), k.get(), v.get(), o_dev.get(), lse.f32(), ws.get()});
        o_dev.poison();
        lse.poison();
        s.forward(p, args);
        CUDA_CHECK_LAUNCH();
        O = download(o_dev, p.q_elems(), p.dtype);
        LSE = download(lse, p.lse_elems(), DType::fp32);
        if (o.bench) {
            const Timing t = time_gpu([&] { s.forward(p, args); }, o.reps);
            CUDA_CHECK_LAUNCH();
            sum.ms = t.median_ms;
            sum.tflops = p.forward_flops() / (t.median_ms * 1e-3) / 1e12;
            const double bytes = double(p.q_elems() * 2 + p.kv_elems() * 2) * dtype_bytes(p.dtype) + p.lse_elems() * 4.0;
            sum.gbs = bytes / (t.median_ms * 1e-3) / 1e9;
            std::printf("  time: median %.4f ms (min %.4f, max %.4f, %d reps), %.2f TFLOP/s, %.1f GB/s of Q,K,V,O,LSE\n",
                        t.median_ms, t.min_ms, t.max_ms, t.reps, sum.tflops, sum.gbs);
        }
        std::printf("  device memory: %.1f MiB (inputs, outputs, workspace)\n", sum.mib);
    }
    if (o.check) {
        sum.check.clear();
        const std::vector<size_t> rows = rows_to_check(p);
        if (!rows.empty()) std::printf("  checking %zu sampled rows against float64 (all rows would be slow here)\n", rows.size());
        std::string note;
        const std::vector<Comparison> cs = compare_forward(p, in, O, LSE, rows, &note);
        if (!note.empty()) std::printf("  %s\n", note.c_str());
        const bool ok64 = report(cs, "float64", &sum);
        if (s.below && !o.cpu) {
            const Stage& b = *s.below;
            Problem below = p;
            below.dtype = DType::fp32;  // the stage below is fp32; the inputs are already rounded to p.dtype
            below.kernel = 0;
            std::string why = b.unsupported ? b.unsupported(below) : "";
            if (why.empty() && p.has_extensions()) why = kBelowHasNoExtensions;
            std::string mem_why;
            const size_t need = (below.q_elems() * 2 + below.kv_elems() * 2 + below.lse_elems()) * 4 +
                                (b.workspace_bytes ? b.workspace_bytes(below) : 0);
            if (why.empty() && !device_memory_fits(need, &mem_why)) why = mem_why;
            if (!why.empty()) {
                std::printf("  vs %s: skipped (%s)\n", b.name, why.c_str());
                sum.check = "vs " + std::string(b.name) + " skipped; ";
            } else {
                const Outputs want = gpu_forward(below, in, b.forward, b.workspace_bytes);
                // Low precision: the fp32 stage below is as good as the float64 reference, so the same rule applies.
                Tolerance tol = fp32_tolerance(p, in);
                if (p.dtype != DType::fp32)
                    tol = low_precision_tolerance(p.dtype, max_abs_error(reference_forward(p, in, rows, p.dtype).o,
                                                                         reference_forward(p, in, rows).o, rows, p.d));
                const Comparison co = compare("O", O.data(), want.o.data(), o_layout(p), tol);
                const Comparison cl = compare("LSE", LSE.data(), want.lse.data(), lse_layout(p), fp32_tolerance(p, in));
                std::printf("  vs %s: %s\n  vs %s: %s\n", b.name, co.report.c_str(), b.name, cl.report.c_str());
                sum.ok = sum.ok && co.ok && cl.ok;
                sum.check = std::string(co.ok && cl.ok ? "ok" : "FAIL") + " vs " + b.name + ", ";
            }
        }
        sum.check += std::string(ok64 ? "ok" : "FAIL") + " vs float64";
    }
    if (!o.save_dir.empty() && !save_outputs(o.save_dir, p, {{"o.npy", &O}, {"lse.npy", &LSE}})) return 1;
    print_row(s, o, sum);
    return sum.ok ? 0 : 1;
}

// The nearest stage below that has a backward pass (for v2: naive; v1 and online_softmax have none).
const Stage* below_with_backward(const Stage& s) {
    const Stage* b = s.below;
    while (b && !b->backward) b = b->below;
    return b;
}

// Stage b's backward (fp32, on the same inputs): its own forward for O and LSE, then its backward.
bool check_below_backward(const Stage& b, const Problem& p, const HostTensors& in, const HostGrads& got, Summary* sum) {
    Problem below = p;
    below.dtype = DType::fp32;
    below.kernel = 0;
    below.deterministic = false;  // --deterministic is this stage's; the stage below runs its own backward
    const size_t fwd_ws = b.workspace_bytes ? b.workspace_bytes(below) : 0;
    const size_t bwd_ws = b.backward_workspace_bytes ? b.backward_workspace_bytes(below) : 0;
    std::string why = b.unsupported ? b.unsupported(below) : "";
    if (why.empty() && b.backward_unsupported) why = b.backward_unsupported(below);
    if (why.empty() && p.has_extensions()) why = kBelowHasNoExtensions;
    const size_t need = (below.q_elems() * 6 + below.kv_elems() * 5) * 4 + std::max(fwd_ws, bwd_ws);
    std::string mem_why;
    if (why.empty() && !device_memory_fits(need, &mem_why)) why = mem_why;
    if (!why.empty()) {
        std::printf("  vs %s backward: skipped (%s)\n", b.name, why.c_str());
        return true;
    }
    const HostGrads want = gpu_backward(below, in, b.forward, b.workspace_bytes, b.backward, b.backward_workspace_bytes);
    const std::string against = std::string(b.name) + " backward";
    return report(compare_grads(p, in, got, &want), against.c_str(), sum);
}

// The forward that makes O and LSE for a backward run: with --backward, --kernel picks a backward step, and the
// forward runs its final kernel.
Problem forward_of_backward(Problem p) {
    p.kernel = 0;
    return p;
}

// --backward: the forward pass once (for O and LSE), then the backward pass, checked and timed on its own.
int run_backward(const Stage& s, const Options& o, const HostTensors& in) {
    const Problem& p = o.p;
    Summary sum;
    HostGrads g;
    std::vector<float>&dQ = g.dq, &dK = g.dk, &dV = g.dv;
    std::vector<float> O, LSE;  // the forward's outputs, which --save writes too
    if (o.cpu) {
        ModelTraffic tf, tb;
        cpu_forward(s, p, in, &O, &LSE, &tf);
        cpu_backward(s, p, in, O, LSE, &g, &tb);
        sum.traffic_mib = (tb.reads + tb.writes) * 4 / 1048576.0;
        std::printf("  CPU model traffic (backward): %.4g elements read, %.4g written (%.1f MiB in fp32)\n", tb.reads,
                    tb.writes, sum.traffic_mib);
    } else {
        DeviceBuffer::reset_peak();
        const size_t before = DeviceBuffer::live_bytes();
        const size_t bytes = dtype_bytes(p.dtype);
        DeviceBuffer q = upload(in.q, p.dtype, "Q"), k = upload(in.k, p.dtype, "K"), v = upload(in.v, p.dtype, "V");
        DeviceBuffer dO = upload(in.dO, p.dtype, "dO");
        const ExtensionInputs ext = upload_extension_inputs(p, in);
        DeviceBuffer o_dev(p.q_elems() * bytes, "O"), lse(p.lse_elems() * 4, "LSE");
        {
            const Problem pf = forward_of_backward(p);
            DeviceBuffer ws(s.workspace_bytes ? s.workspace_bytes(pf) : 0, "workspace");
            s.forward(pf, ext.with(ForwardArgs{q.get(), k.get(), v.get(), o_dev.get(), lse.f32(), ws.get()}));
            CUDA_CHECK_LAUNCH();
            if (!o.save_dir.empty()) {
                O = download(o_dev, p.q_elems(), p.dtype);
                LSE = download(lse, p.lse_elems(), DType::fp32);
            }
        }
        DeviceBuffer dq(p.q_elems() * bytes, "dQ"), dk(p.kv_elems() * bytes, "dK"), dv(p.kv_elems() * bytes, "dV");
        DeviceBuffer dbias = zeroed_dbias(p);
        DeviceBuffer ws(s.backward_workspace_bytes ? s.backward_workspace_bytes(p) : 0, "backward workspace");
        sum.mib = (DeviceBuffer::peak_bytes() - before) / 1048576.0;
        BackwardArgs args = ext.with(BackwardArgs{q.get(), k.get(), v.get(), o_dev.get(), dO.get(), lse.f32(),
                                                  dq.get(), dk.get(), dv.get(), ws.get()});
        args.dbias = dbias.f32();
        dq.poison();
        dk.poison();
        dv.poison();
        s.backward(p, args);
        CUDA_CHECK_LAUNCH();
        dQ = download(dq, p.q_elems(), p.dtype);
        dK = download(dk, p.kv_elems(), p.dtype);
        dV = download(dv, p.kv_elems(), p.dtype);
        g.dbias = download(dbias, p.bias_elems(), DType::fp32);
        if (o.bench) {
            const Timing t = time_gpu([&] { s.backward(p, args); }, o.reps);
            CUDA_CHECK_LAUNCH();
            sum.ms = t.median_ms;
            sum.tflops = p.backward_flops() / (t.median_ms * 1e-3) / 1e12;
            const double io = double(p.q_elems() * 4 + p.kv_elems() * 4) * bytes + p.lse_elems() * 4.0;
            sum.gbs = io / (t.median_ms * 1e-3) / 1e9;
            std::printf("  time: median %.4f ms (min %.4f, max %.4f, %d reps), %.2f TFLOP/s (2.5x forward FLOPs)\n",
                        t.median_ms, t.min_ms, t.max_ms, t.reps, sum.tflops);
        }
        std::printf("  device memory: %.1f MiB (inputs, outputs, gradients, workspace)\n", sum.mib);
    }
    if (o.check) {
        sum.check.clear();
        if (!backward_reference_fits(p)) {
            std::printf("  vs float64: SKIPPED, problem too large for the CPU reference (%s or smaller is checked)\n",
                        backward_reference_hint(p).c_str());
            sum.check = "SKIPPED: too large to check (" + backward_reference_hint(p) + ")";
            sum.skipped = true;
        } else {
            bool ok = report(compare_grads(p, in, g), "float64", &sum);
            if (const Stage* b = below_with_backward(s); b && !o.cpu) ok = check_below_backward(*b, p, in, g, &sum) && ok;
            sum.check = std::string(ok ? "ok" : "FAIL") + " vs float64";
        }
    }
    std::vector<std::pair<const char*, const std::vector<float>*>> files = {
        {"o.npy", &O}, {"lse.npy", &LSE}, {"dq.npy", &dQ}, {"dk.npy", &dK}, {"dv.npy", &dV}};
    if (p.has_bias()) files.push_back({"dbias.npy", &g.dbias});
    if (!o.save_dir.empty() && !save_outputs(o.save_dir, p, files)) return 1;
    print_row(s, o, sum);
    return !sum.ok ? 1 : sum.skipped ? kExitCheckSkipped : 0;
}

}  // namespace

int stage_main(int argc, char** argv, const Stage& s) {
    const bool allow_dtype = s.has_dtype;
    Options o;
    std::string err;
    if (!parse_options(argc, argv, allow_dtype, bool(s.backward), &o, &err)) {
        std::fprintf(stderr, "error: %s\n", err.c_str());
        return 2;
    }
    if (o.help) {
        std::printf("%s", usage(argv[0], allow_dtype, bool(s.backward)).c_str());
        return 0;
    }
    const std::vector<KernelStep>& steps = o.backward ? s.backward_steps : s.forward_steps;
    if (o.kernel == "list") {
        if (s.forward_steps.empty() && s.backward_steps.empty()) std::printf("%s has one kernel per pass\n", s.name);
        for (const auto* list : {&s.forward_steps, &s.backward_steps})
            for (size_t k = 0; k < list->size(); ++k)
                std::printf("%s %zu  %-16s %s%s\n", list == &s.forward_steps ? "forward " : "backward", k + 1,
                            (*list)[k].name, (*list)[k].summary, k + 1 == list->size() ? " (the final kernel)" : "");
        return 0;
    }
    if (!o.kernel.empty()) {
        o.p.kernel = -1;
        for (size_t k = 0; k < steps.size(); ++k)
            if (o.kernel == steps[k].name || o.kernel == std::to_string(k + 1)) o.p.kernel = int(k + 1);
        if (o.p.kernel < 0) {
            std::fprintf(stderr, "error: %s has no %s step '%s' (see --kernel list)\n", s.name,
                         o.backward ? "backward" : "forward", o.kernel.c_str());
            return 2;
        }
    }
    HostTensors in;
    if (!o.load_dir.empty() && !load_inputs(o, &o.p, &in, &err)) {  // sets the sizes from the files
        std::fprintf(stderr, "error: %s\n", err.c_str());
        return 2;
    }
    const Problem& p = o.p;
    std::string why = problem_size_unsupported(p);
    if (why.empty() && s.unsupported) why = s.unsupported(o.backward ? forward_of_backward(p) : p);
    if (why.empty() && o.backward && s.backward_unsupported) why = s.backward_unsupported(p);
    if (why.empty() && p.deterministic && !s.has_deterministic) why = "this stage has no --deterministic backward";
    if (!why.empty()) {
        std::fprintf(stderr, "error: %s: %s\n", s.name, why.c_str());
        return 2;
    }
    if (p.has_extensions() && !s.cpu_model_extensions) {
        std::fprintf(stderr, "error: %s: --kv-heads, --window, --dropout, --bias, --alibi and --seqlens are v2 features (bin/v2 --cpu runs them in its CPU model)\n", s.name);
        return 2;
    }
    // On the GPU, v2 has them in its tensor-core passes, not in its fp32 kernels.
    if (p.has_extensions() && !o.cpu && gpu_available() && p.dtype == DType::fp32) {
        std::fprintf(stderr, "error: %s: the fp32 kernels (CUDA cores) do not have --kv-heads, --window, --dropout, --bias, "
                     "--alibi or --seqlens (--dtype fp16 or bf16 runs them on tensor cores, --cpu in the CPU model)\n", s.name);
        return 2;
    }
    if (!o.cpu && !gpu_available()) {
        std::printf("no CUDA device found: running the CPU model of %s instead\n", s.name);
        o.cpu = true;
    } else if (!o.cpu && s.gpu_unusable) {
        if (const std::string gpu_why = s.gpu_unusable(); !gpu_why.empty()) {
            std::printf("%s: running the CPU model of %s instead\n", gpu_why.c_str(), s.name);
            o.cpu = true;
        }
    }
    if (!host_memory_fits(s, o, &why)) {
        std::fprintf(stderr, "error: %s\n", why.c_str());
        return 2;
    }
    if (o.load_dir.empty()) in = make_inputs(p, o.dist, o.seed);
    std::printf("%s%s%s: B=%d H=%d Nq=%d Nk=%d d=%d causal=%s dtype=%s scale=%.6g inputs=%s seed=%llu%s\n", s.name,
                o.backward ? " (backward)" : "", p.kernel > 0 ? (" step " + std::to_string(p.kernel) + " " + steps[p.kernel - 1].name).c_str() : "", p.B, p.H, p.Nq, p.Nk, p.d, p.causal ? "yes" : "no",
                dtype_name(p.dtype), p.resolved_scale(), o.load_dir.empty() ? dist_name(o.dist) : o.load_dir.c_str(),
                (unsigned long long)o.seed, o.cpu ? " [CPU model]" : (" [" + gpu_name() + "]").c_str());
    if (p.varlen()) {
        std::string q, k;
        for (int s = 0; s < p.B; ++s) {
            if (s > 0) q += ',', k += ',';
            q += std::to_string(p.seqlens_q[s]);
            k += std::to_string(p.seqlens_k[s]);
        }
        std::printf("  packed batch: seqlens_q=%s seqlens_k=%s (%zu and %zu tokens)\n", q.c_str(), k.c_str(), p.tokens_q(), p.tokens_k());
    }
    if (p.has_extensions())
        std::printf("  kv_heads=%d window=%d,%d (-1: unbounded) dropout=%g (runs as %u/256, mask keyed by seed %llu) "
                    "bias=[%d, %d, Nq, Nk] alibi=%s\n", p.kv_heads(), p.window_left, p.window_right, p.dropout,
                    dropout_threshold(p.dropout), (unsigned long long)p.dropout_seed, p.bias_batch, p.bias_heads,
                    p.alibi ? "yes" : "no");
    if (o.bench && o.cpu) {
        std::printf("--bench: nothing is timed, the CPU model runs instead of the GPU kernels (timings need a CUDA "
                    "device)\n");
        o.bench = false;
    }
    if (o.check && o.backward && !backward_reference_fits(p))
        std::printf("note: the float64 backward check will be skipped, the problem is too large for it (exit code %d); "
                    "%s or smaller is checked\n", kExitCheckSkipped, backward_reference_hint(p).c_str());
    return o.backward ? run_backward(s, o, in) : run_forward(s, o, in);
}
