// v2/main.cu: the program bin/v2, FlashAttention-2: fp32 on CUDA cores, or fp16/bf16 on tensor cores (--dtype).
// Build and run it alone (the kernels of the stages it checks against come with it, their programs' main.cu not):
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o v2_attention v2/*.cu $(ls v1/*.cu naive/*.cu | grep -v /main.cu) tests/harness/*.cu && ./v2_attention --check --bench
#include <cstdio>

#include "naive/naive.h"
#include "v1/v1.h"
#include "v2.h"

int main(int argc, char** argv) {
    Stage s{};
    s.name = "v2";
    s.has_dtype = true;
    s.below_name = "v1";
    s.unsupported = v2_unsupported;
    s.workspace_bytes = v2_workspace_bytes;
    s.forward = v2_forward;
    s.cpu_forward = v2_model_forward;
    s.describe = [](const Problem& p) {
        if (p.dtype == DType::fp32) {
            const V2Tiles f = v2_fp32_forward_tiles(p.d), b = v2_fp32_backward_tiles();
            std::printf("  fp32 on CUDA cores: forward tiles Br=%d Bc=%d (grid %d Q tiles x %d heads), "
                        "backward tiles Br=%d Bc=%d\n", f.Br, f.Bc, (p.Nq + f.Br - 1) / f.Br, p.B * p.H, b.Br, b.Bc);
        } else {
            std::printf("  %s on tensor cores (mma.sync m16n8k16): tile sizes per head dim in v2/forward_mma.cu and "
                        "v2/backward_mma.cu\n", dtype_name(p.dtype));
        }
    };
    s.below_unsupported = v1_unsupported;
    s.below_workspace_bytes = v1_workspace_bytes;
    s.below_forward = v1_forward;
    s.backward_unsupported = v2_backward_unsupported;
    s.backward_workspace_bytes = v2_backward_workspace_bytes;
    s.backward = v2_backward;
    s.cpu_backward = v2_model_backward;
    s.forward_steps = v2_forward_steps();
    s.backward_steps = v2_backward_steps();
    s.below_backward_workspace_bytes = naive_backward_workspace_bytes;
    s.below_backward = naive_backward;
    return stage_main(argc, argv, s);
}
