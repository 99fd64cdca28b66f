// v2/main.cu: the program bin/v2, FlashAttention-2: fp32 on CUDA cores, or fp16/bf16 on tensor cores (--dtype).
// Build and run it alone (the kernels of the stages it checks against come with it, their programs' main.cu not):
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o v2_attention v2/*.cu $(ls v1/*.cu online_softmax/*.cu naive/*.cu | grep -v main.cu) tests/harness/*.cu && ./v2_attention --check --bench
#include "v2/v2.h"

int main(int argc, char** argv) { return stage_main(argc, argv, v2_stage()); }
