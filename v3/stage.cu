// stage.cu: the v3 stage as the shared harness sees it: its name, kernels, CPU model and the stage below that
// --check compares against. bin/v3 (main.cu) runs it.
#include <cstdio>

#include "v2/v2.h"
#include "v3.h"

const Stage& v3_stage() {
    static const Stage stage = [] {
        Stage s;
        s.name = "v3";
        s.has_dtype = true;
        s.unsupported = v3_unsupported;
        s.gpu_unusable = v3_gpu_unusable;
        s.workspace_bytes = [](const Problem&) -> size_t { return 0; };
        s.forward = v3_forward;
        // The same algorithm on the CPU: FlashAttention-3 changes who moves the data and when, not the arithmetic,
        // so v2's model (same loops, P rounded to 16 bits before P V, O rounded at the end) is v3's model too.
        s.cpu_forward = v2_model_forward;
        s.describe = [](const Problem& p) -> std::string {
            V3Config c;
            const int step = v3_step_of(p);
            if (std::string why = v3_config(step, p.d, &c); !why.empty()) return why;
            std::printf("  Hopper: step %d, tiles Br=%d Bc=%d, %d-stage K/V ring, %d threads (%d consumer warpgroup%s%s), "
                        "%d bytes of shared memory, grid %d Q tiles x %d heads\n",
                        step, c.Br, c.Bc, c.stages, c.threads, c.consumers, c.consumers > 1 ? "s" : "",
                        c.warp_specialised ? " + 1 producer" : "", c.smem_bytes, (p.Nq + c.Br - 1) / c.Br, p.B * p.H);
            return "";
        };
        s.forward_steps = v3_forward_steps();
        s.below = &v2_stage();
        return s;
    }();
    return stage;
}
