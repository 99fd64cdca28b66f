// cli.cu: the command line every stage program shares: the option splitter, whole-number parsing, the usage text
// and parse_options. Host code only (no CUDA calls), so the parser can be fuzzed on its own (fuzz/).
#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdlib>
#include <cstdio>
#include <cstring>

#include "harness.h"
#include "common/philox.cuh"  // dropout_runs

// A user's argument as it appears inside an error message: control characters (a newline would break the
// one-line error) written as \xNN. Found by fuzz/fuzz_cli.cpp.
static std::string printable(const std::string& s) {
    std::string r;
    for (unsigned char c : s) {
        if (c >= 0x20 && c != 0x7f) {
            r += char(c);
        } else {
            char hex[5];
            std::snprintf(hex, sizeof hex, "\\x%02x", c);
            r += hex;
        }
    }
    return r;
}

// ------------------------------------------------------------------------------------------------ parsing
bool next_flag(int argc, const char* const* argv, int* a, const std::function<bool(const std::string&)>& takes_value,
               std::string* flag, std::string* value, std::string* err) {
    *flag = argv[*a];
    value->clear();
    const size_t eq = flag->find('=');
    if (eq != std::string::npos) {
        *value = flag->substr(eq + 1);
        *flag = flag->substr(0, eq);
    }
    if (takes_value(*flag) && eq == std::string::npos) {
        // "--save --check" is a forgotten value, not a directory named "--check"
        if (*a + 1 >= argc || std::strncmp(argv[*a + 1], "--", 2) == 0)
            return *err = *flag + " needs a value", false;
        *value = argv[++*a];
    } else if (takes_value(*flag) && value->empty()) {
        return *err = *flag + " needs a value (got '" + *flag + "=')", false;
    } else if (!takes_value(*flag) && eq != std::string::npos) {
        return *err = "unknown option '" + printable(argv[*a]) + "' (see --help)", false;
    }
    return true;
}

bool parse_int(const std::string& flag, const std::string& s, long lo, long hi, long* out, std::string* err) {
    char* end = nullptr;
    errno = 0;
    const long long v = s.empty() ? 0 : std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || errno == ERANGE || v < lo || v > hi) {
        *err = flag + " expects a whole number from " + std::to_string(lo) + " to " + std::to_string(hi) + ", got '" + printable(s) + "'";
        return false;
    }
    *out = long(v);
    return true;
}

std::string usage(const char* program, bool allow_dtype, bool allow_backward) {
    std::string u = std::string("usage: ") + program + " [options]\n"
        "  --batch B      batch size (default 4)\n"
        "  --heads H      heads (default 8)\n"
        "  --n N          sequence length of queries and keys (default 1024)\n"
        "  --nq N, --nk N query and key sequence lengths separately\n"
        "  --d D          head dimension (default 64)\n"
        "  --causal       causal mask, aligned bottom-right (query i sees keys j <= i + Nk - Nq)\n"
        "  --scale X      softmax scale (default 1/sqrt(d))\n"
        "  --seed S       random seed (default 1)\n"
        "  --dist NAME    inputs: normal, large (scores of hundreds), outliers, constant (default normal)\n"
        "  --kv-heads HK  grouped-query attention: HK K/V heads (HK divides H), each read by H / HK query heads\n"
        "  --bias         add a bias to the scaled scores: [1, H, Nq, Nk] N(0,1), or bias.npy ([B or 1, H or 1, Nq, Nk])\n"
        "                 with --load; --backward writes its gradient dbias.npy with --save\n"
        "  --alibi        ALiBi: add -slope_h |i + Nk - Nq - j| (slope_h = 2^(-8 (h+1) / H)), computed, not stored\n"
        "  --seqlens A,B,...   a packed batch of sequences of these lengths, tokens [T, H, d], nothing padded\n"
        "                 (--seqlens-q and --seqlens-k for different query and key lengths)\n"
        "  --window L,R   sliding window: query i sees keys i' - L .. i' + R (i' = i + Nk - Nq; -1: unbounded)\n"
        "  --dropout P    drop each attention weight with probability P (0 <= P < 0.998, rounded to a multiple of\n"
        "                 1/256), keep the rest / (1 - P); the mask comes from a counter-based generator keyed by\n"
        "                 --seed (with --load too)\n";
    if (allow_dtype) u += "  --dtype T      fp32 (CUDA cores), fp16 or bf16 (tensor cores) (default fp32)\n";
    if (allow_backward)
        u += "  --backward     run the backward pass too (reads do.npy with --load, writes dq/dk/dv.npy with --save)\n"
             "  --deterministic  with --backward: gradients without atomic additions, the same bits on every run,\n"
             "                 where the stage has such a backward (v2 fp16/bf16)\n";
    u += "  --kernel K     run optimisation step K (number or name) instead of the final kernel, where the stage\n"
         "                 has steps; --kernel list names them\n";
    u += "  --check        compare with the stage below and the float64 reference; exit 1 on a mismatch\n"
         "  --bench        time the stage (CUDA events, median of --reps runs, L2 flushed between runs)\n"
         "  --reps R       timed repetitions (default 20)\n"
         "  --cpu          run the stage's CPU model instead of the GPU kernels (also the fallback with no GPU)\n"
         "  --load DIR     read q.npy, k.npy, v.npy (float32, [B,H,N,d]) from DIR; sizes come from the files\n"
         "  --save DIR     write o.npy ([B,H,Nq,d]) and lse.npy ([B,H,Nq]) to DIR\n"
         "  --help         this text\n";
    return u;
}

