"""A local Google Cloud Storage emulator for tests of `gs://` workdirs.

Both clients that mmjax uses for a bucket talk to it:

- tensorstore (Orbax writes array data through its native `gcs` kvstore driver), via
  `TENSORSTORE_GCS_HTTP_URL` (endpoint) and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (a fixed bearer
  token, so tensorstore neither looks for Google credentials nor probes the GCE metadata
  server);
- etils.epath (fsspec + gcsfs), via `STORAGE_EMULATOR_HOST` (endpoint), `FSSPEC_GCS_TOKEN=anon`
  (no credentials), `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` (gcsfs >= 2026 otherwise uses
  its gRPC "extended" filesystem, whose bucket-type lookup goes to the same host over TLS and
  stalls 60 s per call against an HTTP-only emulator), `EPATH_USE_TF=false` (epath would pick
  tf.io.gfile if TensorFlow were installed) and `NO_GCE_CHECK=true`.
  google-cloud-storage (Orbax asks it whether the bucket has a hierarchical namespace) also
  reads `STORAGE_EMULATOR_HOST` and then goes anonymous.

Usage in a test module (tests/conftest.py imports the fixture, so every test can name it)::

    def test_x(gcs_emulator):
        path = gcs_emulator.path("run")             # epath.Path('gs://bucket/run')
        subprocess.run([...], env=gcs_emulator.subprocess_env())

The emulator is `gcp-storage-emulator` (pure Python, in-memory), started as a subprocess of
this file (`python tests/gcs.py --bucket bucket`), which adds what the package (2026.7.19)
lacks:
- generation preconditions (`ifGenerationMatch` / `ifGenerationNotMatch` -> 412 / 304) on
  object reads, media uploads and deletes, and the `x-goog-generation` header on media reads:
  tensorstore's OCDBT commits its manifest by compare-and-swap and takes a read's generation
  from that header; without them Orbax fails on trees of ~100 arrays with "Error reading
  .../manifest.ocdbt: Malformed StorageGeneration" (and concurrent writers would not be
  detected). Multipart/resumable uploads (gcsfs) still ignore preconditions;
- the `objects.moveTo` call (gcsfs renames with it and retries its 501 for ~30 s before
  falling back to copy+delete);
- a longer listen backlog (the server is single-threaded and tensorstore opens many
  connections at once), buckets without soft delete (deleted checkpoints free memory), and
  quiet handling of connections gcsfs drops on purpose.

Caveats:
- tensorstore (0.1.86) reads `TENSORSTORE_GCS_HTTP_URL` when a gcs kvstore is opened, but
  picks its auth provider once per process: start the fixture before anything in the
  process opens gs:// through tensorstore. fsspec reads `FSSPEC_*` and gcsfs reads
  `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT` at import, so the fixture also patches them
  in-process (fsspec config, the `gcs`/`gs` protocol class, and the filesystem caches of
  epath (`_get_filesystem` is lru_cached), gcsfs and Orbax's `gcs_utils.get_bucket`).
  Child processes get everything from the env.
- Only the JSON/HTTP API is emulated: `TENSORSTORE_GCS_BACKEND=gcs_grpc` (Orbax) or gcsfs's
  gRPC filesystem cannot work against it, so the env pins both to HTTP.
- Each pytest(-xdist) worker process starts its own emulator (session scope).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

BUCKET = "bucket"
START_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class GcsEmulator:
    url: str  # http://127.0.0.1:PORT
    bucket: str
    env: dict  # the variables to set (already set in os.environ while the fixture lives)
    log_path: str

    def path(self, *parts: str):
        """epath.Path('gs://<bucket>/<parts...>')."""
        from etils import epath

        return epath.Path(f"gs://{self.bucket}", *parts)

    def subprocess_env(self, **extra: str) -> dict:
        """A full environment for a child process (os.environ + the emulator's variables)."""
        return {**os.environ, **self.env, **extra}

    def create_bucket(self, name: str) -> None:
        _http(f"{self.url}/storage/v1/b?project=test", {"name": name})
        _http(
            f"{self.url}/storage/v1/b/{name}",
            {"softDeletePolicy": {"retentionDurationSeconds": "0"}},
            method="PATCH",
        )

    def wipe(self) -> None:
        """Deletes every object, keeping the buckets."""
        _http(f"{self.url}/wipe?keep-buckets=1")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n:]
        except OSError:
            return ""


