// edkm eval: zero-shot tasks and perplexity; edkm report: the comparison of several results.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>
#include <torch/version.h>

#include <filesystem>
#include <iostream>

#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "common/error.h"
#include "common/progress.h"
#include "eval/harness.h"
#include "eval/report.h"
#include "format/format.h"
#include "format/size.h"
#include "model/io/safetensors.h"
#include "pipeline/compress.h"

namespace edkm::cli {
namespace {

// Method and bits per weight of a model file: what a compressed file records, else its dtype.
void describe(const std::string& path, const Llama& model, nlohmann::json& out) {
  if (!std::filesystem::is_directory(path) && is_compressed_file(path)) {
    safetensors::File f(path);
    CompressedLayout l = parse_layout(f.header(), path);
    out["method"] = l.metadata.count("method") ? l.metadata.at("method") : "palettized";
    if (l.metadata.count("bits")) out["bits"] = std::stoi(l.metadata.at("bits"));
    if (l.metadata.count("bits_per_weight")) {
      out["bits_per_weight"] = std::stod(l.metadata.at("bits_per_weight"));
    } else {
      SizeReport s = size_of(read_compressed(path));
      out["bits_per_weight"] = s.clustered_weights() ? s.clustered_bits_per_weight() : 32.0;
    }
    return;
  }
  out["method"] = "fp32";
  out["bits_per_weight"] = 8.0 * c10::elementSize(model.weight("model.layers.0.self_attn.q_proj.weight").scalar_type());
}

}  // namespace

void register_eval(CLI::App& app) {
  {
    auto* cmd = app.add_subcommand("eval", "Zero-shot tasks (lm-evaluation-harness scoring) and perplexity");
    auto args = std::make_shared<ModelArgs>();
    auto tasks = std::make_shared<std::vector<std::string>>(std::vector<std::string>{
        "piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "boolq", "copa"});
    auto opts = std::make_shared<EvalOptions>();
    auto ppl = std::make_shared<PerplexityOptions>();
    auto heldout = std::make_shared<double>(0.0);
    auto assets = std::make_shared<std::string>(std::string(EDKM_DEFAULT_ASSETS));
    auto out = std::make_shared<std::string>();
    auto log_samples = std::make_shared<std::string>();
    auto label = std::make_shared<std::string>();
    auto method = std::make_shared<std::string>();
    auto json = std::make_shared<bool>(false);
    auto quiet = std::make_shared<bool>(false);
    add_model_args(cmd, *args);
    cmd->add_option("--tasks", *tasks,
                    "Comma-separated: piqa, winogrande, hellaswag, arc_easy, arc_challenge, boolq, copa, and the "
                    "perplexity tasks tinystories, wikitext2")
        ->delimiter(',');
    cmd->add_option("--limit", opts->limit, "First N items of each task (0: all)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--batch", opts->batch, "Sequences per forward pass")->check(CLI::PositiveNumber);
    cmd->add_option("--max-len", opts->max_len, "Longest request in tokens (0: the model's context)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--ppl-context", ppl->context, "Perplexity window (0: the model's context)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--ppl-stride", ppl->stride, "Perplexity stride (0: half the window)")->check(CLI::NonNegativeNumber);
    cmd->add_option("--heldout", *heldout,
                    "Score only the tail of each perplexity text that `compress --val-fraction F` holds out")
        ->check(finite_in(0.0, 0.9));
    cmd->add_option("--assets", *assets, "Directory holding eval/ (the shared assets)");
    cmd->add_option("-o,--out", *out, "Results JSON file");
    cmd->add_option("--log-samples", *log_samples,
                    "JSONL file: every item's requests, log-likelihoods and predictions (lm-eval's --log_samples)");
    cmd->add_option("--label", *label, "Name of this model in reports (default: the file name)");
    cmd->add_option("--method", *method, "Override the method recorded for this model (fp32, rtn, kmeans, dkm)");
    cmd->add_flag("--json", *json, "Print the results as JSON");
    cmd->add_flag("-q,--quiet", *quiet, "No progress bar");
    add_runner(cmd, [=] {
      std::vector<std::string> outputs;
      for (const auto* f : {out.get(), log_samples.get()})
        if (!f->empty()) {
          check_writable(*f);
          outputs.push_back(*f);
        }
      check_outputs_distinct(outputs, model_inputs(*args));
      LoadedModel m = load_for_inference(*args);
      // Load every task first: a bad file fails before any scoring.
      std::vector<Task> mc;
      std::vector<std::pair<std::string, std::string>> texts;
      int64_t total = 0;
      for (const auto& t : *tasks) {
        const auto& mc_names = task_names();
        if (t != "tinystories" && t != "wikitext2" && std::find(mc_names.begin(), mc_names.end(), t) == mc_names.end()) {
          std::string known;
          for (const auto& n : mc_names) known += n + ", ";
          throw_invalid("unknown task '{}' (known: {}tinystories, wikitext2)", t, known);
        }
      }
      for (const auto& t : *tasks) {
        if (t == "tinystories" || t == "wikitext2") {
          const std::string p = *assets + (t == "tinystories" ? "/eval/tinystories/val_a.txt" : "/eval/wikitext2/wiki.test.raw");
          if (!std::filesystem::exists(p)) throw_input("{}: task file not found", p);
          texts.emplace_back(t, p);
          continue;
        }
        mc.push_back(load_task(t, *assets));
        int64_t n = opts->limit > 0 ? std::min<int64_t>(opts->limit, mc.back().items.size()) : mc.back().items.size();
        for (int64_t i = 0; i < n; ++i) total += static_cast<int64_t>(mc.back().items[i].choices.size());
      }
      nlohmann::json res = {{"model", args->model},
                            {"label", label->empty() ? std::filesystem::path(args->model).filename().string() : *label},
                            {"edkm_version", EDKM_VERSION},
                            {"libtorch", TORCH_VERSION},
                            {"threads", at::get_num_threads()},
                            {"settings", {{"limit", opts->limit}, {"batch", opts->batch}, {"max_len", opts->max_len},
                                          {"dtype", c10::toString(m.model.dtype())}}},
                            {"tasks", nlohmann::json::object()},
                            {"perplexity", nlohmann::json::object()}};
      describe(args->model, m.model, res);
      if (!method->empty()) res["method"] = *method;
      Progress bar("eval", total, *quiet);
      int64_t done = 0;
      std::vector<nlohmann::json> samples;
      for (const Task& t : mc) {
        TaskResult r = evaluate_task(m.model, *m.tokenizer, t, *opts, [&](int64_t d, int64_t) {
          bar.update(done + d, t.name);
        }, log_samples->empty() ? nullptr : &samples);
        int64_t n = 0;
        for (int64_t i = 0; i < r.n; ++i) n += static_cast<int64_t>(t.items[i].choices.size());
        done += n;
        res["tasks"][t.name] = r.to_json();
      }
      bar.finish();
      for (const auto& [name, path] : texts) {
        PerplexityOptions po = *ppl;
        if (po.context == 0) po.context = m.model.config().max_seq_len;
        if (po.stride == 0) po.stride = po.context / 2;
        Progress pb("perplexity " + name, 0, *quiet);
        PerplexityTaskResult r = evaluate_perplexity(m.model, *m.tokenizer, name, path, po, *heldout, [&](int64_t d, int64_t t) {
          pb.set_total(t);
          pb.update(d);
        });
        pb.finish();
        res["perplexity"][name] = r.to_json();
      }
      if (!out->empty()) write_file_atomic(*out, res.dump(2) + "\n");
      if (!log_samples->empty()) {
        std::string lines;
        for (const auto& s : samples) lines += s.dump() + "\n";
        write_file_atomic(*log_samples, lines);
      }
      if (*json) {
        print_json(res);
        return;
      }
      std::cout << fmt::format("{} ({}, {:.2f} bits/weight)\n", args->model, res["method"].get<std::string>(),
                               res["bits_per_weight"].get<double>());
      for (auto it = res["tasks"].begin(); it != res["tasks"].end(); ++it) {
        const auto& x = *it;
        std::cout << fmt::format("{:<14} n={:<6} acc {:.4f} ± {:.4f}", it.key(), x["n"].get<int64_t>(), x["acc"].get<double>(),
                                 x["acc_stderr"].get<double>());
        if (x.contains("acc_norm"))
          std::cout << fmt::format("   acc_norm {:.4f} ± {:.4f}", x["acc_norm"].get<double>(), x["acc_norm_stderr"].get<double>());
        std::cout << "\n";
      }
      for (auto it = res["perplexity"].begin(); it != res["perplexity"].end(); ++it)
        std::cout << fmt::format("{:<14} token ppl {:.4f}   word ppl {:.3f}   bits/byte {:.4f}\n", it.key(),
                                 (*it)["token_perplexity"].get<double>(), (*it)["word_perplexity"].get<double>(),
                                 (*it)["bits_per_byte"].get<double>());
      if (!out->empty()) std::cout << "wrote " << *out << "\n";
    });
  }
  {
    auto* cmd = app.add_subcommand("report", "Markdown table and PNG plot comparing several eval results");
    auto files = std::make_shared<std::vector<std::string>>();
    auto out = std::make_shared<std::string>();
    cmd->add_option("results", *files, "Results JSON files from edkm eval")->required();
    cmd->add_option("-o,--out", *out, "Output directory (report.md, report.png)")->required();
    add_runner(cmd, [files, out] {
      std::vector<nlohmann::json> results;
      for (const auto& f : *files) {
        try {
          results.push_back(nlohmann::json::parse(read_file(f)));
        } catch (const nlohmann::json::exception& e) {
          throw_input("{}: invalid JSON: {}", f, e.what());
        }
        if (!results.back().contains("tasks")) throw_input("{}: not an edkm eval result (no \"tasks\")", f);
      }
      check_outputs_distinct({*out + "/report.md", *out + "/report.png"}, [&] {
        std::vector<InputPath> in;
        for (const auto& f : *files) in.push_back({"RESULTS", f});
        return in;
      }());
      std::filesystem::create_directories(*out);
      const std::string md = report_markdown(results);
      // The plot first: when it cannot be made, nothing is written.
      report_plot(results, *out + "/report.png");
      write_file_atomic(*out + "/report.md", md);
      std::cout << md << "\nwrote " << *out << "/report.md and " << *out << "/report.png\n";
    });
  }
}

}  // namespace edkm::cli
