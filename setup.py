"""Builds attenscribble_ops._C from csrc/.

Always: csrc/*.cpp and csrc/cpu/*.cpp (OpenMP where the compiler has it).
CUDA: csrc/cuda/*.cu as well, when a CUDA toolkit and a CUDA build of torch are both present.
A visible GPU is never required. Environment:
  FORCE_CUDA=1       build the CUDA sources even if the checks above fail (e.g. in a container
                     without a driver, with TORCH_CUDA_ARCH_LIST set)
  FORCE_ONLY_CPU=1   never build the CUDA sources
  ATTENSCRIBBLE_DEBUG=1  -O0 -g, for a debugger
  ATTENSCRIBBLE_SANITIZE=1  -O1 -g with AddressSanitizer and UndefinedBehaviorSanitizer, CPU sources
                     only (`make test-sanitize` builds such a copy under build/sanitize and runs
                     the CPU kernels' tests with the sanitizers' runtimes preloaded)
Build with `pip install --no-build-isolation .` so that the extension matches the installed torch.
"""
import glob
import os
import platform
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - the message is the point
    sys.exit(
        "attenscribble_ops builds against an installed torch: install torch first "
        "(e.g. `pip install torch==2.13.0`), then `pip install --no-build-isolation .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_decision():
    if _flag("FORCE_ONLY_CPU"):
        return False, "FORCE_ONLY_CPU=1"
    if _flag("FORCE_CUDA"):
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (CUDA_HOME unset and nvcc not on PATH)"
    return True, f"CUDA toolkit at {CUDA_HOME}, torch built with CUDA {torch.version.cuda}"


def _openmp_flags():
    """-fopenmp if the C++ compiler accepts it (at::parallel_for is inlined OpenMP)."""
    if platform.system() == "Darwin":
        return [], []
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run(
                [cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ).returncode == 0
        except OSError:
            ok = False
    return (["-fopenmp"], ["-fopenmp"]) if ok else ([], [])


def _extension():
    with_cuda, why = _cuda_decision()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    omp_c, omp_l = _openmp_flags()
    debug = _flag("ATTENSCRIBBLE_DEBUG")
    sanitize = _flag("ATTENSCRIBBLE_SANITIZE")
    if sanitize and with_cuda:
        with_cuda, why = False, "ATTENSCRIBBLE_SANITIZE=1 (the host sanitizers do not see device code)"
    opt = ["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O3"]
    # vptr: torch's classes cross shared-library boundaries with hidden visibility here; -fno-wrapv
    # undoes Python's -fwrapv, under which a signed overflow in index arithmetic is not reported
    sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined",
                  "-fno-omit-frame-pointer", "-fno-wrapv"] if sanitize else []
    # -ffp-contract=off: products rounded before they are added, as in the reference. GCC otherwise
    # fuses a * b - c into one FMA wherever the target has FMA (the AVX2/AVX-512 clones, aarch64,
    # -march=native), in C++ whatever -std says; the softmax exponents s x - lse then keep the
    # rounding error of s x instead of cancelling it for a row's maximum (README, Large logit
    # scales: the attention's dq had 14000 times the fp32 reference's error at logit_scale 1e4, NaN
    # at 1e10). The masked CRF, whose sums do not cancel, keeps its FMAs (csrc/cpu/masked_crf.cpp).
    # the C++ standard is torch's own choice
    cxx = [*opt, *omp_c, *sanitizers, "-fvisibility=hidden", "-ffp-contract=off"]
    define_macros = [("AT_PARALLEL_OPENMP", "1")] if omp_c else []
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros.append(("WITH_CUDA", None))
    print(
        f"attenscribble_ops build: torch {torch.__version__}, CUDA sources "
        f"{'ON' if with_cuda else 'OFF'} ({why}), OpenMP {'ON' if omp_c else 'OFF'}, "
        f"{'debug' if debug else 'sanitizers' if sanitize else 'release'}; {len(sources)} translation units",
        flush=True,
    )
    kwargs = dict(
        name="attenscribble_ops._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_link_args=[*omp_l, *sanitizers],
    )
    if with_cuda:
        nvcc = [*opt, "--expt-relaxed-constexpr", "-lineinfo", "--use_fast_math"]
        return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    packages=find_packages(include=["attenscribble_ops", "attenscribble_ops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
