// harness.h: the one shared harness. Every stage program and every test suite uses it; nothing here is copied
// elsewhere. Its parts, one file each under tests/harness/:
//   inputs.cu     seeded random inputs in several distributions, rounding to fp16/bf16
//   reference.cu  the float64 CPU reference (forward and backward)
//   compare.cu    element-wise comparison with tolerances, mismatch report and a hint
//   device.cu     device detection, counted device buffers, dtype conversion, timing
//   npy.cu        reading and writing NumPy .npy files
//   cli.cu        the command line shared by all stage programs (parsing only: host code, fuzzed in fuzz/)
//   stage_main.cu what a stage program's run does
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "problem.h"

// ---------------------------------------------------------------------------------------------------- threads
// Runs body(i) for i in [0, n) on all CPU cores (inputs and the float64 reference are CPU work).
void parallel_for(size_t n, const std::function<void(size_t)>& body);

// ---------------------------------------------------------------------------------------------------- inputs
enum class Dist {
    normal,    // q, k, v, dO ~ N(0, 1)
    large,     // q and k times 10: scores of several hundred, so the running max grows and rescaling matters
    outliers,  // normal, but every 16th row of each tensor (q, k, v, dO) times 30
    constant,  // every key row identical, so every score row is constant and softmax is uniform
};
const char* dist_name(Dist d);
bool parse_dist(const std::string& s, Dist* d);

struct HostTensors {
    std::vector<float> q, k, v;  // inputs, [B,H,Nq,d] and [B,Hk,Nk,d]
    std::vector<float> dO;       // upstream gradient for the backward pass, [B,H,Nq,d]
    std::vector<float> bias;     // --bias: [bias_batch, bias_heads, Nq, Nk] (empty without)
};
// Deterministic for a given (problem shape, dist, seed) on every platform. When p.dtype is fp16/bf16 the values
// are rounded to that type, so every stage (fp32 ones too) sees exactly the numbers the low-precision stage sees.
HostTensors make_inputs(const Problem& p, Dist dist, uint64_t seed);
float round_to(DType t, float x);  // nearest fp16/bf16 value, as a float (identity for fp32)

// -------------------------------------------------------------------------------------------------- reference
// float64 reference computed in the obvious way (scores, safe softmax, P V). `rows` lists flattened query rows
// (bh * Nq + i) to compute; empty means all. Outputs are full-size; rows not listed are left as NaN.
// round_p: when fp16/bf16, P is rounded to that type before P V and O is rounded at the end, which is the
// "same-precision reference" the low-precision kernels are judged against.
struct Reference {
    std::vector<double> o, lse;
};
Reference reference_forward(const Problem& p, const HostTensors& in, const std::vector<size_t>& rows = {},
                            DType round_p = DType::fp32);
struct ReferenceGrads {
    std::vector<double> dq, dk, dv;
    std::vector<double> dbias;  // with --bias: dS summed over the bias's broadcast dimensions
};
// round_to_type fp16/bf16 gives the same-precision reference: P and dS rounded to that type before the products
// that consume them (as the tensor-core kernels do) and the gradients rounded at the end.
ReferenceGrads reference_backward(const Problem& p, const HostTensors& in, DType round_to_type = DType::fp32);
// ------------------------------------------------------------------------------------------------ packed batches
// --seqlens (varlen.cu): sequence s of a packed batch as a problem of its own (B = 1, the padded layout, its own
// lengths; head_offset = s * H keys its dropout mask), its inputs, and putting a sequence's outputs back: rows of
// [1, heads, n, d] into [T, heads, d] (keys: the K/V token offsets, for dK and dV), LSE [1, H, n] into [H, Tq].
Problem sequence_problem(const Problem& p, int s);
HostTensors sequence_inputs(const Problem& p, const HostTensors& in, int s);
// Sequence s's part of a packed O [T, H, d] and LSE [H, T], as [1, H, n, d] and [1, H, n].
void sequence_outputs(const Problem& p, const std::vector<float>& O, const std::vector<float>& LSE, int s,
                      std::vector<float>* o, std::vector<float>* lse);
