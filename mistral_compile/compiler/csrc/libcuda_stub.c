/* Stand-in for the CUDA driver (libcuda.so.1) on a build machine without a GPU.
 *
 * TVM compiles CUDA kernels to machine code only when its CUDA runtime library is loaded, and
 * that library links against the driver. This stub provides the driver entry points it links
 * to, so it can load; each one reports that there is no device. It is never used to run code.
 */
typedef int CUresult;
#define CUDA_ERROR_NO_DEVICE 100
#define NO_DEVICE(name) \
  CUresult name(void) { return CUDA_ERROR_NO_DEVICE; }

NO_DEVICE(cuInit)
NO_DEVICE(cuDeviceGetName)
NO_DEVICE(cuFuncSetAttribute)
NO_DEVICE(cuLaunchKernelEx)
NO_DEVICE(cuModuleGetFunction)
NO_DEVICE(cuModuleLoadData)
NO_DEVICE(cuModuleUnload)
NO_DEVICE(cuTensorMapEncodeTiled)

CUresult cuGetErrorName(CUresult error, const char **name) {
  (void)error;
  *name = "CUDA_ERROR_NO_DEVICE";
  return 0;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
  (void)error;
  *text = "no CUDA driver: mistral-compile's build-only stand-in is loaded";
  return 0;
}
