"""The --device and --arch values `compile` accepts (free of TVM imports: the CLI starts fast)."""

DEVICES = ("cpu", "cuda")
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90")
DEFAULT_CUDA_ARCH = "sm_90"
