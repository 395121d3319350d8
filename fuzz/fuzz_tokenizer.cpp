// libFuzzer target: the tokenizer.json reader and the pipeline it builds. Any input must either
// be rejected with an InputError, or give a tokenizer whose ids for a fixed text are in range
// and decode; anything else (a crash, another exception, a sanitizer report) is a bug.
#include <cstdint>
#include <cstdlib>
#include <string>

#include "common/error.h"
#include "tokenizer/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto tok = edkm::hf_tokenizer(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
    const std::string text = "Hello wörld  12345\n\t<|x|> 👍🏽 e\u0301";
    int prev = -1;
    for (int id : tok->encode(text, true, true)) {
      if (id < 0 || id >= tok->vocab_size()) std::abort();
      tok->piece(prev, id);
      prev = id;
    }
  } catch (const edkm::InputError&) {
  }
  return 0;
}
