// v3/main.cu: the program bin/v3, FlashAttention-3 on Hopper (fp16/bf16, --kernel K for the steps). On a GPU that
// is not Hopper, or with none, it says so in one line and runs the CPU model. The driver's tensor-map encoder is
// found at run time: libcuda is not linked. Build and run it alone (sm_90a: Hopper's wgmma, TMA and setmaxnreg):
//   nvcc -O3 -std=c++20 -gencode arch=compute_90a,code=sm_90a -I. -Itests -o v3_attention v3/*.cu $(ls v2/*.cu v1/*.cu online_softmax/*.cu naive/*.cu | grep -v main.cu) tests/harness/*.cu && ./v3_attention --dtype fp16 --check --bench
#include "v3/v3.h"

int main(int argc, char** argv) { return stage_main(argc, argv, v3_stage()); }
