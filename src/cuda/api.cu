// Host utilities of the ectfast CUDA backend: device queries that never abort on a machine
// without a driver or GPU, error strings, pointer checks, copies and synchronisation.
#include <string.h>

#include "common.cuh"

using namespace ectfast_cuda;

extern "C" int ectfast_cuda_device_count(void) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear it: no driver / no device is not an error here
    return 0;
  }
  return n < 0 ? 0 : n;
}

extern "C" const char* ectfast_cuda_error_string(int code) {
  if (code == ECTFAST_CUDA_EINVAL) return "invalid argument (cudaErrorInvalidValue)";
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

extern "C" int ectfast_cuda_device_info(int device, char* name, size_t name_len, int* major,
                                        int* minor, int* bus_width_bits, int* mem_clock_khz,
                                        int* sm_count) {
  if (!name || name_len == 0 || !major || !minor || !bus_width_bits || !mem_clock_khz || !sm_count)
    return ECTFAST_CUDA_EINVAL;
  cudaDeviceProp prop;
  ECTFAST_CUDA_TRY(cudaGetDeviceProperties(&prop, device));
  strncpy(name, prop.name, name_len - 1);
  name[name_len - 1] = '\0';
  *major = prop.major;
  *minor = prop.minor;
  *sm_count = prop.multiProcessorCount;
  *bus_width_bits = 0;
  *mem_clock_khz = 0;
  // memoryClockRate left cudaDeviceProp in CUDA 13: ask the attributes (0 when unsupported)
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrGlobalMemoryBusWidth, device) == cudaSuccess) *bus_width_bits = v;
  else cudaGetLastError();
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMemoryClockRate, device) == cudaSuccess) *mem_clock_khz = v;
  else cudaGetLastError();
  return 0;
}

extern "C" int ectfast_cuda_pointer_device(const void* ptr, int* device, int* is_device) {
  if (!ptr || !device || !is_device) return ECTFAST_CUDA_EINVAL;
  cudaPointerAttributes attr;
  const cudaError_t e = cudaPointerGetAttributes(&attr, ptr);
  if (e != cudaSuccess) return (int)e;
  *device = attr.device;
  *is_device = (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) ? 1 : 0;
  return 0;
}

extern "C" int ectfast_cuda_stream_synchronize(int device, void* stream) {
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  return (int)cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
}

extern "C" int ectfast_cuda_memcpy_d2h(int device, void* dst, const void* src, size_t bytes,
                                       void* stream) {
  if (!dst || !src) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  ECTFAST_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, s));
  return (int)cudaStreamSynchronize(s);
}

extern "C" int ectfast_cuda_memcpy_h2d(int device, void* dst, const void* src, size_t bytes,
                                       void* stream) {
  if (!dst || !src) return ECTFAST_CUDA_EINVAL;
  DeviceGuard guard(device);
  ECTFAST_CUDA_TRY(guard.status());
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  ECTFAST_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
  // pageable host memory: the copy has been staged once cudaMemcpyAsync returns only for small
  // sizes; synchronise so that the caller may free `src` right away
  return (int)cudaStreamSynchronize(s);
}
