#include "common/checksum.h"

#include <fmt/format.h>
#include <xxhash.h>

#include <atomic>
#include <new>

namespace edkm {

struct Checksum::State {
  XXH3_state_t* s = XXH3_createState();
  ~State() { XXH3_freeState(s); }
};

Checksum::Checksum() : state_(std::make_unique<State>()) {
  if (!state_->s) throw std::bad_alloc();
  XXH3_64bits_reset(state_->s);
}

Checksum::~Checksum() = default;

void Checksum::update(const void* data, std::size_t size) { XXH3_64bits_update(state_->s, data, size); }

uint64_t Checksum::digest() const { return XXH3_64bits_digest(state_->s); }

std::string Checksum::format(uint64_t digest) { return fmt::format("xxh3-64:{:016x}", digest); }

namespace {
std::atomic<bool> g_verify{true};
}

void set_verify_checksums(bool on) { g_verify = on; }
bool verify_checksums() { return g_verify; }

}  // namespace edkm
