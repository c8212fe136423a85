"""Real slide stores for tests, each started on 127.0.0.1 (a free port) and stopped by the
test: nginx (HTTP Range, from Debian's package), moto's S3 server (its own venv, `make
tools`), and Orthanc with its DICOMweb plugin (Debian's packages; OrthancWSIDicomizer from
orthanc-wsi converts a slide into DICOM-WSI and uploads it). ``make test`` installs the
Debian packages (``make system-deps``); a test without them skips and says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from _servers import free_port, stop_process
from _tools import tool_bin

ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")
ORTHANC_USER, ORTHANC_PASSWORD = "lab", "s3cret-pacs"
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


def system_program(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                  else None)
    if path is None:
        pytest.skip(f"{name} is not installed: `make system-deps` installs it (make test "
                    "runs it; needs root and apt-get)")
    return path


def _wait_http(url: str, proc: subprocess.Popen[bytes], what: str,
               auth: tuple[str, str] | None = None, verify: bool = True) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            httpx.get(url, auth=auth, timeout=2, verify=verify)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not start")


@dataclass
class Nginx:
    url: str
    www: Path
    access_log: Path

    def bytes_sent(self) -> int:
        """Body bytes nginx sent so far, from its own access log."""
        return sum(int(line.split()[1]) for line in self.access_log.read_text().splitlines())

    def requests(self) -> list[str]:
        """``<status> <bytes> <method> <Range>`` of every request so far."""
        return self.access_log.read_text().splitlines()


def self_signed_certificate(work: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, signed by itself (so it is also its own CA)."""
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        [system_program("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
         "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@contextmanager
def nginx(www: Path, work: Path, *, tls: tuple[Path, Path] | None = None,
          proxy_dicomweb: str | None = None) -> Iterator[Nginx]:
    """nginx serving ``www`` (static files answer HTTP Range natively); with ``tls``
    (certificate, key) over HTTPS, and with ``proxy_dicomweb`` forwarding /dicom-web/ to
    that server (a PACS behind a TLS front end, as labs deploy them)."""
    program = system_program("nginx")
    port = free_port()
    listen = f"127.0.0.1:{port}" + (" ssl" if tls else "")
    extra = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else ""
    if proxy_dicomweb:
        extra += f" location /dicom-web/ {{ proxy_pass {proxy_dicomweb}/dicom-web/; }}"
    (work / "tmp").mkdir(parents=True, exist_ok=True)
    log = work / "access.log"
    log.touch()
    conf = work / "nginx.conf"
    # As root, nginx's workers would drop to an account that cannot read pytest's 0700 dirs.
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(f"""daemon off;
{user}pid {work}/nginx.pid;
error_log {work}/error.log;
events {{}}
http {{
  log_format ranges '$status $body_bytes_sent $request_method "$http_range"';
  access_log {log} ranges;
  client_body_temp_path {work}/tmp; proxy_temp_path {work}/tmp;
  fastcgi_temp_path {work}/tmp; uwsgi_temp_path {work}/tmp; scgi_temp_path {work}/tmp;
  server {{ listen {listen}; root {www}; {extra} }}
}}
""")
    proc = subprocess.Popen([program, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    scheme = "https" if tls else "http"
    try:
        _wait_http(f"{scheme}://127.0.0.1:{port}/", proc, "nginx", verify=False)
        yield Nginx(f"{scheme}://127.0.0.1:{port}", www, log)
    finally:
        stop_process(proc)


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3-compatible server; yields its endpoint URL."""
    program = tool_bin("moto", "moto_server")
    port = free_port()
    proc = subprocess.Popen([str(program), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_http(f"http://127.0.0.1:{port}/", proc, "moto")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@dataclass
class Orthanc:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        """The server as a slide root (no TLS on loopback)."""
        return f"dicomweb+http://127.0.0.1:{self.port}/dicom-web"

    def series_url(self, study: str, series: str) -> str:
        return f"{self.dicomweb}/studies/{study}/series/{series}"

    def stop(self) -> None:
        stop_process(self.proc)

    def crash(self) -> None:
        """SIGKILL: gone at once (SIGTERM lets Orthanc finish a busy keep-alive connection)."""
        self.proc.kill()
        self.proc.wait(timeout=10)


@contextmanager
def orthanc(storage: Path) -> Iterator[Orthanc]:
    """Orthanc with DICOMweb, HTTP basic auth, its storage in ``storage``."""
    program = system_program("Orthanc")
    plugin = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"
    if not plugin.exists():
        pytest.skip(f"{plugin} is missing: `make system-deps` installs orthanc-dicomweb")
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = storage / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "wsi-sampler-test", "StorageDirectory": str(storage / "db"),
        "IndexDirectory": str(storage / "db"), "HttpPort": port, "DicomServerEnabled": False,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True,
        "RegisteredUsers": {ORTHANC_USER: ORTHANC_PASSWORD}, "Plugins": [str(plugin)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}))
    proc = subprocess.Popen([program, str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    server = Orthanc(port, proc)
    try:
        _wait_http(f"{server.rest}/system", proc, "Orthanc", (ORTHANC_USER, ORTHANC_PASSWORD))
        yield server
    finally:
        server.stop()


def dicomize(server: Orthanc, slide: Path, work: Path, *, width_mm: float,
             height_mm: float, label: str) -> tuple[str, str]:
    """Convert ``slide`` to DICOM-WSI with OrthancWSIDicomizer, straight into ``server``;
    return its (study, series) UIDs. The specimen size sets the pixel spacing (Orthanc's
    slide axes are the image's rotated: its width is the image height)."""
    program = system_program("OrthancWSIDicomizer")
    dataset = work / f"{label}.json"
    dataset.write_text(json.dumps({
        "PatientID": label, "PatientName": "TEST^SLIDE", "StudyID": label,
        "SeriesNumber": "1", "SeriesDescription": label,
        "ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE", "ContainerIdentifier": label,
        "SpecimenLabelInImage": "NO", "BurnedInAnnotation": "NO"}))
    subprocess.run(
        [program, str(slide), "--orthanc", server.rest + "/", "--username", ORTHANC_USER,
         "--password", ORTHANC_PASSWORD, "--dataset", str(dataset), "--max-size", "0",
         "--imaged-width", str(height_mm), "--imaged-height", str(width_mm), "--threads", "2"],
        check=True, capture_output=True, timeout=300)
    return _series_of(server, {"PatientID": label})


def upload_dicom(server: Orthanc, file: Path) -> tuple[str, str]:
    """POST a DICOM file to Orthanc's REST API; return its (study, series) UIDs."""
    auth = (ORTHANC_USER, ORTHANC_PASSWORD)
    stored = httpx.post(f"{server.rest}/instances", content=file.read_bytes(), auth=auth,
                        timeout=60)
    stored.raise_for_status()
    series = httpx.get(f"{server.rest}/series/{stored.json()['ParentSeries']}", auth=auth).json()
    study = httpx.get(f"{server.rest}/studies/{series['ParentStudy']}", auth=auth).json()
    return (study["MainDicomTags"]["StudyInstanceUID"],
            series["MainDicomTags"]["SeriesInstanceUID"])


def _series_of(server: Orthanc, query: dict[str, str]) -> tuple[str, str]:
    rows = httpx.get(f"{server.rest}/dicom-web/series", params=query,
                     auth=(ORTHANC_USER, ORTHANC_PASSWORD), timeout=30).json()
    assert len(rows) == 1, rows
    return rows[0]["0020000D"]["Value"][0], rows[0]["0020000E"]["Value"][0]