template <class T>
void put_sequence_rows(const Problem& p, int s, bool keys, int heads, const std::vector<T>& part, std::vector<T>* packed);
template <class T>
void put_sequence_lse(const Problem& p, int s, const std::vector<T>& part, std::vector<T>* packed);

// --dropout's factor of weight (row i, key j) of flattened head bh: 0 if dropped, 1 / (1 - p) if kept (p rounded to a
// multiple of 1/256: dropout_scale), from the counter-based generator (common/philox.cuh), so the backward regenerates
// the forward's mask. The one definition, used by the reference and the CPU models.
double dropout_factor(const Problem& p, size_t bh, int i, int j);
// What --bias and --alibi add to the scaled score of (row i, key j) of flattened head bh (0 without them): the one
// definition, used by the reference and the CPU models.
double score_bias(const Problem& p, const HostTensors& in, size_t bh, int i, int j);
// The rows the programs check on large problems: all rows when the reference would be cheap, otherwise a fixed
// sample that always includes the first and last row of every head checked and the last partial tile.
std::vector<size_t> rows_to_check(const Problem& p, double max_flops = 2e9);

// ---------------------------------------------------------------------------------------------------- compare
// |got - ref| <= atol + rtol * |ref| element-wise; NaN or Inf in `got` always fails (unless ref is the same Inf,
// as for the LSE of a fully masked row, which is -inf by convention).
struct Tolerance {
    double atol, rtol;
};
// The constants and their reasons are in docs/conventions.md ("Tolerances").
Tolerance fp32_tolerance(const Problem& p, const HostTensors& in);
// fp16/bf16: a kernel passes when its max error against float64 is at most twice the max error of the
// same-precision reference (reference_forward with round_p) plus atol. This builds that tolerance.
Tolerance low_precision_tolerance(DType t, double same_precision_max_abs_err);

struct Layout {
    // A tensor viewed as [outer, rows, cols] (outer = B*H), with rows grouped into tiles of tile_rows for the
    // report (the stage's Br, so a bad partial last tile is recognisable).
    size_t outer, rows, cols;
    int heads = 1;       // to print (b, h) from outer
    int tile_rows = 64;
};
struct Comparison {
    bool ok = true;
    size_t checked = 0, bad = 0, nan = 0, inf = 0;
    double max_abs = 0, max_rel = 0;
    std::string report;  // one line when ok; first mismatches and a hint when not
};
// got may contain NaN in positions not in `only_rows` when only_rows is non-empty (rows are outer*rows + r).
Comparison compare(const char* what, const float* got, const double* ref, const Layout& layout, Tolerance tol,
                   const std::vector<size_t>& only_rows = {});
Comparison compare(const char* what, const float* got, const float* ref, const Layout& layout, Tolerance tol,
                   const std::vector<size_t>& only_rows = {});
double max_abs_error(const std::vector<double>& a, const std::vector<double>& ref, const std::vector<size_t>& rows,
                     size_t cols);
Layout o_layout(const Problem& p, int tile_rows = 64);
Layout lse_layout(const Problem& p, int tile_rows = 64);
Layout kv_layout(const Problem& p, int tile_rows = 64);

// The two checks every stage gets, used by the programs and the tests alike:
// O and LSE against the float64 reference on `rows` (all when empty): fp32 tolerance, or for fp16/bf16 the
// same-precision rule (the tolerance line it used is put in *note when note is not null).
std::vector<Comparison> compare_forward(const Problem& p, const HostTensors& in, const std::vector<float>& o,
                                        const std::vector<float>& lse, const std::vector<size_t>& rows = {},
                                        std::string* note = nullptr);
// dQ, dK, dV against the float64 reference backward, with the same rules. With `want` given, against those
// gradients instead (another implementation's, e.g. the stage below), with the tolerances of the float64 check.
struct HostGrads {
    std::vector<float> dq, dk, dv;
    std::vector<float> dbias;  // with --bias (see ReferenceGrads)
};
std::vector<Comparison> compare_grads(const Problem& p, const HostTensors& in, const HostGrads& got,
                                      const HostGrads* want = nullptr);

