// device.cu: device detection, counted device buffers, dtype conversion and timing.
#include <algorithm>
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda_check.h"
#include "harness.h"

// Read once: the stages' refusal checks ask on every call, timed launches included.
bool gpu_available() {
    static const bool available = [] {
        int n = 0;
        return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
    }();
    return available;
}

namespace {
// Device 0's properties, read once (a query costs microseconds to milliseconds; never inside a timed region).
const cudaDeviceProp& gpu_properties() {
    static const cudaDeviceProp prop = [] {
        cudaDeviceProp p;
        CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
        return p;
    }();
    return prop;
}
}  // namespace

std::string gpu_name() { return gpu_properties().name; }

int gpu_compute_capability() { return gpu_properties().major * 10 + gpu_properties().minor; }

size_t gpu_smem_per_block() { return gpu_properties().sharedMemPerBlockOptin; }

namespace {
size_t g_live = 0, g_peak = 0;
}

size_t DeviceBuffer::live_bytes() { return g_live; }
size_t DeviceBuffer::peak_bytes() { return g_peak; }
void DeviceBuffer::reset_peak() { g_peak = g_live; }

bool device_memory_fits(size_t bytes, std::string* why) {
    size_t free_b = 0, total_b = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (bytes <= free_b) return true;
    char line[256];
    std::snprintf(line, sizeof line, "needs %zu bytes (%.2f GiB) of device memory, %zu bytes (%.2f GiB) are free",
                  bytes, bytes / 1073741824.0, free_b, free_b / 1073741824.0);
    *why = line;
    return false;
}

DeviceBuffer::DeviceBuffer(size_t bytes, const char* what) : bytes_(bytes) {
    if (bytes == 0) return;
    std::string why;
    if (!device_memory_fits(bytes, &why)) {
        std::fprintf(stderr, "error: %s %s\n", what, why.c_str());
        std::exit(3);
    }
    CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    g_live += bytes;
    g_peak = std::max(g_peak, g_live);
}

DeviceBuffer::~DeviceBuffer() {
    if (ptr_) {
        cudaFree(ptr_);  // no check: destructors must not exit, and a failed free leaves nothing to do
        g_live -= bytes_;
    }
}

DeviceBuffer::DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) {
    o.ptr_ = nullptr;
    o.bytes_ = 0;
}

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
}

void DeviceBuffer::poison() {
    if (ptr_) CUDA_CHECK(cudaMemset(ptr_, 0xFF, bytes_));
}

DeviceBuffer upload(const std::vector<float>& host, DType t, const char* what) {
    DeviceBuffer dev(host.size() * dtype_bytes(t), what);
    if (host.empty()) return dev;
    if (t == DType::fp32) {
        CUDA_CHECK(cudaMemcpy(dev.get(), host.data(), dev.bytes(), cudaMemcpyHostToDevice));
    } else if (t == DType::fp16) {
        std::vector<__half> h(host.size());
        for (size_t i = 0; i < h.size(); ++i) h[i] = __float2half_rn(host[i]);
        CUDA_CHECK(cudaMemcpy(dev.get(), h.data(), dev.bytes(), cudaMemcpyHostToDevice));
    } else {
        std::vector<__nv_bfloat16> h(host.size());
        for (size_t i = 0; i < h.size(); ++i) h[i] = __float2bfloat16_rn(host[i]);
        CUDA_CHECK(cudaMemcpy(dev.get(), h.data(), dev.bytes(), cudaMemcpyHostToDevice));
    }
    return dev;
}

std::vector<float> download(const DeviceBuffer& dev, size_t elems, DType t) {
    std::vector<float> host(elems);
    if (elems == 0) return host;
    CUDA_CHECK(cudaDeviceSynchronize());  // surfaces errors from kernels still running
    if (t == DType::fp32) {
        CUDA_CHECK(cudaMemcpy(host.data(), dev.get(), elems * 4, cudaMemcpyDeviceToHost));
    } else if (t == DType::fp16) {
        std::vector<__half> h(elems);
        CUDA_CHECK(cudaMemcpy(h.data(), dev.get(), elems * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < elems; ++i) host[i] = __half2float(h[i]);
    } else {
        std::vector<__nv_bfloat16> h(elems);
        CUDA_CHECK(cudaMemcpy(h.data(), dev.get(), elems * 2, cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < elems; ++i) host[i] = __bfloat162float(h[i]);
    }
    return host;
}

Timing time_gpu(const std::function<void()>& fn, int reps, int warmup, double max_seconds) {
    // Writing a buffer twice the size of L2 between repetitions evicts the previous run's inputs, so every
    // repetition reads from device memory as a real first call would. It is not counted in the measured buffers.
    int l2 = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, 0));
    void* flush = nullptr;
    CUDA_CHECK(cudaMalloc(&flush, 2 * size_t(l2)));
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    for (int i = 0; i < warmup; ++i) fn();
    CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<double> ms;
    double total = 0;
    for (int i = 0; i < reps; ++i) {
        CUDA_CHECK(cudaMemsetAsync(flush, i & 0xFF, 2 * size_t(l2)));
        CUDA_CHECK(cudaEventRecord(start));
        fn();
        CUDA_CHECK(cudaEventRecord(stop));
        CUDA_CHECK(cudaEventSynchronize(stop));
        float t = 0;
        CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
        ms.push_back(t);
        total += t / 1000.0;
        if (total > max_seconds && ms.size() >= 3) break;
    }
    CUDA_CHECK(cudaEventDestroy(start));
    CUDA_CHECK(cudaEventDestroy(stop));
    CUDA_CHECK(cudaFree(flush));
    std::sort(ms.begin(), ms.end());
    Timing t;
    t.reps = int(ms.size());
    t.min_ms = ms.front();
    t.max_ms = ms.back();
    t.median_ms = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
    return t;
}

