// A progress bar on stderr when it is a terminal (redrawn in place, with rate and ETA), plain
// log lines at most every `log_every` seconds otherwise, nothing when quiet.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

namespace edkm {

class Progress {
 public:
  Progress(std::string label, int64_t total, bool quiet = false, double log_every = 10.0);
  ~Progress();
  void set_total(int64_t total) { total_ = total; }
  // Sets the count done so far and a free-form status (e.g. "loss 1.234").
  void update(int64_t done, const std::string& status = "");
  // Final line: total time and the status.
  void finish(const std::string& status = "");
  double elapsed() const;

 private:
  void draw(bool final);
  std::string label_;
  int64_t total_;
  int64_t done_ = 0;
  std::string status_;
  bool quiet_, tty_, finished_ = false;
  double log_every_;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

std::string format_duration(double seconds);

}  // namespace edkm
