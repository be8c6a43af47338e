#!/usr/bin/env bash
# Fetch NVIDIA's perf_analyzer as it runs on a machine without a GPU or Docker, into DIR
# (default .perf_analyzer), and write DIR/perf_analyzer, a wrapper that finds its libraries.
#   scripts/get_perf_analyzer.sh [DIR]
# tritonclient 2.50.0's wheel carries the binary (2.52-2.59 need glibc 2.38); it links the CUDA
# runtime, which nvidia-cuda-runtime-cu12 provides without a GPU, and libb64 (Debian: libb64-0d).
set -euo pipefail
DIR=$(realpath -m "${1:-.perf_analyzer}")
mkdir -p "$DIR/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: -d "$DIR/wheels" \
    tritonclient==2.50.0 nvidia-cuda-runtime-cu12==12.9.79
for wheel in "$DIR"/wheels/*.whl; do python3 -m zipfile -e "$wheel" "$DIR/site"; done
BIN=$(find "$DIR/site" -path "*/bin/perf_analyzer" -type f | head -1)
CUDART=$(dirname "$(find "$DIR/site" -name "libcudart.so.12" | head -1)")
chmod +x "$BIN"
cat > "$DIR/perf_analyzer" <<WRAPPER
#!/usr/bin/env bash
LD_LIBRARY_PATH="$CUDART\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$BIN" "\$@"
WRAPPER
chmod +x "$DIR/perf_analyzer"
rm -rf "$DIR/wheels"
"$DIR/perf_analyzer" --version >/dev/null 2>&1 || {
    echo "perf_analyzer does not start; is libb64 installed (Debian: apt-get install libb64-0d)?" >&2; exit 1; }
echo "$DIR/perf_analyzer"
