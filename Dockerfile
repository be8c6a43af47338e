# Triton 2.51 (the version the tests run against) with the packages the Python models import.
# Build: docker build -t qwen3vl-triton .
# Run:   docker run --gpus all --shm-size=16g -p 8000-8002:8000-8002 \
#          -v $PWD/model_repository:/models qwen3vl-triton
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# numpy<2: the container's Python backend stub is built against numpy 1.
RUN pip install --no-cache-dir "numpy<2" torch "transformers>=5.17" safetensors pillow onnxruntime-gpu

# Images and embeddings cross the Python backend's shared memory: start it large.
CMD ["tritonserver", "--model-repository=/models", \
     "--backend-config=python,shm-default-byte-size=67108864", \
     "--backend-config=python,shm-growth-byte-size=67108864"]
