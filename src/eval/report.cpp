#include "eval/report.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <map>
#include <set>

#include "common/atomic_file.h"
#include "common/error.h"
#include "eval/tasks.h"

namespace edkm {
namespace {

std::string label(const nlohmann::json& r) { return r.value("label", r.value("model", std::string("?"))); }

double mean_accuracy(const nlohmann::json& r) {
  double s = 0;
  int n = 0;
  for (auto it = r["tasks"].begin(); it != r["tasks"].end(); ++it) s += (*it)["acc"].get<double>(), ++n;
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
  s += " mean acc |", sep += "---|";
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
    s += fmt::format(" {:.1f} |", 100 * mean_accuracy(r));
    for (const auto& p : ppl)
      s += r.contains("perplexity") && r["perplexity"].contains(p)
               ? fmt::format(" {:.3f} |", r["perplexity"][p]["token_perplexity"].get<double>())
               : std::string(" |");
    s += "\n";
  }
  s += "\nAccuracies in % ± standard error; ⁿ: acc_norm (length-normalised), else acc. Mean acc averages acc.\n";
  return s;
}

void report_plot(const std::vector<nlohmann::json>& results, const std::string& png_path) {
  namespace fs = std::filesystem;
  // One data block per method: bits/weight, perplexity, mean accuracy, sorted by bits.
  std::map<std::string, std::vector<std::tuple<double, double, double>>> by_method;
  std::string ppl_name;
  for (const auto& r : results) {
    auto [name, ppl] = headline_perplexity(r);
    if (!name.empty()) ppl_name = name;
    by_method[r.value("method", std::string("?"))].emplace_back(r.value("bits_per_weight", 0.0), ppl, 100 * mean_accuracy(r));
  }
  const fs::path dir = fs::temp_directory_path() / fmt::format("edkm-report-{}", ::getpid());
  fs::create_directories(dir);
  std::string plot1, plot2;
  for (auto& [method, pts] : by_method) {
    std::sort(pts.begin(), pts.end());
    std::string data;
    for (auto [b, p, a] : pts) data += fmt::format("{} {} {}\n", b, p, a);
    const std::string file = (dir / (method + ".dat")).string();
    write_file_atomic(file, data);
    plot1 += fmt::format("{}'{}' using 1:2 with linespoints lw 2 pt 7 title '{}'", plot1.empty() ? "" : ", ", file, method);
    plot2 += fmt::format("{}'{}' using 1:3 with linespoints lw 2 pt 7 title '{}'", plot2.empty() ? "" : ", ", file, method);
  }
  const std::string tmp_png = png_path + ".tmp.png";
  const std::string script = fmt::format(
      "set terminal pngcairo size 1200,500 font ',11'\n"
      "set output '{}'\n"
      "set multiplot layout 1,2 title 'edkm: quality against bits per weight'\n"
      "set grid\nset key top right\nset logscale x 2\nset xlabel 'bits per weight (clustered tensors)'\n"
      "set ylabel '{} perplexity'\nset logscale y\nplot {}\n"
      "unset logscale y\nset ylabel 'mean zero-shot accuracy (%)'\nset key bottom right\nplot {}\n"
      "unset multiplot\n",
      tmp_png, ppl_name.empty() ? "" : ppl_name, plot1, plot2);
  const std::string script_file = (dir / "plot.gp").string();
  write_file_atomic(script_file, script);
  const int rc = std::system(fmt::format("gnuplot '{}' 2> '{}'", script_file, (dir / "err.txt").string()).c_str());
  const std::string err = fs::exists(dir / "err.txt") ? read_file((dir / "err.txt").string()) : "";
  fs::remove_all(dir);
  if (rc != 0 || !fs::exists(tmp_png)) {
    fs::remove(tmp_png);
    throw_input("{}: gnuplot failed (install gnuplot-nox){}", png_path, err.empty() ? "" : ": " + err);
  }
  fs::rename(tmp_png, png_path);
}

}  // namespace edkm
