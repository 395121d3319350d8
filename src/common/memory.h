// Memory measurement: process peak resident memory (VmHWM) and an exact count of the bytes
// held by CPU tensors (a counting wrapper around c10's CPU allocator).
#pragma once

#include <cstdint>

namespace edkm {

// Resident set size now and its high-water mark, from /proc/self/status (0 where unavailable).
int64_t current_rss_bytes();
int64_t peak_rss_bytes();
// Resets the high-water mark to the current RSS (writes 5 to /proc/self/clear_refs).
void reset_peak_rss();

// Counts the bytes of every CPU tensor allocated after install() (idempotent). Tensors on
// other devices are not counted.
class TensorMemory {
 public:
  static void install();
  static int64_t current();
  static int64_t peak();
  // Sets the peak to the current count, so that peak() - current() measured later is the
  // extra memory of what ran in between.
  static void reset_peak();
};

}  // namespace edkm
