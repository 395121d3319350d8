// One check that a tensor holds only finite numbers, for every loader and writer: a NaN or
// Inf weight otherwise flows silently into perplexities, accuracies and written files.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace edkm {

// InputError "{what}: N of M values are NaN or Inf (the first, V, at index [i, j])" unless every
// element of `t` is finite. Integer tensors always pass. `what` names the file and the tensor.
void check_finite(const at::Tensor& t, const std::string& what);

}  // namespace edkm