// ----------------------------------------------------------------------------------------------------- device
bool gpu_available();  // a CUDA device is present and usable (asked once)
std::string gpu_name();
int gpu_compute_capability();  // e.g. 75 for a T4, 80 for an A100, 90 for an H100 (device 0, read once)
// The shared memory one block may ask for on device 0 (cudaDevAttrMaxSharedMemoryPerBlockOptin, read once): 227 KiB
// on Hopper, 163 KiB on an A100, 99 KiB on sm_86 / sm_89 GPUs (RTX 30xx, 40xx, L4).
size_t gpu_smem_per_block();

// Device memory handed out through DeviceBuffer is counted, so programs report their peak device memory.
// Allocation first checks free memory and stops with one clear line (bytes needed, bytes free) if it will not fit.
class DeviceBuffer {
public:
    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t bytes, const char* what = "buffer");
    ~DeviceBuffer();
    DeviceBuffer(DeviceBuffer&& o) noexcept;
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    void* get() const { return ptr_; }
    float* f32() const { return static_cast<float*>(ptr_); }
    size_t bytes() const { return bytes_; }
    void poison();  // fill with NaN (all-ones bytes are NaN in fp32, fp16 and bf16)
    static size_t live_bytes();
    static size_t peak_bytes();
    static void reset_peak();

private:
    void* ptr_ = nullptr;
    size_t bytes_ = 0;
};
// Would `bytes` fit in free device memory? If not, *why says how much is needed and free.
bool device_memory_fits(size_t bytes, std::string* why);

// Host float <-> device tensor of type t.
DeviceBuffer upload(const std::vector<float>& host, DType t, const char* what);
std::vector<float> download(const DeviceBuffer& dev, size_t elems, DType t);

// A packed batch's first tokens, as FlashAttention's interface takes them: {0, n_0, n_0 + n_1, ..., T} (B + 1).
std::vector<int> cu_seqlens(const std::vector<int>& lengths);
// The extensions' device inputs of a problem: the bias (float32, p.bias_elems()) and a packed batch's cu_seqlens_q
// and cu_seqlens_k; buffers p does not use stay empty (null). with() puts them into a pass's arguments.
struct ExtensionInputs {
    DeviceBuffer bias, cu_seqlens_q, cu_seqlens_k;
    template <class Args>  // ForwardArgs or BackwardArgs
    Args with(Args a) const {
        a.bias = bias.f32();
        a.cu_seqlens_q = static_cast<const int*>(cu_seqlens_q.get());
        a.cu_seqlens_k = static_cast<const int*>(cu_seqlens_k.get());
        return a;
    }
};
ExtensionInputs upload_extension_inputs(const Problem& p, const HostTensors& in);
// --bias's gradient for a backward pass: p.bias_elems() floats, zeroed (a backward adds dS into it); empty without.
DeviceBuffer zeroed_dbias(const Problem& p);

struct Timing {
    double median_ms = 0, min_ms = 0, max_ms = 0;
    int reps = 0;
};
// Times fn with CUDA events: `warmup` untimed calls, then `reps` timed calls (stopping early once max_seconds of
// timed work is done, never below 3), each preceded by an L2 flush outside the timed region. Median and spread.
Timing time_gpu(const std::function<void()>& fn, int reps, int warmup = 3, double max_seconds = 3.0);

// ------------------------------------------------------------------------------------------------------ .npy
// float32, little-endian, C order only. Errors are one line in *err.
bool npy_read(const std::string& path, std::vector<float>* data, std::vector<size_t>* shape, std::string* err);
// The same for int32 ('<i4'): a packed batch's cu_seqlens_q.npy and cu_seqlens_k.npy.
bool npy_read_int32(const std::string& path, std::vector<int32_t>* data, std::vector<size_t>* shape,
                    std::string* err);
bool npy_write(const std::string& path, const std::vector<float>& data, const std::vector<size_t>& shape,
               std::string* err);

