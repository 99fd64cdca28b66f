// naive/main.cu: the program bin/naive. Build and run it alone:
//   nvcc -O3 -std=c++20 -arch=native -I. -Itests -o naive_attention naive/*.cu tests/harness/*.cu && ./naive_attention --check --bench
#include "naive/naive.h"

int main(int argc, char** argv) { return stage_main(argc, argv, naive_stage()); }
