// v2/stage.cu: the v2 stage as the shared harness sees it: its name, kernels, CPU model and the stage
// below that --check compares against. bin/v2 (main.cu) runs it; the stage above points at it.
#include <cstdio>

#include "v1/v1.h"
#include "v2.h"

const Stage& v2_stage() {
    static const Stage stage = [] {
        Stage s;
        s.name = "v2";
        s.has_dtype = true;
        s.unsupported = v2_unsupported;
        s.workspace_bytes = v2_workspace_bytes;
        s.forward = v2_forward;
        s.cpu_forward = v2_model_forward;
        s.describe = [](const Problem& p) -> std::string {
            if (p.dtype == DType::fp32) {
                const V2Tiles f = v2_fp32_forward_tiles(p.d), b = v2_fp32_backward_tiles();
                std::printf("  fp32 on CUDA cores: forward tiles Br=%d Bc=%d (grid %d Q tiles x %d heads), "
                            "backward tiles Br=%d Bc=%d\n", f.Br, f.Bc, (p.Nq + f.Br - 1) / f.Br, p.B * p.H, b.Br, b.Bc);
            } else {
                std::printf("  %s on tensor cores (mma.sync m16n8k16): tile sizes per head dim in v2/forward_mma.cu and "
                            "v2/backward_mma.cu\n", dtype_name(p.dtype));
            }
            return "";
        };
        s.backward_unsupported = v2_backward_unsupported;
        s.backward_workspace_bytes = v2_backward_workspace_bytes;
        s.backward = v2_backward;
        s.has_deterministic = true;
        s.cpu_backward = [](const Problem& p, const HostTensors& in, const std::vector<float>& o,
                            const std::vector<float>& lse, HostGrads* g, ModelTraffic* t) {
            v2_model_backward_scheduled(p, in, o, lse, &g->dq, &g->dk, &g->dv, t, 0, false, &g->dbias);
        };
        s.cpu_model_extensions = true;  // and the tensor-core forward (fp16, bf16) has them on the GPU
        s.forward_steps = v2_forward_steps();
        s.backward_steps = v2_backward_steps();
        s.below = &v1_stage();
        return s;
    }();
    return stage;
}
