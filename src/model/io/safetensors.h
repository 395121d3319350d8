// safetensors (https://github.com/huggingface/safetensors): an 8-byte little-endian header
// length N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
// {str: str}}, then the byte buffer the offsets index. The reader validates everything the
// format promises before touching data, and maps files into memory.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace edkm {
class MappedFile;
}

namespace edkm::safetensors {

struct TensorInfo {
  std::string name;
  std::string dtype;             // "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;   // offsets into the byte buffer
};

struct Header {
  std::map<std::string, std::string> metadata;
  std::vector<TensorInfo> tensors;   // sorted by begin
  uint64_t data_start = 0;           // 8 + N
};

// Validates the header at the start of `file` (the whole file, or at least its first
// 8 + N bytes) against the total file size: header length, JSON syntax, known dtypes,
// non-negative shapes, shape x dtype = byte span, spans that tile the buffer exactly (no
// overlap, no gap, ending at the end of the file). InputError naming `source` otherwise.
Header parse_header(std::string_view file, uint64_t file_size, const std::string& source);

at::ScalarType to_scalar_type(const std::string& dtype, const std::string& source);
std::string dtype_name(at::ScalarType t);
int64_t dtype_size(const std::string& dtype);

// A memory-mapped safetensors file. Tensors are zero-copy views of a copy-on-write mapping
// (writing to one never changes the file), kept alive by the tensors that refer to it.
class File {
 public:
  explicit File(const std::string& path);
  const std::string& path() const { return path_; }
  const Header& header() const { return header_; }
  bool contains(const std::string& name) const;
  at::Tensor tensor(const std::string& name) const;
  std::vector<std::string> names() const;

 private:
  std::string path_;
  std::shared_ptr<const MappedFile> map_;  // kept alive by the tensors that view it
  Header header_;
  std::map<std::string, size_t> index_;
};

// The __metadata__ entry in which edkm records the file's checksum ("xxh3-64:<16 hex digits>",
// common/checksum.h) over its tensor table, its other metadata and its data. Files that carry
// one are verified when opened (unless verification is turned off); files from other writers
// carry none and are read as they are.
constexpr const char* kChecksumKey = "checksum";

// Writes tensors (contiguous CPU copies are made as needed) and metadata atomically, the
// header padded with spaces to a multiple of 8 bytes so that data is aligned, with the
// checksum in __metadata__.
void write(const std::string& path, const std::vector<std::pair<std::string, at::Tensor>>& tensors,
           const std::map<std::string, std::string>& metadata = {});

}  // namespace edkm::safetensors
