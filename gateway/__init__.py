"""vlmserve's HTTP gateway: the old services' APIs and the OpenAI API in front of Triton (never imports torch).

It learns what is served from Triton's registry and reads each model's limits through the model contract
(``vlmserve.families.contract``); it imports neither export, the orchestrator nor the CLI."""
