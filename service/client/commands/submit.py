"""`seco submit`: upload the data (or name uploaded files) and create a job; `--follow` then watches it."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from service.client.commands.base import EXIT_OK, command, emit, queue_text
from service.client.commands.follow import follow_job
from service.client.format import human_bytes
from service.client.http import Client, ClientError


def register(sub: Any, conn: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "submit",
        parents=[conn],
        help="upload a JSONL file and start a fine-tuning job",
        description="Upload FILE (or use an uploaded file id) and create a job; prints its id.",
    )
    p.add_argument("file", help="training data: a local .jsonl file, or the id of an uploaded file")
    p.add_argument("--model", required=True, help="base model name offered by the server (see /v1/models)")
    p.add_argument("--validation-file", help="validation data: a local .jsonl file or a file id")
    hp = p.add_argument_group("hyperparameters")
    hp.add_argument("--epochs", type=_int_or_auto, help="passes over the data (default: auto)")
    hp.add_argument("--batch-size", type=_int_or_auto, help="windows (dpo: pairs) per optimizer step (default: auto)")
    hp.add_argument("--lr-multiplier", type=_float_or_auto, help="scales the base learning rate (default: auto)")
    hp.add_argument("--method", choices=["supervised", "dpo"], help="dpo: preference pairs (default: supervised)")
    hp.add_argument(
        "--beta", type=_float_or_auto, help="dpo: how far the policy may move from the reference (default: auto = 0.1)"
    )
    hp.add_argument("--suffix", help="added to the fine-tuned model's name")
    hp.add_argument("--seed", type=int)
    hp.add_argument("--metadata", action="append", metavar="KEY=VALUE", default=[], help="repeatable")
    sc = p.add_argument_group("SeCO / SpaCO")
    sc.add_argument("--mode", choices=["seco", "spaco"], help="seco: exact gradients; spaco: a subset of chunks")
    sc.add_argument("--chunk-size", type=int, help="tokens per chunk (default: from the memory plan)")
    sc.add_argument("--max-length", type=int, help="tokens per training window (default: the model's context)")
    sc.add_argument("--budget", type=int, help="spaco: chunks back-propagated per sequence")
    sc.add_argument("--sampling", choices=["bernoulli", "fixed"], help="spaco: bernoulli is unbiased")
    sc.add_argument("--max-compensation", type=float, help="spaco: cap on the compensation factor")
    lo = p.add_argument_group("LoRA")
    lo.add_argument("--lora-r", type=int)
    lo.add_argument("--lora-alpha", type=float)
    lo.add_argument("--lora-dropout", type=float)
    lo.add_argument("--lora-target-modules", help="comma-separated module names (default: attention projections)")
    p.add_argument("--follow", "-f", action="store_true", help="then follow it live until it finishes")
    p.set_defaults(func=cmd_submit)


def _int_or_auto(v: str) -> int | str:
    return "auto" if v == "auto" else int(v)


def _float_or_auto(v: str) -> float | str:
    return "auto" if v == "auto" else float(v)


def _file_id(client: Client, ref: str, what: str, uploaded: list[str]) -> str:
    """Upload a local file (its id is appended to `uploaded`), or pass through an uploaded file's id."""
    path = Path(ref)
    if path.is_file():
        obj = client.upload(path)
        uploaded.append(str(obj["id"]))
        emit(f"Uploaded {path.name} as {obj['id']} ({human_bytes(obj.get('bytes'))})", sys.stderr)
        return str(obj["id"])
    if ref.startswith("file-") and "/" not in ref:
        return ref
    raise ClientError(f"{what}: no such file: {ref}")


def job_body(args: argparse.Namespace, training_file: str, validation_file: str | None) -> dict[str, Any]:
    """The create-job request; only the options given are sent, so the server's defaults apply."""
    body: dict[str, Any] = {"model": args.model, "training_file": training_file}
    if validation_file:
        body["validation_file"] = validation_file
    hp = {"n_epochs": args.epochs, "batch_size": args.batch_size, "learning_rate_multiplier": args.lr_multiplier}
    if args.beta is not None and args.method != "dpo":
        raise ClientError("--beta applies to --method dpo")
    if args.method == "dpo":  # OpenAI's method object carries a DPO job's hyperparameters, beta included
        hp["beta"] = args.beta
        body["method"] = {"type": "dpo", "dpo": {"hyperparameters": {k: v for k, v in hp.items() if v is not None}}}
    elif hp := {k: v for k, v in hp.items() if v is not None}:
        body["hyperparameters"] = hp
    for name in ("suffix", "seed"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.metadata:
        pairs = [m.partition("=") for m in args.metadata]
        if bad := [k for k, eq, _ in pairs if not eq or not k]:
            raise ClientError(f"--metadata takes KEY=VALUE (got {bad[0]!r})")
        body["metadata"] = {k: v for k, _, v in pairs}
    seco = {
        k: getattr(args, k)
        for k in ("mode", "chunk_size", "max_length", "budget", "sampling", "max_compensation")
        if getattr(args, k) is not None
    }
    lora = {k: getattr(args, f"lora_{k}") for k in ("r", "alpha", "dropout") if getattr(args, f"lora_{k}") is not None}
    if args.lora_target_modules:
        lora["target_modules"] = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if lora:
        seco["lora"] = lora
    if seco:
        body["seco"] = seco
    return body


@command
def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    """Prints the job id alone on stdout (`JOB=$(seco submit ...)`); the rest goes to stderr."""
    uploaded: list[str] = []
    try:
        training = _file_id(client, args.file, "FILE", uploaded)
        validation = (
            _file_id(client, args.validation_file, "--validation-file", uploaded) if args.validation_file else None
        )
        job = client.create_job(job_body(args, training, validation))
    except ClientError:
        for file_id in uploaded:  # no job will use them: don't leave them taking up the quota
            with contextlib.suppress(ClientError):
                client.delete_file(file_id)
        raise
    emit(job["id"])
    emit(f"Created job {job['id']} on {job['model']}: {job['status']} {queue_text(job)}".rstrip(), sys.stderr)
    if not args.follow:
        emit(f"Watch it with: seco follow {job['id']}", sys.stderr)
        return EXIT_OK
    return follow_job(client, job["id"])
