"""The only part of fedmoe that touches the disk: dataset reading (built-ins' raw arrays, .npz and
.csv files), atomic writes, sha256 digests, JSON manifests, safetensors checkpoints. Everything else
in the package works on in-memory objects."""