std::string problem_size_unsupported(const Problem& p) {
    // Every tensor must be indexable: kernels compute offsets in 64 bits, but one tensor is capped at 2^31 - 1
    // elements so that the per-head offsets they compute in 32 bits cannot overflow.
    for (long rows : {long(p.Nq), long(p.Nk)}) {
        const double elems = double(p.B) * p.H * rows * p.d;
        if (elems > double(INT_MAX)) {  // printed as a double: it may exceed any integer type (a fuzz find)
            char line[160];
            std::snprintf(line, sizeof line, "problem too large: a tensor of B*H*N*d = %.4g elements exceeds the "
                          "limit of 2^31-1", elems);
            return line;
        }
    }
    return "";
}

// "A,B,..." into whole numbers from 1 to INT_MAX, or a one-line error naming the flag.
static bool parse_lengths(const std::string& flag, const std::string& value, std::vector<int>* out, std::string* err) {
    out->clear();
    size_t start = 0;
    while (true) {
        const size_t comma = value.find(',', start);
        long n = 0;
        if (!parse_int(flag, value.substr(start, comma == std::string::npos ? std::string::npos : comma - start), 1,
                       INT_MAX, &n, err))
            return false;
        out->push_back(int(n));
        if (comma == std::string::npos) return true;
        start = comma + 1;
    }
}

