// Text files: the UTF-8 check of every text input, and the held-out split of a plain text that
// training (train/data.h) and evaluation (eval/) share.
//
// Text inputs (training data, --text files, prompts) must be UTF-8: a tokenizer given arbitrary
// bytes still produces tokens, and a binary file would silently become training data.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace edkm {

// InputError "{source}: not UTF-8 text: invalid byte 0xNN at byte offset K" at the first
// malformed sequence (RFC 3629: no overlong forms, no surrogates, nothing above U+10FFFF), or
// "... NUL byte at byte offset K" for a NUL, which no text file holds.
void check_utf8(std::string_view text, const std::string& source);

// Where the held-out tail of a plain text starts: the first line that begins at or after byte
// (1 - fraction) * size, or that byte moved forward to a UTF-8 character boundary when no line
// starts after it. fraction 0 gives text.size().
size_t heldout_offset(const std::string& text, double fraction);

// The text of `path` from heldout_offset(text, fraction) on (the whole file for fraction 0);
// InputError when that leaves nothing to score.
std::string read_heldout_text(const std::string& path, double fraction);

}  // namespace edkm