// ------------------------------------------------------------------------------------------------ command line
struct Options {
    Problem p;
    uint64_t seed = 1;
    Dist dist = Dist::normal;
    int reps = 20;
    bool check = false, bench = false, cpu = false, backward = false, help = false;
    std::string kernel;  // --kernel: a step's number or name, or "list"; resolved into p.kernel by stage_main
    std::string load_dir, save_dir;
};
// The next option of argv, from argv[*a]: "--flag value" (then *a moves past the value) or "--flag=value".
// takes_value says which flags have a value. False, with a one-line error, for a missing or unexpected value.
bool next_flag(int argc, const char* const* argv, int* a, const std::function<bool(const std::string&)>& takes_value,
               std::string* flag, std::string* value, std::string* err);
// A whole number in [lo, hi] from s, or a one-line error naming the flag. Shared by every program's parser.
bool parse_int(const std::string& flag, const std::string& s, long lo, long hi, long* out, std::string* err);
// The size caps every stage shares ("" when p is within them): one tensor at most 2^31-1 elements. Checked after
// the flags and again after --load (a problem read from files never bypasses it).
std::string problem_size_unsupported(const Problem& p);
// allow_dtype / allow_backward: later stages accept --dtype and --backward; earlier ones reject them.
bool parse_options(int argc, const char* const* argv, bool allow_dtype, bool allow_backward, Options* o,
                   std::string* err);
std::string usage(const char* program, bool allow_dtype, bool allow_backward);

// Pointers a stage's forward pass reads and writes on the device. q, k, v, o are of type p.dtype.
// The extensions' device inputs (problem.h; null where p does not use them): the bias [bias_batch, bias_heads, Nq,
// Nk] (float32), and for a packed batch (p.varlen()) the sequences' first tokens, cu_seqlens_q = {0, Nq_0,
// Nq_0 + Nq_1, ..., tokens_q} (B + 1 ints; likewise for k), as FlashAttention's interface takes them.
struct ForwardArgs {
    const void *q, *k, *v;
    void* o;
    float* lse;
    void* workspace;  // stage-specific scratch, workspace_bytes(p) bytes
    const float* bias = nullptr;
    const int* cu_seqlens_q = nullptr;
    const int* cu_seqlens_k = nullptr;
};
// dbias (float32, the bias's shape, summed over its broadcast dimensions) is written when p.has_bias().
struct BackwardArgs {
    const void *q, *k, *v, *o, *dO;
    const float* lse;
    void *dq, *dk, *dv;
    void* workspace;
    const float* bias = nullptr;
    float* dbias = nullptr;
    const int* cu_seqlens_q = nullptr;
    const int* cu_seqlens_k = nullptr;
};
// Host arrays of a CPU model: fp32 inputs and outputs, plus the traffic the model counted.
struct ModelTraffic {
    double reads = 0, writes = 0;  // elements read from / written to the model's "device memory" arrays
    double l_divisions = 0;        // reciprocals 1/l taken to normalise a row of O (inverse_l, below)
};
using CpuForward = std::function<void(const Problem&, const HostTensors&, std::vector<float>* o,
                                      std::vector<float>* lse, ModelTraffic*)>;
struct HostGrads;
// A CPU model's backward: fills g's dq, dk, dv (and dbias when p has a bias).
using CpuBackward = std::function<void(const Problem&, const HostTensors&, const std::vector<float>& o,
                                       const std::vector<float>& lse, HostGrads* g, ModelTraffic*)>;

// One runnable optimisation step of a stage's kernel (bin/v2 --kernel list): p.kernel = k runs steps[k-1].
struct KernelStep {
    const char* name;     // short, e.g. "mma-smem"
    const char* summary;  // one line: the idea this step adds to the one before
};

