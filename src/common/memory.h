// Memory measurement: process peak resident memory (VmHWM) and an exact count of the bytes
// held by tensors: CPU tensors through a counting wrapper around c10's CPU allocator, CUDA
// tensors (CUDA builds) through the CUDA caching allocator's own statistics.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace edkm {

// Resident set size now and its high-water mark, from /proc/self/status (0 where unavailable).
int64_t current_rss_bytes();
int64_t peak_rss_bytes();
// Resets the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs).
void reset_peak_rss();

// Counts the bytes of every CPU tensor allocated after install() (idempotent), and of every
// tensor on a CUDA device (counted by its caching allocator from the start; bytes handed to
// tensors, not the blocks it keeps cached). Other devices: std::invalid_argument.
class TensorMemory {
 public:
  static void install();
  static int64_t current(const c10::Device& device = c10::kCPU);
  static int64_t peak(const c10::Device& device = c10::kCPU);
  // Sets the peak to the current count, so that peak() - current() measured later is the
  // extra memory of what ran in between.
  static void reset_peak(const c10::Device& device = c10::kCPU);
};

}  // namespace edkm
