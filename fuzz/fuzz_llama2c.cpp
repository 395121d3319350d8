// libFuzzer target: the llama2.c header validator. The first 8 bytes of an input are the
// claimed file size (little-endian), the rest the start of the file, so the size checks are
// explored without megabyte inputs. Accepted headers must imply exactly the claimed size.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "common/error.h"
#include "model/io/llama2c.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 8) return 0;
  uint64_t file_size;
  std::memcpy(&file_size, data, 8);
  std::string_view head(reinterpret_cast<const char*>(data + 8), size - 8);
  try {
    auto h = edkm::parse_llama2c_header(head, file_size, "fuzz");
    if (h.expected_size != file_size || h.header_bytes > file_size) std::abort();
  } catch (const edkm::InputError&) {
  }
  return 0;
}
