"""``vlmserve-client``: embed, caption or OCR a whole folder of images through a vlmserve gateway (or, for
``embed --api openai``, any OpenAI-compatible embeddings server that embeds images).

Usage::

    vlmserve-client embed photos/ 'scans/**/*.png' --out vectors.npy
    vlmserve-client embed photos/ --out vectors.parquet          # needs the ``parquet`` extra (pyarrow)
    vlmserve-client caption photos/ --out captions.jsonl
    vlmserve-client ocr scans/ --out text.jsonl --language english

Re-running with the same ``--out`` resumes: files already in the output (same path, size and mtime) are skipped.
Files that cannot be read or that the server refuses (4xx) go to ``STEM.errors.jsonl`` with the reason. Exit
status: 0 when every file is done, 1 when some failed, 2 for a usage error, an unreachable server, or a run
stopped early because the server stayed unavailable (429/503/no answer after every retry).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import IO

from vlmserve_client._core import DEFAULT_BASE_URL, _AsyncClient
from vlmserve_client._sinks import open_sink, output_paths
from vlmserve_client.bulk import (
    IMAGE_EXTENSIONS,
    Backend,
    CaptionBackend,
    EmbedBackend,
    OcrBackend,
    Progress,
    RunStats,
    choose_limits,
    fetch_info,
    find_images,
    plan,
    run,
)
from vlmserve_client.embeddings import AsyncEmbeddingsClient
from vlmserve_client.errors import VlmserveError
from vlmserve_client.florence2 import AsyncFlorence2Client
from vlmserve_client.ocr import AsyncOcrClient

__all__ = ["main"]

CAPTION_TASKS = {"caption": "<CAPTION>", "detailed_caption": "<DETAILED_CAPTION>",
                 "more_detailed_caption": "<MORE_DETAILED_CAPTION>"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlmserve-client",
        description="Embed, caption or OCR folders of images through a vlmserve gateway, resumably.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders (walked recursively) or globs ('**' recurses)")
    common.add_argument("--out", required=True, metavar="FILE",
                        help="output: .parquet (pyarrow), .jsonl, or (embed) .npy + FILE.index.jsonl")
    common.add_argument("--base-url", default=os.environ.get("VLMSERVE_BASE_URL", DEFAULT_BASE_URL),
                        help=f"the gateway (env VLMSERVE_BASE_URL; default {DEFAULT_BASE_URL})")
    common.add_argument("--api-key", default=os.environ.get("VLMSERVE_API_KEY"),
                        help="sent as 'Authorization: Bearer KEY' (env VLMSERVE_API_KEY)")
    common.add_argument("--concurrency", type=int, metavar="N",
                        help="requests in flight (default: a quarter of the gateway's in-flight cap for the route "
                             "when /info reports it, else 4)")
    common.add_argument("--max-retries", type=int, default=8, metavar="N",
                        help="tries again after a 429/503 (after its Retry-After) or no answer (default 8)")
    common.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per request (default 120 s)")
    common.add_argument("--flush-seconds", type=float, default=30.0, metavar="S",
                        help="Parquet output: write what has arrived as a part file at least this often, so that a "
                             "killed run keeps it (default 30 s; .npy and JSONL are written as results arrive)")
    common.add_argument("--quiet", action="store_true", help="no progress bar (the summary line is still printed)")

    embed = commands.add_parser("embed", parents=[common], help="image embeddings (POST /embed)")
    embed.add_argument("--api", choices=["vlmserve", "openai"], default="vlmserve",
                       help="vlmserve: POST /embed; openai: POST /v1/embeddings with image data URIs "
                            "(the server must embed images)")
    embed.add_argument("--model", help="embedding model (default: the server's)")
    embed.add_argument("--batch-size", type=int, metavar="N",
                       help="images per request (default: the gateway's max_items, at most 16)")

    caption = commands.add_parser("caption", parents=[common], help="Florence-2 captions (POST /infer/upload)")
    caption.add_argument("--task", choices=sorted(CAPTION_TASKS), default="caption")
    caption.add_argument("--max-new-tokens", type=int, metavar="N")

    ocr = commands.add_parser("ocr", parents=[common], help="the text in each image (POST /ocr, a chat model)")
    ocr.add_argument("--language", default="auto", help="a hint: 'auto', 'english', 'russian', ...")
    ocr.add_argument("--model", help="chat model (default: the gateway's OCR model)")
    ocr.add_argument("--max-tokens", type=int, metavar="N")
    return parser


def _backend(args: argparse.Namespace, client: _AsyncClient, batch_size: int) -> Backend:
    if args.command == "embed":
        assert isinstance(client, AsyncEmbeddingsClient)
        return EmbedBackend(client, batch_size, model=args.model, api=args.api)
    if args.command == "caption":
        assert isinstance(client, AsyncFlorence2Client)
        return CaptionBackend(client, CAPTION_TASKS[args.task], args.max_new_tokens)
    assert isinstance(client, AsyncOcrClient)
    return OcrBackend(client, args.language, args.model, args.max_tokens)


def _client(args: argparse.Namespace) -> _AsyncClient:
    base_url = args.base_url.rstrip("/")
    if args.command == "embed":
        if args.api == "openai" and base_url.endswith("/v1"):  # the openai SDK's base_url form
            base_url = base_url[: -len("/v1")]
        return AsyncEmbeddingsClient(base_url, args.api_key, args.timeout)
    if args.command == "caption":
        return AsyncFlorence2Client(base_url, args.api_key, args.timeout)
    return AsyncOcrClient(base_url, args.api_key, args.timeout)


async def _main(args: argparse.Namespace, err: IO[str]) -> int:
    files, unmatched = find_images(args.paths)
    for arg in unmatched:
        err.write(f"vlmserve-client: warning: {arg!r} matches no file\n")
    if not files:
        err.write("vlmserve-client: no image files found (folders are searched for "
                  f"{' '.join(sorted(IMAGE_EXTENSIONS))})\n")
        return 2
    outputs = set(output_paths(args.out, args.command).values())
    sink = open_sink(args.out, args.command, args.flush_seconds)
    stats = RunStats(found=len(files))
    try:
        items, stats.skipped_done, stats.skipped_bad, missing = plan(files, sink.done, sink.known_bad)
        sink.write_errors(missing)
        stats.failed = stats.failed_before = len(missing)
        client = _client(args)
        async with client:
            try:
                info = await fetch_info(client, min(args.max_retries, 3)) if items else None
            except VlmserveError as exc:
                err.write(f"vlmserve-client: {args.base_url}: {exc}\n")
                return 2
            concurrency, batch_size = choose_limits(info, args.command, args.concurrency,
                                                    getattr(args, "batch_size", None))
            max_bytes = info.limits.get("max_body_bytes") if info is not None else None
            if not args.quiet:
                plan_text = (f"{len(files)} images: {len(items)} to do, {stats.skipped_done} already done, "
                             f"{stats.skipped_bad} known bad")
                if items:
                    per_request = f", {batch_size} per request" if args.command == "embed" else ""
                    plan_text += f"; concurrency {concurrency}{per_request}"
                outputs_text = ", ".join(sorted(str(p) for p in outputs))
                err.write(f"vlmserve-client {args.command}: {plan_text} -> {outputs_text}\n")
            progress = Progress(len(items), err, enabled=not args.quiet and bool(items))
            await run(_backend(args, client, batch_size), sink, items, concurrency=concurrency,
                      max_retries=args.max_retries, progress=progress, stats=stats, max_request_bytes=max_bytes)
    finally:
        sink.close()
    err.write(f"vlmserve-client {args.command}: {stats.summary()}\n")
    if stats.failed:
        errors = output_paths(args.out, args.command)["errors"]
        err.write(f"vlmserve-client: the failures and their reasons are in {errors}\n")
    if stats.stopped:
        err.write("vlmserve-client: run the same command again to resume\n")
        return 2
    return 1 if stats.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """The console script ``vlmserve-client`` (also ``python -m vlmserve_client``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("concurrency", "batch_size", "max_retries"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "max_retries" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least {0 if name == 'max_retries' else 1}")
    try:
        return asyncio.run(_main(args, sys.stderr))
    except KeyboardInterrupt:
        sys.stderr.write("\nvlmserve-client: interrupted; run the same command again to resume\n")
        return 130
    except ValueError as exc:  # an output that does not fit (other dimensions, not a .npy we can append to)
        sys.stderr.write(f"vlmserve-client: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
