// Internal to cluster/: which implementation a pass takes.
#pragma once

namespace edkm::detail {

// kAuto takes the CUDA kernels for CUDA tensors in CUDA builds, the hand-written host loops
// where they apply (CPU tensors of the types they serve; for the unique-value-space passes,
// tables on other devices too, copied to the host and back, uspace.h), and the device-generic
// ATen code elsewhere; kGeneric forces the ATen code, so that tests can compare them on the
// same inputs.
enum class Kernels { kAuto, kGeneric };

}  // namespace edkm::detail