std::vector<int> cu_seqlens(const std::vector<int>& lengths) {
    std::vector<int> starts = {0};
    for (int n : lengths) starts.push_back(starts.back() + n);
    return starts;
}

ExtensionInputs upload_extension_inputs(const Problem& p, const HostTensors& in) {
    ExtensionInputs x;
    if (p.has_bias()) x.bias = upload(in.bias, DType::fp32, "bias");
    if (p.varlen())
        for (auto [buffer, lengths] : {std::pair{&x.cu_seqlens_q, &p.seqlens_q}, {&x.cu_seqlens_k, &p.seqlens_k}}) {
            const std::vector<int> starts = cu_seqlens(*lengths);
            *buffer = DeviceBuffer(starts.size() * sizeof(int), "cu_seqlens");
            CUDA_CHECK(cudaMemcpy(buffer->get(), starts.data(), buffer->bytes(), cudaMemcpyHostToDevice));
        }
    return x;
}

DeviceBuffer zeroed_dbias(const Problem& p) {
    DeviceBuffer dbias(p.bias_elems() * 4, "dbias");
    if (dbias.get()) CUDA_CHECK(cudaMemset(dbias.get(), 0, dbias.bytes()));
    return dbias;
}

Outputs gpu_forward(const Problem& p, const HostTensors& in, const ForwardFn& forward, const WorkspaceFn& workspace) {
    DeviceBuffer q = upload(in.q, p.dtype, "Q"), k = upload(in.k, p.dtype, "K"), v = upload(in.v, p.dtype, "V");
    const ExtensionInputs ext = upload_extension_inputs(p, in);
    DeviceBuffer o(p.q_elems() * dtype_bytes(p.dtype), "O"), lse(p.lse_elems() * 4, "LSE");
    DeviceBuffer ws(workspace ? workspace(p) : 0, "workspace");
    o.poison();
    lse.poison();
    forward(p, ext.with(ForwardArgs{q.get(), k.get(), v.get(), o.get(), lse.f32(), ws.get()}));
    CUDA_CHECK_LAUNCH();
    return {download(o, p.q_elems(), p.dtype), download(lse, p.lse_elems(), DType::fp32)};
}

HostGrads gpu_backward(const Problem& p, const HostTensors& in, const ForwardFn& forward, const WorkspaceFn& fwd_workspace,
                   const BackwardFn& backward, const WorkspaceFn& bwd_workspace) {
    const size_t bytes = dtype_bytes(p.dtype);
    DeviceBuffer q = upload(in.q, p.dtype, "Q"), k = upload(in.k, p.dtype, "K"), v = upload(in.v, p.dtype, "V");
    DeviceBuffer dO = upload(in.dO, p.dtype, "dO");
    const ExtensionInputs ext = upload_extension_inputs(p, in);
    DeviceBuffer o(p.q_elems() * bytes, "O"), lse(p.lse_elems() * 4, "LSE");
    {
        DeviceBuffer ws(fwd_workspace ? fwd_workspace(p) : 0, "workspace");
        forward(p, ext.with(ForwardArgs{q.get(), k.get(), v.get(), o.get(), lse.f32(), ws.get()}));
        CUDA_CHECK_LAUNCH();
    }
    DeviceBuffer dq(p.q_elems() * bytes, "dQ"), dk(p.kv_elems() * bytes, "dK"), dv(p.kv_elems() * bytes, "dV");
    DeviceBuffer dbias = zeroed_dbias(p);
    DeviceBuffer ws(bwd_workspace ? bwd_workspace(p) : 0, "workspace");
    dq.poison();
    dk.poison();
    dv.poison();
    BackwardArgs args = ext.with(BackwardArgs{q.get(), k.get(), v.get(), o.get(), dO.get(), lse.f32(), dq.get(),
                                              dk.get(), dv.get(), ws.get()});
    args.dbias = dbias.f32();
    backward(p, args);
    CUDA_CHECK_LAUNCH();
    return {download(dq, p.q_elems(), p.dtype), download(dk, p.kv_elems(), p.dtype), download(dv, p.kv_elems(), p.dtype),
            download(dbias, p.bias_elems(), DType::fp32)};
}
