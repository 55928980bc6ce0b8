"""vlmserve's HTTP gateway: the seeds' APIs and the OpenAI API in front of Triton (never imports torch)."""
