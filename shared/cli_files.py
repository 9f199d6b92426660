"""`sandstream files put|get|ls|rm` and `sandstream archive put|get`: a sandbox's
files from the command line, streamed both ways (no file is read whole into memory).

They talk to the API (`--url`, default `SANDSTREAM_URL` or http://127.0.0.1:8000)
with a tenant's key (`--key`, default `SANDSTREAM_API_KEY`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

_CHUNK = 1 << 20


def add_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    files = sub.add_parser("files", help="a sandbox's files").add_subparsers(
        dest="action", required=True
    )
    put = files.add_parser("put", parents=[common], help="upload a local file")
    put.add_argument("sandbox")
    put.add_argument("local", help="a local file, or - for standard input")
    put.add_argument("remote", help="its path in the workspace")
    put.add_argument("--if-match", metavar="ETAG", help="only if the file is this version")
    put.add_argument("--if-absent", action="store_true", help="only if there is no such file")
    get = files.add_parser("get", parents=[common], help="download a file")
    get.add_argument("sandbox")
    get.add_argument("remote")
    get.add_argument("local", nargs="?", help="where to write it (its name; - for stdout)")
    ls = files.add_parser("ls", parents=[common], help="list a directory")
    ls.add_argument("sandbox")
    ls.add_argument("remote", nargs="?", default="")
    ls.add_argument("-r", "--recursive", action="store_true")
    rm = files.add_parser("rm", parents=[common], help="delete a file or directory")
    rm.add_argument("sandbox")
    rm.add_argument("remote")
    rm.add_argument("-r", "--recursive", action="store_true")

    archive = sub.add_parser("archive", help="a sandbox's directories as archives").add_subparsers(
        dest="action", required=True
    )
    up = archive.add_parser("put", parents=[common], help="extract an archive into the sandbox")
    up.add_argument("sandbox")
    up.add_argument("local", help="a tar, tar.gz or zip file, or a local directory to send")
    up.add_argument("--path", default="", help="the directory to extract into (the root)")
    down = archive.add_parser("get", parents=[common], help="download a directory as an archive")
    down.add_argument("sandbox")
    down.add_argument("--path", default="", help="the directory (the root)")
    down.add_argument("--format", default="tar.gz", choices=["tar.gz", "tar", "zip"])
    down.add_argument("-o", "--output", help="the archive's file (its name; - for stdout)")


def _files_url(sandbox: str, remote: str = "") -> str:
    base = f"/api/v1/sandboxes/{quote(sandbox, safe='')}/files"
    remote = remote.strip("/")
    return f"{base}/{quote(remote)}" if remote else base


class Failed(Exception):
    """A request the API refused; the message says why."""


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        response.read()
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise Failed(f"{response.status_code}: {detail}")
    return response


def _read_chunks(source: IO[bytes]) -> Any:
    while chunk := source.read(_CHUNK):
        yield chunk


def _write_stream(response: httpx.Response, target: str) -> None:
    if target == "-":
        for chunk in response.iter_bytes(_CHUNK):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
        return
    partial = Path(target + ".partial")
    with partial.open("wb") as out:
        for chunk in response.iter_bytes(_CHUNK):
            out.write(chunk)
    partial.replace(target)


def run_files(args: argparse.Namespace, client: httpx.Client) -> int:
    if args.action == "put":
        headers = {}
        if args.if_match:
            headers["If-Match"] = (
                args.if_match if args.if_match.startswith('"') else (f'"{args.if_match}"')
            )
        if args.if_absent:
            headers["If-None-Match"] = "*"
        with contextlib.ExitStack() as opened:
            content: Any = (
                _read_chunks(sys.stdin.buffer)
                if args.local == "-"
                else opened.enter_context(Path(args.local).open("rb"))
            )
            answer = _check(
                client.put(_files_url(args.sandbox, args.remote), content=content, headers=headers)
            ).json()
        print(f"{answer['path']}  {answer['size']} bytes  sha256 {answer['sha256']}")
    elif args.action == "get":
        target = args.local or os.path.basename(args.remote.rstrip("/")) or "download"
        with client.stream("GET", _files_url(args.sandbox, args.remote)) as response:
            _check(response)
            if response.headers.get("content-type", "").startswith("application/json") and (
                response.headers.get("etag") is None
            ):
                raise Failed(f"{args.remote} is a directory: use `files ls` or `archive get`")
            _write_stream(response, target)
    elif args.action == "ls":
        params: dict[str, str] = {"recursive": "true"} if args.recursive else {}
        url = _files_url(args.sandbox, args.remote)
        while True:
            page = _check(client.get(url, params=params))
            if page.headers.get("etag") is not None:
                raise Failed(f"{args.remote} is a file")
            for entry in page.json():
                kind = {"dir": "d", "symlink": "l"}.get(entry["type"], "-")
                print(f"{kind} {entry['size']:>12}  {entry['modified_at']}  {entry['path']}")
            cursor = page.headers.get("x-next-cursor")
            if cursor is None:
                return 0
            params["cursor"] = cursor
    else:
        params = {"recursive": "true"} if args.recursive else {}
        _check(client.delete(_files_url(args.sandbox, args.remote), params=params))
    return 0


def run_archive(args: argparse.Namespace, client: httpx.Client) -> int:
    url = f"/api/v1/sandboxes/{quote(args.sandbox, safe='')}/archive"
    if args.action == "put":
        local = Path(args.local)
        with tempfile.TemporaryFile() if local.is_dir() else local.open("rb") as source:
            if local.is_dir():  # send the directory's contents as a tar.gz
                with tarfile.open(fileobj=source, mode="w:gz") as tarred:
                    for child in sorted(local.iterdir()):
                        tarred.add(child, arcname=child.name)
                source.seek(0)
            answer = _check(
                client.put(url, params={"path": args.path or "."}, content=source)
            ).json()
        print(f"{answer['entries']} entries, {answer['size']} bytes into {answer['path']}")
        return 0
    params = {"path": args.path or ".", "format": args.format}
    name = (args.path.strip("/").rsplit("/", 1)[-1] or "workspace") + "." + args.format
    with client.stream("GET", url, params=params) as response:
        _check(response)
        _write_stream(response, args.output or name)
    return 0


def connect(args: argparse.Namespace) -> httpx.Client:
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    timeout = httpx.Timeout(60, read=600)
    return httpx.Client(base_url=args.url.rstrip("/"), headers=headers, timeout=timeout)


def main_files(args: argparse.Namespace) -> int:
    try:
        with connect(args) as client:
            if args.group == "files":
                return run_files(args, client)
            return run_archive(args, client)
    except Failed as exc:
        print(exc, file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError) as exc:
        print(f"cannot complete the request: {exc}", file=sys.stderr)
        return 2