bool parse_options(int argc, const char* const* argv, bool allow_dtype, bool allow_backward, Options* o,
                   std::string* err) {
    Options r;
    bool have_n = false, have_nq = false, have_nk = false, have_batch = false;
    long n = 0;
    auto takes_value = [&](const std::string& f) {
        return f == "--batch" || f == "--heads" || f == "--n" || f == "--nq" || f == "--nk" || f == "--d" ||
               f == "--seed" || f == "--dist" || f == "--scale" || f == "--reps" || f == "--load" || f == "--save" ||
               f == "--kernel" || f == "--window" || f == "--dropout" || f == "--kv-heads" || f == "--seqlens" ||
               f == "--seqlens-q" || f == "--seqlens-k" ||
               (allow_dtype && f == "--dtype");
    };
    std::string sized_by;  // the first flag that sets a size or the inputs, which --load takes from its files
    bool have_seed = false;
    for (int a = 1; a < argc; ++a) {
        std::string flag, value;
        if (!next_flag(argc, argv, &a, takes_value, &flag, &value, err)) return false;
        for (const char* f : {"--batch", "--heads", "--n", "--nq", "--nk", "--d", "--dist", "--kv-heads"})
            if (flag == f && sized_by.empty()) sized_by = flag;
        if (flag == "--seed") have_seed = true;
        long v = 0;
        if (flag == "--batch") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.B = int(v); have_batch = true; }
        else if (flag == "--heads") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.H = int(v); }
        else if (flag == "--n") { if (!parse_int(flag, value, 1, INT_MAX, &n, err)) return false; have_n = true; }
        else if (flag == "--nq") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.Nq = int(v); have_nq = true; }
        else if (flag == "--nk") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.Nk = int(v); have_nk = true; }
        else if (flag == "--d") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.d = int(v); }
        else if (flag == "--reps") { if (!parse_int(flag, value, 1, 100000, &v, err)) return false; r.reps = int(v); }
        else if (flag == "--seed") { if (!parse_int(flag, value, 0, LONG_MAX, &v, err)) return false; r.seed = uint64_t(v); }
        else if (flag == "--dist") { if (!parse_dist(value, &r.dist)) return *err = "--dist expects normal, large, outliers or constant, got '" + printable(value) + "'", false; }
        else if (flag == "--scale") {
            char* end = nullptr;
            r.p.scale = std::strtof(value.c_str(), &end);
            if (value.empty() || *end != '\0' || !(r.p.scale > 0.0f) || r.p.scale > 1e4f)
                return *err = "--scale expects a positive number up to 1e4, got '" + printable(value) + "'", false;
        }
        else if (flag == "--dtype" && allow_dtype) {
            if (value == "fp32") r.p.dtype = DType::fp32;
            else if (value == "fp16") r.p.dtype = DType::fp16;
            else if (value == "bf16") r.p.dtype = DType::bf16;
            else return *err = "--dtype expects fp32, fp16 or bf16, got '" + printable(value) + "'", false;
        }
        else if (flag == "--seqlens" || flag == "--seqlens-q" || flag == "--seqlens-k") {
            std::vector<int> lengths;
            if (!parse_lengths(flag, value, &lengths, err)) return false;
            if (flag != "--seqlens-k") r.p.seqlens_q = lengths;
            if (flag != "--seqlens-q") r.p.seqlens_k = lengths;
        }
        else if (flag == "--kv-heads") { if (!parse_int(flag, value, 1, INT_MAX, &v, err)) return false; r.p.Hk = int(v); }
        else if (flag == "--window") {
            const size_t comma = value.find(',');
            long left = 0, right = 0;
            if (comma == std::string::npos)
                return *err = "--window expects L,R (keys to the left and right of the diagonal, -1: unbounded), got '" + printable(value) + "'", false;
            if (!parse_int("--window L", value.substr(0, comma), -1, INT_MAX, &left, err) ||
                !parse_int("--window R", value.substr(comma + 1), -1, INT_MAX, &right, err))
                return false;
            r.p.window_left = int(left), r.p.window_right = int(right);
        }
        else if (flag == "--dropout") {
            char* end = nullptr;
            r.p.dropout = std::strtof(value.c_str(), &end);
            if (value.empty() || *end != '\0' || !(r.p.dropout >= 0.0f && r.p.dropout < 1.0f))
                return *err = "--dropout expects a probability P with 0 <= P < 1, got '" + printable(value) + "'", false;
            if (!dropout_runs(r.p.dropout))  // common/philox.cuh: P runs rounded to a multiple of 1/256
                return *err = "--dropout P runs as P rounded to a multiple of 1/256, and " + printable(value) +
                              " rounds to 1: use P < 0.998", false;
        }
        else if (flag == "--kernel") r.kernel = value;
        else if (flag == "--load") r.load_dir = value;
        else if (flag == "--save") r.save_dir = value;
        else if (flag == "--causal") r.p.causal = true;
        else if (flag == "--bias") r.p.bias_heads = 1;  // its shape is set below, or by bias.npy with --load
        else if (flag == "--alibi") r.p.alibi = true;
        else if (flag == "--check") r.check = true;
        else if (flag == "--bench") r.bench = true;
        else if (flag == "--cpu") r.cpu = true;
        else if (flag == "--backward" && allow_backward) r.backward = true;
        else if (flag == "--deterministic" && allow_backward) r.p.deterministic = true;
        else if (flag == "--help" || flag == "-h") r.help = true;
        else return *err = "unknown option '" + printable(flag) + "' (see --help)", false;
    }
    if (have_n && (have_nq || have_nk)) return *err = "give either --n or --nq/--nk, not both", false;
    if (r.p.deterministic && !r.backward) return *err = "--deterministic is about the backward pass: add --backward", false;
    if (!r.load_dir.empty() && !sized_by.empty())
        return *err = "--load takes the sizes and values from its files; " + sized_by + " cannot be combined with it", false;
    if (!r.load_dir.empty() && have_seed && r.p.dropout == 0.0f)
        return *err = "--load takes the values from its files; --seed only keys the dropout mask there (give --dropout)", false;
    r.p.dropout_seed = r.seed;
    if (have_n) r.p.Nq = r.p.Nk = int(n);
    if (!r.p.seqlens_q.empty() || !r.p.seqlens_k.empty()) {  // a packed batch: B and the lengths come from the lists
        if (r.p.seqlens_q.size() != r.p.seqlens_k.size())
            return *err = "--seqlens-q and --seqlens-k must list the same number of sequences", false;
        if (have_n || have_nq || have_nk || have_batch)
            return *err = "--seqlens sets the batch and the lengths; --batch, --n, --nq and --nk cannot be combined with it", false;
        if (!r.load_dir.empty())
            return *err = "--load takes a packed batch's lengths from cu_seqlens_q.npy and cu_seqlens_k.npy; --seqlens cannot be combined with it", false;
        if (r.p.has_bias()) return *err = "--seqlens cannot be combined with --bias (a [B, H, Nq, Nk] bias has no packed form)", false;
        r.p.B = int(r.p.seqlens_q.size());
        r.p.Nq = *std::max_element(r.p.seqlens_q.begin(), r.p.seqlens_q.end());
        r.p.Nk = *std::max_element(r.p.seqlens_k.begin(), r.p.seqlens_k.end());
    }
    if (r.p.has_bias()) r.p.bias_batch = 1, r.p.bias_heads = r.p.H;  // [1, H, Nq, Nk]
    if (r.p.Hk > 0 && r.p.H % r.p.Hk != 0)
        return *err = "--kv-heads " + std::to_string(r.p.Hk) + " must divide --heads " + std::to_string(r.p.H), false;
    if (const std::string why = problem_size_unsupported(r.p); !why.empty()) return *err = why, false;
    *o = r;
    return true;
}

