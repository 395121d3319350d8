#include "common/threads.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>

namespace edkm {
namespace {

// Busy and total jiffies of all CPUs (the "cpu" line of /proc/stat); false if unreadable.
bool cpu_jiffies(double& busy, double& total) {
  std::ifstream f("/proc/stat");
  std::string line;
  if (!std::getline(f, line) || line.rfind("cpu ", 0) != 0) return false;
  std::istringstream in(line.substr(4));
  // user nice system idle iowait irq softirq steal (guest time is inside user and nice)
  double v[8] = {0};
  for (double& x : v)
    if (!(in >> x)) return false;
  total = 0;
  for (double x : v) total += x;
  busy = total - v[3] - v[4];
  return true;
}

}  // namespace

int usable_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

int idle_cores(int sample_ms) {
  const int usable = usable_cores();
  double busy0 = 0, total0 = 0, busy1 = 0, total1 = 0;
  if (!cpu_jiffies(busy0, total0)) return usable;
  std::this_thread::sleep_for(std::chrono::milliseconds(sample_ms));
  if (!cpu_jiffies(busy1, total1) || total1 <= total0) return usable;
  // /proc/stat counts every CPU of the machine; the busy fraction of them, in cores.
  const int online = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const double busy_cores = (busy1 - busy0) / (total1 - total0) * online;
  return std::max(1, std::min(usable, static_cast<int>(std::lround(online - busy_cores))));
}

int configure_threads(int n) {
  if (n <= 0) n = idle_cores();
  at::set_num_threads(n);
  return at::get_num_threads();
}

}  // namespace edkm
