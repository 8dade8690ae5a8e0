"""Changes to third-party behaviour (transformers version shims), shipped as `flashcore_hf.patches`."""
