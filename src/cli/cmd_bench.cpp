// edkm bench dkm: the DKM side-by-side benchmark.
#include <nlohmann/json.hpp>

#include <iostream>

#include "bench/bench.h"
#include "cli/commands.h"
#include "cli/common.h"
#include "common/atomic_file.h"
#include "dist/dist.h"
#include "pipeline/compress.h"

namespace edkm::cli {
namespace {

// A benchmark's result: JSON with --json, its table otherwise.
template <typename Result, typename Table>
void print(bool json, const Result& r, Table table) {
  if (json) print_json(bench::to_json(r));
  else std::cout << table(r);
}

}  // namespace

void register_bench(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Benchmarks that measure side by side in one run");
  bench->require_subcommand(1);

  auto* dkm = bench->add_subcommand(
      "dkm", "DKM forward+backward on one LLaMA-7B decoder layer: dense vs unique vs element-wise floor");
  auto opts = std::make_shared<bench::DKMBenchOptions>();
  auto json = std::make_shared<bool>(false);
  dkm->add_option("--bits", opts->bits, "Bits per weight (k = 2^bits)")->check(CLI::Range(1, 8));
  dkm->add_option("--reps", opts->reps, "Timed repetitions (the best is reported)")->check(CLI::Range(1, 100));
  dkm->add_option("--layer-scale", opts->layer_scale,
                  "Shrink the layer's output dimensions by this factor (1 = LLaMA-7B)")
      ->check(CLI::Range(1e-3, 1.0));
  dkm->add_option("--dense-slice", opts->dense_slice, "Weights the dense method is run on")
      ->check(CLI::Range(int64_t(1024), int64_t(1) << 30));
  auto weights = std::make_shared<std::string>("bf16");
  dkm->add_option("--weights", *weights, "The layer's dtype: bf16, or fp32 (training's master weights)")
      ->check(CLI::IsMember({"bf16", "fp32"}));
  auto device = std::make_shared<std::string>("cpu");
  dkm->add_option("--device", *device, "Where the layer lives: cpu, cuda or cuda:N");
  dkm->add_flag("--json", *json, "Print the results as JSON");
  add_runner(dkm, [opts, json, weights, device] {
    opts->weight_dtype = parse_dtype(*weights);
    opts->device = parse_device(*device);
    bench::DKMBenchResult r = bench::run_dkm_bench(*opts);
    print(*json, r, [](const auto& x) { return bench::format_table(x); });
  });

  auto* tok = bench->add_subcommand("tokenizer", "Encode tokens/s of tokenizers on one text (one thread)");
  auto tokopts = std::make_shared<bench::TokenizerBenchOptions>();
  auto tokjson = std::make_shared<bool>(false);
  tokopts->text = std::string(EDKM_DEFAULT_ASSETS) + "/eval/wikitext2/wiki.test.raw";
  for (const char* t : {"llama2", "llama3_1", "qwen3"})
    tokopts->tokenizers.push_back(std::string(EDKM_DEFAULT_ASSETS) + "/tokenizers/" + t + "/tokenizer.json");
  tok->add_option("--tokenizer", tokopts->tokenizers, "Tokenizer files (default: the three tokenizer.json assets)");
  tok->add_option("--text", tokopts->text, "Text to encode (default: WikiText-2's test file)");
  tok->add_option("--reps", tokopts->reps, "Rounds (the best is reported)")->check(CLI::Range(1, 100));
  tok->add_flag("--json", *tokjson, "Print the results as JSON");
  add_runner(tok, [tokopts, tokjson] {
    bench::TokenizerBenchResult r = bench::run_tokenizer_bench(*tokopts);
    print(*tokjson, r, [](const auto& x) { return x.table(); });
  });

  auto* model = bench->add_subcommand("model", "Training-step tokens/s: a 4-layer dim-512 LLaMA and stories260K, fp32 vs bf16");
  auto mopts = std::make_shared<bench::ModelBenchOptions>();
  mopts->stories260k = std::string(EDKM_DEFAULT_ASSETS) + "/models/stories260K/stories260K.bin";
  auto mjson = std::make_shared<bool>(false);
  model->add_option("--reps", mopts->reps, "Timed repetitions (the best is reported)")->check(CLI::Range(1, 100));
  model->add_option("--stories260k", mopts->stories260k, "stories260K.bin (empty: skip)");
  model->add_flag("--json", *mjson, "Print the results as JSON");
  add_runner(model, [mopts, mjson] {
    bench::ModelBenchResult r = bench::run_model_bench(*mopts);
    print(*mjson, r, [](const auto& x) { return bench::format_table(x); });
  });

  auto* comp = bench->add_subcommand("compress", "Held-out perplexity of RTN, k-means and DKM at 3 and 2 bits, and DKM's memory");
  auto copts = std::make_shared<bench::CompressBenchOptions>();
  auto ctrain = std::make_shared<CompressOptions>();
  auto cjson = std::make_shared<bool>(false);
  copts->model = std::string(EDKM_DEFAULT_ASSETS) + "/models/stories260K/stories260K.bin";
  copts->data = std::string(EDKM_DEFAULT_ASSETS) + "/eval/tinystories/val_a.txt";
  comp->add_option("-m,--model", copts->model, "Model to compress");
  comp->add_option("-d,--data", copts->data, "Data: the last --val-fraction is held out");
  comp->add_option("--bits", copts->bits, "Bit widths")->check(CLI::Range(1, 8));
  comp->add_option("--rtn-group", copts->rtn_group, "RTN group size along rows");
  comp->add_option("--lr", ctrain->train.lr, "Fine-tuning learning rate")->check(positive_finite());
  comp->add_option("--steps", ctrain->train.steps, "Fine-tuning steps (default: one epoch)");
  comp->add_option("--seq-len", ctrain->data.seq_len, "Tokens per sequence");
  comp->add_flag("--json", *cjson, "Print the results as JSON");
  add_runner(comp, [copts, ctrain, cjson] {
    bench::CompressBenchResult r = bench::run_compress_bench(*copts, *ctrain);
    print(*cjson, r, [](const auto& x) { return x.markdown(); });
  });

  auto* lut = bench->add_subcommand("lut", "Matvec from packed palettes vs dense fp32/bf16: one 4096x11008 matrix in and out of cache, and decoding");
  auto lreps = std::make_shared<int>(20);
  auto ltokens = std::make_shared<int>(32);
  auto ljson = std::make_shared<bool>(false);
  lut->add_option("--reps", *lreps, "Timed repetitions of the matvec (best reported)")->check(CLI::Range(1, 1000));
  lut->add_option("--tokens", *ltokens, "Tokens decoded per model")->check(CLI::Range(1, 500));
  lut->add_flag("--json", *ljson, "Print the results as JSON");
  add_runner(lut, [lreps, ltokens, ljson] {
    bench::LutBenchResult r = bench::run_lut_bench(*lreps, *ltokens);
    print(*ljson, r, [](const auto& x) { return x.table(); });
  });

  auto* step = bench->add_subcommand(
      "step", "One fine-tuning step of a LLaMA-7B-shaped model (random weights) with DKM, without, and with hard "
      "k-means or QAT instead: memory, time");
  auto sopts = std::make_shared<bench::StepBenchOptions>();
  auto sdevice = std::make_shared<std::string>("cpu");
  auto sjson = std::make_shared<bool>(false);
  const auto positive = CLI::Range(int64_t(1), int64_t(1) << 20);
  step->add_option("--layers", sopts->layers, "Decoder layers (LLaMA-7B: 32)")->check(positive);
  step->add_option("--dim", sopts->dim, "Hidden size (LLaMA-7B: 4096)")->check(positive);
  step->add_option("--hidden", sopts->hidden, "SwiGLU size (LLaMA-7B: 11008)")->check(positive);
  step->add_option("--heads", sopts->heads, "Attention heads (LLaMA-7B: 32)")->check(positive);
  step->add_option("--vocab", sopts->vocab, "Vocabulary (LLaMA-7B: 32000)")->check(positive);
  step->add_option("--seq-len", sopts->seq_len, "Tokens per sequence")->check(positive);
  step->add_option("--batch", sopts->batch, "Sequences per step")->check(positive);
  step->add_option("--bits", sopts->bits, "Bits per weight")->check(CLI::Range(1, 8));
  step->add_option("--steps", sopts->steps, "Timed steps (after one untimed step)")->check(CLI::Range(1, 100));
  step->add_option("--device", *sdevice, "cpu, cuda or cuda:N");
  step->add_flag("--json", *sjson, "Print the results as JSON");
  add_runner(step, [sopts, sdevice, sjson] {
    sopts->device = parse_device(*sdevice);
    bench::StepBenchResult r = bench::run_step_bench(*sopts);
    print(*sjson, r, [](const auto& x) { return bench::format_table(x); });
  });

  auto* thr = bench->add_subcommand("threads", "1 thread vs the default, idle and with a busy core: decode, perplexity, a training step");
  auto topts = std::make_shared<bench::ThreadsBenchOptions>();
  auto tjson = std::make_shared<bool>(false);
  topts->model = std::string(EDKM_DEFAULT_ASSETS) + "/models/stories260K/stories260K.bin";
  topts->text = std::string(EDKM_DEFAULT_ASSETS) + "/eval/tinystories/val_a.txt";
  thr->add_option("-m,--model", topts->model, "Model");
  thr->add_option("--text", topts->text, "Perplexity text");
  thr->add_option("--text-bytes", topts->text_bytes, "Bytes of the text scored")->check(CLI::Range(int64_t(1000), int64_t(1) << 30));
  thr->add_option("--tokens", topts->decode_tokens, "Tokens decoded")->check(CLI::Range(1, 100000));
  thr->add_option("--train-seq", topts->train_seq, "Sequence length of the training step (batch 8)")
      ->check(CLI::Range(int64_t(2), int64_t(1) << 16));
  thr->add_option("--reps", topts->reps, "Rounds (the best is reported)")->check(CLI::Range(1, 100));
  thr->add_flag("--json", *tjson, "Print the results as JSON");
  add_runner(thr, [topts, tjson] {
    bench::ThreadsBenchResult r = bench::run_threads_bench(*topts);
    print(*tjson, r, [](const auto& x) { return x.table(); });
  });

  auto* mem = bench->add_subcommand("memory", "eDKM's ablation: DKM memory for one LLaMA-7B layer, plain / +M / +M+U / +M+U+S vs unique");
  auto mopt = std::make_shared<bench::MemoryBenchOptions>();
  auto learner_out = std::make_shared<std::string>();
  auto memjson = std::make_shared<bool>(false);
  mem->add_option("--bits", mopt->bits, "Bits per weight")->check(CLI::Range(1, 8));
  mem->add_option("--slice", mopt->slice, "Weights the dense configurations run on")->check(CLI::Range(int64_t(4096), int64_t(1) << 28));
  mem->add_option("--learners", mopt->learners, "Learner counts for the sharded rows");
  mem->add_option("--learner-out", *learner_out, "(internal) run as a sharding learner, rank 0 writing its row here");
  mem->add_flag("--json", *memjson, "Print the results as JSON");
  add_runner(mem, [mopt, learner_out, memjson] {
    if (!learner_out->empty()) {
      auto dist = Dist::from_env();
      set_default_dist(dist);
      bench::MemoryBenchRow r = bench::run_memory_learner(*mopt);
      if (dist->is_main()) write_file_atomic(*learner_out, bench::to_json(r).dump());
      return;
    }
    bench::MemoryBenchResult r = bench::run_memory_bench(*mopt);
    print(*memjson, r, [](const auto& x) { return x.table(); });
  });
}

}  // namespace edkm::cli
