// Bad input to the loaders: every broken file gets an InputError naming the file and problem.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>

#include "common/atomic_file.h"
#include "common/error.h"
#include "model/io/hf.h"
#include "model/io/llama2c.h"
#include "model/io/safetensors.h"
#include "pipeline/load.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace edkm {
namespace {

// Runs f, expects an InputError whose message contains every fragment.
template <typename F>
void expect_input_error(F&& f, const std::vector<std::string>& fragments) {
  try {
    f();
    ADD_FAILURE() << "no error; expected one mentioning " << fragments.front();
  } catch (const InputError& e) {
    for (const auto& frag : fragments)
      EXPECT_NE(std::string(e.what()).find(frag), std::string::npos) << "message: " << e.what() << "\nmissing: " << frag;
  }
}

std::string stories_bytes() { return read_file(test::asset("models/stories260K/stories260K.bin")); }

TEST(Llama2cLoader, TruncatedAndLyingHeaders) {
  test::TempDir tmp;
  const std::string good = stories_bytes();
  write_file_atomic(tmp / "cut.bin", good.substr(0, good.size() - 100));
  expect_input_error([&] { load_llama2c(tmp / "cut.bin"); }, {"cut.bin", "truncated", "1056540"});
  write_file_atomic(tmp / "long.bin", good + "xx");
  expect_input_error([&] { load_llama2c(tmp / "long.bin"); }, {"long.bin", "trailing data"});
  std::string wrong = good;
  int32_t layers = 6;
  std::memcpy(&wrong[8], &layers, 4);
  write_file_atomic(tmp / "layers.bin", wrong);
  expect_input_error([&] { load_llama2c(tmp / "layers.bin"); }, {"layers.bin", "6 layers", "implies"});
  std::string zero = good;
  int32_t heads = 0;
  std::memcpy(&zero[12], &heads, 4);
  write_file_atomic(tmp / "heads.bin", zero);
  expect_input_error([&] { load_llama2c(tmp / "heads.bin"); }, {"heads.bin", "n_heads"});
  std::string huge = good;
  int32_t dim = 0x7fffffff;
  std::memcpy(&huge[0], &dim, 4);
  write_file_atomic(tmp / "huge.bin", huge);
  expect_input_error([&] { load_llama2c(tmp / "huge.bin"); }, {"huge.bin", "dim", "out of range"});
  write_file_atomic(tmp / "tiny.bin", "abc");
  expect_input_error([&] { load_llama2c(tmp / "tiny.bin"); }, {"tiny.bin", "truncated"});
  std::string v9 = std::string("\x32\x34\x6b\x61", 4) + std::string(252, '\0');
  v9[4] = 9;
  write_file_atomic(tmp / "v9.bin", v9);
  expect_input_error([&] { load_llama2c(tmp / "v9.bin"); }, {"v9.bin", "version 9"});
  expect_input_error([&] { load_model(tmp / "missing.bin"); }, {"missing.bin", "no such file"});
}

// A safetensors file with a hand-written header and `data_bytes` bytes of data.
std::string safetensors_file(const std::string& header, size_t data_bytes) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  std::memcpy(&out[0], &n, 8);
  return out + header + std::string(data_bytes, '\0');
}

TEST(SafetensorsReader, RejectsLyingHeaders) {
  auto parse = [](const std::string& f) { return safetensors::parse_header(f, f.size(), "t.safetensors"); };
  // A valid two-tensor file for reference.
  auto ok = safetensors_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]}})", 16);
  EXPECT_EQ(parse(ok).tensors.size(), 2u);
  const std::vector<std::pair<std::string, std::string>> bad = {
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlaps"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8), "past the end"},
      {safetensors_file(R"({"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8), "unknown dtype 'Q4'"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8), "needs 12 bytes"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8), "non-negative"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8), "reversed"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[2]}})", 8), "needs dtype, shape and data_offsets"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 12), "trailing or missing"},
      {safetensors_file(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "unindexed bytes"},
      {safetensors_file(R"({"a": [1, 2)", 8), "not valid JSON"},
      {safetensors_file(R"([1,2])", 0), "not a JSON object"},
      {safetensors_file(R"({"__metadata__":{"x":1}})", 0), "not a string"},
      {std::string("\x10\x00\x00\x00\x00\x00\x00\x00{}", 10), "runs past the end"},
      {std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8), "exceeds the 100 MB limit"},
      {std::string("\x02\x00", 2), "truncated"},
  };
  for (const auto& [file, message] : bad) expect_input_error([&] { parse(file); }, {"t.safetensors", message});
}

TEST(SafetensorsReader, RoundTripAndZeroCopy) {
  test::TempDir tmp;
  at::Tensor a = at::randn({3, 5}), b = at::randn({7}).to(at::kBFloat16), c = at::randint(0, 255, {9}, at::kByte);
  safetensors::write(tmp / "x.safetensors", {{"a", a}, {"b", b}, {"c", c}}, {{"k", "v"}});
  safetensors::File f(tmp / "x.safetensors");
  EXPECT_TRUE(at::equal(f.tensor("a"), a));
  EXPECT_TRUE(at::equal(f.tensor("b"), b));
  EXPECT_TRUE(at::equal(f.tensor("c"), c));
  EXPECT_EQ(f.header().metadata.at("k"), "v");
  EXPECT_EQ(f.header().data_start % 8, 0u);
  // Writing into a loaded tensor never reaches the file (copy-on-write mapping).
  f.tensor("a").fill_(0);
  EXPECT_TRUE(at::equal(safetensors::File(tmp / "x.safetensors").tensor("a"), a));
}

