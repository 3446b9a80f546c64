"""The runtime: the runner (slots, one step call), the backends that run steps on a device, the KV cache."""
