// naive/stage.cu: the naive stage as the shared harness sees it: its name, kernels, CPU model and the stage
// below that --check compares against. bin/naive (main.cu) runs it; the stage above points at it.
#include <cstdio>

#include "naive.h"

const Stage& naive_stage() {
    static const Stage stage = [] {
        Stage s;
        s.name = "naive";
        s.unsupported = naive_unsupported;
        s.workspace_bytes = naive_workspace_bytes;
        s.forward = naive_forward;
        s.cpu_forward = naive_model_forward;
        s.cpu_model_score_matrices = 1;  // S (and P, dS in the backward) for one head at a time
        s.describe = [](const Problem& p) -> std::string {
            std::printf("  the score matrix S (B*H*Nq*Nk fp32) takes %.1f MiB of device memory\n",
                        naive_workspace_bytes(p) / 1048576.0);
            std::string why;
            return device_memory_fits(naive_workspace_bytes(p), &why) ? "" : "the score matrix S " + why;
        };
        s.backward_workspace_bytes = naive_backward_workspace_bytes;
        s.backward = naive_backward;
        s.cpu_backward = [](const Problem& p, const HostTensors& in, const std::vector<float>& o,
                            const std::vector<float>& lse, HostGrads* g, ModelTraffic* t) {
            naive_model_backward(p, in, o, lse, &g->dq, &g->dk, &g->dv, t);
        };
        return s;
    }();
    return stage;
}
