"""The only part of fedmoe that touches the disk: atomic writes, JSON manifests, safetensors
checkpoints. Everything else in the package works on in-memory objects."""
