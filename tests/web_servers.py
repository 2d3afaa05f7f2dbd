"""Static web servers holding a repository's metadata/ and targets/, for the HTTP transport's tests:
the fleet service's own (``fleet serve --http-repo``: Starlette's StaticFiles on uvicorn) and nginx
(Debian's nginx-light; skipped, naming the package, where it is not installed)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edgeopt.fleet.repo_web import RepoWeb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FleetRepoWeb:
    def __init__(self, root: Path):
        self.web = RepoWeb(root, "127.0.0.1:0").start()
        self.url = self.web.url

    def stop(self) -> None:
        self.web.stop()


class Nginx:
    """nginx in the foreground, one process (no worker user that could not read pytest's 0700 folders),
    serving ROOT/metadata/ and ROOT/targets/ — and nothing else of ROOT (its keys/)."""

    def __init__(self, root: Path, workdir: Path):
        exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
        if exe is None:
            pytest.skip("nginx is not installed (Debian: apt-get install nginx-light)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = workdir / "nginx.conf"
        conf.write_text(f"""daemon off;
master_process off;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    types {{ application/json json; }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        location /metadata/ {{ alias {root}/metadata/; }}
        location /targets/ {{ alias {root}/targets/; }}
        location / {{ return 404; }}
    }}
}}
""")
        self.proc = subprocess.Popen([exe, "-p", str(workdir), "-c", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                self.stop()
                raise RuntimeError(f"nginx did not start: {err or (workdir / 'error.log').read_text()}")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def static_server(root: Path, workdir: Path):
    """nginx serving the repository at ``root`` where it is installed, else the fleet service's own
    server (the tests that use it are about the agent or the fleet, not about which server it is)."""
    try:
        return Nginx(root, workdir / "nginx")
    except pytest.skip.Exception:
        return FleetRepoWeb(root)


def self_signed(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key (cert.pem, key.pem in ``tmp_path``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    return tmp_path / "cert.pem", tmp_path / "key.pem"
