"""The --device values `compile` accepts (kept free of TVM imports so the CLI starts fast)."""

DEVICES = ("cpu",)
