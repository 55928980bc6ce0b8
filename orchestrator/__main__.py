from vlmserve.orchestrator.cli import app

app(prog_name="python -m vlmserve.orchestrator")
