// Integrity of the files edkm writes: XXH3-64 (xxHash, Debian's libxxhash) over their contents,
// stored with them and verified when they are read, so that a flipped byte in a compressed
// model or a checkpoint is an error naming the file rather than a silently different number.
// XXH3 hashes at memory bandwidth (tens of GB/s), so verifying costs less than reading.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

namespace edkm {

class Checksum {
 public:
  Checksum();
  ~Checksum();
  Checksum(const Checksum&) = delete;
  Checksum& operator=(const Checksum&) = delete;

  void update(const void* data, std::size_t size);
  void update(std::string_view s) { update(s.data(), s.size()); }
  uint64_t digest() const;

  // "xxh3-64:" followed by 16 lower-case hex digits: how files record a digest.
  static std::string format(uint64_t digest);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// Whether readers verify the checksums they find (default true; `--no-verify` turns it off for
// files too large to read twice).
void set_verify_checksums(bool on);
bool verify_checksums();

}  // namespace edkm
