#pragma once

namespace edkm {

// Debian's libtorch starts single-threaded unless OMP_NUM_THREADS is set. Sets the intra-op
// thread count (n <= 0: every core) and returns the count in effect.
int configure_threads(int n);

}  // namespace edkm
