// The comparison report over several `edkm eval` results: a markdown table (task x model, with
// standard errors) and a plot of perplexity and mean accuracy against bits per weight, one line
// per method, drawn by gnuplot.
#pragma once

#include <nlohmann/json_fwd.hpp>

#include <string>
#include <vector>

namespace edkm {

std::string report_markdown(const std::vector<nlohmann::json>& results);
// Writes png_path with gnuplot (InputError if gnuplot is not installed or fails).
void report_plot(const std::vector<nlohmann::json>& results, const std::string& png_path);

}  // namespace edkm
