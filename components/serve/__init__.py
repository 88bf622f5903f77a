"""Serving on NVIDIA Triton: export a model folder as a versioned model repository (serve.export),
run the real tritonserver with the python backend (server), validate a new version through
tritonclient over HTTP and gRPC (serve.check), and sweep concurrency (loadtest)."""
