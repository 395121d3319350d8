// How many threads edkm's parallel loops (libtorch's OpenMP pool, OpenBLAS, our own) use.
//
// With every core as the default, a machine whose cores are partly taken by another process
// (a browser, a CI neighbour, a second learner) slows edkm down many times over: libgomp's
// threads spin-wait for each other at every parallel region, and one of them keeps losing its
// core to the other process (measured: stories260K decoding 122 tokens/s with 2 threads against
// 482 with 1, with a busy loop on one of 2 cores). libgomp's wait policy is fixed when the
// library loads, and a passive policy halves small-work throughput on an idle machine, so
// instead the default counts the cores that are idle when edkm starts.
#pragma once

namespace edkm {

// The cores this process may run on (sched_getaffinity: taskset, cgroups' cpusets).
int usable_cores();

// The usable cores that other processes leave idle, measured over `sample_ms` from
// /proc/stat's CPU time (this process sleeps meanwhile): usable_cores() minus the busy time of
// the others rounded to whole cores, at least 1. usable_cores() where /proc/stat is unreadable.
int idle_cores(int sample_ms = 50);

// Debian's libtorch starts single-threaded unless OMP_NUM_THREADS is set. Sets the intra-op
// thread count (n <= 0: idle_cores()) and returns the count in effect.
int configure_threads(int n);

}  // namespace edkm
