// Internal to cluster/: which implementation a pass takes.
#pragma once

namespace edkm::detail {

// kAuto takes the hand-written host loops where they apply (CPU tensors of the types they
// serve) and the device-generic ATen code elsewhere; kGeneric forces the ATen code, so that
// tests can compare the two on the same inputs.
enum class Kernels { kAuto, kGeneric };

}  // namespace edkm::detail
