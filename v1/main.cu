// v1/main.cu: the program bin/v1, FlashAttention-1, checked against the online_softmax stage. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o v1_attention v1/*.cu $(ls online_softmax/*.cu naive/*.cu | grep -v main) tests/harness/*.cu && ./v1_attention --check --bench
#include "v1/v1.h"

int main(int argc, char** argv) { return stage_main(argc, argv, v1_stage()); }