// What a stage program is: its name, its GPU passes, its CPU model, and the stage below it that --check compares
// against. Functions left empty are features the stage does not have.
struct Stage {
    const char* name = "";
    bool has_dtype = false;  // accepts --dtype fp16/bf16 (only the tensor-core rung)
    std::function<std::string(const Problem&)> unsupported;  // "" when the stage accepts p, else one line
    // Optional: "" when the stage's kernels run on this machine's GPU, else one line why not (v3 needs Hopper); the
    // program then says so and runs the CPU model, as it does without a GPU.
    std::function<std::string()> gpu_unusable;
    std::function<size_t(const Problem&)> workspace_bytes;
    std::function<void(const Problem&, const ForwardArgs&)> forward;
    CpuForward cpu_forward;
    // Optional: prints stage facts (tile sizes, S bytes) once before a GPU run; returns "" or why the run cannot go
    // on (the naive stages' score matrix does not fit in device memory: exit code 3).
    std::function<std::string(const Problem&)> describe;
    // backward (optional)
    std::function<std::string(const Problem&)> backward_unsupported;  // "" when --backward accepts p
    std::function<size_t(const Problem&)> backward_workspace_bytes;
    std::function<void(const Problem&, const BackwardArgs&)> backward;
    CpuBackward cpu_backward;
    bool has_deterministic = false;  // --deterministic: its backward_unsupported decides which problems it covers
    int cpu_model_score_matrices = 0;  // Nq x Nk matrices the CPU model keeps per head (naive, online_softmax: 1)
    // The CPU model runs the extensions (Problem::has_extensions); of the GPU kernels, v2's tensor-core forward and
    // backward have them (stage_main refuses the others on a GPU).
    bool cpu_model_extensions = false;
    // Runnable steps (--kernel); empty when the stage has one kernel per pass. The last step is the final kernel.
    std::vector<KernelStep> forward_steps, backward_steps;
    // The stage below (fp32, on the same inputs): --check compares the forward with it, and the backward with the
    // nearest stage below that has a backward pass. nullptr for the first rung.
    const Stage* below = nullptr;
};
// ------------------------------------------------------------------------------------- one GPU run, host in/out
struct Outputs {
    std::vector<float> o, lse;
};
using ForwardFn = std::function<void(const Problem&, const ForwardArgs&)>;
using WorkspaceFn = std::function<size_t(const Problem&)>;
// Uploads the inputs in p.dtype, poisons the outputs with NaN, runs `forward`, downloads O (as float) and LSE.
Outputs gpu_forward(const Problem& p, const HostTensors& in, const ForwardFn& forward, const WorkspaceFn& workspace);

using BackwardFn = std::function<void(const Problem&, const BackwardArgs&)>;
// Runs `forward` for O and LSE, then `backward` on poisoned gradient buffers.
HostGrads gpu_backward(const Problem& p, const HostTensors& in, const ForwardFn& forward, const WorkspaceFn& fwd_workspace,
                   const BackwardFn& backward, const WorkspaceFn& bwd_workspace);

// The whole program: parse, make or load inputs, run, check, time, save. Returns the exit code.
int stage_main(int argc, char** argv, const Stage& stage);

// ------------------------------------------------------------------------------------------------ CPU models
// The "device memory" of a CPU model: an array that counts every element read from it and written to it, so a
// test can hold each algorithm's traffic to its closed form (naive O(N*d + N^2), FlashAttention-1
// O(N^2 d^2 / M), ...). On-chip memory is modelled by ordinary local arrays, which are not counted.
class Hbm {
public:
    Hbm(std::vector<float> init, ModelTraffic* t) : data_(std::move(init)), t_(t) {}
    Hbm(size_t n, ModelTraffic* t, float fill = 0.0f) : data_(n, fill), t_(t) {}
    float read(size_t i) const { t_->reads += 1; return data_[i]; }
    // n consecutive elements from `offset`, brought "on chip" (each one counted as read).
    std::vector<float> read_block(size_t offset, size_t n) const {
        t_->reads += double(n);
        return std::vector<float>(data_.begin() + offset, data_.begin() + offset + n);
    }
    void write(size_t i, float x) { t_->writes += 1; data_[i] = x; }
    size_t size() const { return data_.size(); }
    std::vector<float>& values() { return data_; }  // uncounted: for handing results back to the caller

private:
    std::vector<float> data_;
    ModelTraffic* t_;
};
// 1/l, to normalise a row of O by its softmax sum l (0 for a row that saw no key), counted in t->l_divisions: the
// FlashAttention models take it once per row and K/V tile (v1, Algorithm 1 line 12) or once per row (v2).
inline float inverse_l(float l, ModelTraffic* t) {
    t->l_divisions += 1;
    return l > 0.0f ? 1.0f / l : 0.0f;
}
