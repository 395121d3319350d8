// GGUF files, against the `gguf` package and llama.cpp (tests/fixtures/gguf, made by
// make_gguf_fixtures.py): dequantization bit-identical to gguf's for every type edkm reads, every
// metadata value type, models whose logits are transformers' own, tokenizers that give
// llama.cpp's ids, and refusals of damaged files.
#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

#include "common/atomic_file.h"
#include "common/error.h"
#include "common/mapped_file.h"
#include "model/io/gguf.h"
#include "model/io/hf.h"
#include "model/io/safetensors.h"
#include "pipeline/load.h"
#include "test_util.h"

namespace edkm {
namespace {

namespace fs = std::filesystem;

std::string fixture(const std::string& name) { return std::string(EDKM_FIXTURES) + "/" + name; }

TEST(Gguf, DequantizesEveryTypeBitIdenticallyToTheGgufPackage) {
  MappedFile file(fixture("gguf/quants.gguf"));
  const gguf::Header h = gguf::parse_header(file.bytes(), "quants.gguf");
  safetensors::File ref(fixture("gguf/quants_ref.safetensors"));
  EXPECT_EQ(h.alignment, 64u);
  EXPECT_EQ(h.data_start % 64, 0u);
  ASSERT_EQ(h.tensors.size(), 13u);
  for (const gguf::TensorInfo& t : h.tensors) {
    const std::string type = t.name.substr(2);  // "q.<TYPE>"
    EXPECT_EQ(gguf::type_name(t.type), type);
    EXPECT_EQ(t.shape(), (std::vector<int64_t>{4, 512}));
    at::Tensor out = at::empty({4, 512}, at::kFloat);
    gguf::dequantize(t.type, reinterpret_cast<const uint8_t*>(file.data() + h.data_start + t.offset), t.numel(),
                     out.data_ptr<float>());
    at::Tensor expected = ref.tensor(type);
    EXPECT_TRUE(at::equal(out.view(at::kInt), expected.contiguous().view(at::kInt))) << type;
  }
}

TEST(Gguf, ReadsEveryMetadataValueType) {
  MappedFile file(fixture("gguf/quants.gguf"));
  const nlohmann::json m = gguf::parse_header(file.bytes(), "quants.gguf").metadata;
  EXPECT_EQ(m["test.u8"], 200);
  EXPECT_EQ(m["test.i8"], -100);
  EXPECT_EQ(m["test.u16"], 60000);
  EXPECT_EQ(m["test.i16"], -30000);
  EXPECT_EQ(m["test.u32"], 4000000000u);
  EXPECT_EQ(m["test.i32"], -2000000000);
  EXPECT_EQ(m["test.f32"], 1.5);
  EXPECT_EQ(m["test.u64"].get<uint64_t>(), (uint64_t(1) << 63) + 5);
  EXPECT_EQ(m["test.i64"].get<int64_t>(), -(int64_t(1) << 62));
  EXPECT_EQ(m["test.f64"], 0.1);
  EXPECT_EQ(m["test.bool"], true);
  EXPECT_EQ(m["test.string"], "héllo ✓");
  EXPECT_EQ(m["test.ints"], nlohmann::json({1, -2, 3}));
  EXPECT_EQ(m["test.strings"], nlohmann::json({"a", "", "ü"}));
  EXPECT_EQ(m["test.nested"], nlohmann::json({{1, 2}, {3}}));
  EXPECT_EQ(m["general.architecture"], "llama");
}

// The fixture models as convert_hf_to_gguf.py writes them give transformers' logits: the names,
// llama's rotary interleaving undone (not qwen3's), head_dim, q/k norms and tied embeddings.
TEST(Gguf, ModelsGiveTransformersLogits) {
  for (const char* family : {"smollm2", "qwen3"}) {
    LoadedModel m = load_model(fixture(std::string("gguf/") + family + ".gguf"));
    LoadedModel hf = load_model(fixture(std::string("hf/") + family));
    const LlamaConfig &a = m.model.config(), &b = hf.model.config();
    EXPECT_EQ(a.model_type, b.model_type);
    EXPECT_EQ(a.head_dim(), b.head_dim());
    EXPECT_EQ(a.tie_embeddings, b.tie_embeddings);
    EXPECT_EQ(a.qk_norm, b.qk_norm);
    EXPECT_EQ(a.n_kv_heads, b.n_kv_heads);
    safetensors::File ref(fixture(std::string("hf/") + family + "/logits.safetensors"));
    at::NoGradGuard ng;
    at::Tensor logits = m.model.forward(ref.tensor("tokens"));
    at::Tensor expected = ref.tensor("logits");
    const double err = ((logits - expected).abs().amax(-1) / expected.abs().amax(-1)).max().item<double>();
    EXPECT_LT(err, 1e-4) << family;
  }
}

TEST(Gguf, TokenizersGiveLlamaCppIds) {
  const nlohmann::json ref = nlohmann::json::parse(read_file(fixture("gguf/tokens.json")))["tokens"];
  for (const auto& [name, cases] : ref.items()) {
    LoadedModel m = load_model(fixture("gguf/" + name + ".gguf"));
    ASSERT_TRUE(m.tokenizer) << name;
    for (const auto& [text, ids] : cases.items())
      EXPECT_EQ(m.tokenizer->encode(text, /*bos=*/true, /*eos=*/false), ids.get<std::vector<int>>())
          << name << ": '" << text << "'";
  }
  // The SentencePiece vocabulary encodes as the llama2.c tokenizer it came from.
  LoadedModel spm = load_model(fixture("gguf/stories_spm.gguf"));
  std::unique_ptr<Tokenizer> bin = load_tokenizer(test::asset("models/stories260K/tok512.bin"), 512);
  const std::string story = read_file(test::asset("eval/tinystories/val_a.txt")).substr(0, 3000);
  EXPECT_EQ(spm.tokenizer->encode(story, true, false), bin->encode(story, true, false));
  EXPECT_EQ(spm.tokenizer->eos_id(), 2);
}

// edkm convert: an ordinary Hugging Face directory with tokenizer.json that edkm reloads with
// the same logits and ids.
TEST(Gguf, ConvertsToAHuggingFaceDirectory) {
  test::TempDir tmp;
  test::CliResult r = test::run_cli("convert -m " + fixture("gguf/smollm2.gguf") + " -o " + (tmp / "hf"), tmp);
  ASSERT_EQ(r.code, 0) << r.err;
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
    EXPECT_TRUE(fs::exists(tmp / (std::string("hf/") + f))) << f;
  LoadedModel a = load_model(fixture("gguf/smollm2.gguf")), b = load_model(tmp / "hf");
  at::Tensor tokens = at::arange(20, at::kLong).view({1, 20});
  at::NoGradGuard ng;
  EXPECT_TRUE(at::equal(a.model.forward(tokens), b.model.forward(tokens)));
  EXPECT_EQ(a.tokenizer->encode("Hello world, 123", true, true), b.tokenizer->encode("Hello world, 123", true, true));
}

// Damaged files: each refusal names the file and the problem, and is exit 1 from the CLI.
TEST(Gguf, RefusesDamagedFiles) {
  test::TempDir tmp;
  const std::string good = read_file(fixture("gguf/stories_spm.gguf"));
  auto refused = [&](std::string bytes, const std::string& expected) {
    const std::string path = tmp / "bad.gguf";
    write_file_atomic(path, bytes);
    try {
      load_model(path);
      ADD_FAILURE() << "accepted; expected '" << expected << "'";
    } catch (const InputError& e) {
      EXPECT_NE(std::string(e.what()).find(path), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
    }
  };
  auto patched = [&](size_t at, const std::string& with) { return std::string(good).replace(at, with.size(), with); };
  refused(good.substr(0, 100), "truncated GGUF header");
  refused(good.substr(0, good.size() - 8), "runs past the end of the file");
  refused(patched(4, std::string("\x04\0\0\0", 4)), "GGUF version 4 is not supported");
  refused(patched(4, std::string("\x01\0\0\0", 4)), "GGUF version 1 is not supported");
  refused(patched(8, std::string("\xff\xff\xff\xff\xff\xff\0\0", 8)), "tensor count 281474976710655 exceeds");
  const size_t arch = good.find("llama");  // general.architecture's value comes first
  refused(patched(arch, "gemma"), "GGUF architecture 'gemma' is not supported");
  const size_t pre = good.find("tokenizer.ggml.model");
  refused(patched(pre + std::string("tokenizer.ggml.model").size() + 4 + 8, "bert!"),
          "tokenizer.ggml.model 'bert!' is not supported");
  const size_t type_key = good.find("blk.0.attn_q.weight");
  // The tensor info after the name: uint32 rank 2, two uint64 dims, then the uint32 type.
  refused(patched(type_key + 19 + 4 + 16, std::string("\x14\0\0\0", 4)), "ggml type 20");
  test::CliResult r = test::run_cli("generate -m " + (tmp / "bad.gguf") + " --prompt x", tmp);
  EXPECT_EQ(r.code, 1);
  EXPECT_NE(r.err.find("bad.gguf"), std::string::npos) << r.err;
}

}  // namespace
}  // namespace edkm
