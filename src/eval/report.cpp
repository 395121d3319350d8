#include "eval/report.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <map>
#include <set>

#include "common/atomic_file.h"
#include "common/error.h"
#include "eval/tasks.h"

namespace edkm {
namespace {

std::string label(const nlohmann::json& r) { return r.value("label", r.value("model", std::string("?"))); }

// The mean of the tasks' accuracies and its standard error, sqrt(sum se_t^2) / T (the tasks'
// samples are independent).
std::pair<double, double> mean_accuracy(const nlohmann::json& r) {
  double s = 0, v = 0;
  int n = 0;
  for (auto it = r["tasks"].begin(); it != r["tasks"].end(); ++it) {
    s += (*it)["acc"].get<double>();
    v += std::pow((*it)["acc_stderr"].get<double>(), 2);
    ++n;
  }
  return n ? std::make_pair(s / n, std::sqrt(v) / n) : std::make_pair(0.0, 0.0);
}

// Each task's accuracy under uniform guessing, from the first result that records it.
std::map<std::string, double> chance_levels(const std::vector<nlohmann::json>& results) {
  std::map<std::string, double> c;
  for (const auto& r : results)
    for (auto it = r["tasks"].begin(); it != r["tasks"].end(); ++it)
      if (it->contains("chance") && !c.count(it.key())) c[it.key()] = (*it)["chance"].get<double>();
  return c;
}

// The mean chance level over the tasks a result reports, as mean_accuracy averages them.
double mean_chance(const nlohmann::json& r, const std::map<std::string, double>& chance) {
  double s = 0;
  int n = 0;
  for (auto it = r["tasks"].begin(); it != r["tasks"].end(); ++it)
    if (chance.count(it.key())) s += chance.at(it.key()), ++n;
  return n ? s / n : 0;
}

// The perplexity a result reports for the plot: TinyStories first, else the first one.
std::pair<std::string, double> headline_perplexity(const nlohmann::json& r) {
  if (!r.contains("perplexity") || r["perplexity"].empty()) return {"", 0};
  const auto& p = r["perplexity"].contains("tinystories") ? r["perplexity"]["tinystories"] : r["perplexity"].begin().value();
  const std::string name = r["perplexity"].contains("tinystories") ? "tinystories" : r["perplexity"].begin().key();
  return {name, p["token_perplexity"].get<double>()};
}

}  // namespace

std::string report_markdown(const std::vector<nlohmann::json>& results) {
  std::vector<std::string> tasks, ppl;
  for (const auto& r : results) {
    for (auto it = r["tasks"].begin(); it != r["tasks"].end(); ++it)
      if (std::find(tasks.begin(), tasks.end(), it.key()) == tasks.end()) tasks.push_back(it.key());
    if (r.contains("perplexity"))
      for (auto it = r["perplexity"].begin(); it != r["perplexity"].end(); ++it)
        if (std::find(ppl.begin(), ppl.end(), it.key()) == ppl.end()) ppl.push_back(it.key());
  }
  // Columns in the order papers list the tasks.
  auto rank = [](const std::string& t) {
    const auto& names = task_names();
    return std::find(names.begin(), names.end(), t) - names.begin();
  };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const std::string& a, const std::string& b) { return rank(a) < rank(b); });
  std::string s = "| model | method | bits/weight |";
  std::string sep = "|---|---|---|";
  for (const auto& t : tasks) s += " " + t + " |", sep += "---|";
  if (!tasks.empty()) s += " mean acc |", sep += "---|";
  for (const auto& p : ppl) s += " " + p + " ppl |", sep += "---|";
  s += "\n" + sep + "\n";
  for (const auto& r : results) {
    s += fmt::format("| {} | {} | {:.2f} |", label(r), r.value("method", std::string("?")), r.value("bits_per_weight", 0.0));
    for (const auto& t : tasks) {
      if (!r["tasks"].contains(t)) {
        s += " |";
        continue;
      }
      const auto& x = r["tasks"][t];
      // acc_norm where the harness reports it (as the papers' tables do), else acc.
      const bool norm = x.contains("acc_norm");
      s += fmt::format(" {:.1f} ± {:.1f}{} |", 100 * x[norm ? "acc_norm" : "acc"].get<double>(),
                       100 * x[norm ? "acc_norm_stderr" : "acc_stderr"].get<double>(), norm ? "ⁿ" : "");
    }
    const auto [mean, se] = mean_accuracy(r);
    if (!tasks.empty())  // a model scored on perplexity only has no mean
      s += r["tasks"].empty() ? std::string(" |") : fmt::format(" {:.1f} ± {:.1f} |", 100 * mean, 100 * se);
    for (const auto& p : ppl)
      s += r.contains("perplexity") && r["perplexity"].contains(p)
               ? fmt::format(" {:.3f} |", r["perplexity"][p]["token_perplexity"].get<double>())
               : std::string(" |");
    s += "\n";
  }
  const auto chance = chance_levels(results);
  if (!chance.empty()) {
    s += "| chance (uniform guess) | | |";
    for (const auto& t : tasks) s += chance.count(t) ? fmt::format(" {:.1f} |", 100 * chance.at(t)) : std::string(" |");
    s += fmt::format(" {:.1f} |", 100 * mean_chance(results.front(), chance));
    for (size_t i = 0; i < ppl.size(); ++i) s += " |";
    s += "\n";
  }
  s += "\nAccuracies in % ± standard error; ⁿ: acc_norm (length-normalised), else acc. Mean acc averages acc; "
       "its standard error is sqrt(sum of the tasks' squared errors) / tasks.\n";
  return s;
}

