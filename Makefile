# FlashAttention from scratch: build every stage program (bin/<stage>) and the test binary (bin/tests).
#
#   make            build everything          make test       build, run every test (CPU tests without a GPU)
#   make run        the ladder, stage by stage make bench      the FlashAttention-2 benchmark shapes, all stages
#   make sanitize   compute-sanitizer on small shapes of every stage
#   make steps      v2's tensor-core optimisation steps, one by one, on the benchmark shapes (table and plots)
#   make gpt        optional, needs PyTorch + GPU: the small GPT trained on our attention and on PyTorch's
#
# GPU architecture: detected with nvidia-smi when a GPU is present; override with `make ARCH=sm_90`. Without a
# GPU (CI) the default builds machine code for sm_80 (Ampere: A100; also runs on sm_86/sm_89) and sm_90 (Hopper),
# plus compute_90 PTX so newer GPUs can JIT it.

NVCC     ?= nvcc
DETECTED := $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' .')
ifneq ($(ARCH),)
  GENCODE := -arch=$(ARCH)
else ifneq ($(DETECTED),)
  GENCODE := -gencode arch=compute_$(DETECTED),code=sm_$(DETECTED)
else
  GENCODE := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=[sm_90,compute_90]
endif
NVCCFLAGS ?= -O3 -std=c++20 -lineinfo -Xcompiler -Wall,-Wextra -Werror all-warnings
FLAGS    := $(NVCCFLAGS) $(GENCODE) -I. -Itests
V3_FLAGS := $(NVCCFLAGS) -gencode arch=compute_90a,code=sm_90a -I. -Itests $(if $(V3_DEBUG),-DV3_HANG_CHECK)
BUILD    := build

# Each stage is a folder; its program links its own sources and the kernels of the stages it reuses or checks
# against (the rung below). main.cu of a folder belongs to that folder's program only; online_softmax/rows_main.cu
# is a second program, bin/softmax_rows (row softmax three ways, on its own).
STAGES              := naive online_softmax v1 v2 v3
DEPS_naive          :=
DEPS_online_softmax := naive
DEPS_v1             := online_softmax naive
DEPS_v2             := v1 online_softmax naive
DEPS_v3             := v2 v1 online_softmax naive