TEST(HfLoader, MissingFieldsTensorsAndTokenizer) {
  test::TempDir tmp;
  LoadedModel m = load_model(test::asset("models/stories260K/stories260K.bin"));
  save_hf_dir(m.model, tmp / "hf", at::kFloat);  // no tokenizer copied
  expect_input_error([&] { load_model(tmp / "hf"); }, {"hf", "no tokenizer found"});
  EXPECT_NO_THROW(load_model(tmp / "hf", "", /*require_tokenizer=*/false));

  nlohmann::json cfg = nlohmann::json::parse(read_file(tmp / "hf/config.json"));
  cfg.erase("num_attention_heads");
  write_file_atomic(tmp / "hf/config.json", cfg.dump());
  expect_input_error([&] { load_hf_dir(tmp / "hf"); }, {"config.json", "num_attention_heads"});

  cfg = m.model.config().to_hf();
  cfg["num_hidden_layers"] = 6;
  write_file_atomic(tmp / "hf/config.json", cfg.dump());
  expect_input_error([&] { load_hf_dir(tmp / "hf"); }, {"hf", "missing tensor 'model.layers.5"});

  cfg["num_hidden_layers"] = 5;
  cfg["hidden_size"] = 32;
  cfg["num_attention_heads"] = 4;
  cfg["num_key_value_heads"] = 2;
  write_file_atomic(tmp / "hf/config.json", cfg.dump());
  expect_input_error([&] { load_hf_dir(tmp / "hf"); }, {"hf", "has shape [512, 64], expected [512, 32]"});

  std::filesystem::remove(tmp / "hf/model.safetensors");
  expect_input_error([&] { load_hf_dir(tmp / "hf"); }, {"no model.safetensors"});
  expect_input_error([&] { load_hf_dir(tmp / "nothing"); }, {"nothing", "no config.json"});
}

TEST(HfLoader, ShardedIndex) {
  // The same model split over two shards with a model.safetensors.index.json.
  test::TempDir tmp;
  LoadedModel m = load_model(test::asset("models/stories260K/stories260K.bin"));
  save_hf_dir(m.model, tmp / "one", at::kFloat, m.tokenizer.get());
  std::filesystem::create_directories(tmp / "two");
  std::vector<std::pair<std::string, at::Tensor>> a, b;
  nlohmann::json map = nlohmann::json::object();
  int i = 0;
  for (const auto& [name, shape] : tensor_shapes(m.model.config())) {
    const bool first = i++ % 2 == 0;
    (first ? a : b).emplace_back(name, m.model.weight(name));
    map[name] = first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  safetensors::write(tmp / "two/model-00001-of-00002.safetensors", a);
  safetensors::write(tmp / "two/model-00002-of-00002.safetensors", b);
  write_file_atomic(tmp / "two/model.safetensors.index.json", nlohmann::json({{"weight_map", map}}).dump());
  write_file_atomic(tmp / "two/config.json", read_file(tmp / "one/config.json"));
  Llama sharded = load_hf_dir(tmp / "two");
  for (const auto& [name, t] : m.model.weights()) EXPECT_TRUE(at::equal(t, sharded.weight(name))) << name;
  map["model.norm.weight"] = "../escape.safetensors";
  write_file_atomic(tmp / "two/model.safetensors.index.json", nlohmann::json({{"weight_map", map}}).dump());
  expect_input_error([&] { load_hf_dir(tmp / "two"); }, {"index.json", "not a file in the directory"});
}

TEST(Tokenizers, Llama2BinAndSentencePieceAgree) {
  // The Llama-2 tokenizer as a llama2.c .bin (our BPE) and as a SentencePiece .model
  // (libsentencepiece, loaded in this libtorch process through the isolated shim).
  auto bin = load_tokenizer(test::asset("models/llama2_tokenizer/llama2_tokenizer.bin"), 32000);
  auto spm = load_tokenizer(test::asset("models/llama2_tokenizer/llama2_tokenizer.model"));
  EXPECT_EQ(spm->vocab_size(), 32000);
  EXPECT_EQ(spm->encode("Hello world", true, false), (std::vector<int>{1, 15043, 3186}));
  for (const std::string s : {"Hello world", "The quick brown fox jumps over the lazy dog.",
                              "Once upon a time, there was a little girl named Lily.\nShe loved to play.",
                              "naïve café — 日本語 😀 12345", "  leading spaces and\ttabs"}) {
    auto a = bin->encode(s, true, false), b = spm->encode(s, true, false);
    EXPECT_EQ(a, b) << s;
    EXPECT_EQ(spm->decode(b), s);
    EXPECT_EQ(bin->decode(a), s);
  }
  at::Tensor t = at::randn({4, 4});
  EXPECT_EQ(at::matmul(t, t).sizes(), t.sizes());  // libtorch still works beside sentencepiece
  expect_input_error([&] { load_tokenizer(test::asset("models/stories260K/stories260K.bin")); }, {"stories260K.bin"});
  expect_input_error([&] { load_tokenizer("/nonexistent/tok.model"); }, {"tok.model", "not found"});
}

}  // namespace
}  // namespace edkm
