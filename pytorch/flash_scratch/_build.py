"""Builds the PyTorch extension from the project's own kernel sources (no copies) with torch.utils.cpp_extension.

The first call compiles (about a minute); later calls load the cached build from build/torch_ext/ in the
repository. Loading it registers the operators (pytorch/csrc/bridge.cpp, TORCH_LIBRARY).

Architectures: on a Hopper GPU (sm_90) everything is compiled with -gencode arch=compute_90a,code=sm_90a, as the
Makefile compiles v3 (TMA, wgmma and setmaxnreg exist only on sm_90a; v2 runs there too), and v3 is built in. On
any other GPU v3 is left out and v2 is compiled for TORCH_CUDA_ARCH_LIST if set, otherwise for the current GPU.
"""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The bridge plus the kernel files bin/v2 links for fp16/bf16 (see the Makefile's v2 rule).
SOURCES = ["pytorch/csrc/bridge.cpp", "v2/forward_mma.cu", "v2/backward_mma.cu"]
# v3's forward and host rules, and the harness's device queries that v3_gpu_unusable uses (gpu_available, ...).
V3_SOURCES = ["v3/forward.cu", "v3/host.cu", "tests/harness/device.cu"]

_module = None


def extension():
    """The compiled module (built on first use)."""
    global _module
    if _module is None:
        import torch
        from torch.utils.cpp_extension import load

        if not torch.cuda.is_available():
            raise RuntimeError("flash_scratch needs a CUDA GPU (torch.cuda.is_available() is False)")
        hopper = torch.cuda.get_device_capability() == (9, 0)
        sources, defines, arch = SOURCES, [], []
        if hopper:
            sources, defines = SOURCES + V3_SOURCES, ["-DFLASH_SCRATCH_V3"]
            # An arch flag of our own: cpp_extension then adds none from TORCH_CUDA_ARCH_LIST.
            arch = ["-gencode=arch=compute_90a,code=sm_90a"]
        elif "TORCH_CUDA_ARCH_LIST" not in os.environ:
            major, minor = torch.cuda.get_device_capability()
            os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
        build_dir = os.path.join(ROOT, "build", "torch_ext")
        os.makedirs(build_dir, exist_ok=True)
        _module = load(
            name="flash_scratch_ext",
            sources=[os.path.join(ROOT, s) for s in sources],
            extra_include_paths=[ROOT, os.path.join(ROOT, "tests")],
            extra_cflags=["-O3", "-std=c++20", "-Wall", "-Wextra"] + defines,
            # PyTorch defines __CUDA_NO_HALF_CONVERSIONS__ and friends for extensions; undefining them compiles
            # the kernels exactly as the Makefile does for bin/v2 and bin/v3.
            extra_cuda_cflags=["-O3", "-std=c++20", "-lineinfo"] + arch + ["-U__CUDA_NO_" + m + "__" for m in (
                "HALF_OPERATORS", "HALF_CONVERSIONS", "BFLOAT16_CONVERSIONS", "HALF2_OPERATORS")],
            build_directory=build_dir,
            verbose=os.environ.get("FLASH_SCRATCH_VERBOSE") == "1",
        )
    return _module