def emulator_env(url: str) -> dict:
    return {
        # tensorstore `gcs` driver: endpoint + fixed token (no credential search, no GCE probe).
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        # Orbax: tensorstore's HTTP `gcs` driver (its default), not `gcs_grpc`.
        "TENSORSTORE_GCS_BACKEND": "gcs",
        # gcsfs (epath's gs:// backend) and google-cloud-storage: endpoint.
        "STORAGE_EMULATOR_HOST": url,
        # fsspec config -> gcsfs.GCSFileSystem(token='anon'): no credential lookup at all.
        "FSSPEC_GCS_TOKEN": "anon",
        # gcsfs: the plain HTTP/JSON filesystem, not the gRPC "extended" one.
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        # epath: fsspec backend even where TensorFlow is installed.
        "EPATH_USE_TF": "false",
        # gcsfs/google-auth: never probe the GCE metadata server.
        "NO_GCE_CHECK": "true",
        # google-cloud-storage (and gcsfs bucket creation): a project, without asking google-auth.
        "GOOGLE_CLOUD_PROJECT": "test",
    }


def _http(url: str, body=None, method=None, timeout: float = 5.0) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


def _patch_clients(restore: dict | None = None) -> dict:
    """Makes the already-imported fsspec/gcsfs/epath/Orbax of this process follow the env:
    token='anon' and the plain GCSFileSystem for gs:// (what the env does at import), and
    empty filesystem caches. With `restore` (what the first call returned), undoes it."""
    import gcsfs.core
    from fsspec import config as fsspec_config
    from fsspec.registry import _registry

    protos = ("gcs", "gs")
    if restore is None:
        before = {p: (fsspec_config.conf.get(p), _registry.get(p)) for p in protos}
        for p in protos:
            fsspec_config.conf[p] = {**fsspec_config.conf.get(p, {}), "token": "anon"}
            _registry[p] = gcsfs.core.GCSFileSystem  # as fsspec.register_implementation(clobber=True)
    else:
        before = {}
        for p, (conf, cls) in restore.items():
            for mapping, value in ((fsspec_config.conf, conf), (_registry, cls)):
                if value is None:
                    mapping.pop(p, None)
                else:
                    mapping[p] = value
    for cls in {gcsfs.core.GCSFileSystem, *(c for _, c in (restore or before).values() if c is not None)}:
        cls.clear_instance_cache()
    try:
        from etils.epath import backend as epath_backend

        epath_backend.fsspec_backend._get_filesystem.cache_clear()
    except (ImportError, AttributeError):
        pass
    try:
        from orbax.checkpoint._src.path import gcs_utils

        gcs_utils.get_bucket.cache_clear()
    except (ImportError, AttributeError):
        pass
    return before


