"""`fashionchameleon batch`: produce many clips through a running Studio's job queue.

    fashionchameleon batch submit manifest.jsonl [--wait [--out DIR]]   # all or nothing
    fashionchameleon batch status [JOB_ID ...] [--from FILE] [--all [--state S]]
    fashionchameleon batch download [JOB_ID ...] [--from FILE] --out DIR
    fashionchameleon batch cancel JOB_ID ...

The manifest format is in services/jobs/README.md (and services/jobs/manifest.py). `submit`
checks the whole manifest first and reports every problem with its line number; nothing is
sent unless every line is valid, and the server accepts or rejects the batch as a whole.
Results go to stdout: a table on a terminal, JSON with --json or when stdout is not a terminal
(`--from FILE` takes the JSON that `submit` printed). A progress bar goes to stderr with --wait. Exit status: 0, 1 when a waited-for job did not succeed, 2 on
bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

import grpc

from shared.cli import CliError, add_json_argument, emit, fmt_bytes, format_table, json_wanted, print_json

FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")


def register(subparsers: argparse._SubParsersAction) -> None:
    batch = subparsers.add_parser(
        "batch", help="submit and follow batch clip jobs (manifest.jsonl)", description=__doc__.split("\n\n")[0]
    )
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="ACTION", parser_class=type(batch))

    submit = sub.add_parser("submit", help="submit every clip of a manifest (all or nothing)")
    submit.add_argument("manifest", help="JSONL file, one clip per line (see services/jobs/README.md)")
    submit.add_argument("--wait", action="store_true", help="follow the jobs until they finish (progress on stderr)")
    submit.add_argument("--out", help="with --wait: download the results into this folder")
    submit.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    submit.add_argument("--dry-run", action="store_true", help="check the manifest only; send nothing")
    _connection_args(submit)
    submit.set_defaults(run=run_submit)

    status = sub.add_parser("status", help="show jobs (a table; --json: one JSON line per job)")
    status.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    status.add_argument("--from", dest="from_file", help="JSON printed by `batch submit`")
    status.add_argument("--all", action="store_true", help="every job of the tenant, newest first")
    status.add_argument(
        "--state",
        action="append",
        default=[],
        choices=[s.lower() for s in _state_names()],
        help="with --all: only jobs in this state (repeatable)",
    )
    _connection_args(status)
    status.set_defaults(run=run_status)

    download = sub.add_parser("download", help="download finished clips (MP4, manifest, poster)")
    download.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    download.add_argument("--from", dest="from_file", help="JSON printed by `batch submit`")
    download.add_argument("--out", required=True, help="folder for <id>.mp4, <id>.json and <id>.png")
    _connection_args(download)
    download.set_defaults(run=run_download)

    cancel = sub.add_parser("cancel", help="cancel jobs")
    cancel.add_argument("job_ids", nargs="+", metavar="JOB_ID")
    _connection_args(cancel)
    cancel.set_defaults(run=run_cancel)


def _connection_args(p: argparse.ArgumentParser) -> None:
    add_json_argument(p)
    p.add_argument("--target", default="localhost:9000", help="Studio gRPC address (default localhost:9000)")
    p.add_argument("--api-key", default=None, help="API key (default: $FASHIONCHAMELEON_API_KEY)")
    p.add_argument("--application", default="fashionchameleon", help="Ray Serve application name")


def _state_names() -> list[str]:
    from fashionchameleon.v1 import studio_pb2

    return [n for n in studio_pb2.Job.State.keys() if n != "STATE_UNSPECIFIED"]  # noqa: SIM118 - an enum wrapper


def _client(args):
    from services.jobs.client import JobsClient

    key = args.api_key or os.environ.get("FASHIONCHAMELEON_API_KEY")
    if not key:
        raise CliError("no API key: pass --api-key or set FASHIONCHAMELEON_API_KEY")
    return JobsClient(args.target, key, application=args.application)


def _studio_errors(fn, *a, lines: list[int] | None = None, **kw):
    """Call `fn`; a StudioError becomes a one-line CliError (clip index -> manifest line)."""
    from services.studio.client import StudioError

    try:
        return fn(*a, **kw)
    except StudioError as e:
        if e.code == grpc.StatusCode.UNAVAILABLE:
            raise CliError(f"cannot reach the Studio: {e.details or e}") from None
        where = ""
        if lines is not None and e.metadata.get("index", "").isdigit() and int(e.metadata["index"]) < len(lines):
            where = f"line {lines[int(e.metadata['index'])]}: "
        raise CliError(f"{where}{e.code.name}: {e.details}") from None


def job_summary(job) -> dict:
    from fashionchameleon.v1 import studio_pb2

    out = {
        "job_id": job.job_id,
        "id": job.idempotency_key,
        "state": studio_pb2.Job.State.Name(job.state),
        "attempts": job.attempts,
        "chunks_done": job.chunks_done,
        "chunks_total": job.chunks_total,
    }
    if job.error_message:
        out["error"] = job.error_message
    if job.HasField("result"):
        out["video_key"] = job.result.video_key
        if job.result.video_url:
            out["video_url"] = job.result.video_url
    if job.labels:
        out["labels"] = dict(job.labels)
    return out


# ---- submit ----------------------------------------------------------------------------------
def run_submit(args) -> int:
    from services.jobs.manifest import ManifestError, build_request, parse_manifest

    path = Path(args.manifest)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read manifest {path}: {e}") from None
    try:
        clips = parse_manifest(text, path.parent)
    except ManifestError as e:
        raise CliError(f"manifest {path} rejected, nothing submitted: {e}") from None
    if args.out and not args.wait:
        raise CliError("--out goes with --wait (or use `batch download`)")
    request = build_request(clips)
    if args.dry_run:
        emit(
            args,
            {
                "manifest": str(path),
                "clips": len(clips),
                "shared_images": len(request.shared_images),
                "request_bytes": request.ByteSize(),
                "submitted": False,
            },
            lambda r: (
                f"{r['manifest']} is valid: {r['clips']} clips, {r['shared_images']} distinct images, "
                f"a {fmt_bytes(r['request_bytes'])} request (dry run: nothing submitted)"
            ),
        )
        return 0
    lines = [c.line for c in clips]
    with _client(args) as client:
        jobs = _studio_errors(client.submit_request, request, lines=lines)
        summary = {
            "manifest": str(path),
            "clips": len(clips),
            "created": sum(j.created for j in jobs),
            "existing": sum(not j.created for j in jobs),
            "jobs": [{"line": line, **job_summary(j)} for line, j in zip(lines, jobs)],
        }
        if not args.wait:
            emit(args, summary, describe_submit)
            return 0
        final = _wait(client, [j.job_id for j in jobs], args.timeout)
        summary["jobs"] = [{"line": line, **job_summary(final[j.job_id])} for line, j in zip(lines, jobs)]
        summary["states"] = _count(s["state"] for s in summary["jobs"])
        if args.out:
            summary["downloaded"] = _download(client, [j.job_id for j in jobs], Path(args.out))
    emit(args, summary, describe_submit)
    return 0 if all(s["state"] == "SUCCEEDED" for s in summary["jobs"]) else 1


JOB_COLUMNS = ("job_id", "id", "state", "attempts", "chunks", "result")


def _job_row(job: dict) -> dict:
    """A `job_summary` as a table row: chunks as done/total, the error or the video as result."""
    return {
        **job,
        "chunks": f"{job['chunks_done']}/{job['chunks_total']}",
        "result": job.get("error") or job.get("video_key") or "",
    }


def describe_jobs(jobs: list[dict], first: tuple[str, ...] = ()) -> str:
    return format_table([_job_row(j) for j in jobs], (*first, *JOB_COLUMNS)) if jobs else "  (no jobs)"


def describe_submit(summary: dict) -> str:
    lines = [
        f"submitted {summary['manifest']}: {summary['clips']} clips "
        f"({summary['created']} new, {summary['existing']} already submitted)"
    ]
    if "states" in summary:
        lines.append("finished: " + ", ".join(f"{n} {s.lower()}" for s, n in summary["states"].items()))
    lines.append(describe_jobs(summary["jobs"], first=("line",)))
    for entry in summary.get("downloaded", []):
        lines.append(f"  {entry['job_id']}: " + (", ".join(entry["files"]) or f"not downloaded ({entry['state']})"))
    return "\n".join(lines)


def _count(states) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in states:
        counts[s] = counts.get(s, 0) + 1
    return counts


class ProgressBar:
    """One status line on stderr: redrawn in place on a terminal, else printed on change.

    The bar and the words say the same thing: `#` fills the finished jobs' share of the bar (the
    "N/M done" count), `=` the unfinished jobs' chunks already generated, and the percentage is
    the whole filled length. So "0/2 done" never shows a `#`, however far the running jobs are."""

    def __init__(self, total: int, stream=None, width: int = 30) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.started = time.monotonic()
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = ""

    def render(self, states: dict[str, str], chunks: float) -> str:
        """`states`: job id -> state name of the jobs seen so far; `chunks`: the progress in jobs
        (a finished job counts 1, an unfinished one its chunks done / chunks total)."""
        counts = _count(states.values())
        done = sum(counts.get(s, 0) for s in FINAL)
        running = counts.get("RUNNING", 0)
        total = max(1, self.total)
        fraction = min(1.0, max(chunks, done) / total)
        full = self.width * done // total
        filled = max(full, int(self.width * fraction))
        elapsed = int(time.monotonic() - self.started)
        return (
            f"[{'#' * full}{'=' * (filled - full)}{'.' * (self.width - filled)}] {int(100 * fraction)}%  "
            f"{done}/{self.total} done ({counts.get('SUCCEEDED', 0)} ok, {counts.get('FAILED', 0)} failed, "
            f"{counts.get('CANCELLED', 0)} cancelled), {running} running, "
            f"{max(0, self.total - done - running)} waiting  {elapsed // 60}:{elapsed % 60:02d}"
        )

    def update(self, states: dict[str, str], chunks: float) -> None:
        line = self.render(states, chunks)
        if line == self._last:
            return
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self._last)))
        elif line.rsplit("  ", 1)[0] != self._last.rsplit("  ", 1)[0]:  # the clock alone: no new line
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last = line

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _wait(client, job_ids: list[str], timeout_s: float | None) -> dict:
    from fashionchameleon.v1 import studio_pb2

    jobs: dict = {}
    bar = ProgressBar(len(job_ids))
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    from services.studio.client import StudioError

    try:
        for event in client.watch_jobs(job_ids, timeout_s=timeout_s):
            job = event.job
            jobs[job.job_id] = job
            states = {j: studio_pb2.Job.State.Name(x.state) for j, x in jobs.items()}
            chunks = sum(
                1.0 if studio_pb2.Job.State.Name(x.state) in FINAL else x.chunks_done / max(1, x.chunks_total)
                for x in jobs.values()
            )
            bar.update(states, chunks)
            if deadline is not None and time.monotonic() > deadline:
                break
    except StudioError as e:
        if e.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise CliError(f"following the jobs failed: {e.code.name}: {e.details}") from None
    finally:
        bar.close()
    # The stream reports every job; fetch once more for URLs and anything the stream missed.
    return {j: _studio_errors(client.get_job, j) for j in job_ids}


# ---- status / download / cancel ------------------------------------------------------------------
def _job_ids(args) -> list[str]:
    ids = list(args.job_ids)
    if args.from_file:
        try:
            data = json.loads(Path(args.from_file).read_text(encoding="utf-8"))
            ids += [j["job_id"] for j in data["jobs"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CliError(f"--from {args.from_file}: not the JSON of `batch submit` ({e})") from None
    return list(dict.fromkeys(ids))


def run_status(args) -> int:
    from fashionchameleon.v1 import studio_pb2

    ids = _job_ids(args)
    if not ids and not args.all:
        raise CliError("give JOB_IDs, --from FILE or --all")
    with _client(args) as client:
        if args.all:
            states = [studio_pb2.Job.State.Value(s.upper()) for s in args.state]
            jobs = _studio_errors(lambda: list(client.iter_jobs(states)))
        else:
            jobs = [_studio_errors(client.get_job, j) for j in ids]
    summaries = [job_summary(job) for job in jobs]
    if json_wanted(args):
        for summary in summaries:
            print_json(summary)
    else:
        print(describe_jobs(summaries))
    return 0


def _safe_name(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.=@+" else "_" for c in text)[:120] or "clip"


def _fetch(url: str, dest: Path) -> int:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            size = 0
            while chunk := response.read(1 << 20):
                f.write(chunk)
                size += len(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _download(client, job_ids: list[str], out: Path) -> list[dict]:
    from fashionchameleon.v1 import studio_pb2

    files = []
    for job_id in job_ids:
        job = _studio_errors(client.get_job, job_id)
        if job.state != studio_pb2.Job.SUCCEEDED:
            files.append({"job_id": job_id, "state": studio_pb2.Job.State.Name(job.state), "files": []})
            continue
        name = _safe_name(job.idempotency_key or job_id)
        r = job.result
        got = []
        for url, suffix in ((r.video_url, ".mp4"), (r.manifest_url, ".json"), (r.poster_url, ".png")):
            dest = out / f"{name}{suffix}"
            try:
                _fetch(url, dest)
            except OSError as e:
                raise CliError(f"download of job {job_id} failed: {e}") from None
            got.append(str(dest))
        files.append({"job_id": job_id, "state": "SUCCEEDED", "files": got})
    return files


def run_download(args) -> int:
    ids = _job_ids(args)
    if not ids:
        raise CliError("give JOB_IDs or --from FILE")
    with _client(args) as client:
        files = _download(client, ids, Path(args.out))
    for entry in files:
        emit(
            args,
            entry,
            lambda e: f"{e['job_id']}: " + (", ".join(e["files"]) or f"nothing to download ({e['state'].lower()})"),
        )
    return 0 if all(e["files"] for e in files) else 1


def run_cancel(args) -> int:
    with _client(args) as client:
        cancelled = [job_summary(_studio_errors(client.cancel_job, job_id)) for job_id in args.job_ids]
    if json_wanted(args):
        for summary in cancelled:
            print_json(summary)
    else:
        print(describe_jobs(cancelled))
    return 0
