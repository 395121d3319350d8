#include "common/progress.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cstdio>

namespace edkm {

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "--:--";
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) return fmt::format("{}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
  return fmt::format("{:02}:{:02}", t / 60, t % 60);
}

Progress::Progress(std::string label, int64_t total, bool quiet, double log_every)
    : label_(std::move(label)), total_(total), quiet_(quiet), tty_(::isatty(STDERR_FILENO) == 1),
      log_every_(log_every), start_(std::chrono::steady_clock::now()), last_draw_(start_) {}

Progress::~Progress() {
  if (!finished_ && tty_ && !quiet_ && done_ > 0) std::fputc('\n', stderr);
}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

void Progress::update(int64_t done, const std::string& status) {
  done_ = done;
  status_ = status;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_draw_).count();
  if (quiet_ || since < (tty_ ? 0.1 : log_every_)) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish(const std::string& status) {
  if (finished_) return;
  finished_ = true;
  if (!status.empty()) status_ = status;
  done_ = std::max(done_, total_);
  if (!quiet_) draw(true);
}

void Progress::draw(bool final) {
  const double t = elapsed();
  const double rate = t > 0 ? done_ / t : 0;
  const double eta = rate > 0 ? (total_ - done_) / rate : -1;
  const double frac = total_ > 0 ? std::min(1.0, double(done_) / total_) : 1.0;
  std::string line;
  if (tty_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    line = fmt::format("\r{} [{}{}] {}/{} {:3.0f}% {} ETA {}  {}\x1b[K", label_, std::string(filled, '#'),
                       std::string(kWidth - filled, '.'), done_, total_, 100 * frac, format_duration(t),
                       final ? "00:00" : format_duration(eta), status_);
    if (final) line += "\n";
  } else {
    line = fmt::format("{}: {}/{} ({:.0f}%) elapsed {} eta {} {}\n", label_, done_, total_, 100 * frac,
                       format_duration(t), final ? "00:00" : format_duration(eta), status_);
  }
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
}

}  // namespace edkm