def _read_port(proc: subprocess.Popen, timeout: float) -> tuple:
    """(port, why): the port the child prints as its first stdout line ('PORT N'), else None
    and why not (it exited, printed something else, or said nothing within `timeout`)."""
    result = {}
    t = threading.Thread(target=lambda: result.update(line=proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if "line" not in result:
        return None, f"no port within {timeout}s"
    line = result["line"]
    if line.startswith("PORT "):
        return int(line.split()[1]), ""
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    code = proc.poll()
    why = f"exited with {code}" if code is not None else "no port"
    return None, why + (f", printed {line!r}" if line else "")


@contextlib.contextmanager
def run_emulator(bucket: str = BUCKET, timeout: float = START_TIMEOUT_S):
    """Starts the emulator subprocess, sets the env; yields a GcsEmulator; stops it."""
    try:
        import gcp_storage_emulator  # noqa: F401
        import gcsfs  # noqa: F401
    except ImportError as e:
        raise RuntimeError(
            f"GCS emulator tests need the `gcp-storage-emulator` and `gcsfs` packages "
            f"(pip install -e '.[test]'): {e}"
        ) from e
    workdir = tempfile.mkdtemp(prefix="gcs_emulator_")
    log_path = os.path.join(workdir, "emulator.log")
    log = open(log_path, "wb")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STORAGE_EMULATOR", "TENSORSTORE_GCS"))}
    proc = subprocess.Popen(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--bucket",
            bucket,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--exit-with-parent",
            "--remove-dir",
            workdir,
        ],
        cwd=workdir,
        env=env,
        stdin=subprocess.PIPE,  # the child exits when this closes, e.g. when pytest is killed
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    saved = None
    try:
        port, why = _read_port(proc, timeout)

        def fail(why):
            log.flush()
            with open(log_path, errors="replace") as f:
                tail = f.read()[-4000:]
            raise RuntimeError(f"GCS emulator did not start: {why}\n--- its log (tail) ---\n{tail}")

        if port is None:
            fail(why)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                _http(f"{url}/storage/v1/b/{bucket}", timeout=2.0)
                break
            except (urllib.error.URLError, OSError) as e:
                if proc.poll() is not None:
                    fail(f"exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    fail(f"{url} did not answer within {timeout}s ({e})")
                time.sleep(0.05)

        variables = emulator_env(url)
        saved = {k: os.environ.get(k) for k in variables}
        os.environ.update(variables)
        patched = _patch_clients()
        yield GcsEmulator(url=url, bucket=bucket, env=variables, log_path=log_path)
    finally:
        if saved is not None:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _patch_clients(restore=patched)
        proc.stdin.close()
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def gcs_emulator():
    """Session-wide GCS emulator with bucket `bucket`; env set for this process and children."""
    cm = run_emulator()
    try:
        emulator = cm.__enter__()
    except RuntimeError as e:
        error = str(e)
    else:
        error = None
    if error is not None:
        pytest.fail(error, pytrace=False)
    try:
        yield emulator
    finally:
        cm.__exit__(None, None, None)


# --- the emulator process -------------------------------------------------------------------


def _exit_on_stdin_eof(remove_dir: str | None) -> None:
    """Ends this process once stdin closes (the parent stopped us, or died)."""

    def watch():
        while os.read(0, 1 << 16):  # the raw fd: no buffer lock held at interpreter exit
            pass
        if remove_dir:
            shutil.rmtree(remove_dir, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _serve(host: str, port: int, buckets: list, log_level: str) -> None:
    import logging
    from http import HTTPStatus, server as http_server

    from gcp_storage_emulator import server as emu_server
    from gcp_storage_emulator import settings
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import buckets as emu_buckets
    from gcp_storage_emulator.handlers import objects as emu_objects

    logging.basicConfig(
        level=log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )

    def move(request, response, storage, *args, **kwargs):
        """objects.moveTo (same bucket): copy, then delete the source."""
        bucket, src, dst = (request.params[k] for k in ("bucket_name", "object_id", "dest_object_id"))
        try:
            dest = emu_objects._copy(request.base_url, storage, bucket, src, bucket, dst)
            storage.delete_file(bucket, src)
        except NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        response.json(dest)

    # Generation preconditions and the `x-goog-generation` header, which the package lacks and
    # tensorstore relies on: OCDBT commits its manifest by compare-and-swap (ifGenerationMatch,
    # 412 when lost), revalidates cached reads (ifGenerationNotMatch, 304), and takes a ranged
    # read's generation from the header (without it: "Malformed StorageGeneration").
    def current_generation(storage, bucket, name):
        try:
            return int(storage.get_file_obj(bucket, name)["generation"])
        except (NotFound, KeyError, TypeError, ValueError):
            return None

    def precondition_failed(request, current, read):
        """The status for a failed ifGeneration(Not)Match, or None when it holds."""

        def arg(key):
            value = request.query.get(key)
            return int(value[0]) if value else None

        match, not_match = arg("ifGenerationMatch"), arg("ifGenerationNotMatch")
        if match is not None and (current is not None if match == 0 else current != match):
            return HTTPStatus.PRECONDITION_FAILED
        if not_match is not None and current is not None and current == not_match:
            return HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
        return None

    def refuse(request, response, status):
        request.data  # noqa: B018  (read the body before answering)
        response.status = status
        if status == HTTPStatus.PRECONDITION_FAILED:
            response.json({"error": {"code": 412, "message": "conditionNotMet"}})

    def wrap_read(handler):
        def read(request, response, storage, *args, **kwargs):
            bucket, name = request.params["bucket_name"], request.params["object_id"]
            current = current_generation(storage, bucket, name)
            if current is not None:
                status = precondition_failed(request, current, read=True)
                if status is not None:
                    return refuse(request, response, status)
            handler(request, response, storage, *args, **kwargs)
            if current is not None and response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
                response["x-goog-generation"] = str(current)
                response["x-goog-metageneration"] = "1"

        return read

    def wrap_write(handler, name_of):
        def write(request, response, storage, *args, **kwargs):
            name = name_of(request)
            if name is not None:
                current = current_generation(storage, request.params["bucket_name"], name)
                status = precondition_failed(request, current, read=False)
                if status is not None:
                    return refuse(request, response, status)
            return handler(request, response, storage, *args, **kwargs)

        return write

    def upload_name(request):  # uploadType=media names the object in the query
        names = request.query.get("name")
        return names[0] if names else None

    wrapped = {
        emu_objects.get: wrap_read(emu_objects.get),
        emu_objects.download: wrap_read(emu_objects.download),
        emu_objects.insert: wrap_write(emu_objects.insert, upload_name),
        emu_objects.delete: wrap_write(emu_objects.delete, lambda r: r.params["object_id"]),
    }
    routes = tuple(
        (regex, {method: wrapped.get(fn, fn) for method, fn in handlers.items()})
        for regex, handlers in emu_server.HANDLERS
    )
    move_routes = tuple(
        (
            rf"^{prefix}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
            rf"/moveTo/o/(?P<dest_object_id>.*[^/]+)$",
            {emu_server.POST: move},
        )
        for prefix in (settings.API_ENDPOINT, "")
    )
    emu_server.HANDLERS = move_routes + routes
    emu_objects.insert = wrapped[emu_objects.insert]  # the router's fallback for bare /o uploads

    # The server is single-threaded: let concurrent connections queue instead of being dropped.
    http_server.HTTPServer.request_queue_size = 512
    # gcsfs races a GET and a LIST for `info()` and drops the loser's connection: not an error.
    base_handle_error = http_server.HTTPServer.handle_error

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            base_handle_error(self, request, client_address)

    http_server.HTTPServer.handle_error = handle_error

    emu = emu_server.create_server(host, port, in_memory=True)
    storage = emu._storage
    for name in buckets:
        emu_buckets.create_bucket(name, storage)
        storage.buckets[name]["softDeletePolicy"] = {"retentionDurationSeconds": "0"}
    emu.start()
    print(f"PORT {emu._api._httpd.server_address[1]}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed as 'PORT N')")
    parser.add_argument("--bucket", action="append", default=[])
    parser.add_argument(
        "--log-level",
        default=os.environ.get("GCS_EMULATOR_LOG_LEVEL", "WARNING"),
        help="INFO logs every request (default: $GCS_EMULATOR_LOG_LEVEL or WARNING)",
    )
    parser.add_argument("--exit-with-parent", action="store_true", help="exit when stdin closes")
    parser.add_argument("--remove-dir", help="with --exit-with-parent: a folder to delete on exit")
    args = parser.parse_args()
    if args.exit_with_parent:
        _exit_on_stdin_eof(args.remove_dir)
    _serve(args.host, args.port, args.bucket or [BUCKET], args.log_level)


if __name__ == "__main__":
    main()