HARNESS_SRC := $(wildcard tests/harness/*.cu)
HARNESS_OBJ := $(HARNESS_SRC:%.cu=$(BUILD)/%.o)
kernel_objs  = $(patsubst %.cu,$(BUILD)/%.o,$(filter-out %main.cu,$(wildcard $(1)/*.cu)))
TEST_SRC    := $(wildcard tests/*.cu)
TEST_OBJ    := $(TEST_SRC:%.cu=$(BUILD)/%.o) $(foreach s,$(STAGES),$(call kernel_objs,$(s)))

.PHONY: doctest all test run bench steps sanitize gpt clean exercises starter check
PROGRAMS := $(STAGES:%=bin/%) $(if $(wildcard online_softmax/rows_main.cu),bin/softmax_rows)
all: $(PROGRAMS) bin/tests

# The compiler and flags of the last build, rewritten only when they change: every object depends on it, so
# `make ARCH=sm_75` after a default build recompiles everything instead of linking stale objects.
FLAGS_STAMP := $(BUILD)/flags.txt
# (-MMD is in it so that a tree built before the objects had .d files is rebuilt once, then tracked.)
$(shell mkdir -p $(BUILD) && (echo '$(NVCC) $(FLAGS) $(V3_FLAGS) -MMD' | cmp -s - $(FLAGS_STAMP) || echo '$(NVCC) $(FLAGS) $(V3_FLAGS) -MMD' > $(FLAGS_STAMP)))

# Each object depends on the headers its source includes, as nvcc lists them while it compiles (-MMD; the CUDA
# Toolkit's are listed too), in a .d file beside the object (-MP adds a rule for each header, so deleting one is not
# an error). So a change to a header rebuilds only what includes it. A fresh build has no .d files and builds all.
DEPFLAGS = -MMD -MP -MF $(@:.o=.d)
-include $(patsubst %.cu,$(BUILD)/%.d,$(wildcard */*.cu tests/harness/*.cu))

$(BUILD)/%.o: %.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(FLAGS) $(DEPFLAGS) -c $< -o $@

# v3 (FlashAttention-3) is Hopper code: TMA, wgmma and setmaxnreg exist only on sm_90a, so v3/ is compiled for it
# whatever ARCH is (nvcc needs no GPU for that; the program says so and runs its CPU model elsewhere). ptxas's
# "wgmma serialized" notes (C7513, C7515...: correct but slow) fail the build. make V3_DEBUG=1: mbarrier waits that report
# the barrier, stage and parity and trap after about 2^28 polls instead of hanging (their printf serialises wgmma,
# C7510, so that build skips the check: it is for finding hangs, not for timing).
$(BUILD)/v3/%.o: v3/%.cu $(FLAGS_STAMP)
	@mkdir -p $(dir $@)
	$(NVCC) $(V3_FLAGS) $(DEPFLAGS) -c $< -o $@ >$@.log 2>&1; status=$$?; cat $@.log; test $$status = 0
	@[ -n "$(V3_DEBUG)" ] || ! grep -q "wgmma.mma_async instructions are serialized" $@.log || \
	    { echo "error: $<: ptxas serialised wgmma (C751x), see $@.log"; rm -f $@; exit 1; }

# The test suites need doctest: installed here when it is missing and that is possible, else one line says how.
$(TEST_SRC:%.cu=$(BUILD)/%.o): | doctest
doctest:
	@bash scripts/need_doctest.sh

define stage_rule
bin/$(1): $(BUILD)/$(1)/main.o $(call kernel_objs,$(1)) $(foreach d,$(DEPS_$(1)),$(call kernel_objs,$(d))) $(HARNESS_OBJ)
	@mkdir -p bin
	$$(NVCC) $$(FLAGS) $$^ -o $$@
endef
$(foreach s,$(STAGES),$(eval $(call stage_rule,$(s))))

bin/softmax_rows: $(BUILD)/online_softmax/rows_main.o $(call kernel_objs,online_softmax) $(call kernel_objs,naive) $(HARNESS_OBJ)
	@mkdir -p bin
	$(NVCC) $(FLAGS) $^ -o $@

bin/tests: $(TEST_OBJ) $(HARNESS_OBJ)
	@mkdir -p bin
	$(NVCC) $(FLAGS) $^ -o $@

# REQUIRE_GPU=1 make test fails when any GPU test was skipped.
# All three suites run even when one fails (in a starter copy the CLI tests fail too); the doctest suites last, so
# that their summary ends the output. Fails when any of them failed.
test: all
	@status=0; \
	bash tests/cli_test.sh || status=1; \
	bash scripts/pytorch_tests.sh || status=1; \
	./bin/tests || status=1; \
	exit $$status

run: $(PROGRAMS)
	@bash scripts/ladder.sh

bench: all
	@bash scripts/bench.sh

# every tensor-core optimisation step of v2 (bin/v2 --kernel list) on the benchmark shapes, with plots
steps: all
	@bash scripts/steps.sh

sanitize: all
	@bash scripts/sanitize.sh

gpt:
	python3 pytorch/train_gpt.py

# ---- The course kit (docs/exercises.md): exercises are marked regions of the code, checked by bin/check_cpu (CPU
# models: builds only the models and the harness) or bin/check_gpu (kernels, needs sm_80+).
#   make exercises                      list them          make check EX=name     run one exercise's checks
#   make starter DIR=path [EX=a,b]      a copy with those regions (default: all) replaced by stubs
EXERCISE_MODEL_OBJ := $(patsubst %.cu,$(BUILD)/%.o,naive/model.cu online_softmax/model.cu v1/model.cu v1/v1.cu \
                      v2/model.cu v2/forward_fp32.cu v2/backward_fp32.cu)
EXERCISE_OBJ       := $(BUILD)/exercises/runner.o $(BUILD)/exercises/checks_cpu.o
bin/check_cpu: $(BUILD)/exercises/check_cpu_main.o $(EXERCISE_OBJ) $(EXERCISE_MODEL_OBJ) $(HARNESS_OBJ)
	@mkdir -p bin
	$(NVCC) $(FLAGS) $^ -o $@
bin/check_gpu: $(BUILD)/exercises/check_gpu_main.o $(BUILD)/exercises/checks_gpu.o $(EXERCISE_OBJ) \
               $(foreach s,$(STAGES),$(call kernel_objs,$(s))) $(HARNESS_OBJ)
	@mkdir -p bin
	$(NVCC) $(FLAGS) $^ -o $@
bin/tests: $(BUILD)/exercises/checks_cpu.o $(BUILD)/exercises/checks_gpu.o
exercises:
	@python3 scripts/exercises.py list
starter:
	@python3 scripts/exercises.py starter "$(DIR)" "$(EX)"
check:
	@MAKE="$(MAKE)" python3 scripts/exercises.py check "$(EX)"

clean:
	rm -rf $(BUILD) bin