void report_plot(const std::vector<nlohmann::json>& results, const std::string& png_path) {
  namespace fs = std::filesystem;
  // One data block per method: bits/weight, perplexity, mean accuracy and its standard error,
  // sorted by bits.
  std::map<std::string, std::vector<std::tuple<double, double, double, double>>> by_method;
  // A panel is drawn only for what some result reports; a missing value is NaN, which gnuplot skips.
  std::string ppl_name;
  bool any_tasks = false;
  for (const auto& r : results) {
    auto [name, ppl] = headline_perplexity(r);
    if (!name.empty()) ppl_name = name;
    const bool tasks = r.contains("tasks") && !r["tasks"].empty();
    any_tasks |= tasks;
    const auto [acc, se] = mean_accuracy(r);
    by_method[r.value("method", std::string("?"))].emplace_back(
        r.value("bits_per_weight", 0.0), name.empty() ? NAN : ppl, tasks ? 100 * acc : NAN, tasks ? 100 * se : NAN);
  }
  if (ppl_name.empty() && !any_tasks)
    throw_input("{}: nothing to plot: the results hold neither task accuracies nor perplexities", png_path);
  const auto chance = chance_levels(results);
  const fs::path dir = fs::temp_directory_path() / fmt::format("edkm-report-{}", ::getpid());
  fs::create_directories(dir);
  // Room around the extreme points so their error bars are not cut by the border.
  double lo = 1e9, hi = 0;
  for (const auto& [method, pts] : by_method)
    for (const auto& pt : pts) lo = std::min(lo, std::get<0>(pt)), hi = std::max(hi, std::get<0>(pt));
  // gnuplot cycles through 8 line colours; the 9th method on would repeat one. Each method also
  // gets its own point shape, and from the 9th a dash pattern, so that no two look alike.
  constexpr int kShapes[] = {7, 5, 9, 13, 11, 15};  // filled circle, square, triangles, diamond, pentagon
  std::string plot1, plot2;
  int series = 0;
  for (auto& [method, pts] : by_method) {
    std::sort(pts.begin(), pts.end());
    std::string data;
    for (auto [b, p, a, e] : pts) data += fmt::format("{} {} {} {}\n", b, p, a, e);
    const std::string file = (dir / (method + ".dat")).string();
    write_file_atomic(file, data);
    const std::string style = fmt::format("lw 2 pt {} ps 1.2 dt {}", kShapes[series % std::size(kShapes)], 1 + series / 8);
    ++series;
    plot1 += fmt::format("{}'{}' using 1:2 with linespoints {} title '{}'", plot1.empty() ? "" : ", ", file, style, method);
    plot2 += fmt::format("{}'{}' using 1:3:4 with yerrorlines {} title '{}'", plot2.empty() ? "" : ", ", file, style, method);
  }
  // Near-chance accuracies (small models) must look like what they are.
  if (!chance.empty())
    plot2 += fmt::format(", {} with lines dt 2 lw 2 lc 'gray40' title 'chance (uniform guess)'",
                         100 * mean_chance(results.front(), chance));
  const std::string tmp_png = png_path + ".tmp.png";
  const int panels = (ppl_name.empty() ? 0 : 1) + (any_tasks ? 1 : 0);
  std::string script = fmt::format(
      "set terminal pngcairo size {},500 font ',11'\n"
      "set output '{}'\n"
      "set multiplot layout 1,{} title 'edkm: quality against bits per weight'\n"
      "set grid\nset key top right\nset logscale x 2\nset xrange [{}:{}]\nset xlabel 'bits per weight (clustered tensors)'\n",
      600 * panels, tmp_png, panels, lo / 1.15, hi * 1.15);
  if (!ppl_name.empty()) script += fmt::format("set ylabel '{} perplexity'\nset logscale y\nplot {}\nunset logscale y\n", ppl_name, plot1);
  if (any_tasks) script += fmt::format("set ylabel 'mean zero-shot accuracy (%)'\nset key bottom right\nplot {}\n", plot2);
  script += "unset multiplot\n";
  const std::string script_file = (dir / "plot.gp").string();
  write_file_atomic(script_file, script);
  const int rc = std::system(fmt::format("gnuplot '{}' 2> '{}'", script_file, (dir / "err.txt").string()).c_str());
  const std::string err = fs::exists(dir / "err.txt") ? read_file((dir / "err.txt").string()) : "";
  remove_tree(dir.string());
  if (rc != 0 || !fs::exists(tmp_png)) {
    fs::remove(tmp_png);
    if (WIFEXITED(rc) && WEXITSTATUS(rc) == 127) throw_input("{}: gnuplot not found; install gnuplot-nox", png_path);
    throw_input("{}: gnuplot failed{}", png_path, err.empty() ? "" : ": " + err);
  }
  fs::rename(tmp_png, png_path);
}

}  // namespace edkm
