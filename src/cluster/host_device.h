// Internal to cluster/: EDKM_HOST_DEVICE marks a function that the CUDA kernels and the host code
// (or tests) share: __host__ __device__ under nvcc, nothing elsewhere.
#pragma once

#ifdef __CUDACC__
#define EDKM_HOST_DEVICE __host__ __device__
#else
#define EDKM_HOST_DEVICE
#endif
