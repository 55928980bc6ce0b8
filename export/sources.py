"""Where checkpoints come from: a local directory, the Hugging Face cache, or the Hub."""

from __future__ import annotations

from pathlib import Path


class SourceError(RuntimeError):
    """A checkpoint could not be found; the message says how to provide it."""


def resolve_source(model: str | Path) -> Path:
    """A local directory as-is, else a Hub id through ``snapshot_download`` (honours HF_HOME/HF_HUB_OFFLINE)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if str(model).startswith((".", "/", "~")):
        raise SourceError(f"checkpoint directory {path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id=str(model),
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py", "*.tiktoken"],
            )
        )
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types; all mean "not available"
        raise SourceError(
            f"could not get {model!r} from the Hugging Face Hub or the local cache ({type(exc).__name__}: "
            f"{exc}). Without network, put the checkpoint in the cache (HF_HOME) or pass a local directory; "
            "`make demo` uses the offline tiny models instead."
        ) from None
