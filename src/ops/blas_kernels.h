#pragma once
// OpenBLAS picks its kernels by CPU model when it is loaded (DYNAMIC_ARCH builds, as Debian's). Version 0.3.21 (Debian
// 12) falls back to its SSE3 "Prescott" kernels on models it does not know, e.g. the Sapphire Rapids VMs that report a
// generic "Intel(R) Xeon(R) Processor": sgemm, and with it CPU training and prefill, runs ~2.5× slower there.

namespace mamba3 {

// The OpenBLAS core type the CPU deserves when OpenBLAS chose an older one than its AVX2/AVX-512 support allows
// ("SkylakeX" or "Haswell"), or nullptr: nothing to fix (or not x86-64 Linux, or OPENBLAS_CORETYPE already set).
const char* blas_core_to_force();

// When blas_core_to_force() names a core: sets OPENBLAS_CORETYPE to it and re-executes this program with the same
// arguments (OpenBLAS reads the variable only when it is loaded), so the process continues with the right kernels;
// returns only when nothing was to be done or the re-execution failed. Call first thing in main. The user's own
// OPENBLAS_CORETYPE is always respected.
void reexec_with_blas_core(char** argv);

}  // namespace mamba3
