// Launch helpers shared by the CUDA translation units. Only CUDA and c10 core headers: the
// current stream comes from c10's device-generic guard interface, so these files compile with
// plain `nvcc -c` against a CPU build of torch's headers.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cuda_runtime.h>

namespace attenscribble_ops {

inline cudaStream_t current_stream(const c10::Device& device) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(device);
  return static_cast<cudaStream_t>(stream.native_handle());
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace attenscribble_ops
