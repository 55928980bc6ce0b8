from orchestrator.cli import app

app(prog_name="python -m orchestrator")
